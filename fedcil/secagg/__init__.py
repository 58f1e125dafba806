"""Secure aggregation (SecAgg+, Bell et al. 2020) on Flower's Message API.

- :mod:`fedcil.secagg.encoding`: fixed-point encoding of a reply and its error bound;
- :mod:`fedcil.secagg.masks`: key agreement, masks and secret shares (Flower's primitives);
- :mod:`fedcil.secagg.identity`: keys signed with a node's SuperNode key, checked against the registered ones;
- :mod:`fedcil.secagg.client`: a client's side of the five stages;
- :mod:`fedcil.secagg.server`: the server's side (:mod:`server_app.secure` drives it).

Nothing here imports torch: the ClientApp runs the protocol in Flower's own process.
"""
