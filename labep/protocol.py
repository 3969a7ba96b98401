"""The protocol file: a Pydantic-validated YAML document that sequences an EP run.

Validation happens whole, before anything touches a bench: the schema (types, ranges, unknown
keys), then the cross-checks that need the registry or the data (bench options, model vs.
dataset sizes, one learning rate per layer, dataset files readable). Every problem is reported
with its dotted path, its line in the file (or the ``--set`` override it came from) and a
plain message; :class:`ProtocolError` carries them all.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    DirectoryPath,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from labep import registry
from labep.strict import StrictModel

# --------------------------------------------------------------------------------------------
# Schema


class _Strict(StrictModel):
    """A protocol section: strict types (labep.strict), unknown keys and NaN refused."""


class BenchConfig(_Strict):
    """Which bench runs the protocol: exactly one of ``simulator`` or ``driver``."""

    simulator: str | None = Field(None, description="Name of a labep simulator, e.g. hopfield.")
    driver: str | None = Field(None, description="Name of a labep driver (real instrument).")
    resource: str | None = Field(
        None, description="Transport of a driver: a serial URL or a VISA resource string."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="The bench's own options, validated by the bench."
    )

    @property
    def name(self) -> str:
        return self.simulator or self.driver or ""

    @property
    def kind(self) -> str:
        return "simulator" if self.simulator else "driver"


class LayeredHopfieldConfig(_Strict):
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

    @field_validator("sizes")
    @classmethod
    def _not_huge(cls, sizes: list[int]) -> list[int]:
        if any(n > 1_000_000 for n in sizes):
            raise ValueError("layer sizes above 1,000,000 units are refused")
        return sizes

    @field_validator("skips")
    @classmethod
    def _skips_fit(cls, skips: list[list[int]], info: ValidationInfo) -> list[list[int]]:
        sizes = info.data.get("sizes")
        if sizes is not None:
            from labep.models.hopfield import resolve_skips

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


class LayeredOIMConfig(_Strict):
    """Layered oscillator Ising machine: sizes [n_0 (inputs), n_1, ..., n_L (outputs)]."""

    kind: Literal["layered_oim"]
    sizes: list[PositiveInt] = Field(min_length=2, max_length=64)
    shil: float = Field(0.0, ge=0.0, le=1e3,
                        description="K_s, second-harmonic injection locking strength.")
    init_gain: PositiveFloat = Field(1.0, description="J, h ~ U(-g/sqrt(n_in), g/sqrt(n_in)).")

    _not_huge = field_validator("sizes")(LayeredHopfieldConfig._not_huge.__func__)


class DenseOIMConfig(_Strict):
    """All-to-all oscillator Ising machine: sizes [n_0 (inputs), n_hidden, n_out]; every free
    oscillator is coupled to every other (J, symmetric) and to every input (K)."""

    kind: Literal["dense_oim"]
    sizes: list[PositiveInt] = Field(min_length=3, max_length=3)
    shil: float = Field(0.0, ge=0.0, le=1e3,
                        description="K_s, second-harmonic injection locking strength.")
    init_gain: PositiveFloat = Field(1.0, description="K, h, g ~ U(-g/sqrt(n_0), g/sqrt(n_0)); "
                                     "J ~ U(-g/sqrt(N), g/sqrt(N)).")

    @field_validator("sizes")
    @classmethod
    def _small(cls, sizes: list[int]) -> list[int]:
        if sizes[1] + sizes[2] > 4096 or sizes[0] > 1_000_000:
            raise ValueError("a dense machine has at most 4,096 free oscillators (N^2 couplings)")
        return sizes


class InitRegion(_Strict):
    """Initial potentials of some sites of a polariton lattice: V ~ U(low, high) there."""

    sites: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    potential: tuple[float, float] = Field(
        strict=False, description="[low, high], units of J (a YAML list).")


def _flatten_regions(regions: list[int | list[int]]) -> list[int]:
    """Every site of a list of regions (a region is a site or a list of sites), in order."""
    return [site for region in regions
            for site in ([region] if isinstance(region, int) else region)]


class PolaritonConfig(_Strict):
    """Exciton-polariton lattice (driven-dissipative Gross-Pitaevskii, labep.models.polariton):
    complex fields psi_i on a chain [n] or a grid [rows, cols], trainable local potentials V_i,
    inputs as potentials on the input sites, readout the output sites' intensities."""

    kind: Literal["polariton"]
    lattice: list[PositiveInt] = Field(min_length=1, max_length=2,
                                       description="[n] (chain) or [rows, cols] (grid).")
    inputs: PositiveInt = Field(le=1_000_000, description="Raw input features (the dataset's).")
    input_sites: list[Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]]] = Field(
        min_length=1, description="One input region per encoded feature: a site (row-major), "
        "or a list of sites that all display the feature.")
    inverted_input_sites: (list[Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]]]
                           | None) = Field(
        None, min_length=1, description="Optional: one more region per encoded feature that "
        "displays it inverted, -u x_k (a differential display; the input pump is not applied "
        "there).")
    output_sites: list[Annotated[int, Field(ge=0)] | list[Annotated[int, Field(ge=0)]]] = Field(
        min_length=2, description="One output region per class: a site, or a list of sites "
        "whose intensities |psi|^2 are summed (a camera's region of interest).")
    encoding: Literal["direct", "downsample", "pca"] = Field(
        "direct", description="direct: feature k drives input region k; downsample: the "
        "features are an image (image_shape), averaged over pool x pool blocks, row-major; pca: "
        "the first K principal components of the training inputs, standardized (K input "
        "regions).")
    image_shape: list[PositiveInt] | None = Field(None, min_length=2, max_length=2)
    pool: PositiveInt = Field(1, le=64)
    hopping: PositiveFloat = Field(1.0, le=1e3, description="J, the tunnelling (energy unit).")
    interaction: float = Field(1.0, ge=-1e3, le=1e3, description="g, the interaction.")
    pump: float = Field(0.9, ge=0.0, le=1e3, description="P, the non-resonant pump.")
    pump_sites: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="Sites the pump spot covers (None: every site).")
    loss: PositiveFloat = Field(0.3, le=1e3, description="gamma, the loss rate.")
    saturation: PositiveFloat = Field(0.3, le=1e3, description="Gamma, the gain saturation.")
    input_potential: float = Field(1.0, ge=-1e3, le=1e3,
                                   description="u: input site k gets the potential u x_k.")
    input_pump: float = Field(0.0, ge=0.0, le=1e3,
                              description="p_in: input site k gets the extra pump p_in x_k.")
    target_low: float = Field(0.5, ge=0.0, le=1e6,
                              description="Target intensity (or fraction), other classes.")
    target_high: float = Field(2.0, ge=0.0, le=1e6,
                               description="Target intensity (or fraction), the class.")
    init_potential: tuple[float, float] = Field(
        (-0.5, 0.5), strict=False, description="V ~ U(low, high) (a YAML list).")
    init_regions: list[InitRegion] = Field(
        [], description="Sites drawn from their own range instead, in order (walls, wells).")
    cost: Literal["intensity", "fraction", "fraction_hinge", "cross_entropy"] = Field(
        "intensity", description="intensity: 1/2 sum (n_k - t_k)^2; fraction: 1/2 sum (f_k - "
        "t_k)^2 with f_k = n_k / sum_j n_j; fraction_hinge: the same, but the class's region "
        "costs nothing above target_high nor the others below target_low; cross_entropy: "
        "-sum t_k log f_k (targets 0 and 1). The last three are blind to the total intensity "
        "(EP exact with the intensity projection).")
    projection: Literal["none", "uniform", "intensity"] = Field(
        "intensity", description="How the EP contrast of V is made to sum to zero (the gauge "
        "identity): along the states' intensity pattern, uniformly, or not at all.")
    energy_relaxation: float = Field(
        0.0, ge=0.0, le=10.0, description="eta, energy relaxation of the generalized GP "
        "(0: none, the bare driven-dissipative equation).")

    @property
    def sizes(self) -> list[int]:
        """[input features, classes], what the dataset checks compare against."""
        return [self.inputs, len(self.output_sites)]

    @property
    def output_site_list(self) -> list[int]:
        """Every output site, region by region."""
        return _flatten_regions(self.output_sites)

    @property
    def input_site_list(self) -> list[int]:
        """Every input site, region by region (then the inverted regions)."""
        return (_flatten_regions(self.input_sites)
                + _flatten_regions(self.inverted_input_sites or []))

    @model_validator(mode="after")
    def _geometry(self) -> PolaritonConfig:
        n_sites = math.prod(self.lattice)
        if n_sites > 65_536:
            raise ValueError("a lattice has at most 65,536 sites (dense gradient checks)")
        inverted = self.inverted_input_sites
        if inverted is not None and len(inverted) != len(self.input_sites):
            raise ValueError(f"inverted_input_sites: {len(inverted)} regions for "
                             f"{len(self.input_sites)} input regions (one per feature)")
        for label, regions in (("input_sites", self.input_sites),
                               ("inverted_input_sites", inverted or []),
                               ("output_sites", self.output_sites)):
            if any(isinstance(region, list) and not region for region in regions):
                raise ValueError(f"{label}: a region has no sites")
        for number, region in enumerate(self.init_regions):
            if max(region.sites) >= n_sites:
                raise ValueError(f"init_regions[{number}]: sites are 0 .. {n_sites - 1}, got "
                                 f"{max(region.sites)}")
        for label, sites in (("input_sites", self.input_site_list),
                             ("output_sites", self.output_site_list),
                             ("pump_sites", self.pump_sites or [0])):
            if max(sites) >= n_sites:
                raise ValueError(f"{label}: sites are 0 .. {n_sites - 1}, got {max(sites)}")
            if len(set(sites)) != len(sites):
                raise ValueError(f"{label}: a site appears twice")
        if self.encoding == "direct":
            encoded = self.inputs
        elif self.encoding == "pca":
            if len(self.input_sites) > self.inputs:
                raise ValueError(f"pca keeps at most the {self.inputs} inputs as components, "
                                 f"not {len(self.input_sites)} input regions")
            encoded = len(self.input_sites)
        else:
            shape = self.image_shape
            if (shape is None or shape[0] * shape[1] != self.inputs or shape[0] % self.pool
                    or shape[1] % self.pool):
                raise ValueError("downsample needs image_shape [rows, cols] holding the inputs, "
                                 "each divisible by pool")
            encoded = (shape[0] // self.pool) * (shape[1] // self.pool)
        if encoded != len(self.input_sites):
            raise ValueError(f"the {self.encoding} encoding gives {encoded} features for "
                             f"{len(self.input_sites)} input regions")
        return self


class NonreciprocalConfig(_Strict):
    """Layered network with non-reciprocal couplings (labep.models.nonreciprocal): forward W_l,
    backward M_l = (1 - a)((1 - a) W_l^T + a B_l); a = 0 conservative, a = 1 feedforward."""

    kind: Literal["nonreciprocal"]
    sizes: list[PositiveInt] = Field(min_length=2, max_length=64)
    activation: Literal["sigmoid"] = Field(
        "sigmoid", description="rho(s) = sigmoid(4 s - 2), smooth so that J = df/ds exists.")
    asymmetry: float = Field(0.5, ge=0.0, le=1.0,
                             description="a: 0 reciprocal (B = W^T), 1 feedforward (no feedback).")
    init_gain: PositiveFloat = Field(1.0, description="W, B, b ~ U(-g/sqrt(n_in), g/sqrt(n_in)).")

    _not_huge = field_validator("sizes")(LayeredHopfieldConfig._not_huge.__func__)


ModelConfig = Annotated[LayeredHopfieldConfig | LayeredOIMConfig | DenseOIMConfig
                        | PolaritonConfig | NonreciprocalConfig, Field(discriminator="kind")]


class DigitsConfig(_Strict):
    """scikit-learn's bundled 8x8 digits (1,797 images; 64 inputs, 10 classes)."""

    name: Literal["digits"]
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = Field(0, ge=0, description="Seed of the fixed train/test shuffle.")


class XorConfig(_Strict):
    """XOR of two binary inputs (2 inputs, 2 classes); the four points form the test set."""

    name: Literal["xor"]
    repeats: PositiveInt = Field(16, le=1_000_000, description="Copies of the 4 points per epoch.")


class IdxPart(_Strict):
    """Rows [start, stop) of an IDX image file and its label file."""

    images: str = "t10k-images-idx3-ubyte.gz"
    labels: str = "t10k-labels-idx1-ubyte.gz"
    start: int = Field(0, ge=0)
    stop: int | None = Field(None, gt=0)


class IdxConfig(_Strict):
    """MNIST-format (IDX) files in a directory. Default: the 10,000-image MNIST test set split
    8,000 (first) for training and 2,000 (last) for testing."""

    name: Literal["idx"]
    path: DirectoryPath = Field(strict=False, description="The folder of the IDX files.")
    train: IdxPart = IdxPart(start=0, stop=8000)
    test: IdxPart = IdxPart(start=8000, stop=10000)


DatasetConfig = Annotated[DigitsConfig | XorConfig | IdxConfig, Field(discriminator="name")]


class SettleConfig(_Strict):
    """Settle criteria of a phase: residual max|rho(h(s)) - s| <= tolerance within max_steps."""

    tolerance: PositiveFloat = 1e-4
    max_steps: PositiveInt = Field(100, le=10_000_000)


class PhasesConfig(_Strict):
    """The free phase, the nudged phase(s), and what to do with a sample that did not settle."""

    free: SettleConfig = SettleConfig()
    nudged: SettleConfig = SettleConfig()
    readout_average: PositiveInt = Field(
        1, le=10_000_000, description="Readouts of the settled state averaged per phase "
        "(the samples of a thermal estimator, kept rather than averaged)."
    )
    on_unsettled: Literal["skip", "stop"] = Field(
        "skip",
        description="skip: a sample whose phase did not settle is left out of the update "
        "(counted as a fault); stop: end the run with an error.",
    )


class FaultsConfig(_Strict):
    """What the engine does when a bench command fails after the bench's own retries
    (:class:`labep.bench.BenchFaultError`: a dropped link that would not come back, a command
    that kept timing out). Every fault, recovered or not, is recorded in the run store."""

    policy: Literal["retry_phase", "skip", "stop"] = Field(
        "retry_phase",
        description="retry_phase: run the failed phase (or write) again, up to max_retries "
        "times, then skip the batch; skip: the batch makes no update; stop: end the run "
        "(status failed), the bench left in its safe state.",
    )
    max_retries: int = Field(3, ge=0, le=1000, description="Retries of a failed phase.")


class EstimatorConfig(_Strict):
    """The EP gradient estimator and its nudge strength beta."""

    name: Literal["one_sided", "symmetric", "finite_nudge", "thermal_covariance"] = Field(
        "symmetric", description="finite_nudge and thermal_covariance take Boltzmann sample "
        "sets (phases.readout_average readouts per phase) from a bench at temperature T > 0.")
    beta: PositiveFloat = Field(0.5, le=1e6, description="Nudge strength magnitude |beta|.")
    random_sign: bool = Field(
        False, description="one_sided only: draw the sign of beta at random for each batch."
    )
    correction: bool = Field(
        False, description="Non-conservative correction (Scurria et al. 2026): nudge with "
        "(J^T - J)(s - s0) added, exact for non-reciprocal couplings; needs a bench that "
        "supports it.")


class OptimizerConfig(_Strict):
    """How a gradient estimate becomes a step (labep.optimizers): plain SGD, or Adam with its
    moment decay rates and epsilon."""

    name: Literal["sgd", "adam"] = Field(
        "sgd", description="sgd: theta <- theta - lr g; adam: Kingma and Ba's Adam with bias "
        "correction (its moments are part of every resume point).")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam: decay of the first moment.")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam: decay of the second moment.")
    epsilon: PositiveFloat = Field(1e-8, description="Adam: added to sqrt(v_hat).")


class ScheduleConfig(_Strict):
    """A learning-rate schedule s(t) on every rate (labep.optimizers.schedule_scale)."""

    name: Literal["constant", "cosine", "step"] = Field(
        "constant", description="constant: s = 1; cosine: from 1 down to final_fraction over "
        "the run's steps; step: times factor every every_epochs epochs.")
    final_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="cosine: the floor f of s(t) = f + (1 - f)(1 + "
        "cos(pi t / T)) / 2.")
    factor: float = Field(0.5, gt=0.0, le=1.0, description="step: the factor per period.")
    every_epochs: PositiveInt = Field(1, description="step: the period in epochs.")


class TrainingConfig(_Strict):
    epochs: PositiveInt = Field(1, le=100_000)
    batch_size: PositiveInt = Field(20, le=1_000_000)
    learning_rates: list[PositiveFloat] = Field(
        description="One learning rate per layer of couplings (W_l with its bias b_l)."
    )
    checkpoint_every: PositiveInt = Field(
        100, description="Store a parameter snapshot every this many steps (and at each epoch end)."
    )
    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig,
        description="sgd (the default) or adam; learning_rates are the step sizes of either.")
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig,
        description="Learning-rate schedule: constant (the default), cosine or step decay.")

    @field_validator("learning_rates", mode="before")
    @classmethod
    def _scalar_to_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, int | float) and not isinstance(value, bool) else value


class WritesConfig(_Strict):
    """How parameters reach the bench: rounding to codes, range policy, verify, budget,
    calibration (see labep.write_path)."""

    rounding: Literal["nearest", "stochastic", "error_feedback"] = Field(
        "nearest", description="Value -> code rounding of quantized parameters.")
    out_of_range: Literal["refuse", "clip"] = Field(
        "refuse", description="refuse: stop with an error; clip: clip and count the channels.")
    accumulate: PositiveInt = Field(
        1, le=1_000_000, description="Mini-batch updates summed in the shadow before a write.")
    verify: bool = Field(False, description="Measure or read back after every write.")
    verify_tolerance_lsb: PositiveFloat = Field(
        1.0, description="A channel further than this from its value is a miss.")
    verify_stop_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="Stop the run when more channels than this miss.")
    write_budget: PositiveInt | None = Field(
        None, description="Most code changes any channel may see in the run.")
    shadow: bool = Field(
        True, description="Keep full-precision host copies of quantized parameters; false: "
        "the bench's codes are the only copy (sub-LSB updates need stochastic rounding or "
        "error feedback).")
    calibration: str = Field(
        "newest", min_length=1, max_length=100,
        description="newest: the bench's newest valid record (nominal map if none); none: "
        "the nominal map; or a calibration id (refused if it is another bench's).")


class EvaluationConfig(_Strict):
    every_epochs: PositiveInt = Field(1, description="Evaluate on the test set every N epochs.")
    batch_size: PositiveInt = Field(500, le=1_000_000)


class Protocol(_Strict):
    """A whole EP run: bench, model, data, phases, estimator, training, evaluation."""

    name: str = Field("run", max_length=200)
    description: str = Field("", max_length=10_000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    bench: BenchConfig
    model: ModelConfig
    dataset: DatasetConfig
    phases: PhasesConfig = PhasesConfig()
    faults: FaultsConfig = FaultsConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    training: TrainingConfig
    evaluation: EvaluationConfig = EvaluationConfig()
    writes: WritesConfig = WritesConfig()
    store: str | None = Field(None, description="Run store path (CLI --store and LABEP_STORE win).")


class BenchDocument(_Strict):
    """A bench file: just the bench and the model it runs (for ``labep calibrate``)."""

    name: str = Field("bench", max_length=200)
    bench: BenchConfig
    model: ModelConfig


# --------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One offending field: its dotted path, where it came from, and a plain message."""

    path: str
    message: str
    where: str = ""

    def __str__(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"{self.path or '(document)'}{where}: {self.message}"


class ProtocolError(ValueError):
    """A protocol was refused; ``problems`` lists every offending field."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = [f"{source}: invalid protocol ({len(problems)} problem(s)); nothing was run"]
        lines += [f"  {problem}" for problem in problems]
        super().__init__("\n".join(lines))


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _LineMap:
    """Line numbers of the nodes of a YAML document, looked up by key path."""

    def __init__(self, text: str | None) -> None:
        self.root = None
        if text is not None:
            try:
                self.root = yaml.compose(text, Loader=yaml.SafeLoader)
            except yaml.YAMLError:
                self.root = None

    def line(self, loc: tuple[Any, ...]) -> int | None:
        node = self.root
        if node is None:
            return None
        line = node.start_mark.line + 1
        for part in loc:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if getattr(key, "value", None) == str(part):
                        child = value
                        line = key.start_mark.line + 1
                        break
            elif (isinstance(node, yaml.SequenceNode) and isinstance(part, int)
                  and 0 <= part < len(node.value)):
                child = node.value[part]
                line = child.start_mark.line + 1
            if child is None:
                return line
            node = child
        return line


def _document_loc(doc: Any, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the discriminator tags pydantic inserts into locations of tagged unions."""
    out: list[Any] = []
    node = doc
    for part in loc:
        if isinstance(node, dict):
            if part in node:
                out.append(part)
                node = node[part]
                continue
            if part in (node.get("kind"), node.get("name")):
                continue
            out.append(part)
            node = None
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        else:
            out.append(part)
            node = None
    return tuple(out)


def _describe(error: dict[str, Any]) -> str:
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        return "unknown field (not part of the protocol schema)"
    if error["type"] == "missing":
        return "required field is missing"
    given = error.get("input")
    if error["type"] in ("int_type", "float_type") and isinstance(given, bool):
        message += " (true and false are not numbers)"
    elif error["type"] == "bool_type" and isinstance(given, int | float):
        message += " (a number is not a boolean: write true or false)"
    if "input" in error and error["type"] not in ("model_type", "dict_type"):
        shown = repr(error["input"])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        message += f", got {shown}"
    return message


# --------------------------------------------------------------------------------------------
# Loading


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (data only), reading an exponent without a dot (``1e-6``, YAML
    1.2's float) as the number it is rather than as a string: with strict types a string is
    never a number, so a number must be read as one. A quoted ``"1e-6"`` stays a string."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str) -> Any:
    """A YAML document as data, with :class:`YamlLoader`."""
    return yaml.load(text, Loader=YamlLoader)  # a SafeLoader: data only


def parse_override(item: str) -> tuple[tuple[Any, ...], Any]:
    """``a.b[2].c=value`` -> (("a", "b", 2, "c"), value parsed as a YAML scalar or flow list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} is not of the form dotted.key=value")
    path: list[Any] = []
    for part in key.strip().replace("]", "").replace("[", ".").split("."):
        if part == "":
            raise ValueError(f"override {item!r}: empty key component")
        path.append(int(part) if part.isdigit() else part)
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: value is not valid YAML ({err})") from err
    return tuple(path), value


def apply_override(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = doc
    for depth, part in enumerate(path[:-1]):
        nxt = path[depth + 1]
        if isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            raise KeyError(_dotted(path[: depth + 1]))
    last = path[-1]
    in_list = isinstance(node, list) and isinstance(last, int) and last < len(node)
    if isinstance(node, dict) or in_list:
        node[last] = value
    else:
        raise KeyError(_dotted(path))


@dataclass
class LoadedProtocol:
    """A validated protocol with the document it came from (as run, overrides applied)."""

    protocol: Any  # Protocol, or BenchDocument from load_bench_file
    document: dict[str, Any]
    source: str


def load_bench_file(
    source: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> LoadedProtocol:
    """A protocol, or a bench file with only ``bench`` and ``model`` (and ``name``)."""
    text = Path(source).read_text(errors="replace") if Path(source).is_file() else ""
    try:
        doc = read_yaml(text)
    except yaml.YAMLError:
        doc = None
    bench_only = isinstance(doc, dict) and set(doc) <= {"name", "bench", "model"}
    return load_protocol(source, overrides, schema=BenchDocument if bench_only else Protocol)


#: a protocol is a short text: larger files, deeper nesting or more nodes (e.g. YAML aliases
#: expanding exponentially) are refused before validation
MAX_PROTOCOL_BYTES = 1_000_000
MAX_DEPTH = 32
MAX_NODES = 100_000


def _too_big(doc: Any) -> str | None:
    """Why ``doc`` is too deep or too large to be a protocol, or None. Shared (aliased) nodes
    count every time they are reached, so an alias bomb is caught early."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            return f"more than {MAX_NODES:,} values (YAML aliases expand every time they appear)"
        if depth > MAX_DEPTH:
            return f"nested deeper than {MAX_DEPTH} levels"
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node)
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)
    return None


def load_protocol(
    source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
    schema: type[Protocol] | type[BenchDocument] = Protocol,
) -> LoadedProtocol:
    """Read, override and validate a protocol; raise :class:`ProtocolError` listing every
    problem. Nothing is created and no bench is touched here."""
    text: str | None = None
    if isinstance(source, dict):
        label, doc = "<protocol>", copy.deepcopy(source)
    else:
        label = str(source)
        path = Path(source)
        try:
            if path.is_file() and path.stat().st_size > MAX_PROTOCOL_BYTES:
                problem = Problem("", f"the file has {path.stat().st_size:,} bytes; a protocol "
                                  f"has at most {MAX_PROTOCOL_BYTES:,}")
                raise ProtocolError(label, [problem])
            raw = path.read_bytes()
        except OSError as err:
            problem = Problem("", f"cannot read the file: {err.strerror}")
            raise ProtocolError(label, [problem]) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ProtocolError(label, [Problem("", f"not UTF-8 text ({err.reason})")]) from None
        try:
            doc = read_yaml(text)
        except RecursionError:
            raise ProtocolError(label, [Problem("", "not a protocol: nested too deeply")]) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ProtocolError(label, [Problem("", f"not valid YAML: {problem}", where)]) from None
        if doc is None:
            doc = {}
    if not isinstance(doc, dict):
        raise ProtocolError(label, [Problem("", "a protocol must be a mapping of fields")])
    reason = _too_big(doc)
    if reason is not None:
        raise ProtocolError(label, [Problem("", f"not a protocol: {reason}")])

    problems: list[Problem] = []
    overridden: dict[tuple[Any, ...], str] = {}
    for item in overrides:
        try:
            path_, value = parse_override(item)
            apply_override(doc, path_, value)
            overridden[path_] = item
        except ValueError as err:
            problems.append(Problem("", str(err), f"--set {item}"))
        except KeyError as err:
            problems.append(Problem(err.args[0], "no such field to override", f"--set {item}"))
    if problems:
        raise ProtocolError(label, problems)

    lines = _LineMap(text)

    def where(loc: tuple[Any, ...]) -> str:
        for path_, item in overridden.items():
            if loc[: len(path_)] == path_ or path_[: len(loc)] == loc:
                return f"--set {item}"
        line = lines.line(loc)
        return f"line {line}" if line is not None else ""

    try:
        protocol = schema.model_validate(doc)
    except ValidationError as err:
        for error in err.errors():
            loc = _document_loc(doc, tuple(error["loc"]))
            problems.append(Problem(_dotted(loc), _describe(error), where(loc)))
        raise ProtocolError(label, problems) from None

    for loc, message in cross_check(protocol):
        problems.append(Problem(_dotted(loc), message, where(loc)))
    if problems:
        raise ProtocolError(label, problems)
    return LoadedProtocol(protocol, doc, label)


def cross_check(protocol: Protocol | BenchDocument) -> list[tuple[tuple[Any, ...], str]]:
    """Checks that need the registry or the data; returns (location, message) pairs."""
    problems = check_bench(protocol)
    if isinstance(protocol, BenchDocument):
        return problems
    problems += check_training(protocol)
    problems += check_correction(protocol)
    problems += check_thermal(protocol)
    return problems


def check_correction(protocol: Protocol) -> list[tuple[tuple[Any, ...], str]]:
    """A protocol asking for the non-conservative correction names a bench that applies it."""
    if not protocol.estimator.correction:
        return []
    if protocol.estimator.name not in ("one_sided", "symmetric"):
        return [(("estimator", "correction"), "the non-conservative correction is for the "
                 "one_sided and symmetric estimators of deterministic states, not "
                 f"{protocol.estimator.name}")]
    entry = registry.BENCHES.get(protocol.bench.name)
    if entry is None or entry.kind != protocol.bench.kind:
        return []
    if getattr(entry.load(), "supports_correction", False):
        return []
    able = ", ".join(registry.correcting_benches())
    return [(("estimator", "correction"),
             f"bench {protocol.bench.name!r} cannot apply the non-conservative correction "
             f"(J^T - J)(s - s0) to its nudged phases; benches that can: {able or '(none)'}")]


def check_bench(protocol: Protocol | BenchDocument) -> list[tuple[tuple[Any, ...], str]]:
    """The bench exists, runs the model, and accepts its options."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    bench = protocol.bench
    if (bench.simulator is None) == (bench.driver is None):
        problems.append((("bench",), "give exactly one of 'simulator' or 'driver'"))
        return problems
    entry = registry.BENCHES.get(bench.name)
    if entry is None or entry.kind != bench.kind:
        known = ", ".join(registry.bench_names(bench.kind)) or "(none yet)"
        message = f"unknown {bench.kind} {bench.name!r}; known: {known}"
        problems.append((("bench", bench.kind), message))
    else:
        cls = entry.load()
        if protocol.model.kind not in cls.model_kinds:
            problems.append((
                ("model", "kind"),
                f"bench {bench.name!r} runs {', '.join(cls.model_kinds)}, "
                f"not {protocol.model.kind}",
            ))
        try:
            cls.options_model.model_validate(bench.options)
        except ValidationError as err:
            for error in err.errors():
                loc = ("bench", "options", *error["loc"])
                problems.append((loc, _describe(error)))
        if bench.kind == "driver" and not bench.resource:
            problems.append((("bench", "resource"), "a driver needs a resource string"))
    return problems


def check_training(protocol: Protocol) -> list[tuple[tuple[Any, ...], str]]:
    """One learning rate per layer; the dataset is readable and fits the model."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    n_layers = len(protocol.model.sizes) - 1
    rates = protocol.training.learning_rates
    if len(rates) not in (1, n_layers):
        problems.append((
            ("training", "learning_rates"),
            f"give one learning rate per layer of couplings ({n_layers}) or a single value, "
            f"got {len(rates)}",
        ))
    try:
        n_features, n_classes = dataset_shape(protocol)
    except (OSError, ValueError) as err:
        problems.append((("dataset", "path"), str(err)))
    else:
        if protocol.model.sizes[0] != n_features:
            problems.append((
                ("model", "sizes", 0),
                f"the input layer has {protocol.model.sizes[0]} units but the dataset has "
                f"{n_features} features",
            ))
        if protocol.model.sizes[-1] != n_classes:
            problems.append((
                ("model", "sizes", len(protocol.model.sizes) - 1),
                f"the output layer has {protocol.model.sizes[-1]} units but the dataset has "
                f"{n_classes} classes",
            ))
    return problems


def dataset_shape(protocol: Protocol) -> tuple[int, int]:
    """(features, classes) of the protocol's dataset, reading only file headers."""
    from labep.datasets import _open_idx, idx_header

    data = protocol.dataset
    if isinstance(data, DigitsConfig):
        return 64, 10
    if isinstance(data, XorConfig):
        return 2, 2
    from labep.datasets import read_idx

    features, classes = 0, 0
    for part in (data.train, data.test):
        path = Path(data.path) / part.images
        _, shape, _ = idx_header(_open_idx(path), path)
        if len(shape) < 2:
            raise ValueError(f"{path}: an image file needs >= 2 dimensions, got {shape}")
        if part.stop is not None and part.stop > shape[0]:
            raise ValueError(f"{path}: stop {part.stop} beyond its {shape[0]} items")
        features = math.prod(shape[1:])
        labels = read_idx(Path(data.path) / part.labels)
        classes = max(classes, int(labels.max(initial=0)) + 1)
    return int(features), classes


#: largest sample set a thermal estimator may keep per phase (bytes)
MAX_SAMPLE_BYTES = 2 * 2**30


def check_thermal(protocol: Protocol) -> list[tuple[tuple[Any, ...], str]]:
    """A thermal estimator (finite_nudge, thermal_covariance) needs a bench that returns
    Boltzmann samples (its options' ``sampling_temperature`` T > 0) and >= 2 readouts."""
    estimator = protocol.estimator.name
    if estimator not in ("finite_nudge", "thermal_covariance"):
        return []
    entry = registry.BENCHES.get(protocol.bench.name)
    if entry is None or entry.kind != protocol.bench.kind:
        return []  # check_bench reports it
    try:
        options = entry.load().options_model.model_validate(protocol.bench.options)
    except ValidationError:
        return []  # check_bench reports it
    problems: list[tuple[tuple[Any, ...], str]] = []
    temperature = getattr(options, "sampling_temperature", None)
    if temperature is None:
        problems.append((("estimator", "name"), f"{estimator} takes Boltzmann samples; bench "
                         f"{protocol.bench.name!r} cannot return samples (use the hopfield "
                         "simulator with options.temperature > 0, or oim with phase_noise > 0)"))
    elif not temperature > 0.0:
        problems.append((("bench", "options"), f"{estimator} takes Boltzmann samples at a "
                         f"temperature T > 0; bench {protocol.bench.name!r} is at T = 0 (set "
                         "options.temperature on hopfield, options.phase_noise on oim)"))
    if protocol.phases.readout_average < 2:
        problems.append((("phases", "readout_average"), f"{estimator}: the readouts per phase "
                         "are its samples; give at least 2 (a few hundred in practice)"))
    # the samples of a phase are kept whole: (readouts, batch, units) float64
    kept = (protocol.phases.readout_average * protocol.training.batch_size
            * sum(protocol.model.sizes[1:]) * 8)
    if kept > MAX_SAMPLE_BYTES:
        problems.append((("phases", "readout_average"), f"{estimator} keeps every readout: "
                         f"{protocol.phases.readout_average} readouts x batch "
                         f"{protocol.training.batch_size} x {sum(protocol.model.sizes[1:])} "
                         f"units is {kept / 2**30:.1f} GiB per phase (limit "
                         f"{MAX_SAMPLE_BYTES / 2**30:.0f} GiB); fewer readouts or a smaller "
                         "batch"))
    return problems
