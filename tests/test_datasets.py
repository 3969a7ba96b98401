"""Dataset loaders: real IDX parsing with clear errors, digits, XOR, the shared MNIST split."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from labep.data.loaders import DatasetError, load_digits, load_idx_pair, load_xor, read_idx
from labep.run.validate import load_protocol

from .conftest import MNIST, PROTOCOLS, needs_mnist


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(">u1" if type_code == 0x08 else ">f4").tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize("name", ["img.idx", "img.idx.gz"])
def test_idx_round_trip(tmp_path: Path, name: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4)).astype(np.uint8)
    write_idx(tmp_path / name, images)
    np.testing.assert_array_equal(read_idx(tmp_path / name), images)


def test_idx_pair_scales_and_slices(tmp_path: Path) -> None:
    images = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2) * 10
    write_idx(tmp_path / "i.idx", images)
    write_idx(tmp_path / "l.idx", np.array([0, 1, 2, 3, 4, 5], dtype=np.uint8))
    x, y = load_idx_pair(tmp_path, "i.idx", "l.idx", 2, 5)
    assert x.shape == (3, 4) and x.max() <= 1.0
    np.testing.assert_allclose(x[0], images[2].ravel() / 255.0)
    np.testing.assert_array_equal(y, [2, 3, 4])
    with pytest.raises(DatasetError, match="outside the file"):
        load_idx_pair(tmp_path, "i.idx", "l.idx", 0, 7)


def test_wrong_magic_number(tmp_path: Path) -> None:
    (tmp_path / "bad.idx").write_bytes(b"\x12\x34\x08\x03" + bytes(20))
    with pytest.raises(DatasetError, match="wrong IDX magic number 12340803"):
        read_idx(tmp_path / "bad.idx")


def test_truncated_file(tmp_path: Path) -> None:
    images = np.zeros((10, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "t.idx", images)
    raw = (tmp_path / "t.idx").read_bytes()
    (tmp_path / "t.idx").write_bytes(raw[:1000])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "t.idx")
    (tmp_path / "h.idx").write_bytes(raw[:6])
    with pytest.raises(DatasetError, match="truncated IDX header"):
        read_idx(tmp_path / "h.idx")


def test_not_gzip(tmp_path: Path) -> None:
    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="gzip"):
        read_idx(tmp_path / "x.gz")


def test_digits_and_xor() -> None:
    split = load_digits(0.2, 0)
    assert split.n_features == 64 and split.n_classes == 10
    assert len(split.train_labels) + len(split.test_labels) == 1797
    assert split.train_inputs.min() >= 0.0 and split.train_inputs.max() <= 1.0
    xor = load_xor(3)
    assert xor.train_inputs.shape == (12, 2)
    np.testing.assert_array_equal(xor.test_labels, [0, 1, 1, 0])


@needs_mnist
def test_shared_mnist_split() -> None:
    loaded = load_protocol(PROTOCOLS / "hopfield_mnist.yaml", [f"dataset.path={MNIST}"])
    split = loaded.protocol.dataset.load()
    assert split.train_inputs.shape == (8000, 784) and split.test_inputs.shape == (2000, 784)
    assert set(np.unique(split.train_labels)) == set(range(10))
