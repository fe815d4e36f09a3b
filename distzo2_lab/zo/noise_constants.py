"""The constants of the counter-based noise (:mod:`distzo2_lab.zo.noise`), shared by its torch
definition and its Triton kernels so that both compute with the same fp32 values."""
from __future__ import annotations

import math
import struct


def f32(x: float) -> float:
    """x rounded to the nearest fp32 (so torch, Inductor and Triton all see the same constant)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _i32(u: int) -> int:
    """An unsigned 32-bit word as the signed int32 with the same bits."""
    u &= 0xFFFFFFFF
    return u - (1 << 32) if u >= 1 << 31 else u


M1, M2 = 0x7FEB352D, 0x846CA68B  # lowbias32 multipliers
SQRT2 = f32(math.sqrt(2.0))
LN2 = f32(math.log(2.0))
LN_C = [f32(2.0 / k) for k in (3, 5, 7, 9)]  # ln m = 2s + s^3 (2/3 + 2/5 s^2 + 2/7 s^4 + 2/9 s^6)
_H = math.pi / 2  # cos / sin of (pi/2) f, |f| <= 1/2: Taylor coefficients times (pi/2)^k
COS_C = [f32((-1) ** k * _H ** (2 * k) / math.factorial(2 * k)) for k in range(5)]
SIN_C = [f32((-1) ** k * _H ** (2 * k + 1) / math.factorial(2 * k + 1)) for k in range(5)]
TWO_M24, TWO_M22 = 2.0 ** -24, 2.0 ** -22
PAIR_SHIFT = 19  # gaussian pairs: element i and i + 2**19 of each aligned block of 2**20 (noise.pair_of)
