"""The protocol's sections: what a protocol file says, as Pydantic models (no bench, no data).

The sections every protocol shares (bench, phases, faults, training, writes, evaluation) are
defined here, and the bases of the three open ones: a model's section
(:class:`ModelSection`, subclassed beside each model), a dataset's (:class:`DatasetSection`)
and an estimator's (:class:`EstimatorSection`). Which subclasses exist is the registry's
business (:mod:`labep.registry`); this module imports nothing above it.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from labep.protocol.strict import StrictModel

if TYPE_CHECKING:
    from labep.data.loaders import Split


class Section(StrictModel):
    """A protocol section: strict types (labep.protocol.strict), unknown keys and NaN refused."""


class BenchConfig(Section):
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




class ModelSection(Section):
    """Base of a model's section. ``kind`` names the model (its entry point in the
    ``labep.models`` group); a model's config class (the model class's ``config_model``)
    subclasses this with ``kind: Literal["its kind"]`` and its own fields, and gives
    ``sizes``: [input features, ..., classes], one entry per layer of units (a field or a
    property), which the cross-checks compare with the dataset and the learning rates."""

    kind: str

    def model_arguments(self) -> dict[str, Any]:
        """The keyword arguments of the model's constructor (by default every field but
        ``kind``)."""
        return self.model_dump(exclude={"kind"})


class DatasetSection(Section):
    """Base of a dataset's section. ``name`` names the dataset (its entry point in the
    ``labep.data.loaders`` group, which points at the subclass itself)."""

    name: str

    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """(features, classes), reading no more than file headers (for the cross-checks).
        Raises OSError or ValueError naming the file if it cannot be read."""

    @abstractmethod
    def load(self) -> Split:
        """The training and test sets."""


class SettleConfig(Section):
    """Settle criteria of a phase: residual max|rho(h(s)) - s| <= tolerance within max_steps."""

    tolerance: PositiveFloat = 1e-4
    max_steps: PositiveInt = Field(100, le=10_000_000)


class PhasesConfig(Section):
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


class FaultsConfig(Section):
    """What the engine does when a bench command fails after the bench's own retries
    (:class:`labep.hardware.bench.BenchFaultError`: a dropped link that would not come back, a
    command that kept timing out). Every fault, recovered or not, is recorded in the run store."""

    policy: Literal["retry_phase", "skip", "stop"] = Field(
        "retry_phase",
        description="retry_phase: run the failed phase (or write) again, up to max_retries "
        "times, then skip the batch; skip: the batch makes no update; stop: end the run "
        "(status failed), the bench left in its safe state.",
    )
    max_retries: int = Field(3, ge=0, le=1000, description="Retries of a failed phase.")


#: the estimator of a protocol whose ``estimator`` section is absent or gives no ``name``
DEFAULT_ESTIMATOR = "symmetric"


class EstimatorSection(Section):
    """Base of an EP estimator's section: ``name`` names the estimator (its entry point in
    the ``labep.ep.estimators`` group), ``beta`` its nudge strength. An estimator's own config
    class (its ``config_model``) subclasses this one with ``name: Literal["its name"]`` and any
    field of its own."""

    name: str
    beta: PositiveFloat = Field(0.5, le=1e6, description="Nudge strength magnitude |beta|.")
    random_sign: bool = Field(
        False, description="Estimators that nudge once: draw the sign of beta at random for "
        "each batch (ignored by the others).")
    correction: bool = Field(
        False, description="Non-conservative correction (Scurria et al. 2026): nudge with "
        "(J^T - J)(s - s0) added, exact for non-reciprocal couplings; needs an estimator of "
        "deterministic states and a bench that supports it.")


class OptimizerConfig(Section):
    """How a gradient estimate becomes a step (labep.ep.optimizers): plain SGD, or Adam with its
    moment decay rates and epsilon."""

    name: Literal["sgd", "adam"] = Field(
        "sgd", description="sgd: theta <- theta - lr g; adam: Kingma and Ba's Adam with bias "
        "correction (its moments are part of every resume point).")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam: decay of the first moment.")
    beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam: decay of the second moment.")
    epsilon: PositiveFloat = Field(1e-8, description="Adam: added to sqrt(v_hat).")


class ScheduleConfig(Section):
    """A learning-rate schedule s(t) on every rate (labep.ep.optimizers.schedule_scale)."""

    name: Literal["constant", "cosine", "step"] = Field(
        "constant", description="constant: s = 1; cosine: from 1 down to final_fraction over "
        "the run's steps; step: times factor every every_epochs epochs.")
    final_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="cosine: the floor f of s(t) = f + (1 - f)(1 + "
        "cos(pi t / T)) / 2.")
    factor: float = Field(0.5, gt=0.0, le=1.0, description="step: the factor per period.")
    every_epochs: PositiveInt = Field(1, description="step: the period in epochs.")


class TrainingConfig(Section):
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


class WritesConfig(Section):
    """How parameters reach the bench: rounding to codes, range policy, verify, budget,
    calibration (see labep.hardware.write_path)."""

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


class EvaluationConfig(Section):
    every_epochs: PositiveInt = Field(1, description="Evaluate on the test set every N epochs.")
    batch_size: PositiveInt = Field(500, le=1_000_000)


class Protocol(Section):
    """A whole EP run: bench, model, data, phases, estimator, training, evaluation.

    The generic shape of every protocol. The schema a file is validated with
    (:func:`labep.run.validate.protocol_schema`) is this class with ``model``, ``dataset``
    and ``estimator`` narrowed to the unions of the config classes the registry holds, so a
    plugin's sections are validated exactly like labep's own."""

    name: str = Field("run", max_length=200)
    description: str = Field("", max_length=10_000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    bench: BenchConfig
    model: ModelSection
    dataset: DatasetSection
    phases: PhasesConfig = PhasesConfig()
    faults: FaultsConfig = FaultsConfig()
    estimator: EstimatorSection
    training: TrainingConfig
    evaluation: EvaluationConfig = EvaluationConfig()
    writes: WritesConfig = WritesConfig()
    store: str | None = Field(None, description="Run store path (CLI --store and LABEP_STORE win).")

    @model_validator(mode="before")
    @classmethod
    def _default_estimator(cls, data: Any) -> Any:
        """No ``estimator`` section, or one without ``name``: the :data:`DEFAULT_ESTIMATOR`
        (the document itself is left as written)."""
        if not isinstance(data, dict):
            return data
        section = data.get("estimator", {})
        if isinstance(section, dict) and "name" not in section:
            data = {**data, "estimator": {"name": DEFAULT_ESTIMATOR, **section}}
        return data


class BenchDocument(Section):
    """A bench file: just the bench and the model it runs (for ``labep calibrate``); like
    :class:`Protocol`, validated with the registry's model union
    (:func:`labep.run.validate.bench_file_schema`)."""

    name: str = Field("bench", max_length=200)
    bench: BenchConfig
    model: ModelSection
