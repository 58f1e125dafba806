"""Authenticated secure-aggregation keys: a node signs the keys it advertises with its SuperNode
authentication key, and its peers accept only keys signed by a key registered at deployment.

Without it the server relays public keys it could swap for its own, and then reads every
share encrypted for them, or joins fake clients to a round. With it, the server can still
drop and delay messages, but every key a client encrypts for or checks a signature against
belongs to a registered node, in this round (the session) and under that node id.

Two environment variables of the process that runs the node's ClientApps (with process
isolation, the node's ``flower-superexec``: where the files are) turn it on, both or neither:

- ``FEDCIL_SECAGG_IDENTITY_KEY``: the path of the node's private key, the one it
  authenticates to the SuperLink with (``flower-supernode --auth-supernode-private-key``;
  OpenSSH or PEM);
- ``FEDCIL_SECAGG_TRUSTED_KEYS``: the path of a file of the public keys registered with the
  SuperLink, one OpenSSH public key per line (``#`` starts a comment).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcil.errors import ConfigError

IDENTITY_KEY, TRUSTED_KEYS = "FEDCIL_SECAGG_IDENTITY_KEY", "FEDCIL_SECAGG_TRUSTED_KEYS"
SIGNED_KEYS = ("encryption-key", "mask-key", "signing-key")  # what a node's identity signature covers, with the session and node id


@dataclass(frozen=True)
class Identity:
    """A node's SuperNode key (to sign its keys) and the registered public keys it accepts signatures from."""

    private: ec.EllipticCurvePrivateKey
    trusted: frozenset[bytes]  # OpenSSH public keys, without comments

    @property
    def public(self) -> bytes:
        return openssh_public(self.private.public_key())


def fresh_federation(nodes: Iterable[int]) -> dict[int, Identity]:
    """A new key per node, every node trusting every node's key: a registered federation in memory."""
    private = {node: ec.generate_private_key(ec.SECP384R1()) for node in nodes}
    trusted = frozenset(openssh_public(key.public_key()) for key in private.values())
    return {node: Identity(key, trusted) for node, key in private.items()}


def openssh_public(key: ec.EllipticCurvePublicKey) -> bytes:
    """``key`` as one OpenSSH line without a comment (``ecdsa-sha2-nistp384 AAAA...``)."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def keys_message(session: bytes, node: int, keys: Mapping[str, bytes]) -> bytes:
    """What ``node`` signs in round ``session``: its three public keys, each with its length."""
    parts = [b"fedcil-secagg-keys", struct.pack(">H", len(session)), session, struct.pack(">Q", node % 2**64)]
    for name in SIGNED_KEYS:
        parts += [struct.pack(">I", len(keys[name])), keys[name]]
    return b"".join(parts)


def sign_keys(identity: Identity, session: bytes, node: int, keys: Mapping[str, bytes]) -> bytes:
    """``node``'s ECDSA (SHA-256) signature of its keys in round ``session``."""
    return identity.private.sign(keys_message(session, node, keys), ec.ECDSA(hashes.SHA256()))


def signed_by(public: bytes, signature: bytes, session: bytes, node: int, keys: Mapping[str, bytes]) -> bool:
    """Whether ``signature`` is the signature of ``node``'s keys in round ``session`` by the OpenSSH key ``public``."""
    try:
        key = serialization.load_ssh_public_key(public)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        key.verify(signature, keys_message(session, node, keys), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError, TypeError, struct.error):
        return False
    return True


def identity_of(environ: Mapping[str, str]) -> Identity | None:
    """The node's :class:`Identity` from the environment, or None when it sets neither variable."""
    paths = {name: environ.get(name) for name in (IDENTITY_KEY, TRUSTED_KEYS)}
    if not any(paths.values()):
        return None
    if not all(paths.values()):
        given, missing = (IDENTITY_KEY, TRUSTED_KEYS) if paths[IDENTITY_KEY] else (TRUSTED_KEYS, IDENTITY_KEY)
        raise ConfigError(f"{given} is set without {missing}: authenticated secure aggregation needs both")
    return load_identity(str(paths[IDENTITY_KEY]), str(paths[TRUSTED_KEYS]))


@lru_cache(maxsize=4)
def load_identity(private_path: str, trusted_path: str) -> Identity:
    """The :class:`Identity` of a private key file and a file of trusted public keys."""
    private = load_private_key(private_path)
    trusted = frozenset(trusted_keys(trusted_path))
    identity = Identity(private, trusted)
    if identity.public not in trusted:
        raise ConfigError(f"{TRUSTED_KEYS}={trusted_path} does not hold the public key of {IDENTITY_KEY}={private_path}")
    return identity


def load_private_key(path: str) -> ec.EllipticCurvePrivateKey:
    """An elliptic-curve private key from an OpenSSH or PEM file, unencrypted."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{IDENTITY_KEY}={path}: {exc.strerror}") from None
    loader = serialization.load_ssh_private_key if b"OPENSSH PRIVATE KEY" in data else serialization.load_pem_private_key
    try:
        key = loader(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{IDENTITY_KEY}={path}: not an unencrypted OpenSSH or PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{IDENTITY_KEY}={path}: a {type(key).__name__}; valid choices: an elliptic-curve key "
                          "(ssh-keygen -t ecdsa), as SuperNode authentication uses")
    return key


def trusted_keys(path: str) -> list[bytes]:
    """The OpenSSH public keys of a file, one per line (comments and blank lines skipped)."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"{TRUSTED_KEYS}={path}: {exc.strerror}") from None
    keys = []
    for number, line in enumerate(lines, 1):
        line = line.split(b"#", 1)[0].strip()
        if not line:
            continue
        try:
            key = serialization.load_ssh_public_key(b" ".join(line.split()[:2]))
        except (ValueError, TypeError, IndexError):
            raise ConfigError(f"{TRUSTED_KEYS}={path} line {number}: not an OpenSSH public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError(f"{TRUSTED_KEYS}={path} line {number}: not an elliptic-curve key")
        keys.append(openssh_public(key))
    if not keys:
        raise ConfigError(f"{TRUSTED_KEYS}={path}: no public key in it")
    return keys
