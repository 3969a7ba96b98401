"""cos and sin of one argument with no branches, so that a loop over units vectorizes.

``math.cos`` / ``math.sin`` in a numba loop call libm once per element: no SIMD (numba's
vector math library, SVML, needs a patched LLVM that PyPI's llvmlite is not). The OIM kernels
take cos and sin of every phase at every step, so the calls were a third of a float32 step
and most of a float64 one. :func:`sincos` is fdlibm's algorithm written without branches:

- reduction by pi/2: k = round(x 2/pi), r = x - k pi/2 with pi/2 in three parts
  (Cody and Waite; exact for |x| up to about 2^20, far beyond any phase a relaxation
  reaches before it is wrapped);
- fdlibm's minimax polynomials ``__kernel_sin`` / ``__kernel_cos`` on [-pi/4, pi/4];
- the quadrant k mod 4 picks and signs the two results by selects, not jumps.

Error at most 1 ulp in float64 (measured max |error| 1.1e-16 against numpy over [-60, 60]),
bit-equal to libm on about three quarters of the arguments.

:func:`sincos_single` is the same scheme for a float32 argument, with the shorter minimax
polynomials of musl's ``__sindf`` / ``__cosdf`` (four terms each, evaluated in float64):
|error| below 6e-11, far under a float32 ulp (6e-8 at 1), at about two thirds of the cost.
:func:`sincos_like` picks one by the dtype of the array the argument comes from (a compile-time
constant, so the choice costs nothing in a kernel).
"""

from __future__ import annotations

import math

import numba
import numpy as np

_S1 = -1.66666666666666324348e-01
_S2 = 8.33333333332248946124e-03
_S3 = -1.98412698298579493134e-04
_S4 = 2.75573137070700676789e-06
_S5 = -2.50507602534068634195e-08
_S6 = 1.58969099521155010221e-10
_C1 = 4.16666666666666019037e-02
_C2 = -1.38888888888741095749e-03
_C3 = 2.48015872894767294178e-05
_C4 = -2.75573143513906633035e-07
_C5 = 2.08757232129817482790e-09
_C6 = -1.13596475577881948265e-11
# musl __sindf.c / __cosdf.c: |sin(r)/r - s(r)| < 4.9e-12, |cos(r) - c(r)| < 5.4e-11 on
# |r| <= pi/4
_S1F = -0.166666666416265235595
_S2F = 0.0083333293858894631756
_S3F = -0.000198393348360966317347
_S4F = 0.0000027183114939898219064
_C0F = -0.499999997251031003120
_C1F = 0.0416666233237390631894
_C2F = -0.00138867637746099294692
_C3F = 0.0000243904487962774090654
_TWO_OVER_PI = 6.36619772367581382433e-01
_PIO2_1 = 1.57079632673412561417e+00  # first 33 bits of pi/2
_PIO2_2 = 6.07710050630396597660e-11  # next 33 bits
_PIO2_3 = 2.02226624879595063154e-21  # the rest


@numba.njit(cache=True, inline="always")
def sincos(x):
    """(cos x, sin x) in float64 for a float32 or float64 x, without branches."""
    v = float(x)
    k = math.floor(v * _TWO_OVER_PI + 0.5)
    r = ((v - k * _PIO2_1) - k * _PIO2_2) - k * _PIO2_3
    z = r * r
    sin_r = r + r * z * (_S1 + z * (_S2 + z * (_S3 + z * (_S4 + z * (_S5 + z * _S6)))))
    cos_r = 1.0 - 0.5 * z + z * z * (_C1 + z * (_C2 + z * (_C3 + z * (_C4 + z * (_C5
                                                                              + z * _C6)))))
    return _by_quadrant(k, cos_r, sin_r)


@numba.njit(cache=True, inline="always")
def sincos_single(x):
    """(cos x, sin x) in float64, accurate to float32 (|error| < 6e-11), without branches:
    for the float32 kernels. The reduction is :func:`sincos`'s (in float64, pi/2 in two
    parts: a float32 x needs no third)."""
    v = float(x)
    k = math.floor(v * _TWO_OVER_PI + 0.5)
    r = (v - k * _PIO2_1) - k * _PIO2_2
    z = r * r
    w = z * z
    sin_r = (r + r * z * (_S1F + z * _S2F)) + r * z * w * (_S3F + z * _S4F)
    cos_r = ((1.0 + z * _C0F) + w * _C1F) + w * z * (_C2F + z * _C3F)
    return _by_quadrant(k, cos_r, sin_r)


@numba.njit(cache=True, inline="always")
def sincos_like(values, x):
    """:func:`sincos_single` of ``x`` if ``values`` (the array x is read from) is float32,
    else :func:`sincos`."""
    if values.itemsize == 4:
        return sincos_single(x)
    return sincos(x)


@numba.njit(cache=True, inline="always")
def _by_quadrant(k, cos_r, sin_r):
    """cos x and sin x from cos r and sin r, x = r + k pi/2, by selects."""
    quadrant = np.int64(k) & 3
    odd = (quadrant & 1) == 1
    first = cos_r if odd else sin_r  # sin x, up to its sign
    second = sin_r if odd else cos_r  # cos x, up to its sign
    sin_x = -first if quadrant >= 2 else first
    cos_x = -second if (quadrant == 1 or quadrant == 2) else second
    return cos_x, sin_x
