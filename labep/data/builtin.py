"""labep's own datasets as protocol sections (``dataset: {name: ...}``): scikit-learn's
bundled 8x8 digits, XOR, and MNIST-format (IDX) files in a directory. Each section knows its
shape (for the cross-checks, from file headers) and loads its split (:mod:`labep.data.loaders`);
they are registered in the ``labep.data.loaders`` entry-point group like any plugin's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import DirectoryPath, Field, PositiveInt, field_validator

from labep.data.loaders import (
    Split,
    idx_header,
    load_digits,
    load_idx_pair,
    load_xor,
    open_idx,
    read_idx,
)
from labep.protocol.sections import DatasetSection, Section


class DigitsConfig(DatasetSection):
    """scikit-learn's bundled 8x8 digits (1,797 images; 64 inputs, 10 classes); optionally
    only some ``classes`` (relabelled 0, 1, ... in the order given) and the first
    ``components`` principal components of the pixels instead of the pixels (for the small
    networks of the quantum and Lagrangian benches)."""

    name: Literal["digits"]
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: int = Field(0, ge=0, description="Seed of the fixed train/test shuffle.")
    classes: list[Annotated[int, Field(ge=0, le=9)]] | None = Field(
        None, min_length=2, max_length=10, description="Keep only these digits; class k is "
        "the k-th digit listed. None: all ten.")
    components: int | None = Field(
        None, ge=1, le=64, description="Principal components of the training pixels, each "
        "standardized and squashed to [0, 1] as (1 + tanh z) / 2. None: the 64 pixels.")

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[int] | None) -> list[int] | None:
        if classes is not None and len(set(classes)) != len(classes):
            raise ValueError(f"a digit is listed twice in {classes}")
        return classes

    def shape(self) -> tuple[int, int]:
        return (self.components or 64), (10 if self.classes is None else len(self.classes))

    def load(self) -> Split:
        return load_digits(self.test_fraction, self.split_seed, self.classes, self.components)


class XorConfig(DatasetSection):
    """XOR of two binary inputs (2 inputs, 2 classes); the four points form the test set."""

    name: Literal["xor"]
    repeats: PositiveInt = Field(16, le=1_000_000, description="Copies of the 4 points per epoch.")

    def shape(self) -> tuple[int, int]:
        return 2, 2

    def load(self) -> Split:
        return load_xor(self.repeats)


class IdxPart(Section):
    """Rows [start, stop) of an IDX image file and its label file."""

    images: str = "t10k-images-idx3-ubyte.gz"
    labels: str = "t10k-labels-idx1-ubyte.gz"
    start: int = Field(0, ge=0)
    stop: int | None = Field(None, gt=0)


class IdxConfig(DatasetSection):
    """MNIST-format (IDX) files in a directory. Default: the 10,000-image MNIST test set split
    8,000 (first) for training and 2,000 (last) for testing."""

    name: Literal["idx"]
    path: DirectoryPath = Field(strict=False, description="The folder of the IDX files.")
    train: IdxPart = IdxPart(start=0, stop=8000)
    test: IdxPart = IdxPart(start=8000, stop=10000)

    def shape(self) -> tuple[int, int]:
        """(features, classes) from the image files' headers and the label files."""
        features, classes = 0, 0
        for part in (self.train, self.test):
            path = Path(self.path) / part.images
            _, shape, _ = idx_header(open_idx(path), path)
            if len(shape) < 2:
                raise ValueError(f"{path}: an image file needs >= 2 dimensions, got {shape}")
            if part.stop is not None and part.stop > shape[0]:
                raise ValueError(f"{path}: stop {part.stop} beyond its {shape[0]} items")
            features = math.prod(shape[1:])
            labels = read_idx(Path(self.path) / part.labels)
            classes = max(classes, int(labels.max(initial=0)) + 1)
        return int(features), classes

    def load(self) -> Split:
        train = load_idx_pair(self.path, self.train.images, self.train.labels,
                              self.train.start, self.train.stop)
        test = load_idx_pair(self.path, self.test.images, self.test.labels, self.test.start,
                             self.test.stop)
        n_classes = int(max(train[1].max(), test[1].max())) + 1
        return Split(train[0], train[1], test[0], test[1], n_classes)
