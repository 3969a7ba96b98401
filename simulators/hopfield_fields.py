"""Field kernels of the layered Hopfield network, shared by its settle loop
(:mod:`labep.simulators.hopfield`) and its stochastic spiking phases
(:mod:`labep.simulators.spiking`).

h_l = b_l + W_l^T s_{l-1} + W_{l+1} s_{l+1} (+ skip terms), the clamped input's drive
x W_1 + b_1, and the output unit's exact block update under the nudged energy E + beta C.

Indexing: the kernels index the flat buffers (a state row, the weights, the biases) directly
with unsigned indices (:data:`labep.simulators.layered.U`) and make no array views in their
loops; every sum is taken in the order it had with views.
"""

from __future__ import annotations

import numba
import numpy as np

from labep.simulators.layered import U


@numba.njit(cache=True)
def add_scaled_rows(out, n, block, offset, scales, first, count):
    """out[:n] += sum_r scales[first + r] block[offset + r n : ... + n] over the
    ``count`` rows r whose scale is not zero (a NaN is not zero), one row after another in
    increasing r, each sum rounded as it is made (no fastmath here: the order is the result).
    Every field of a layer from a wider layer, a state vector's or a clamped input's (MNIST's
    pixels are 81% zero), is this sum; ``block`` is the row-major (count, n) block at
    ``offset`` of a flat buffer."""
    for r in range(count):
        value = scales[U(first + r)]
        if value != 0.0:
            row = U(offset + r * n)
            for j in range(U(n)):
                out[j] += value * block[row + j]


@numba.njit(cache=True, fastmath={"reassoc"})
def dot_rows(out, n, block, offset, vector, first, width, bias, bias_start):
    """out[j] = bias[bias_start + j] + block[j] . vector[first:first + width] for the ``n``
    rows j of the row-major (n, width) block at ``offset`` of a flat buffer, summed from the
    bias in its dtype. ``reassoc`` lets the dot products vectorize (it reorders sums only: NaN
    and inf still propagate)."""
    for j in range(n):
        row = U(offset + j * width)
        acc = bias[U(bias_start + j)]
        for i in range(U(width)):
            acc += block[row + i] * vector[U(first) + i]
        out[U(j)] = acc


@numba.njit(cache=True, fastmath={"reassoc"})
def add_dot_rows(out, n, block, offset, vector, first, width):
    """out[j] += block[j] . vector[first:first + width] for the ``n`` rows j of the row-major
    (n, width) block at ``offset`` of a flat buffer, each dot product summed in float64 from
    zero (``reassoc``: as :func:`dot_rows`)."""
    for j in range(n):
        row = U(offset + j * width)
        acc = 0.0
        for i in range(U(width)):
            acc += block[row + i] * vector[U(first) + i]
        out[U(j)] += acc


@numba.njit(cache=True)
def drive_row(inputs_row, coupling, bias, out):
    """out = x W_1 + b_1 for one sample: b_1 plus the rows of W_1 (row-major (n_0, n_1),
    contiguous) of the inputs that are not zero, each scaled by its input, added one input
    after another in order (:func:`add_scaled_rows`)."""
    n = bias.shape[0]
    for j in range(U(n)):
        out[j] = bias[j]
    add_scaled_rows(out, n, coupling.reshape(-1), 0, inputs_row, 0, inputs_row.shape[0])


@numba.njit(cache=True, parallel=True)
def input_drive(inputs, coupling, bias, out):
    """out = x W_1 + b_1 for a batch of clamped inputs x (batch, n_0): :func:`drive_row` per
    sample, in parallel on numba's threads (no BLAS pool next to numba's)."""
    for sample in numba.prange(inputs.shape[0]):
        drive_row(inputs[sample], coupling, bias, out[sample])


@numba.njit(cache=True, inline="always")
def _output_update(field: float, target: float, strength: float) -> float:
    """argmin over s in [0, 1] of (1 + beta)/2 s^2 - (h + beta y) s: the output unit's
    exact block update under the nudged energy E + beta C (rho(h + beta (y - s)) at the
    fixed point; also correct for beta <= -1, where the block energy is concave)."""
    curvature = 1.0 + strength
    drive = field + strength * target
    if curvature > 0.0:
        value = drive / curvature
        if value < 0.0:
            return 0.0
        if value > 1.0:
            return 1.0
        return value
    return 1.0 if 0.5 * curvature - drive < 0.0 else 0.0


@numba.njit(cache=True)
def _layer_field(layer, sizes, state_offsets, weights, weight_offsets, transposed, biases,
                 bias_offsets, drive_row, row, out):
    """h_l for one sample into ``out``: input drive (l = 1) or b_l + W_l^T s_{l-1}, plus
    W_{l+1} s_{l+1} from the layer above; on a Hopfield-ResNet the caller adds the skip terms
    (:func:`_skip_field`, called only where there are skips: a wrapper calling both cost a
    quarter of a sample-step on the 784-500-10 network, numba passing its arrays field by
    field).

    W_l is stored row-major (n_{l-1}, n_l), or transposed (n_l, n_{l-1}) where n_{l-1} > n_l,
    so that every inner loop runs over the larger of the two layers: a dot product
    (:func:`dot_rows`, :func:`add_dot_rows`) or a sum of scaled rows (:func:`add_scaled_rows`).
    """
    n_here = sizes[layer]
    n_layers = sizes.shape[0] - 1
    if layer == 1:
        for j in range(U(n_here)):
            out[j] = drive_row[j]
    else:
        n_below = sizes[layer - 1]
        bias = bias_offsets[layer - 1]
        below = state_offsets[layer - 2]
        offset = weight_offsets[layer - 1]
        if transposed[layer - 1]:
            dot_rows(out, n_here, weights, offset, row, below, n_below, biases, bias)
        else:
            for j in range(U(n_here)):
                out[j] = biases[U(bias) + j]
            add_scaled_rows(out, n_here, weights, offset, row, below, n_below)
    if layer < n_layers:
        n_above = sizes[layer + 1]
        above = state_offsets[layer]
        offset = weight_offsets[layer]
        if transposed[layer]:
            add_scaled_rows(out, n_here, weights, offset, row, above, n_above)
        else:
            add_dot_rows(out, n_here, weights, offset, row, above, n_above)


@numba.njit(cache=True)
def _skip_field(layer, sizes, state_offsets, weights, skip_offsets, skip_lower, skip_upper, row,
                out):
    """Add the skip terms of layer l to its field ``out``: S_{l,m} s_m for every skip (l, m)
    above it, S_{k,l}^T s_k for every skip (k, l) below it. Each S_{l,m} is stored row-major
    (n_l, n_m) at ``skip_offsets[k]`` of the weight buffer."""
    for k in range(skip_lower.shape[0]):
        low = skip_lower[k]
        high = skip_upper[k]
        if low != layer and high != layer:
            continue
        n_low = sizes[low]
        n_high = sizes[high]
        if low == layer:
            add_dot_rows(out, n_low, weights, skip_offsets[k], row, state_offsets[high - 1],
                         n_high)
        else:
            add_scaled_rows(out, n_high, weights, skip_offsets[k], row,
                            state_offsets[low - 1], n_low)


@numba.njit(cache=True)
def _state_offsets(sizes):
    """Where each layer's units start in a state row, and the widest layer."""
    n_layers = sizes.shape[0] - 1
    state_offsets = np.zeros(n_layers, dtype=np.int64)
    for layer in range(1, n_layers):
        state_offsets[layer] = state_offsets[layer - 1] + sizes[layer]
    width = 0
    for layer in range(1, n_layers + 1):
        width = max(width, sizes[layer])
    return state_offsets, width


@numba.njit(cache=True)
def _all_fields(sizes, state_offsets, weights, weight_offsets, transposed, biases,
                bias_offsets, drive_row, row, skip_offsets, skip_lower, skip_upper, field,
                fields):
    """Every layer's local field from the same state ``row`` (a synchronous update) into
    ``fields`` (laid out like the state); ``field`` is scratch of the widest layer."""
    for layer in range(1, sizes.shape[0]):
        s0 = state_offsets[layer - 1]
        _layer_field(layer, sizes, state_offsets, weights, weight_offsets, transposed, biases,
                     bias_offsets, drive_row, row, field)
        if skip_lower.shape[0] > 0:
            _skip_field(layer, sizes, state_offsets, weights, skip_offsets, skip_lower,
                        skip_upper, row, field)
        for j in range(U(sizes[layer])):
            fields[U(s0) + j] = field[j]
