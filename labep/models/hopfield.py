"""Layered continuous Hopfield network: the classic EP system (Scellier and Bengio 2017).

Layers s_0 = x (clamped input), s_1 ... s_L (s_L the output), units confined to [0, 1].
Energy (the primitive function Phi of Laborieux et al. 2021, with E = |s|^2 / 2 - Phi):

    E(x, s; W, b) = 1/2 sum_l |s_l|^2 - sum_l s_{l-1}^T W_l s_l - sum_l b_l^T s_l

with W_l of shape (n_{l-1}, n_l). Its box-constrained stationary points are the fixed points
s_l = rho(h_l), h_l = W_l^T s_{l-1} + W_{l+1} s_{l+1} + b_l, rho the hard sigmoid clip(., 0, 1).
Cost C = 1/2 |s_L - y|^2; the nudged energy is E + beta C.

Local measurements: dE/dW_l = -s_{l-1} s_l^T, dE/db_l = -s_l.

Skip couplings (Hopfield-ResNet, Elayedam and Srinivasan 2025, "Scaling Equilibrium Propagation
to Deeper Neural Network Architectures"): optional symmetric couplings S_{l,m} of shape
(n_l, n_m) between non-adjacent free layers 1 <= l < m <= L, m - l >= 2, add

    - sum_{(l, m)} s_l^T S_{l,m} s_m

to E, so h_l gains S_{l,m} s_m, h_m gains S_{l,m}^T s_l, and dE/dS_{l,m} = -s_l s_m^T (local, like
W). With no skips the model is exactly the plain layered network above.

Activation: the paper's "clipped ReLU" is min(max(s, 0), c); its reference code defaults to
c = 6 (ReLU6). Here the box is [0, 1], c = 1: the hard sigmoid clip(s, 0, 1) *is* the clipped
ReLU with ceiling 1. A ceiling c is a change of units: with s = c u, E / c^2 is this energy in u
with W_1 and b scaled by 1 / c and the targets by 1 / c, so c only sets where the one-hot
targets sit inside the box (here at its top).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numba
import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt, ValidationInfo, field_validator

from labep.models import Params
from labep.models.layered import SquaredErrorReadout, not_huge
from labep.protocol.sections import ModelSection

Skip = tuple[int, int]


@numba.njit(cache=True, parallel=True)
def _input_contrast(inputs, weights, difference, out):  # pragma: no cover - compiled
    n_samples = inputs.shape[0]
    n_here = difference.shape[1]
    # each row's list of non-zero inputs, allocated once (an allocation per row cost more
    # than the row's arithmetic)
    all_values = np.empty((inputs.shape[1], n_samples), dtype=difference.dtype)
    all_which = np.empty((inputs.shape[1], n_samples), dtype=np.int64)
    for i in numba.prange(inputs.shape[1]):
        row = out[i]
        for j in range(n_here):
            row[j] = 0.0
        # the samples whose input i is not zero, in order; four of them a pass over the row
        values = all_values[i]
        which = all_which[i]
        count = 0
        for sample in range(n_samples):
            value = inputs[sample, i] * weights[sample]
            if value != 0.0:
                values[count] = value
                which[count] = sample
                count += 1
        k = 0
        while k + 4 <= count:
            v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
            c0, c1 = difference[which[k]], difference[which[k + 1]]
            c2, c3 = difference[which[k + 2]], difference[which[k + 3]]
            for j in range(n_here):
                row[j] = (((row[j] - v0 * c0[j]) - v1 * c1[j]) - v2 * c2[j]) - v3 * c3[j]
            k += 4
        while k < count:
            value = values[k]
            change = difference[which[k]]
            for j in range(n_here):
                row[j] -= value * change[j]
            k += 1


def input_contrast(inputs: np.ndarray, weights: np.ndarray, difference: np.ndarray
                   ) -> np.ndarray:
    """-x^T diag(w) (s_a1 - s_b1), the clamped input layer's dE/dW_1 contrast, shape
    (n_0, n_1): one row per input (in parallel, on numba's threads), summed over the samples
    in order and only over those whose input is not zero (MNIST's pixels are 81% zero), so no
    BLAS pool runs next to numba's. ``inputs``, ``weights`` and ``difference`` share a dtype."""
    out = np.empty((inputs.shape[1], difference.shape[1]), dtype=difference.dtype)
    _input_contrast(np.ascontiguousarray(inputs), np.ascontiguousarray(weights),
                    np.ascontiguousarray(difference), out)
    return out


@numba.njit(cache=True)
def _pair_contrast(state_a, state_b, low, n_low, high, n_high, weights,
                   out):  # pragma: no cover - compiled
    # float64 sums over the samples, in order, the inner loop over the larger layer; the
    # layers are taken from each (contiguous) state row, so the loops vectorize
    transposed = n_high < n_low
    small, n_small = (high, n_high) if transposed else (low, n_low)
    large, n_large = (low, n_low) if transposed else (high, n_high)
    acc = np.empty(n_large)
    for p in range(n_small):
        acc[:] = 0.0
        for sample in range(state_a.shape[0]):
            row_a, row_b = state_a[sample], state_b[sample]
            wa = np.float64(weights[sample]) * row_a[small + p]
            wb = np.float64(weights[sample]) * row_b[small + p]
            big_a, big_b = row_a[large:large + n_large], row_b[large:large + n_large]
            for q in range(n_large):
                acc[q] += wa * big_a[q] - wb * big_b[q]
        for q in range(n_large):
            if transposed:
                out[q, p] = -acc[q]
            else:
                out[p, q] = -acc[q]


@numba.njit(cache=True)
def _unit_contrast(state_a, state_b, weights, out):  # pragma: no cover - compiled
    acc = np.zeros(state_a.shape[1])
    for sample in range(state_a.shape[0]):
        w = np.float64(weights[sample])
        row_a, row_b = state_a[sample], state_b[sample]
        for j in range(acc.shape[0]):
            acc[j] += w * (np.float64(row_a[j]) - row_b[j])
    for j in range(acc.shape[0]):
        out[j] = -acc[j]


def pair_contrast(state_a: np.ndarray, state_b: np.ndarray, low: tuple[int, int],
                  high: tuple[int, int], weights: np.ndarray) -> np.ndarray:
    """-(s_a,l^T diag(w) s_a,m - s_b,l^T diag(w) s_b,m), the dE/dW contrast of a coupling
    between two free layers (W_l, l >= 2, or a skip S_{l,m}) whose units are the columns
    ``low`` = (start, stop) and ``high`` of the states, shape (n_l, n_m): one numba loop
    summing in float64 over the samples in order (the two outer products of small layers
    cost more as numpy temporaries and BLAS calls than as arithmetic)."""
    state_a, state_b = np.ascontiguousarray(state_a), np.ascontiguousarray(state_b)
    n_low, n_high = low[1] - low[0], high[1] - high[0]
    out = np.empty((n_low, n_high), dtype=state_a.dtype)
    _pair_contrast(state_a, state_b, low[0], n_low, high[0], n_high, weights, out)
    return out


def unit_contrast(state_a: np.ndarray, state_b: np.ndarray, weights: np.ndarray
                  ) -> np.ndarray:
    """-sum_s w_s (s_a - s_b) per unit of the whole state, the dE/db_l contrast of every
    layer at once (float64 sums over the samples in order, in the states' dtype)."""
    out = np.empty(state_a.shape[1], dtype=state_a.dtype)
    _unit_contrast(state_a, state_b, weights, out)
    return out


def resolve_skips(n_layers: int, skips: list[list[int]] | list[Skip] | None = None,
                  skip_every: int | None = None) -> tuple[Skip, ...]:
    """The skip couplings (l, m) of a network with L = ``n_layers`` free layers, sorted.

    ``skips`` lists pairs explicitly; ``skip_every = k`` is the ResNet shorthand
    (1, 1 + k), (1 + k, 1 + 2k), ... up to layer L (k >= 2). Raises ValueError naming the
    offending pair: endpoints must be free layers 1..L, l < m, m - l >= 2, no duplicates.
    """
    pairs: list[Skip] = []
    for pair in skips or ():
        if len(pair) != 2:
            raise ValueError(f"skip {list(pair)} must be a pair [l, m]")
        low, high = int(pair[0]), int(pair[1])
        if not (1 <= low <= n_layers and 1 <= high <= n_layers):
            raise ValueError(f"skip [{low}, {high}]: endpoints must be free layers 1..{n_layers} "
                             "(0 is the clamped input)")
        if high - low < 2:
            raise ValueError(f"skip [{low}, {high}]: needs l < m and m - l >= 2 "
                             "(adjacent layers are already coupled by W)")
        if (low, high) in pairs:
            raise ValueError(f"skip [{low}, {high}] is listed twice")
        pairs.append((low, high))
    if skip_every is not None:
        if skip_every < 2:
            raise ValueError(f"skip_every must be >= 2, got {skip_every}")
        for low in range(1, n_layers + 1 - skip_every, skip_every):
            if (low, low + skip_every) not in pairs:
                pairs.append((low, low + skip_every))
    return tuple(sorted(pairs))


class LayeredHopfieldConfig(ModelSection):
    """Layered Hopfield network: sizes [n_0 (inputs), n_1, ..., n_L (outputs)]."""

    kind: Literal["layered_hopfield"]
    sizes: list[PositiveInt] = Field(min_length=2, max_length=64)
    activation: Literal["hard_sigmoid"] = Field(
        "hard_sigmoid", description="clip(s, 0, 1): the clipped ReLU with ceiling 1.")
    init_gain: PositiveFloat = Field(1.0, description="W ~ U(-g/sqrt(n_in), g/sqrt(n_in)).")
    skips: list[list[int]] = Field(
        default_factory=list, max_length=2016,
        description="Skip couplings S_{l,m} (Hopfield-ResNet) between free layers [l, m], "
        "1 <= l, m - l >= 2, m <= L; each learns at the rate of its upper layer m.")
    skip_every: int | None = Field(
        None, ge=2, le=64,
        description="Shorthand: skips [1, 1+k], [1+k, 1+2k], ... up to layer L (added to skips).")
    skip_init_gain: PositiveFloat | None = Field(
        None, description="S_{l,m} ~ U(-g_s/sqrt(n_l), g_s/sqrt(n_l)); default init_gain.")

    def model_arguments(self) -> dict[str, Any]:
        return self.model_dump(exclude={"kind", "activation"})

    _not_huge = field_validator("sizes")(not_huge)

    @field_validator("skips")
    @classmethod
    def _skips_fit(cls, skips: list[list[int]], info: ValidationInfo) -> list[list[int]]:
        sizes = info.data.get("sizes")
        if sizes is not None:
            resolve_skips(len(sizes) - 1, skips)  # raises naming the offending pair
        return skips

    @field_validator("skip_every")
    @classmethod
    def _span_fits(cls, every: int | None, info: ValidationInfo) -> int | None:
        sizes = info.data.get("sizes")
        if every is not None and sizes is not None and every > len(sizes) - 2:
            raise ValueError(f"a skip every {every} layers needs more than {every} free layers; "
                             f"this network has {len(sizes) - 1}")
        return every


class LayeredHopfield(SquaredErrorReadout):
    """Layered Hopfield energy with hard-sigmoid units; the model shared by simulator and host.

    Parameters are named ``W1..WL`` (W_l couples layer l-1 to l, shape (n_{l-1}, n_l)) and
    ``b1..bL``, then one ``S{l}_{m}`` per skip (S_{l,m}, shape (n_l, n_m)). A read-back state is
    the concatenation [s_1, ..., s_L], one row per sample.

    A skip's learning-rate group (:meth:`layer_of`) is its upper layer m, the layer it feeds
    from below, as W_m is; it is drawn from U(-g_s/sqrt(n_l), g_s/sqrt(n_l)) (fan-in n_l, g_s
    ``skip_init_gain``, default the ``init_gain``).
    """

    #: the protocol section this model is built from (``model:``)
    config_model: ClassVar[type[ModelSection]] = LayeredHopfieldConfig

    kind = "layered_hopfield"
    coupling = "W"
    vectors = ("b",)

    def __init__(self, sizes: list[int] | tuple[int, ...], init_gain: float = 1.0,
                 skips: list[list[int]] | list[Skip] | None = None,
                 skip_every: int | None = None,
                 skip_init_gain: float | None = None) -> None:
        super().__init__(sizes, init_gain)
        self.skips = resolve_skips(self.n_layers, skips, skip_every)
        self.skip_init_gain = self.init_gain if skip_init_gain is None else float(skip_init_gain)

    @staticmethod
    def skip_name(low: int, high: int) -> str:
        """Parameter name of S_{l,m}."""
        return f"S{low}_{high}"

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        # skips after W and b: a model without skips draws and stores exactly what it did
        shapes = super().parameter_shapes()
        for low, high in self.skips:
            shapes[self.skip_name(low, high)] = (self.sizes[low], self.sizes[high])
        return shapes

    def layer_of(self, name: str) -> int:
        """The layer l of W_l or b_l, the upper layer m of a skip S_{l,m}."""
        if name.startswith("S"):
            return int(name.partition("_")[2])
        return super().layer_of(name)

    def init_params(self, rng: np.random.Generator) -> Params:
        """W_l, b_l ~ U(-g/sqrt(n_{l-1}), g/sqrt(n_{l-1})), S_{l,m} ~ U(-g_s/sqrt(n_l), ...),
        drawn in the order of :meth:`parameter_shapes` (the skips last)."""
        params: Params = {}
        for name, shape in self.parameter_shapes().items():
            if name.startswith("S"):
                bound = self.skip_init_gain / np.sqrt(shape[0])
            else:
                bound = self.init_gain / np.sqrt(self.sizes[self.layer_of(name) - 1])
            params[name] = rng.uniform(-bound, bound, size=shape)
        return params

    # -- activation -------------------------------------------------------------------------

    @staticmethod
    def rho(h: np.ndarray) -> np.ndarray:
        """Hard sigmoid rho(h) = clip(h, 0, 1)."""
        return np.clip(h, 0.0, 1.0)

    @staticmethod
    def rho_prime(h: np.ndarray) -> np.ndarray:
        """rho'(h): 1 strictly inside (0, 1), 0 where the unit is saturated."""
        return ((h > 0.0) & (h < 1.0)).astype(h.dtype)

    # -- physics ----------------------------------------------------------------------------

    def local_fields(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """h(s) = dPhi/ds for every unit, shape like ``state`` (no nudge)."""
        fields = np.empty_like(state, dtype=np.result_type(state, params["W1"]))
        for index in range(1, self.n_layers + 1):
            start, stop = self.layer_slices[index]
            below = inputs if index == 1 else self.layer(state, index - 1)
            field = below @ params[f"W{index}"] + params[f"b{index}"]
            if index < self.n_layers:
                field = field + self.layer(state, index + 1) @ params[f"W{index + 1}"].T
            fields[:, start:stop] = field
        for low, high in self.skips:  # h_l += S s_m, h_m += S^T s_l
            skip = params[self.skip_name(low, high)]
            lo_l, hi_l = self.layer_slices[low]
            lo_m, hi_m = self.layer_slices[high]
            fields[:, lo_l:hi_l] += self.layer(state, high) @ skip.T
            fields[:, lo_m:hi_m] += self.layer(state, low) @ skip
        return fields

    def energy(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        """Per-sample E(x, s; theta)."""
        energy = 0.5 * np.sum(state * state, axis=1)
        for index in range(1, self.n_layers + 1):
            below = inputs if index == 1 else self.layer(state, index - 1)
            here = self.layer(state, index)
            energy -= np.sum((below @ params[f"W{index}"]) * here, axis=1)
            energy -= here @ params[f"b{index}"]
        for low, high in self.skips:
            skip = params[self.skip_name(low, high)]
            energy -= np.sum((self.layer(state, low) @ skip) * self.layer(state, high), axis=1)
        return energy

    def residual(self, inputs: np.ndarray, state: np.ndarray, params: Params) -> np.ndarray:
        return np.max(np.abs(self.rho(self.local_fields(inputs, state, params)) - state), axis=1)

    # -- EP measurements --------------------------------------------------------------------

    def contrast(
        self,
        inputs: np.ndarray,
        state_a: np.ndarray,
        state_b: np.ndarray,
        weights: np.ndarray | None = None,
        scale: float = 1.0,
    ) -> Params:
        """``scale`` times the weighted batch mean of dE/dtheta(s_a) - dE/dtheta(s_b).

        dE/dW_l = -s_{l-1} s_l^T, so for the clamped input layer the difference is one product
        -x^T (s_a1 - s_b1) (:func:`input_contrast`, over the inputs that are not zero); deeper
        layers and skips need both outer products (:func:`pair_contrast`), the biases the
        states' difference (:func:`unit_contrast`). The scale rides on the per-sample
        weights, so it costs nothing on the parameter-sized arrays.
        """
        batch = state_a.shape[0]
        inputs = np.asarray(inputs, dtype=state_a.dtype)
        w = np.full(batch, 1.0 / batch) if weights is None else weights / max(weights.sum(), 1e-300)
        w = (w * scale).astype(state_a.dtype, copy=False)
        units = unit_contrast(state_a, state_b, w)  # every dE/db_l = -s_l at once
        slices = self.layer_slices
        grads: Params = {}
        for index in range(1, self.n_layers + 1):
            a, b = self.layer(state_a, index), self.layer(state_b, index)
            if index == 1:
                grads["W1"] = input_contrast(inputs, w, a - b)
            else:
                grads[f"W{index}"] = pair_contrast(state_a, state_b, slices[index - 1],
                                                   slices[index], w)
            start, stop = slices[index]
            grads[f"b{index}"] = units[start:stop]
        for low, high in self.skips:  # dE/dS_{l,m} = -s_l s_m^T
            grads[self.skip_name(low, high)] = pair_contrast(state_a, state_b, slices[low],
                                                             slices[high], w)
        return grads

    def couplings(self, params: Params) -> np.ndarray:
        """A = dh/ds, (n, n) float64 and symmetric: the inter-layer couplings W_l (l >= 2) and
        the skips S, so that h(s) = A s + d(x) with d_1 = W_1^T x + b_1, d_l = b_l."""
        n = self.state_size
        coupling = np.zeros((n, n))
        blocks = [(index - 1, index, f"W{index}") for index in range(2, self.n_layers + 1)]
        blocks += [(low, high, self.skip_name(low, high)) for low, high in self.skips]
        for low, high, name in blocks:
            lo_a, hi_a = self.layer_slices[low]
            lo_b, hi_b = self.layer_slices[high]
            coupling[lo_a:hi_a, lo_b:hi_b] = params[name]
            coupling[lo_b:hi_b, lo_a:hi_a] = np.asarray(params[name]).T
        return coupling

    def field_gradient(self, inputs: np.ndarray, state: np.ndarray, mu: np.ndarray) -> Params:
        """sum over samples and units of mu_i dh_i/dtheta at fixed s (h the local fields),
        ``mu`` (batch, n): dW_l[i, j] = s_{l-1,i} mu_{l,j} + mu_{l-1,i} s_{l,j} (mu_0 = 0),
        db_l = mu_l, dS_{l,m}[i, j] = s_{l,i} mu_{m,j} + mu_{l,i} s_{m,j}. Since
        dE/ds = s - h, this is minus sum_i mu_i d^2E/(ds_i dtheta)."""
        grads: Params = {}
        for index in range(1, self.n_layers + 1):
            here_mu = self.layer(mu, index)
            below = inputs if index == 1 else self.layer(state, index - 1)
            grad = below.T @ here_mu
            if index > 1:
                grad += self.layer(mu, index - 1).T @ self.layer(state, index)
            grads[f"W{index}"] = grad
            grads[f"b{index}"] = here_mu.sum(axis=0)
        for low, high in self.skips:
            grads[self.skip_name(low, high)] = (
                self.layer(state, low).T @ self.layer(mu, high)
                + self.layer(mu, low).T @ self.layer(state, high))
        return grads

    # -- second derivatives (the low-temperature expansion, labep.ep.low_temperature) -------

    def state_gradient(self, inputs: np.ndarray, state: np.ndarray, params: Params,
                       strength: float = 0.0, target: np.ndarray | None = None) -> np.ndarray:
        """dE_beta/ds = s - h(s) + beta (s_L - y) on the outputs, (batch, n) float64."""
        state = np.asarray(state, dtype=np.float64)
        gradient = state - self.local_fields(np.asarray(inputs, dtype=np.float64), state,
                                             _float64(params))
        if strength != 0.0:
            lo, hi = self.output_slice
            gradient[:, lo:hi] += strength * (state[:, lo:hi] - target)
        return gradient

    def hessian(self, inputs: np.ndarray, state: np.ndarray, params: Params,
                strength: float = 0.0) -> np.ndarray:
        """H_beta = d^2(E + beta C)/ds^2 = I - A + beta P_L (P_L: the output units), one
        (n, n) matrix per sample, float64. E is quadratic in s: H does not depend on s."""
        hessian = np.eye(self.state_size) - self.couplings(_float64(params))
        lo, hi = self.output_slice
        hessian[np.arange(lo, hi), np.arange(lo, hi)] += strength
        return np.broadcast_to(hessian, (len(state), *hessian.shape))

    def hessian_gradient(self, inputs: np.ndarray, state: np.ndarray, params: Params,
                         matrix: np.ndarray) -> Params:
        """sum over samples of sum_ij M_ij dH_ij/dtheta, ``matrix`` M (batch, n, n), H the
        Hessian of E + beta C. Only A depends on theta (dH/dW_l = -dA/dW_l for l >= 2,
        dH/dS = -dA/dS; W_1, b and beta do not enter H), and H does not depend on s, so
        this is the total derivative along the fixed point too (no third derivatives)."""
        total = np.sum(matrix, axis=0)
        total = total + total.T  # A_ij and A_ji are the same parameter entry
        grads: Params = {name: np.zeros(shape) for name, shape in self.parameter_shapes().items()}
        blocks = [(index - 1, index, f"W{index}") for index in range(2, self.n_layers + 1)]
        blocks += [(low, high, self.skip_name(low, high)) for low, high in self.skips]
        for low, high, name in blocks:
            lo_a, hi_a = self.layer_slices[low]
            lo_b, hi_b = self.layer_slices[high]
            grads[name] = -total[lo_a:hi_a, lo_b:hi_b]
        return grads

    def exact_gradient(
        self, inputs: np.ndarray, state: np.ndarray, target: np.ndarray, params: Params
    ) -> Params:
        """d(mean C)/dtheta at the free fixed point s* = rho(h(s*)), by implicit differentiation.

        With D = diag(rho'(h)) and A = dh/ds (symmetric, the inter-layer couplings W and the
        skips S, :meth:`couplings`), the adjoint lambda solves (I - A D) lambda = dC/ds; with
        mu = D lambda, dC/dtheta = sum_i mu_i dh_i/dtheta (:meth:`field_gradient`).
        Computed in float64, one dense solve per sample.
        """
        inputs = np.asarray(inputs, dtype=np.float64)
        state = np.asarray(state, dtype=np.float64)
        params = _float64(params)
        coupling = self.couplings(params)
        slope = self.rho_prime(self.local_fields(inputs, state, params))
        dcost = np.zeros_like(state)
        lo, hi = self.output_slice
        dcost[:, lo:hi] = state[:, lo:hi] - target
        mu = np.empty_like(state)
        eye = np.eye(self.state_size)
        for sample in range(state.shape[0]):
            adjoint = np.linalg.solve(eye - coupling * slope[sample][None, :], dcost[sample])
            mu[sample] = slope[sample] * adjoint
        batch = state.shape[0]
        return {name: grad / batch
                for name, grad in self.field_gradient(inputs, state, mu).items()}


def _float64(params: Params) -> Params:
    return {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
