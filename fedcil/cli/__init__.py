"""The console entry points, above the library: ``fcil-run`` (:mod:`fedcil.cli.run`),
``fcil-sweep`` (:mod:`fedcil.cli.sweep`), ``fcil-report`` (:mod:`fedcil.cli.report`) and
``fcil-pretrain`` (:mod:`fedcil.cli.pretrain`). Nothing below this package imports it."""
