"""Fixed-point encoding of real vectors into integers modulo ``2**bits``, and its error bound.

A reply is a list of segments (one per tensor, then the example count and the loss sum).
Every client reveals, per segment, the exponent ``e`` of a power of two that bounds its
entries (``max |x| <= 2**e``); the server takes each segment's largest exponent over the
round's clients and every client encodes with it::

    q = round(x * 2**(b - e)),   b = bits - 2 - ceil(log2 K)      (K: clients in the sum)

so ``|q| <= 2**b`` and a sum of up to ``K`` encodings stays below ``2**(bits - 2)`` in
magnitude: it never wraps around the modulus. Decoding the sum of the encodings gives the
exact sum of the clients' float64 vectors within::

    K * (2**(e - b - 1) + 2**(e - 52))      per entry

the first term for the rounding of each encoding (half a step), the second for float64's
rounding of the decoded sum (at most ``K * 2**e`` in magnitude). With 64 bits and 50
clients that is ``50 * 2**-52`` of the segment's range: float64's own precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODULUS_BITS = (32, 64)
MIN_EXPONENT = -126  # below 2**-126 every entry rounds to 0, whatever its range
UNSIGNED = {32: np.uint32, 64: np.uint64}


def range_exponent(values: np.ndarray) -> int:
    """The smallest ``e >= MIN_EXPONENT`` with ``max |values| <= 2**e``: the range a client reveals."""
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak == 0.0:
        return MIN_EXPONENT
    mantissa, exponent = math.frexp(peak)  # peak = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return max(MIN_EXPONENT, exponent - 1 if mantissa == 0.5 else exponent)


def fraction_bits(bits: int, clients: int) -> int:
    """``b``: the bits of an encoding that keep a sum of ``clients`` encodings from wrapping."""
    return bits - 2 - math.ceil(math.log2(max(1, clients)))


@dataclass(frozen=True)
class FixedPoint:
    """The encoding of one round: modulus ``2**bits``, at most ``clients`` terms, one exponent per segment."""

    bits: int
    clients: int
    exponents: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.bits not in MODULUS_BITS:
            raise ValueError(f"modulus bits {self.bits!r}; valid choices: {', '.join(map(str, MODULUS_BITS))}")
        if len(self.exponents) != len(self.sizes):
            raise ValueError(f"{len(self.exponents)} exponents for {len(self.sizes)} segments")

    @property
    def length(self) -> int:
        return sum(self.sizes)

    @property
    def dtype(self) -> type:
        return UNSIGNED[self.bits]

    def _ranges(self) -> np.ndarray:
        """Per entry, its segment's range ``2**e``."""
        return np.repeat(np.ldexp(1.0, np.array(self.exponents, dtype=np.int64)), self.sizes)

    def _steps(self) -> np.ndarray:
        """Per entry, the value of one unit of its encoding: ``2**(e - b)``."""
        b = fraction_bits(self.bits, self.clients)
        return np.repeat(np.ldexp(1.0, np.array(self.exponents, dtype=np.int64) - b), self.sizes)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """``values`` (float64, clipped to their segments' ranges) as integers modulo ``2**bits``."""
        if values.shape != (self.length,):
            raise ValueError(f"a vector of {values.shape} entries, the encoding has {self.length}")
        ranges = self._ranges()
        steps = np.rint(np.clip(values, -ranges, ranges) / self._steps()).astype(np.int64)
        return steps.astype(self.dtype)  # two's complement: negative steps wrap modulo 2**bits

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float64 sum of the vectors whose encodings add up (modulo ``2**bits``) to ``total``."""
        signed = total.astype(np.uint64).astype(np.int64)
        if self.bits < 64:
            signed = np.where(signed >= 2 ** (self.bits - 1), signed - 2**self.bits, signed)
        return signed.astype(np.float64) * self._steps()

    def error_bound(self) -> np.ndarray:
        """Per entry, the most a decoded sum of ``clients`` encodings differs from the exact sum."""
        return self.clients * (self._steps() / 2 + self._ranges() * 2.0**-52)
