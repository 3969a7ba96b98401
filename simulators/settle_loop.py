"""The one step loop of the integrating simulators (OIM, polariton lattice).

A simulator gives two numba functions over one sample's ``work`` tuple (its arrays and
constants): ``measure(work)``, the residual of the current state (and whatever the next step
reads, e.g. the forces), and ``step(work, k)``, one integrator step, ``k`` its index (which
keys counter-based noise). :func:`integrate` steps until the residual is at or below the
tolerance, checking it every ``check_every`` steps, or until ``max_steps`` steps; a
non-finite residual (a diverged state) ends the loop at once, unsettled.

``inline="always"``: numba inlines the loop into each kernel, where ``step`` and ``measure``
are then fixed functions, called directly (no function pointers, so the kernels stay
cacheable) and open to LLVM's inlining as if written in place. The batch loop over
samples (``numba.prange``) stays in each simulator's kernel, which allocates the work arrays.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def integrate(step, measure, work, tolerance, max_steps, check_every, residual):
    """(steps taken, final residual) of one sample: ``step`` until ``measure`` <= tolerance
    (checked every ``check_every`` steps), ``max_steps`` steps, or a non-finite residual.
    ``residual``: the residual ``measure`` gave for ``work`` as it is (a loop that goes on
    where another stopped, which measured last), or inf to measure it first (a measurement
    may update ``work``, e.g. a rotating frame, so measuring again would not go on exactly)."""
    if math.isinf(residual):
        residual = measure(work)
    steps = 0
    while residual > tolerance and steps < max_steps and math.isfinite(residual):
        block = min(check_every, max_steps - steps)
        for k in range(block):
            step(work, steps + k)
        steps += block
        residual = measure(work)
    return steps, residual


@numba.njit(cache=True)
def _as_double(bits):
    return np.uint64(bits).view(np.float64)


@numba.njit(cache=True)
def max_abs(values):
    """max |v| over a float64 array, NaN if any entry is NaN (then the loop above ends the
    relaxation as diverged), by the IEEE 754 bit patterns: for non-negative doubles (the sign
    bit cleared) they order like the values, +inf above every finite value and NaN above
    +inf. An integer max vectorizes where a float max with NaN semantics does not."""
    bits = values.view(np.uint64)
    magnitude = np.uint64(0x7FFFFFFFFFFFFFFF)
    top = np.uint64(0)
    for u in range(bits.shape[0]):
        top = max(top, bits[u] & magnitude)
    return _as_double(top)
