"""Numba simulator of an exciton-polariton lattice (the physics of the VISA polariton bench).

Physics: :class:`labep.models.polariton.PolaritonLattice`, the discretized driven-dissipative
Gross-Pitaevskii equation on a 1-D chain or a 2-D grid,

    i d(psi_i)/dt = -J sum_{j in nn(i)} psi_j + (V_i + U_i + g |psi_i|^2) psi_i
                    + (i/2) (P - gamma - Gamma |psi_i|^2) psi_i,

integrated with classical fourth-order Runge-Kutta steps of size ``dt`` (units of 1/J) in a
frame rotating at Omega: d(psi)/dt = -i (h - Omega psi). The frame is a gauge transformation
(the physics is unchanged); Omega follows the frame frequency mu estimated from the state at
every residual check, so a stationary state is a true fixed point of the discrete steps (in the
lab frame RK4 would damp the rotation exp(-i mu t) by O((mu dt)^6) per step and leave a
residual floor). Every ``check_every`` steps the rotating-frame residual
max_i |h_i - mu psi_i| / sqrt(N / n) (units of J; see the model) is measured; a sample stops
when it is at or below tolerance (each sample on its own), or after ``max_steps``.

``steady_state: implicit`` finds the same fixed point faster. RK4 runs until the residual is
at or below ``implicit_from`` (0.02 J: the condensate has formed and, but for states near
the boundary between two branches, chosen its branch; its intensity is still far from the
gain-loss balance, which RK4 approaches at the slowest decay rate, about 0.02 J on the digits
grid: most of its 3,800 steps. The lattice is multistable: handed over at 0.03 J, 7 of 1,280
states at two sets of trained digits potentials end on another branch than RK4 run to 1e-9;
at 0.02 J, 2, as many as RK4 at the protocol's 1e-4 itself; ``benchmarks/polariton_basins.py``),
then
pseudo-transient continuation takes over: backward-Euler steps (I / h - df/dx) dx = f whose
size h starts at ``implicit_step`` and grows as the residual falls (by the residual's ratio,
at least ``implicit_growth`` a step, at most 1e4), with the frame frequency mu an unknown and
the U(1) gauge fixed by Im(psi^dagger dpsi) = 0, so that large steps are Newton steps on the
stationary rotating-frame equations of the model's implicit differentiation. One step is one
factorization of a banded system (the sites numbered along a grid's short side, half
bandwidth 2 min(rows, cols) + 1) bordered by mu's column and the gauge's row,
O(n min(rows, cols)^2). After a step that lowers the residual the same factors are reused
for chord steps (the new f, one forward and back substitution each, O(n min(rows, cols)))
while each at least halves the residual, which near the fixed point replaces the last
factorizations. It stops on the same residual at the same tolerance. Should it fail (a
residual grown a thousandfold, a singular system, ``implicit_iterations`` factorizations),
the field is restored and RK4 goes on. A relaxation's ``steps`` count RK4 steps plus
implicit steps (factorizations and chord steps); the factorizations of the last relaxation
are in ``last_implicit`` (negative: it fell back to RK4, see :func:`_implicit_settle`), its
chord steps in ``last_chord``. Nudged phases start from the free state, within reach of
Newton's method, so they take one factorization and a few chord steps.

What a relaxation displays on the (simulated) light modulator: the pattern V + U(x) + nudge,
with the input potential U(x) on the input sites and the nudge potential beta (n_k - t_k) on
the output sites (n_k from the ``start`` state, the free state; without a start the free phase
is relaxed first to get it). The pattern must lie within ``potential_range``; a relaxation whose
pattern does not is refused before anything runs (:class:`labep.hardware.bench.OutOfRangeError`).
The trainable range of V is ``potential_range`` less ``margin`` at both ends, which leaves room
for the inputs and the nudge.

Imperfections (all off by default; every draw from ``device.seed``):

- potential resolution, the light modulator's grey levels: ``device.bits`` quantizes the
  whole range into 2^bits levels; V is then written as codes (levels 2^bits - 2 m, m the margin
  in grey levels) and the input and nudge potentials are rounded to whole grey levels too;
- per-channel mismatch and a bowed response: ``device.gain_mismatch``, ``offset_mismatch``,
  ``nonlinearity``, ``write_noise``, ``readback_noise`` (:mod:`labep.simulators.device`);
  a channel's gain scales the input and nudge potentials it displays as well;
- camera noise and bit depth: ``device.readout_noise`` (std of an intensity readout, units of
  |psi|^2) and ``device.readout_bits`` (intensities quantized over [0, ``intensity_full_scale``]);
  ``phase_noise`` (std of the interferometric phase, rad); ``readouts`` are averaged;
- pump fluctuations: ``pump_noise``, the relative std of the pump P, drawn per relaxation and
  sample (the pulse-to-pulse or shot-to-shot fluctuation of the laser).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numba
import numpy as np
from pydantic import BaseModel, Field, model_validator

from labep.hardware.bench import (
    BenchError,
    BenchIdentity,
    BenchLifecycle,
    BenchSpec,
    Nudge,
    OutOfRangeError,
    ParameterSpec,
    Relaxation,
    Settle,
)
from labep.models.polariton import PolaritonLattice
from labep.protocol.strict import STRICT_CONFIG
from labep.simulators.device import DeviceOptions, ParameterDevice, read_out
from labep.simulators.settle_loop import integrate

# -- kernels ---------------------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _derivative(re, im, neighbours, potential, frame, pump, hopping, interaction, loss,
                saturation, relaxation, out_re, out_im):
    """d(psi)/dt = -i [(1 - i eta)(h_E - Omega psi) + (i/2)(P_i - gamma - Gamma |psi|^2) psi]
    for every site of one sample (``frame`` is Omega, ``relaxation`` eta, ``pump`` P_i)."""
    for i in range(re.shape[0]):
        sum_re = 0.0
        sum_im = 0.0
        for k in range(neighbours.shape[1]):
            j = neighbours[i, k]
            if j < 0:
                break
            sum_re += re[j]
            sum_im += im[j]
        density = re[i] * re[i] + im[i] * im[i]
        real_part = potential[i] - frame + interaction * density
        gain = 0.5 * (pump[i] - loss - saturation * density)
        c_re = -hopping * sum_re + real_part * re[i]
        c_im = -hopping * sum_im + real_part * im[i]
        # (1 - i eta)(c_re + i c_im) + i gain psi
        h_re = c_re + relaxation * c_im - gain * im[i]
        h_im = c_im - relaxation * c_re + gain * re[i]
        out_re[i] = h_im
        out_im[i] = -h_re


@numba.njit(cache=True)
def _residual(re, im, neighbours, potential, frame, pump, hopping, interaction, loss,
              saturation, relaxation, a_re, a_im):
    """(rotating-frame residual, mu) of one sample. With F(mu) = A - mu B, A = (1 - i eta) h_E
    + (i/2) D psi and B = (1 - i eta) psi, mu = Re(B^dagger A) / |B|^2 (least squares) and the
    residual is max_i |F_i(mu)| / sqrt(N / n); infinite if N / n < 1e-12."""
    _derivative(re, im, neighbours, potential, frame, pump, hopping, interaction, loss,
                saturation, relaxation, a_re, a_im)
    n = re.shape[0]
    norm = 0.0
    overlap = 0.0
    for i in range(n):
        b_re = re[i] + relaxation * im[i]
        b_im = im[i] - relaxation * re[i]
        # i d(psi)/dt = A - Omega B
        x = -a_im[i] + frame * b_re
        y = a_re[i] + frame * b_im
        a_re[i] = x
        a_im[i] = y
        norm += b_re * b_re + b_im * b_im
        overlap += b_re * x + b_im * y
    if norm / (n * (1.0 + relaxation * relaxation)) < 1e-12:
        return math.inf, frame
    mu = overlap / norm
    worst = 0.0
    for i in range(n):
        x = a_re[i] - mu * (re[i] + relaxation * im[i])
        y = a_im[i] - mu * (im[i] - relaxation * re[i])
        worst = max(worst, math.sqrt(x * x + y * y))
    return worst / math.sqrt(norm / (n * (1.0 + relaxation * relaxation))), mu


@numba.njit(cache=True)
def _polariton_measure(work):
    """The rotating-frame residual of one sample; mu lands in ``mu[0]`` and, if finite, becomes
    the frame Omega (``frame[0]``) of the next steps; infinite once the field is not
    finite."""
    (x_re, x_im, neighbours, pot, p, hopping, interaction, loss, saturation, relaxation,
     frame, mu, k1r, k1i, _, _, _, _, _, _, _, _, _) = work
    residual, mu[0] = _residual(x_re, x_im, neighbours, pot, frame[0], p, hopping,
                                interaction, loss, saturation, relaxation, k1r, k1i)
    if math.isfinite(mu[0]):
        frame[0] = mu[0]
    if not (math.isfinite(x_re[0]) and math.isfinite(x_im[0])):
        return math.inf
    return residual


@numba.njit(cache=True)
def _polariton_step(work, step):
    """One classical RK4 step of size dt of one sample's field, in the frame ``frame[0]``."""
    (x_re, x_im, neighbours, pot, p, hopping, interaction, loss, saturation, relaxation,
     frame_at, _, k1r, k1i, k2r, k2i, k3r, k3i, k4r, k4i, t_re, t_im, dt) = work
    n = x_re.shape[0]
    frame = frame_at[0]
    half = 0.5 * dt
    sixth = dt / 6.0
    _derivative(x_re, x_im, neighbours, pot, frame, p, hopping, interaction, loss,
                saturation, relaxation, k1r, k1i)
    for i in range(n):
        t_re[i] = x_re[i] + half * k1r[i]
        t_im[i] = x_im[i] + half * k1i[i]
    _derivative(t_re, t_im, neighbours, pot, frame, p, hopping, interaction, loss,
                saturation, relaxation, k2r, k2i)
    for i in range(n):
        t_re[i] = x_re[i] + half * k2r[i]
        t_im[i] = x_im[i] + half * k2i[i]
    _derivative(t_re, t_im, neighbours, pot, frame, p, hopping, interaction, loss,
                saturation, relaxation, k3r, k3i)
    for i in range(n):
        t_re[i] = x_re[i] + dt * k3r[i]
        t_im[i] = x_im[i] + dt * k3i[i]
    _derivative(t_re, t_im, neighbours, pot, frame, p, hopping, interaction, loss,
                saturation, relaxation, k4r, k4i)
    for i in range(n):
        x_re[i] += sixth * (k1r[i] + 2.0 * k2r[i] + 2.0 * k3r[i] + k4r[i])
        x_im[i] += sixth * (k1i[i] + 2.0 * k2i[i] + 2.0 * k3i[i] + k4i[i])


@numba.njit(cache=True, parallel=True)
def settle_polariton(re, im, neighbours, potential, pump, hopping, interaction, loss,
                     saturation, relaxation, dt, tolerance, max_steps, check_every, steps_out,
                     residual_out, mu_out, implicit_from, order, neighbour_slots, bandwidth,
                     first_step, growth, max_iterations, implicit_out, chord_out):
    """Integrate a batch of fields (``re``, ``im``: (batch, n), in place) with RK4 steps in
    the rotating frame until each sample's residual is at or below ``tolerance`` (checked
    every ``check_every`` steps) or ``max_steps`` steps; the step loop is
    :func:`labep.simulators.settle_loop.integrate`. ``potential`` (batch, n) is what the
    light modulator displays, ``pump`` (batch, n) the pump P_i.

    With ``implicit_from`` > 0 the RK4 steps stop once the residual is at or below it and
    :func:`_implicit_settle` takes over (``order``, ``neighbour_slots``, ``bandwidth``: the
    band layout; ``first_step``, ``max_iterations``); its iterations land in
    ``implicit_out`` (its factorizations; negative: it failed, and RK4 went on from where it
    had stopped), its chord steps in ``chord_out``."""
    batch, n = re.shape
    for sample in numba.prange(batch):
        frame = np.zeros(1)
        mu = np.zeros(1)
        counts = np.zeros(1, dtype=np.int64)
        work = (re[sample], im[sample], neighbours, potential[sample], pump[sample], hopping,
                interaction, loss, saturation, relaxation, frame, mu, np.empty(n),
                np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n), np.empty(n),
                np.empty(n), np.empty(n), np.empty(n), dt)
        implicit_out[sample] = 0
        chord_out[sample] = 0
        if implicit_from > 0.0:
            steps, residual = integrate(_polariton_step, _polariton_measure, work,
                                        max(tolerance, implicit_from), max_steps, check_every,
                                        math.inf)
            if tolerance < residual <= implicit_from:
                iterations, found, found_mu = _implicit_settle(
                    re[sample], im[sample], neighbours, order, neighbour_slots,
                    potential[sample], pump[sample], hopping, interaction, loss, saturation,
                    relaxation, frame[0], tolerance, first_step, growth, max_iterations, bandwidth,
                    bandwidth, counts)
                implicit_out[sample] = iterations
                chord_out[sample] = counts[0]
                if iterations >= 0:
                    steps += iterations + counts[0]
                    residual = found
                    mu[0] = found_mu
                else:
                    # on from the restored field, in the frame its last measurement set
                    more, residual = integrate(_polariton_step, _polariton_measure, work,
                                               tolerance, max_steps - steps, check_every,
                                               residual)
                    steps += more
        else:
            steps, residual = integrate(_polariton_step, _polariton_measure, work, tolerance,
                                        max_steps, check_every, math.inf)
        steps_out[sample] = steps
        residual_out[sample] = residual
        mu_out[sample] = mu[0]


@numba.njit(cache=True)
def _bordered_factor(ab, column, row, corner, lower, upper, m, pivots, factors):
    """Factor [[A, column], [row^T, corner]] in place by Gaussian elimination, A (m x m)
    banded with ``lower`` sub- and ``upper`` super-diagonals, stored column by column as
    ab[j, lower + upper + i - j] = A[i, j] (with room for the pivoting's fill above), the last
    column and row dense. Pivots are chosen within the band (partial pivoting over A's rows)
    and land in ``pivots``; the dense row is eliminated along the way, its multipliers in
    ``factors``, so the work is O(m (lower + upper) lower). Afterwards ab holds L (below the
    diagonal) and U, ``column`` L^-1 column; ``row`` is overwritten. Returns the eliminated
    corner, the last pivot: NaN if a pivot is zero or not finite (then the system is singular
    for this elimination and nothing may be solved with it). :func:`_bordered_substitute`
    solves with the factors, as often as wanted."""
    top = lower + upper
    for j in range(m):
        last = min(m - 1, j + lower)
        pivot = j
        best = abs(ab[j, top])
        for i in range(j + 1, last + 1):
            value = abs(ab[j, top + i - j])
            if value > best:
                best = value
                pivot = i
        if best == 0.0 or not math.isfinite(best):
            return math.nan
        pivots[j] = pivot
        right = min(m - 1, j + top)
        if pivot != j:
            for c in range(j, right + 1):
                a = ab[c, top + pivot - c]
                ab[c, top + pivot - c] = ab[c, top + j - c]
                ab[c, top + j - c] = a
            a = column[pivot]
            column[pivot] = column[j]
            column[j] = a
        inverse = 1.0 / ab[j, top]
        for i in range(j + 1, last + 1):
            ab[j, top + i - j] *= inverse
        for c in range(j + 1, right + 1):
            u = ab[c, top + j - c]
            if u != 0.0:
                for i in range(j + 1, last + 1):
                    ab[c, top + i - c] -= ab[j, top + i - j] * u
        u = column[j]
        for i in range(j + 1, last + 1):
            column[i] -= ab[j, top + i - j] * u
        factor = row[j] * inverse  # the dense row's multiplier
        factors[j] = factor
        if factor != 0.0:
            for c in range(j + 1, right + 1):
                row[c] -= factor * ab[c, top + j - c]
            corner -= factor * u
    if corner == 0.0 or not math.isfinite(corner):
        return math.nan
    return corner


@numba.njit(cache=True)
def _bordered_substitute(ab, column, corner, pivots, factors, rhs, lower, upper, m):
    """Solve the system :func:`_bordered_factor` factored (``corner`` its return) for
    ``rhs`` (length m + 1) in place: the row swaps and L's multipliers forward, then U and
    the border backward. O(m (lower + upper)), a few percent of the factoring."""
    top = lower + upper
    for j in range(m):
        pivot = pivots[j]
        if pivot != j:
            a = rhs[pivot]
            rhs[pivot] = rhs[j]
            rhs[j] = a
        r = rhs[j]
        if r != 0.0:
            for i in range(j + 1, min(m - 1, j + lower) + 1):
                rhs[i] -= ab[j, top + i - j] * r
        rhs[m] -= factors[j] * r
    rhs[m] /= corner
    border = rhs[m]
    for j in range(m - 1, -1, -1):
        s = rhs[j] - column[j] * border
        for c in range(j + 1, min(m - 1, j + top) + 1):
            s -= ab[c, top + j - c] * rhs[c]
        rhs[j] = s / ab[j, top]


@numba.njit(cache=True)
def _implicit_system(re, im, order, neighbour_slots, potential, frame, pump, hopping,
                     interaction, loss, saturation, relaxation, step, flow_re, flow_im,
                     lower, upper, ab, column, row, rhs):
    """One pseudo-transient step's system of one sample, for :func:`_bordered_factor`: the
    unknowns are x = (Re psi, Im psi) of the sites in band ``order``, interleaved, and the
    frame frequency mu; the equations are the backward-Euler step (I / h - df/dx) dx -
    (df/dmu) dmu = f, f = d(psi)/dt in the frame mu = ``frame`` (``flow_re``, ``flow_im``,
    by site), and the phase condition Im(psi^dagger dpsi) = 0 (the U(1) gauge), so that as h
    grows the step becomes the Newton step on the stationary equations F(psi, mu) = 0 and
    Im(psi0^dagger psi) = 0 of the model's implicit differentiation.
    ``neighbour_slots``: the band positions of each position's neighbours (-1 padded)."""
    top = lower + upper
    ab[:, :] = 0.0
    inverse_step = 1.0 / step
    # d F_i / d Re psi_j and d F_i / d Im psi_j of a neighbour j: -J t and -i J t, t = 1 - i eta
    nb_re_r, nb_re_i = -hopping, hopping * relaxation
    nb_im_r, nb_im_i = -hopping * relaxation, -hopping
    for p in range(order.shape[0]):
        i = order[p]
        x, y = re[i], im[i]
        density = x * x + y * y
        a = potential[i] + interaction * density - frame
        b = 0.5 * (pump[i] - loss - saturation * density)
        # d F_i / d Re psi_i = t (a + 2 g x psi) + i b - i Gamma x psi
        zr, zi = a + 2.0 * interaction * x * x, 2.0 * interaction * x * y
        dre_r = zr + relaxation * zi + saturation * x * y
        dre_i = zi - relaxation * zr + b - saturation * x * x
        # d F_i / d Im psi_i = t (i a + 2 g y psi) - b - i Gamma y psi
        zr, zi = 2.0 * interaction * x * y, a + 2.0 * interaction * y * y
        dim_r = zr + relaxation * zi - b + saturation * y * y
        dim_i = zi - relaxation * zr - saturation * x * y
        # rows: f_re = Im F, f_im = -Re F; M = I / h - df/dx; ab[col, top + row - col]
        row_re, row_im = 2 * p, 2 * p + 1
        ab[row_re, top] = inverse_step - dre_i
        ab[row_im, top - 1] = -dim_i
        ab[row_re, top + 1] = dre_r
        ab[row_im, top] = inverse_step + dim_r
        for k in range(neighbour_slots.shape[1]):
            q = neighbour_slots[p, k]
            if q < 0:
                break
            col_re, col_im = 2 * q, 2 * q + 1
            ab[col_re, top + row_re - col_re] = -nb_re_i
            ab[col_im, top + row_re - col_im] = -nb_im_i
            ab[col_re, top + row_im - col_re] = nb_re_r
            ab[col_im, top + row_im - col_im] = nb_im_r
        rhs[row_re] = flow_re[i]
        rhs[row_im] = flow_im[i]
        # -df/dmu = -i (1 - i eta) psi... f = -i F and dF/dmu = -(1 - i eta) psi
        column[row_re] = y - relaxation * x
        column[row_im] = -x - relaxation * y
        row[row_re] = -y
        row[row_im] = x
    rhs[2 * order.shape[0]] = 0.0


@numba.njit(cache=True)
def _implicit_try(re, im, base_re, base_im, order, rhs, scale, neighbours, potential, pump,
                  hopping, interaction, loss, saturation, relaxation, frame, scratch_re,
                  scratch_im):
    """Set the field to base + scale dx (dx: the solve's ``rhs``, in band order) and return
    its (rotating-frame residual, mu), the residual infinite if not finite."""
    for p in range(order.shape[0]):
        i = order[p]
        re[i] = base_re[i] + scale * rhs[2 * p]
        im[i] = base_im[i] + scale * rhs[2 * p + 1]
    residual, mu = _residual(re, im, neighbours, potential, frame, pump, hopping, interaction,
                             loss, saturation, relaxation, scratch_re, scratch_im)
    if not math.isfinite(residual):
        residual = math.inf
    return residual, mu


@numba.njit(cache=True)
def _implicit_settle(re, im, neighbours, order, neighbour_slots, potential, pump, hopping,
                     interaction, loss, saturation, relaxation, frame, tolerance, first_step,
                     growth, max_iterations, lower, upper, counts):
    """Pseudo-transient continuation of one sample from its current field, until the
    rotating-frame residual r is at or below ``tolerance``. Each factorization is one
    backward-Euler step (I / h - df/dx) dx = f in the frame of the current mu (f = d(psi)/dt,
    x = (Re psi, Im psi), mu an unknown, the U(1) gauge Im(psi^dagger dpsi) = 0), h from
    ``first_step``: for small h the steps follow the flow, for large h they are Newton steps
    on the stationary equations F(psi, mu) = 0.

    - A step that lowers r is followed by chord steps: the same factors solved for the new f
      (one forward and back substitution, a few percent of a factorization), kept while
      each cuts r at least by ``_CHORD_RATE`` (a chord step that does not is undone). Near
      the fixed point, where the factored matrix is close to the Newton one, they converge
      linearly and replace the last factorizations; a nudged phase from the free state
      takes one factorization and a few chord steps.
    - Then h <- h * max(r_before / r_after, ``growth``) over the factorization's steps (the
      switched evolution relaxation rule), at most ``_LARGEST_STEP``.
    - A step that raises r is kept (in the transient, r is not monotone along the flow
      either: rejecting such steps, with or without a line search on r, was measured to
      need more factorizations and to fall back to RK4 more often), and the next h is
      h * r_after / r_before.

    Returns (factorizations, residual, mu); ``counts[0]`` gets the chord steps. On failure
    the field is restored, the residual and frame are the starting ones, and the
    factorization count is negative: -1 no convergence within ``max_iterations``
    factorizations, -2 the residual grew past ``_DIVERGED`` times its first, -3 a singular
    system."""
    n = re.shape[0]
    m = 2 * n
    ab = np.empty((m, 2 * lower + upper + 1))
    column = np.empty(m)
    row = np.empty(m)
    rhs = np.empty(m + 1)
    pivots = np.empty(m, dtype=np.int64)
    factors = np.empty(m)
    flow_re = np.empty(n)
    flow_im = np.empty(n)
    backup_re = re.copy()
    backup_im = im.copy()
    base_re = re.copy()
    base_im = im.copy()
    residual, mu = _residual(re, im, neighbours, potential, frame, pump, hopping, interaction,
                             loss, saturation, relaxation, flow_re, flow_im)
    first = residual
    frame_mu = mu
    step = first_step
    factorizations = 0
    chords = 0
    counts[0] = 0
    while residual > tolerance:
        if factorizations >= max_iterations or not residual <= _DIVERGED * first:
            re[:] = backup_re
            im[:] = backup_im
            return -1 if factorizations >= max_iterations else -2, first, frame
        _derivative(re, im, neighbours, potential, frame_mu, pump, hopping, interaction, loss,
                    saturation, relaxation, flow_re, flow_im)
        _implicit_system(re, im, order, neighbour_slots, potential, frame_mu, pump, hopping,
                         interaction, loss, saturation, relaxation, step, flow_re, flow_im,
                         lower, upper, ab, column, row, rhs)
        corner = _bordered_factor(ab, column, row, 0.0, lower, upper, m, pivots, factors)
        if not math.isfinite(corner):
            re[:] = backup_re
            im[:] = backup_im
            return -3, first, frame
        factorizations += 1
        _bordered_substitute(ab, column, corner, pivots, factors, rhs, lower, upper, m)
        before = residual
        residual, mu = _implicit_try(re, im, base_re, base_im, order, rhs, 1.0, neighbours,
                                     potential, pump, hopping, interaction, loss, saturation,
                                     relaxation, mu, flow_re, flow_im)
        frame_mu += rhs[m]
        base_re[:] = re
        base_im[:] = im
        if not residual < before:
            # a step that raised r (not finite: the loop's check gives up): the next one is
            # shorter, h times the residual's ratio
            step *= before / residual
            continue
        while residual > tolerance:
            _derivative(re, im, neighbours, potential, frame_mu, pump, hopping, interaction,
                        loss, saturation, relaxation, flow_re, flow_im)
            for p in range(n):
                i = order[p]
                rhs[2 * p] = flow_re[i]
                rhs[2 * p + 1] = flow_im[i]
            rhs[m] = 0.0
            _bordered_substitute(ab, column, corner, pivots, factors, rhs, lower, upper, m)
            found, found_mu = _implicit_try(re, im, base_re, base_im, order, rhs, 1.0,
                                            neighbours, potential, pump, hopping,
                                            interaction, loss, saturation, relaxation, mu,
                                            flow_re, flow_im)
            if not found <= _CHORD_RATE * residual:
                re[:] = base_re
                im[:] = base_im
                break
            chords += 1
            residual = found
            mu = found_mu
            frame_mu += rhs[m]
            base_re[:] = re
            base_im[:] = im
        step = min(step * max(before / max(residual, 1e-300), growth), _LARGEST_STEP)
    counts[0] = chords
    return factorizations, residual, mu


#: cap on the pseudo-transient step (1/J): past it the steps are Newton steps to within
#: 1 / (h * rate) of the slowest decay rate, and the U(1) null direction of the stationary
#: equations (a global phase) stays regularized by 1 / h
_LARGEST_STEP = 1e4
#: the implicit solver gives up (RK4 goes on) when the residual exceeds this multiple of its
#: first
_DIVERGED = 1e3
#: a chord step (the same factors, the new f) is kept if it cuts the residual at least by this
_CHORD_RATE = 0.5


# -- the bench -------------------------------------------------------------------------------


def band_layout(neighbours: np.ndarray, lattice: tuple[int, ...]
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """(order, neighbour_slots, bandwidth) of the implicit solver: the sites in the order of
    the unknowns (a grid's sites column by column when it has fewer rows than columns, else
    row by row), each position's neighbours as positions (-1 padded), and the half bandwidth
    2 d + 1 of the real system, d the largest position offset between neighbours."""
    n = neighbours.shape[0]
    if len(lattice) == 2 and lattice[0] < lattice[1]:
        rows, cols = lattice
        order = np.arange(n).reshape(rows, cols).T.ravel()
    else:
        order = np.arange(n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    table = neighbours[order]
    slots = np.where(table >= 0, position[np.maximum(table, 0)], -1)
    offset = max(int(np.max(np.abs(np.where(slots >= 0, slots - np.arange(n)[:, None], 0)))), 1)
    return order.astype(np.int64), np.ascontiguousarray(slots, dtype=np.int64), 2 * offset + 1


def rest_field(n_sites: int, amplitude: float) -> np.ndarray:
    """The field every relaxation without a start begins from: a weak, fixed, deliberately
    asymmetric seed a (1 + 0.2 cos(2.3 i + 0.4)) exp(0.5 i sin(1.7 i)) (a condensate forms
    from noise; a fixed seed keeps runs deterministic, and breaking the lattice's mirror
    symmetries keeps it off symmetric unstable states)."""
    i = np.arange(n_sites)
    return amplitude * (1.0 + 0.2 * np.cos(2.3 * i + 0.4)) * np.exp(0.5j * np.sin(1.7 * i))


class PolaritonSimulatorOptions(BaseModel):
    """Options of the polariton simulator bench (``bench.options`` in a protocol)."""

    model_config = STRICT_CONFIG

    dtype: Literal["float32", "float64"] = Field(
        "float64", description="Arithmetic precision of the field (float32 leaves a residual "
        "floor near 1e-6).")
    dt: float = Field(0.1, gt=0.0, le=1.0, description="RK4 step (units of 1/J).")
    check_every: int = Field(
        10, ge=1, le=100_000,
        description="Steps between residual checks (and frame-frequency updates).")
    tolerance: float = Field(1e-6, gt=0.0, description="Default settle tolerance (units of J).")
    max_steps: int = Field(20_000, ge=1, description="Default cap on RK4 steps.")
    potential_range: tuple[float, float] = Field(
        (-4.0, 4.0), strict=False, description="What the light modulator can display, [low, "
        "high] (units of J; a YAML list): V + input + nudge must stay inside.")
    margin: float = Field(
        1.5, ge=0.0, description="Kept free at both ends of potential_range for the input and "
        "nudge potentials: V is trainable in [low + margin, high - margin].")
    rest_amplitude: float = Field(
        0.3, gt=0.0, description="Amplitude of the seed field a relaxation starts from.")
    pump_noise: float = Field(
        0.0, ge=0.0, le=0.5, description="Relative std of the pump P per relaxation and sample.")
    phase_noise: float = Field(
        0.0, ge=0.0, le=math.pi, description="Std of the interferometric phase readout (rad).")
    steady_state: Literal["rk4", "implicit"] = Field(
        "rk4", description="rk4: RK4 steps of dt to the tolerance; implicit: RK4 steps until "
        "the residual is at or below implicit_from, then pseudo-transient continuation "
        "(backward-Euler steps growing into Newton steps on the stationary rotating-frame "
        "equations, one banded factorization each, reused for chord steps while they at "
        "least halve the residual) to the same tolerance on the same residual; RK4 goes on "
        "where it fails.")
    implicit_from: float = Field(
        0.02, gt=0.0, description="Residual (units of J) at which the implicit solver takes "
        "over from RK4 (steady_state implicit).")
    implicit_step: float = Field(
        20.0, gt=0.0, description="First backward-Euler step (units of 1/J); it grows as the "
        "residual falls.")
    implicit_growth: float = Field(
        2.0, ge=1.0, le=100.0, description="Least factor by which the backward-Euler step "
        "grows while the residual falls (it grows by the residual's ratio if that is more).")
    implicit_iterations: int = Field(
        100, ge=1, le=100_000, description="Cap on the implicit solver's factorizations "
        "(banded solves) per relaxation; past it RK4 goes on.")
    intensity_full_scale: float = Field(
        16.0, gt=0.0, description="Camera full scale (|psi|^2) for device.readout_bits.")
    device: DeviceOptions = Field(
        default_factory=DeviceOptions,
        description="Light-modulator resolution (bits) and mismatch, camera noise and bit depth "
        "(readout_noise, readout_bits), all off.")

    @model_validator(mode="after")
    def _room_for_v(self) -> PolaritonSimulatorOptions:
        low, high = self.potential_range
        if not high - low > 2.0 * self.margin:
            raise ValueError("potential_range must be wider than twice the margin")
        return self


class SlmGrid:
    """The light modulator's grey levels over ``potential_range`` and where V's codes sit.

    With 2^bits grey levels g = 0 .. 2^bits - 1 the displayed potential is low + g * lsb; V's
    code k is grey level k + m (m = round(margin / lsb)), so V has 2^bits - 2m levels over
    [low + m lsb, high - m lsb]."""

    def __init__(self, potential_range: tuple[float, float], margin: float, bits: int) -> None:
        self.low, self.high = (float(v) for v in potential_range)
        self.levels = 2 ** int(bits)
        self.lsb = (self.high - self.low) / (self.levels - 1)
        self.margin_levels = round(margin / self.lsb)
        if self.levels - 2 * self.margin_levels < 2:
            raise ValueError("the margin leaves V fewer than 2 grey levels")

    @property
    def v_levels(self) -> int:
        return self.levels - 2 * self.margin_levels

    @property
    def v_range(self) -> tuple[float, float]:
        return (self.low + self.margin_levels * self.lsb,
                self.low + (self.levels - 1 - self.margin_levels) * self.lsb)

    def offset_levels(self, offsets: np.ndarray) -> np.ndarray:
        """Potential offsets (input, nudge) in whole grey levels (rounded half to even)."""
        return np.rint(np.asarray(offsets, dtype=np.float64) / self.lsb).astype(np.int64)


class PolaritonSimulator(BenchLifecycle):
    """The polariton lattice as a Bench, integrated by a numba kernel."""

    name = "polariton"
    model_kinds = ("polariton",)
    options_model = PolaritonSimulatorOptions

    def __init__(self, model: PolaritonLattice,
                 options: PolaritonSimulatorOptions | None = None) -> None:
        self.model = model
        self.options = options or PolaritonSimulatorOptions()
        self.dtype = np.dtype(self.options.dtype)
        device = self.options.device
        low, high = self.options.potential_range
        self.grid: SlmGrid | None = None
        if device.quantized:
            assert device.bits is not None
            self.grid = SlmGrid((low, high), self.options.margin, device.bits)
            v_low, v_high = self.grid.v_range
            spec = ParameterSpec("V", (model.n_sites,), v_low, v_high, "J", self.grid.v_levels)
        else:
            spec = ParameterSpec("V", (model.n_sites,), low + self.options.margin,
                                 high - self.options.margin, "J")
        self.spec = BenchSpec((spec,), model.input_size, model.state_size, model.output_slice,
                              state_unit="sqrt(polaritons per site)")
        self.device: ParameterDevice | None = None
        self.potential = np.zeros(model.n_sites)  # V as realized (float64)
        if self.grid is not None:
            self.device = ParameterDevice(spec, device, np.random.default_rng([device.seed, 0]),
                                          self.name)
            self.potential = np.array(self.device.values, dtype=np.float64)
        self._readout_rng = np.random.default_rng([device.seed, 1])
        self._pump_rng = np.random.default_rng([device.seed, 2])
        self._neighbours = np.ascontiguousarray(model.neighbours)
        self._rest = rest_field(model.n_sites, self.options.rest_amplitude)
        self._order, self._slots, self._bandwidth = band_layout(self._neighbours, model.lattice)
        self.last_implicit = np.zeros(0, dtype=np.int64)
        self.last_chord = np.zeros(0, dtype=np.int64)

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> BenchIdentity:
        shape = "x".join(str(n) for n in self.model.lattice)
        return BenchIdentity("labep", "polariton-simulator",
                             f"polariton-{shape}-device{self.options.device.seed}",
                             "numba-" + numba.__version__)

    def close(self) -> None:
        """Nothing to release: the simulated pump is off between relaxations."""

    # -- parameters -------------------------------------------------------------------------

    def write(self, params: dict[str, np.ndarray]) -> None:
        """Continuous storage: V in units of J within the trainable range. Quantized storage
        (``device.bits``): V as integer codes 0 .. levels - 1. Checked before storing."""
        for name, values in params.items():
            if name != "V":
                raise BenchError(f"{self.name}: write: no parameter {name!r}; the bench has V")
            if self.device is None:
                self.spec.parameter("V").check_range(values, bench=self.name)
            else:
                self.device.check(values)
        if "V" in params:
            if self.device is None:
                self.potential = np.array(params["V"], dtype=np.float64)
            else:
                self.potential = np.array(self.device.store(params["V"]), dtype=np.float64)

    def read_params(self) -> dict[str, np.ndarray]:
        """What the bench holds: codes (quantized storage) or values (continuous)."""
        if self.device is not None:
            return {"V": self.device.codes.copy()}
        return {"V": self.potential.copy()}

    def measure_params(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """A measurement of the potentials the channels realize (with readback noise)."""
        if self.device is not None:
            return {"V": self.device.measure()}
        return {"V": self.potential.copy()}

    # -- relaxation -------------------------------------------------------------------------

    def display(self, offsets: np.ndarray) -> np.ndarray:
        """The potential (batch, n_sites) the modulator realizes for V plus ``offsets`` (input
        and nudge potentials), after checking that the pattern lies within its range.

        Quantized: the offsets are rounded to whole grey levels, the pattern's grey levels
        (V code + margin + offset levels) must lie in [0, 2^bits - 1], and each channel
        realizes V's value plus its gain times the rounded offset."""
        if self.grid is None:
            low, high = self.options.potential_range
            pattern = self.potential[None, :] + offsets
            lo, hi = float(pattern.min()), float(pattern.max())
            if not (low <= lo and hi <= high):
                raise OutOfRangeError(
                    f"{self.name}: the pattern V + input + nudge spans [{lo:.6g}, {hi:.6g}] J, "
                    f"outside the modulator's range [{low:g}, {high:g}] J; refused")
            return pattern
        assert self.device is not None
        shift = self.grid.offset_levels(offsets)
        grey = self.device.codes[None, :] + self.grid.margin_levels + shift
        if grey.min() < 0 or grey.max() > self.grid.levels - 1:
            raise OutOfRangeError(
                f"{self.name}: the pattern's grey levels span [{grey.min()}, {grey.max()}], "
                f"outside [0, {self.grid.levels - 1}]; refused")
        return self.potential[None, :] + self.device.gain[None, :] * (shift * self.grid.lsb)

    def _check_inputs(self, inputs: np.ndarray) -> np.ndarray:
        x = np.asarray(inputs, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.model.input_size or not np.all(np.isfinite(x)):
            raise ValueError(f"{self.name}: inputs must be finite, (batch, "
                             f"{self.model.input_size}), got {x.shape}")
        return x

    def relax(
        self,
        inputs: np.ndarray,
        nudge: Nudge | None = None,
        start: np.ndarray | None = None,
        settle: Settle | None = None,
    ) -> Relaxation:
        """Display V + U(x) (+ the nudge potential), pump, and integrate to a steady state
        from ``start`` (or the rest seed); the state read back through the camera."""
        settle = settle or Settle(self.options.tolerance, self.options.max_steps)
        x = self._check_inputs(inputs)
        batch = x.shape[0]
        offsets = self.model.input_potentials(x)
        if nudge is not None and nudge.strength != 0.0:
            target = np.asarray(nudge.target, dtype=np.float64)
            if target.shape != (batch, self.model.output_size):
                raise ValueError(f"{self.name}: nudge target must be ({batch}, "
                                 f"{self.model.output_size}), got {target.shape}")
            reference = start if start is not None else self.relax(x, settle=settle).state
            offsets = offsets + self.model.nudge_potential(float(nudge.strength), target,
                                                           np.asarray(reference, np.float64))
        potential = self.display(offsets)
        if start is None:
            field = np.repeat(self._rest[None, :], batch, axis=0)
        else:
            start = np.asarray(start, dtype=np.float64)
            if start.shape != (batch, self.model.state_size):
                raise ValueError(f"{self.name}: start must be ({batch}, "
                                 f"{self.model.state_size}), got {start.shape}")
            field = self.model.field(start)
        return self.integrate(potential, field, self.pumps(x), settle)

    def pumps(self, inputs: np.ndarray) -> np.ndarray:
        """The pump P_i (batch, n_sites) of each sample (the model's, with the input pump),
        times 1 + the pump fluctuation of that sample if any."""
        pump = self.model.pumps(inputs)
        if self.options.pump_noise:
            pump *= 1.0 + self.options.pump_noise * self._pump_rng.standard_normal(
                (len(pump), 1))
        return pump

    def evolve(self, potential: np.ndarray, field: np.ndarray, pump: np.ndarray,
               tolerance: float, max_steps: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Run the kernel on a displayed ``potential`` (batch, n) from the complex ``field``
        (batch, n) with ``pump`` (batch, n): (field, steps, residual, mu) afterwards, the
        field complex128 whatever the bench's dtype."""
        model = self.model
        batch = field.shape[0]
        re = np.ascontiguousarray(field.real, dtype=self.dtype)
        im = np.ascontiguousarray(field.imag, dtype=self.dtype)
        steps = np.zeros(batch, dtype=np.int64)
        residual = np.zeros(batch, dtype=np.float64)
        mu = np.zeros(batch, dtype=np.float64)
        implicit = np.zeros(batch, dtype=np.int64)
        chords = np.zeros(batch, dtype=np.int64)
        options = self.options
        settle_polariton(re, im, self._neighbours,
                         np.ascontiguousarray(potential, dtype=self.dtype),
                         np.ascontiguousarray(pump, dtype=self.dtype),
                         model.hopping, model.interaction, model.loss, model.saturation,
                         model.energy_relaxation, float(self.options.dt), float(tolerance),
                         int(max_steps),
                         int(options.check_every), steps, residual, mu,
                         float(options.implicit_from) if options.steady_state == "implicit"
                         else 0.0, self._order, self._slots, self._bandwidth,
                         float(options.implicit_step), float(options.implicit_growth),
                         int(options.implicit_iterations),
                         implicit, chords)
        #: the implicit solver's factorizations (banded solves) per sample of the last
        #: relaxation (-1, -2, -3: it failed and RK4 went on; see :func:`_implicit_settle`)
        self.last_implicit = implicit
        #: its chord steps (reusing a factorization) per sample of the last relaxation
        self.last_chord = chords
        return re.astype(np.float64) + 1j * im, steps, residual, mu

    def integrate(self, potential: np.ndarray, field: np.ndarray, pump: np.ndarray,
                  settle: Settle) -> Relaxation:
        """:meth:`evolve` to the settle criterion, read out through the camera."""
        field, steps, residual, mu = self.evolve(potential, field, pump, settle.tolerance,
                                                 settle.max_steps)
        state = self.read_out(field, settle.readouts)
        converged = residual <= settle.tolerance
        return Relaxation(state, converged, steps, residual, {"frame_frequency": mu})

    def read_out(self, field: np.ndarray, readouts: int) -> np.ndarray:
        """State rows of ``field`` as the camera reports them: intensities with readout noise
        and bit depth, phases with interferometric noise, ``readouts`` averaged."""
        device = self.options.device
        if device.ideal_readout and not self.options.phase_noise:
            return self.model.pack(field, self.dtype)
        intensity = read_out(np.abs(field) ** 2, device, self._readout_rng, readouts,
                             0.0, self.options.intensity_full_scale)
        phase = np.angle(field)
        if self.options.phase_noise:
            draws = phase[None] + self.options.phase_noise * self._readout_rng.standard_normal(
                (readouts, *phase.shape))
            phase = np.arctan2(np.sin(draws).sum(0), np.cos(draws).sum(0))
        measured = np.sqrt(np.maximum(intensity, 0.0)) * np.exp(1j * phase)
        return self.model.pack(measured, self.dtype)

    # -- resume (labep.hardware.bench.Resumable) ----------------------------------------------

    def save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The realized potentials, the codes, and every generator's state."""
        meta: dict[str, Any] = {"readout_rng": self._readout_rng.bit_generator.state,
                                "pump_rng": self._pump_rng.bit_generator.state}
        arrays = {"potential": self.potential.copy()}
        if self.device is not None:
            meta["truth_rng"] = self.device.rng.bit_generator.state
            arrays["codes"] = self.device.codes.copy()
            arrays["values"] = np.asarray(self.device.values, dtype=np.float64)
        return meta, arrays

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.potential = np.array(arrays["potential"], dtype=np.float64)
        self._readout_rng.bit_generator.state = meta["readout_rng"]
        self._pump_rng.bit_generator.state = meta["pump_rng"]
        if self.device is not None:
            self.device.codes = np.array(arrays["codes"], dtype=np.int64)
            self.device.values = np.array(arrays["values"], dtype=np.float64)
            self.device.rng.bit_generator.state = meta["truth_rng"]
