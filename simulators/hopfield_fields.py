"""Field kernels of the layered Hopfield network, shared by its settle loop
(:mod:`labep.simulators.hopfield`) and its stochastic spiking phases
(:mod:`labep.simulators.spiking`).

h_l = b_l + W_l^T s_{l-1} + W_{l+1} s_{l+1} (+ skip terms), the clamped input's drive
x W_1 + b_1, and the output unit's exact block update under the nudged energy E + beta C.
"""

from __future__ import annotations

import numba
import numpy as np

from labep.simulators.layered import coupling_block


@numba.njit(cache=True)
def _next_nonzero(scales, start):
    """The first index at or after ``start`` whose scale is not zero (a NaN is not zero), or
    the length of ``scales``."""
    while start < scales.shape[0] and scales[start] == 0.0:
        start += 1
    return start


@numba.njit(cache=True)
def add_scaled_rows(out, block, scales):
    """out += sum_r scales[r] block[r] over the rows r whose scale is not zero, added one row
    after another in increasing r, each sum rounded as it is made (no fastmath here: the
    order is the result). Four rows go into one pass over ``out``: the same sums in the same
    order, with a quarter of the loads and stores of ``out`` (``block`` is (len(scales), n)
    or wider, ``out`` has n entries). Every field of a layer from a wider layer, a state
    vector's or a clamped input's (MNIST's pixels are 81% zero), is this sum."""
    n = out.shape[0]
    rows = scales.shape[0]
    r0 = _next_nonzero(scales, 0)
    while r0 < rows:
        r1 = _next_nonzero(scales, r0 + 1)
        r2 = _next_nonzero(scales, r1 + 1) if r1 < rows else rows
        r3 = _next_nonzero(scales, r2 + 1) if r2 < rows else rows
        if r3 == rows:  # fewer than four rows left: one at a time
            for r in (r0, r1, r2):
                if r < rows:
                    value, weights = scales[r], block[r]
                    for j in range(n):
                        out[j] += value * weights[j]
            return
        v0, v1, v2, v3 = scales[r0], scales[r1], scales[r2], scales[r3]
        w0, w1, w2, w3 = block[r0], block[r1], block[r2], block[r3]
        for j in range(n):
            out[j] = (((out[j] + v0 * w0[j]) + v1 * w1[j]) + v2 * w2[j]) + v3 * w3[j]
        r0 = _next_nonzero(scales, r3 + 1)


@numba.njit(cache=True)
def drive_row(inputs_row, coupling, bias, out):
    """out = x W_1 + b_1 for one sample: b_1 plus the rows of W_1 of the inputs that are not
    zero, each scaled by its input, added one input after another in order
    (:func:`add_scaled_rows`; W_1 row-major (n_0, n_1))."""
    for j in range(bias.shape[0]):
        out[j] = bias[j]
    add_scaled_rows(out, coupling, inputs_row)


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


@numba.njit(cache=True, fastmath={"reassoc"})
def _layer_field(layer, sizes, state_offsets, weights, weight_offsets, transposed, biases,
                 bias_offsets, drive_row, row, out):
    """h_l for one sample into ``out``: input drive (l = 1) or b_l + W_l^T s_{l-1}, plus
    W_{l+1} s_{l+1} from the layer above.

    W_l is stored row-major (n_{l-1}, n_l), or transposed (n_l, n_{l-1}) where n_{l-1} > n_l,
    so that every inner loop runs over the larger of the two layers. Inner loops index views
    from zero (see :func:`coupling_block`); ``reassoc`` lets the dot products vectorize (it
    reorders sums only: NaN and inf still propagate).
    """
    n_here = sizes[layer]
    n_layers = sizes.shape[0] - 1
    if layer == 1:
        out[:n_here] = drive_row[:n_here]
    else:
        n_below = sizes[layer - 1]
        bias = biases[bias_offsets[layer - 1]:bias_offsets[layer - 1] + n_here]
        below = row[state_offsets[layer - 2]:state_offsets[layer - 2] + n_below]
        if transposed[layer - 1]:
            block = coupling_block(weights, weight_offsets[layer - 1], n_here, n_below)
            for j in range(n_here):
                coupling = block[j]
                acc = bias[j]
                for i in range(n_below):
                    acc += coupling[i] * below[i]
                out[j] = acc
        else:
            block = coupling_block(weights, weight_offsets[layer - 1], n_below, n_here)
            for j in range(n_here):
                out[j] = bias[j]
            add_scaled_rows(out[:n_here], block, below)
    if layer < n_layers:
        n_above = sizes[layer + 1]
        above = row[state_offsets[layer]:state_offsets[layer] + n_above]
        if transposed[layer]:
            block = coupling_block(weights, weight_offsets[layer], n_above, n_here)
            add_scaled_rows(out[:n_here], block, above)
        else:
            block = coupling_block(weights, weight_offsets[layer], n_here, n_above)
            for i in range(n_here):
                coupling = block[i]
                acc = 0.0
                for j in range(n_above):
                    acc += coupling[j] * above[j]
                out[i] += acc


@numba.njit(cache=True, fastmath={"reassoc"})
def _skip_field(layer, sizes, state_offsets, weights, skip_offsets, skip_lower, skip_upper, row,
                out):
    """Add the skip terms of layer l to its field ``out``: S_{l,m} s_m for every skip (l, m)
    above it, S_{k,l}^T s_k for every skip (k, l) below it. Each S_{l,m} is stored row-major
    (n_l, n_m) at ``skip_offsets[k]`` of the weight buffer; loops index views from zero."""
    for k in range(skip_lower.shape[0]):
        low = skip_lower[k]
        high = skip_upper[k]
        if low != layer and high != layer:
            continue
        n_low = sizes[low]
        n_high = sizes[high]
        block = coupling_block(weights, skip_offsets[k], n_low, n_high)
        if low == layer:
            above = row[state_offsets[high - 1]:state_offsets[high - 1] + n_high]
            for i in range(n_low):
                coupling = block[i]
                acc = 0.0
                for j in range(n_high):
                    acc += coupling[j] * above[j]
                out[i] += acc
        else:
            below = row[state_offsets[low - 1]:state_offsets[low - 1] + n_low]
            add_scaled_rows(out[:n_high], block, below)


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
def _full_field(layer, sizes, state_offsets, weights, weight_offsets, transposed, biases,
                bias_offsets, drive_row, row, skip_offsets, skip_lower, skip_upper, out):
    """The whole local field h_l of one sample into ``out``: :func:`_layer_field` plus, on a
    Hopfield-ResNet, :func:`_skip_field`."""
    _layer_field(layer, sizes, state_offsets, weights, weight_offsets, transposed, biases,
                 bias_offsets, drive_row, row, out)
    if skip_lower.shape[0] > 0:
        _skip_field(layer, sizes, state_offsets, weights, skip_offsets, skip_lower,
                    skip_upper, row, out)


@numba.njit(cache=True)
def _all_fields(sizes, state_offsets, weights, weight_offsets, transposed, biases,
                bias_offsets, drive_row, row, skip_offsets, skip_lower, skip_upper, field,
                fields):
    """Every layer's local field from the same state ``row`` (a synchronous update) into
    ``fields`` (laid out like the state); ``field`` is scratch of the widest layer."""
    for layer in range(1, sizes.shape[0]):
        s0 = state_offsets[layer - 1]
        _full_field(layer, sizes, state_offsets, weights, weight_offsets, transposed, biases,
                    bias_offsets, drive_row, row, skip_offsets, skip_lower, skip_upper, field)
        fields[s0:s0 + sizes[layer]] = field[:sizes[layer]]
