"""Parameter storage shared by the simulators of layered networks.

A layered model has couplings between consecutive layers (2-D parameters, layer l-1 to l, shape
(n_{l-1}, n_l)) and per-unit biases (1-D). This base class keeps them in flat buffers the numba
kernels read, each coupling block row-major or transposed so that kernel inner loops run over
the larger layer, and implements the storage half of the Bench contract: the physical ranges,
quantized storage with the device's hidden truth (:mod:`labep.simulators.device`), ``write``,
``read_params``, ``measure_params``, ``open`` and ``close``.
"""

from __future__ import annotations

from typing import Any, Literal

import numba
import numpy as np
from pydantic import BaseModel, Field, model_validator

from labep.hardware.bench import (
    BenchIdentity,
    BenchLifecycle,
    BenchSpec,
    OutOfRangeError,
    ParameterSpec,
)
from labep.protocol.strict import STRICT_CONFIG
from labep.simulators.device import DeviceOptions, ParameterDevice

#: the index type of kernels that index flat buffers directly, ``buffer[U(offset) + i]`` with
#: ``for i in range(U(n))``: unsigned, so numba adds no negative-index wraparound (which stops
#: inner loops from vectorizing), and no array view is made in a loop (each one made or taken
#: costs a reference count up and down, about 30 ns: more than half of a sample-step of the
#: 784-500-10 Hopfield network, a seventh of the OIM's forces). Used by
#: :mod:`labep.simulators.hopfield_fields`, :mod:`labep.simulators.hopfield` and
#: :mod:`labep.simulators.oim`; every sum keeps the order it had with views, so states are the
#: same to the bit. Index arithmetic stays int64 and is cast once: numba promotes
#: int64 + uint64 to float64.
U = numba.uint64


@numba.njit(cache=True)
def coupling_block(weights, offset, rows, cols):
    """The coupling block at ``offset`` of a flat buffer as a (rows, cols) row-major view.

    A kernel that indexes ``block[j][i]`` and views of the state from zero, never
    ``buffer[offset + i]`` with a signed index, lets numba know every index is non-negative:
    it drops its negative-index wraparound, and the inner loops vectorize (five times faster
    on the 784-500-10 networks). Kernels whose loops are short index the flat buffers with
    :data:`U` instead (no wraparound, no views).
    """
    return weights[offset:offset + rows * cols].reshape((rows, cols))


#: a continuous parameter this large is checked and stored by the kernels below (numba's
#: threads); a smaller one by numpy (cheaper than waking the threads)
_PARALLEL_SIZE = 1 << 16


@numba.njit(cache=True, parallel=True)
def _count_outside(values, low, high):  # pragma: no cover - compiled
    """How many of ``values`` (flat) are outside [low, high] or not finite."""
    count = 0
    for i in numba.prange(values.shape[0]):
        value = values[i]
        if not (value >= low and value <= high and value - value == 0.0):
            count += 1
    return count


@numba.njit(cache=True, parallel=True)
def _store_flat(values, out):  # pragma: no cover - compiled
    """out = values (flat, cast to ``out``'s dtype), in parallel."""
    for i in numba.prange(values.shape[0]):
        out[i] = values[i]


@numba.njit(cache=True, parallel=True)
def _store_counting(values, low, high, out):  # pragma: no cover - compiled
    """out = values (flat, cast to ``out``'s dtype), and how many of ``values`` are outside
    [low, high] or not finite: the check and the store of a write in one pass."""
    count = 0
    for i in numba.prange(values.shape[0]):
        value = values[i]
        out[i] = value
        if not (value >= low and value <= high and value - value == 0.0):
            count += 1
    return count


class LayeredSimulatorOptions(BaseModel):
    """Options every layered simulator has (``bench.options`` in a protocol)."""

    model_config = STRICT_CONFIG

    dtype: Literal["float32", "float64"] = Field(
        "float32", description="Arithmetic precision of states and parameters."
    )
    weight_range: float | None = Field(
        None, gt=0.0,
        description="Physical range |coupling| <= weight_range; writes outside are refused."
    )
    bias_range: float | None = Field(
        None, gt=0.0, description="Physical range |bias| <= bias_range; writes outside are refused."
    )
    tolerance: float = Field(1e-4, gt=0.0, description="Default settle tolerance.")
    max_steps: int = Field(100, ge=1, description="Default settle step cap.")
    device: DeviceOptions = Field(
        default_factory=DeviceOptions,
        description="Imperfections: resolution, mismatch, nonlinearity, noise (all off).")

    @model_validator(mode="after")
    def _ranges_for_codes(self) -> Any:
        if self.device.quantized and (self.weight_range is None or self.bias_range is None):
            raise ValueError("device.bits needs a finite weight_range and bias_range")
        return self


class LayeredSimulator(BenchLifecycle):
    """Storage of a layered model's couplings and biases, ideal or through a device."""

    name = ""
    #: the ``model`` field of the identity; the serial adds the sizes and the device seed
    identity_model = ""
    #: couplings l >= this index are stored transposed when n_{l-1} > n_l (kernel layout)
    transpose_from = 2

    def __init__(self, model: Any, options: LayeredSimulatorOptions) -> None:
        self.model = model
        self.options = options
        self.dtype = np.dtype(options.dtype)
        device = options.device
        levels = None if device.bits is None else 2 ** device.bits
        shapes = model.parameter_shapes()
        params = []
        for name, shape in shapes.items():
            limit = options.weight_range if len(shape) == 2 else options.bias_range
            limit = np.inf if limit is None else limit
            params.append(ParameterSpec(name, shape, -limit, limit, unit="1", levels=levels))
        self.spec = BenchSpec(
            parameters=tuple(params),
            input_size=model.input_size,
            state_size=model.state_size,
            output_slice=model.output_slice,
        )
        sizes = model.sizes
        self._sizes = np.asarray(sizes, dtype=np.int64)
        # 2-D parameters (couplings) lie one after another in the order of the model's shapes
        # (W_1 .. W_L for a layered model); block i is stored transposed where the kernels
        # want it (see transpose_from)
        couplings = [(name, shape) for name, shape in shapes.items() if len(shape) == 2]
        self._coupling_index = {name: i for i, (name, _) in enumerate(couplings)}
        w_sizes = [rows * cols for _, (rows, cols) in couplings]
        self._weight_offsets = np.concatenate(([0], np.cumsum(w_sizes)[:-1])).astype(np.int64)
        # only the inter-layer couplings W_l; further 2-D parameters (skips) stay row-major
        self._transposed = np.array(
            [model.layer_of(name) >= self.transpose_from and rows > cols
             and name == f"{model.coupling}{model.layer_of(name)}"
             for name, (rows, cols) in couplings], dtype=np.bool_)
        # 1-D parameters (biases) lie one after another in the order of the model's shapes:
        # b_1 .. b_L at the state's offsets, then any further per-unit parameters
        vectors = [(name, shape[0]) for name, shape in shapes.items() if len(shape) == 1]
        starts = np.concatenate(([0], np.cumsum([n for _, n in vectors])[:-1])).astype(np.int64)
        self._vector_offsets = {name: int(start) for (name, _), start in zip(vectors, starts,
                                                                             strict=True)}
        self._bias_offsets = np.concatenate(([0], np.cumsum(sizes[1:])[:-1])).astype(np.int64)
        self._weights = np.zeros(int(sum(w_sizes)), dtype=self.dtype)
        #: the second copy a write stages the large couplings in (see write)
        self._spare_weights: np.ndarray | None = None
        self._spare_views: dict[str, np.ndarray] = {}
        self._biases = np.zeros(int(sum(n for _, n in vectors)), dtype=self.dtype)
        self._version = 0
        self._clamp: tuple[np.ndarray, int, Any] | None = None
        self._views = {name: self._make_view(name, shape) for name, shape in shapes.items()}
        #: the hidden truth of each quantized parameter (None: ideal continuous storage)
        self.devices: dict[str, ParameterDevice] | None = None
        if device.quantized:
            truth = np.random.default_rng([device.seed, 0])
            self.devices = {spec.name: ParameterDevice(spec, device, truth, self.name)
                            for spec in self.spec.parameters}
            for name, dev in self.devices.items():
                self._views[name][...] = dev.values
        self._readout_rng = np.random.default_rng([device.seed, 1])

    def _make_view(self, name: str, shape: tuple[int, ...],
                   weights: np.ndarray | None = None) -> np.ndarray:
        """The view of parameter ``name`` into the biases or into the couplings (``weights``,
        default the live ones)."""
        if len(shape) == 1:
            start = self._vector_offsets[name]
            return self._biases[start:start + shape[0]]
        rows, cols = shape
        index = self._coupling_index[name]
        start = self._weight_offsets[index]
        flat = (self._weights if weights is None else weights)[start:start + rows * cols]
        return flat.reshape(cols, rows).T if self._transposed[index] else flat.reshape(
            rows, cols)

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> BenchIdentity:
        sizes = "-".join(str(n) for n in self.model.sizes)
        return BenchIdentity("labep", self.identity_model,
                             f"{self.name}-{sizes}-device{self.options.device.seed}",
                             "numba-" + numba.__version__)

    def close(self) -> None:
        self._clamp = None

    # -- parameters -------------------------------------------------------------------------

    def write(self, params: dict[str, np.ndarray]) -> None:
        """Continuous storage: physical values. Quantized storage (``device.bits``): integer
        codes in [0, levels - 1]. Everything is checked before anything is stored.

        Large couplings (continuous storage) are checked and stored in one pass into a second
        copy of the couplings, which replaces the first only once every value of the write
        passed its check (with the couplings the write does not name copied over)."""
        staged = self._stage_couplings(params) if self.devices is None else set()
        for name, values in params.items():
            if name in staged:
                continue
            if self.devices is None:
                spec = self.spec.parameter(name)
                if not self._large(values, spec.shape):
                    spec.check_range(values, bench=self.name)
                elif _count_outside(values.reshape(-1), spec.low, spec.high):
                    spec.check_range(values, bench=self.name)  # the error that says why
                    raise OutOfRangeError(f"{self.name}: write {name}: value(s) outside "
                                          "the physical range or not finite; refused")
            else:
                self.devices[name].check(values)
        if staged:
            self._swap_couplings(staged)
        for name, values in params.items():
            if name in staged:
                continue
            view = self._views[name]
            if self.devices is not None:
                view[...] = self.devices[name].store(values)
            elif self._large(values, view.shape) and view.flags.c_contiguous:
                _store_flat(values.reshape(-1), view.reshape(-1))
            else:
                view[...] = values
        self._version += 1

    def _stage_couplings(self, params: dict[str, np.ndarray]) -> set[str]:
        """Check and store the large couplings of ``params`` whose storage is contiguous into
        the spare copy of the couplings (:func:`_store_counting`); raises OutOfRangeError
        (nothing stored) if a value is outside its range. Returns the names staged."""
        names = [name for name, values in params.items()
                 if name in self._coupling_index and self._views[name].flags.c_contiguous
                 and self._large(values, self._views[name].shape)]
        if not names:
            return set()
        if self._spare_weights is None:
            self._spare_weights = np.empty_like(self._weights)
            self._spare_views = self._coupling_views(self._spare_weights)
        for name in names:
            spec = self.spec.parameter(name)
            target = self._spare_views[name].reshape(-1)  # contiguous, as the live view is
            if _store_counting(params[name].reshape(-1), spec.low, spec.high, target):
                spec.check_range(params[name], bench=self.name)  # the error that says why
                raise OutOfRangeError(f"{self.name}: write {name}: value(s) outside "
                                      "the physical range or not finite; refused")
        return set(names)

    def _swap_couplings(self, staged: set[str]) -> None:
        """The spare copy (holding ``staged``) becomes the couplings, with every coupling
        not staged copied into it first."""
        spare, views = self._spare_weights, self._spare_views
        assert spare is not None
        for name in self._coupling_index:
            if name not in staged:
                views[name][...] = self._views[name]
        live = {name: self._views[name] for name in self._coupling_index}
        self._weights, self._spare_weights = spare, self._weights
        self._views.update(views)
        self._spare_views = live

    def _coupling_views(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Each coupling's view into ``weights`` (a flat copy laid out as the couplings)."""
        return {name: self._make_view(name, self.spec.parameter(name).shape, weights)
                for name in self._coupling_index}

    @staticmethod
    def _large(values: Any, shape: tuple[int, ...]) -> bool:
        """Whether ``values`` are checked and stored by the parallel kernels: a float64
        C-contiguous array of the parameter's shape, of at least ``_PARALLEL_SIZE`` values."""
        return (isinstance(values, np.ndarray) and values.dtype == np.float64
                and values.shape == tuple(shape) and values.flags.c_contiguous
                and values.size >= _PARALLEL_SIZE)

    def read_params(self) -> dict[str, np.ndarray]:
        """What the bench holds: codes (quantized storage) or values (continuous)."""
        if self.devices is not None:
            return {name: dev.codes.copy() for name, dev in self.devices.items()}
        return {name: view.copy() for name, view in self._views.items()}

    def measure_params(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """A measurement of the physical values the channels realize (with readback noise)."""
        names = list(self.spec.parameter_names) if names is None else names
        if self.devices is not None:
            return {name: self.devices[name].measure() for name in names}
        return {name: self._views[name].astype(np.float64) for name in names}

    # -- resume (labep.hardware.bench.Resumable) ---------------------------------------------------

    def save_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The stored values (with their write noise), the codes, and every generator's state."""
        meta: dict[str, Any] = {"readout_rng": self._readout_rng.bit_generator.state}
        arrays = {"weights": self._weights.copy(), "biases": self._biases.copy()}
        if self.devices is not None:
            meta["truth_rng"] = next(iter(self.devices.values())).rng.bit_generator.state
            for name, dev in self.devices.items():
                arrays[f"codes.{name}"] = dev.codes.copy()
                arrays[f"values.{name}"] = np.asarray(dev.values, dtype=np.float64)
        return meta, arrays

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self._weights[...] = arrays["weights"]
        self._biases[...] = arrays["biases"]
        self._readout_rng.bit_generator.state = meta["readout_rng"]
        if self.devices is not None:
            for name, dev in self.devices.items():
                dev.codes = np.array(arrays[f"codes.{name}"], dtype=np.int64)
                dev.values = np.array(arrays[f"values.{name}"], dtype=np.float64)
            # the devices share one generator (the device truth and its noise)
            next(iter(self.devices.values())).rng.bit_generator.state = meta["truth_rng"]
        self._version += 1
        self._clamp = None

    # -- shared physics helpers -------------------------------------------------------------

    def _clamped(self, inputs: np.ndarray, compute: Any) -> Any:
        """``compute(inputs)`` (the clamped input's constant drive), cached per inputs and
        parameters so that every phase of a batch reuses it."""
        if self._clamp is not None:
            clamped, version, drive = self._clamp
            if version == self._version and np.array_equal(clamped, inputs):
                return drive
        drive = compute(inputs)
        self._clamp = (inputs.copy(), self._version, drive)
        return drive

    def _prepare(self, inputs: np.ndarray, nudge: Any, start: np.ndarray | None,
                 rest: float = 0.0) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        """Inputs (checked, contiguous), the start state, the nudge strength and target."""
        inputs = np.ascontiguousarray(inputs, dtype=self.dtype)
        if inputs.ndim != 2 or inputs.shape[1] != self.model.input_size:
            raise ValueError(f"{self.name}: inputs must be (batch, {self.model.input_size}), "
                             f"got {inputs.shape}")
        return (inputs, *self._start_and_nudge(inputs.shape[0], nudge, start, rest))

    def _start_and_nudge(self, batch: int, nudge: Any, start: np.ndarray | None,
                         rest: float = 0.0) -> tuple[np.ndarray, float, np.ndarray]:
        """The start state (``rest`` everywhere when no start is given), the nudge strength
        and the nudge target of a batch, in the bench's dtype."""
        if start is None:
            state = np.full((batch, self.model.state_size), rest, dtype=self.dtype)
        else:
            state = np.array(start, dtype=self.dtype, order="C", copy=True)
        if nudge is None:
            strength = 0.0
            target = np.zeros((batch, self.model.output_size), dtype=self.dtype)
        else:
            strength = float(nudge.strength)
            target = np.ascontiguousarray(nudge.target, dtype=self.dtype)
        return state, strength, target
