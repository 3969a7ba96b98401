"""What every layered model shares: layer sizes, where each layer sits in a state row, the
parameter names and shapes, and their initialization."""

from __future__ import annotations

import numpy as np

from labep.models import Params


def not_huge(cls: type, sizes: list[int]) -> list[int]:
    """A config's ``sizes`` validator (``field_validator("sizes")(not_huge)``): no layer of
    more than 1,000,000 units."""
    if any(n > 1_000_000 for n in sizes):
        raise ValueError("layer sizes above 1,000,000 units are refused")
    return sizes


class LayeredModel:
    """Layers 0 (clamped inputs) .. L (outputs); a read-back state is [s_1, ..., s_L].

    Subclasses name their per-layer parameters: ``coupling`` (shape (n_{l-1}, n_l), between
    layers l-1 and l) and ``vectors`` (one value per unit of layer l), e.g. W and b. Every
    parameter of layer l is drawn from U(-g/sqrt(n_{l-1}), g/sqrt(n_{l-1})) (g: init gain).
    """

    coupling = "W"
    vectors: tuple[str, ...] = ("b",)

    def __init__(self, sizes: list[int] | tuple[int, ...], init_gain: float = 1.0) -> None:
        if len(sizes) < 2 or any(int(n) < 1 for n in sizes):
            raise ValueError(f"layer sizes must be >= 2 positive integers, got {sizes}")
        self.sizes = tuple(int(n) for n in sizes)
        self.init_gain = float(init_gain)
        self.input_size = self.sizes[0]
        self.output_size = self.sizes[-1]
        self.state_size = int(sum(self.sizes[1:]))
        offsets = np.cumsum((0, *self.sizes[1:]))
        #: (start, stop) of layer l (1..L) inside a state row; index 0 is unused (the input).
        self.layer_slices: tuple[tuple[int, int], ...] = (
            (0, 0),
            *((int(offsets[i]), int(offsets[i + 1])) for i in range(len(self.sizes) - 1)),
        )

    @property
    def n_layers(self) -> int:
        """L, the number of non-input layers."""
        return len(self.sizes) - 1

    @property
    def output_slice(self) -> tuple[int, int]:
        return self.layer_slices[-1]

    def layer(self, state: np.ndarray, index: int) -> np.ndarray:
        """Layer ``index`` (1..L) of a batch of read-back states."""
        start, stop = self.layer_slices[index]
        return state[:, start:stop]

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for index in range(1, self.n_layers + 1):
            shapes[f"{self.coupling}{index}"] = (self.sizes[index - 1], self.sizes[index])
        for prefix in self.vectors:
            for index in range(1, self.n_layers + 1):
                shapes[f"{prefix}{index}"] = (self.sizes[index],)
        return shapes

    def layer_of(self, name: str) -> int:
        """The coupling layer l a parameter belongs to (its learning-rate group)."""
        return int(name.lstrip("".join({self.coupling, *self.vectors})))

    def init_params(self, rng: np.random.Generator) -> Params:
        params: Params = {}
        for name, shape in self.parameter_shapes().items():
            bound = self.init_gain / np.sqrt(self.sizes[self.layer_of(name) - 1])
            params[name] = rng.uniform(-bound, bound, size=shape)
        return params


class SquaredErrorReadout(LayeredModel):
    """A layered network whose output layer s_L is compared with one-hot targets:
    C = 1/2 |s_L - y|^2; the prediction is the most active output unit."""

    def cost(self, state: np.ndarray, target: np.ndarray) -> np.ndarray:
        """C = 1/2 |s_L - y|^2 per sample."""
        out = self.layer(state, self.n_layers)
        return 0.5 * np.sum((out - target) ** 2, axis=1)

    def encode_target(self, labels: np.ndarray) -> np.ndarray:
        """One-hot targets y for class labels."""
        target = np.zeros((len(labels), self.output_size))
        target[np.arange(len(labels)), labels] = 1.0
        return target

    def predict(self, state: np.ndarray) -> np.ndarray:
        return np.argmax(self.layer(state, self.n_layers), axis=1)
