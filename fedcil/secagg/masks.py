"""The cryptography of secure aggregation: key agreement, masks, encrypted Shamir shares.

Flower's primitives do the work: elliptic-curve key pairs (SECP384R1) and their
serialisation, ECDH + HKDF shared keys, Fernet authenticated encryption, Shamir's secret
sharing and the share plaintext layout. Masks come from AES-256 in counter mode keyed by
SHA-256 of the seed: Flower's ``pseudo_rand_gen`` folds its seed into 32 bits, which a
server could search exhaustively to strip a self-mask.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
    sign_message,
    verify_signature,
)

from fedcil.secagg.encoding import UNSIGNED

SEED_BYTES = 32
SCALAR_BYTES = 48  # a SECP384R1 private key's secret


def mask(seed: bytes, session: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform integers modulo ``2**bits`` drawn from ``seed`` for one round (``session``)."""
    key = hashlib.sha256(session + seed).digest()
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(length * bits // 8))
    return np.frombuffer(stream, dtype=UNSIGNED[bits])


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh (private, public) key pair, serialised."""
    private, public = generate_key_pairs()
    return private_key_to_bytes(private), public_key_to_bytes(public)


def public_of(private: bytes) -> bytes:
    """The serialised public key of a serialised private key."""
    return public_key_to_bytes(bytes_to_private_key(private).public_key())


def private_scalar(private: bytes) -> bytes:
    """The 48-byte secret scalar of a serialised private key: what its Shamir shares carry."""
    return bytes_to_private_key(private).private_numbers().private_value.to_bytes(SCALAR_BYTES, "big")


def private_from_scalar(scalar: bytes) -> bytes:
    """The serialised private key of a secret scalar (:func:`private_scalar`'s inverse)."""
    return private_key_to_bytes(ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1()))


def shared_secret(private: bytes, public: bytes) -> bytes:
    """The secret two parties agree on from one's private key and the other's public key."""
    return generate_shared_key(bytes_to_private_key(private), bytes_to_public_key(public))


def new_seed() -> bytes:
    """A fresh self-mask seed."""
    return os.urandom(SEED_BYTES)


def commitment(secret: bytes) -> bytes:
    """What a client publishes of its self-mask seed, so that a rebuilt seed can be checked."""
    return hashlib.sha256(b"fedcil-secagg-seed" + secret).digest()


def survivors_message(session: bytes, survivors: list[int]) -> bytes:
    """What a client signs to say that ``survivors`` (sorted) sent a vector in round ``session``."""
    return b"fedcil-secagg-survivors" + session + ",".join(map(str, sorted(survivors))).encode()


def sign(private: bytes, message: bytes) -> bytes:
    """An ECDSA (SHA-256) signature of ``message`` with a serialised private key."""
    return sign_message(bytes_to_private_key(private), message)


def verifies(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the serialised public key's signature of ``message`` (False on malformed input)."""
    try:
        return verify_signature(bytes_to_public_key(public), message, signature)
    except Exception:  # a malformed key or signature
        return False


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """``holders`` Shamir shares of ``secret``, any ``threshold`` of which rebuild it."""
    return create_shares(secret, threshold, holders)


def rebuild_secret(shares: list[bytes]) -> bytes:
    """The secret of at least ``threshold`` shares (garbage, or ValueError, from bad shares)."""
    return combine_shares(shares)


def seal_shares(key: bytes, src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    """``src``'s shares for ``dst``, encrypted and authenticated under their shared ``key``."""
    return encrypt(key, share_keys_plaintext_concat(src, dst, seed_share, key_share))


def open_shares(key: bytes, ciphertext: bytes) -> tuple[int, int, bytes, bytes]:
    """``(src, dst, seed share, key share)`` of :func:`seal_shares` (raises on any tampering)."""
    return share_keys_plaintext_separate(decrypt(key, ciphertext))
