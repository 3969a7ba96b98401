"""Datasets: a real IDX (MNIST-format) loader, scikit-learn's bundled 8x8 digits, and XOR.

Every loader returns inputs scaled to [0, 1] (what a clamped input unit or a pixel drive
expects) as float32 rows (exact for 8-bit pixels, and what the simulators compute in by
default), and integer class labels.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: IDX magic: two zero bytes, a type code, the number of dimensions.
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetError(ValueError):
    """A dataset file is missing, truncated or not what it claims to be."""


@dataclass(frozen=True)
class Split:
    """Training and test sets: inputs (n, features) in [0, 1], labels (n,)."""

    train_inputs: np.ndarray
    train_labels: np.ndarray
    test_inputs: np.ndarray
    test_labels: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.train_inputs.shape[1])


def open_idx(path: Path) -> bytes:
    if not path.is_file():
        raise DatasetError(f"{path}: no such IDX file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DatasetError(f"{path}: not a readable gzip file ({err})") from err
    return raw


def idx_header(raw: bytes, path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parse an IDX header: (element dtype, shape, header length in bytes)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(
            f"{path}: wrong IDX magic number {raw[:4].hex() or '(empty file)'}; expected "
            "00 00 <type> <ndim> (e.g. 00000803 for MNIST images, 00000801 for labels)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    return np.dtype(_IDX_TYPES[raw[2]]), tuple(int(n) for n in shape), header


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array of its declared shape and type."""
    path = Path(path)
    raw = open_idx(path)
    dtype, shape, header = idx_header(raw, path)
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header < expected:
        raise DatasetError(
            f"{path}: truncated: header declares shape {shape} ({expected} bytes of data), "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=header).reshape(shape)


def load_idx_pair(
    directory: str | Path, images: str, labels: str, start: int, stop: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Images flattened and scaled to [0, 1], labels as int64, rows [start, stop)."""
    directory = Path(directory)
    pixels = read_idx(directory / images)
    classes = read_idx(directory / labels)
    if pixels.shape[0] != classes.shape[0]:
        raise DatasetError(
            f"{directory}: {images} has {pixels.shape[0]} items but {labels} has "
            f"{classes.shape[0]}"
        )
    stop = pixels.shape[0] if stop is None else stop
    if not 0 <= start < stop <= pixels.shape[0]:
        raise DatasetError(
            f"{directory / images}: rows [{start}, {stop}) outside the file's "
            f"{pixels.shape[0]} items"
        )
    flat = pixels[start:stop].reshape(stop - start, -1).astype(np.float64)
    scale = 255.0 if pixels.dtype == np.uint8 else max(float(np.abs(flat).max()), 1e-12)
    return (flat / scale).astype(np.float32), classes[start:stop].astype(np.int64)


def load_digits(test_fraction: float, split_seed: int, classes: list[int] | None = None,
                components: int | None = None) -> Split:
    """scikit-learn's bundled 8x8 digits (1,797 images), pixels scaled from 0..16 to [0, 1].

    ``classes``: keep those digits only, class k the k-th listed (the shuffle and split are
    those of the whole set, restricted). ``components``: the first principal components of the
    training pixels instead (mean m, directions p_k by SVD, each direction's largest entry
    made positive so the fit is deterministic, spread s_k), as x_k = (1 + tanh z_k) / 2 with
    z_k = (x - m) . p_k / s_k, so every feature stays in [0, 1]; fitted on the training set
    only."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    inputs = (data.data / 16.0).astype(np.float32)
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(split_seed).permutation(len(labels))
    n_test = round(test_fraction * len(labels))
    test, train = order[:n_test], order[n_test:]
    n_classes = 10
    if classes is not None:
        relabel = np.full(10, -1, dtype=np.int64)
        relabel[np.asarray(classes)] = np.arange(len(classes))
        test, train = test[relabel[labels[test]] >= 0], train[relabel[labels[train]] >= 0]
        labels = relabel[labels]
        n_classes = len(classes)
    if components is not None:
        pixels = inputs.astype(np.float64)
        mean = pixels[train].mean(axis=0)
        _, _, directions = np.linalg.svd(pixels[train] - mean, full_matrices=False)
        directions = directions[:components]
        largest = np.argmax(np.abs(directions), axis=1)
        directions *= np.sign(directions[np.arange(components), largest])[:, None]
        projected = (pixels - mean) @ directions.T
        spread = np.maximum(projected[train].std(axis=0), 1e-12)
        inputs = (0.5 * (1.0 + np.tanh(projected / spread))).astype(np.float32)
    return Split(inputs[train], labels[train], inputs[test], labels[test], n_classes)


def load_xor(repeats: int) -> Split:
    """The four XOR points (class = x1 xor x2); the training set repeats them ``repeats`` times."""
    inputs = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 1, 1, 0], dtype=np.int64)
    return Split(np.tile(inputs, (repeats, 1)), np.tile(labels, repeats), inputs, labels, 2)
