"""What a person reads while a run goes: in a log file (stderr not a terminal) one plain line
per epoch, no carriage-return bar; the test accuracy on it names its epoch, and the last
line's is the final one the run prints."""

from __future__ import annotations

import re
from pathlib import Path

from labep.run.engine import epoch_line

from .conftest import cli, tiny_xor, write_protocol


def test_a_log_gets_one_line_per_epoch_and_the_final_accuracy(tmp_path: Path) -> None:
    doc = tiny_xor(**{"training.epochs": 3, "evaluation.every_epochs": 2})
    path = write_protocol(tmp_path / "p.yaml", doc)
    result = cli("run", str(path), "--store", str(tmp_path / "runs.db"))
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tiny-xor: epoch")]
    assert [line.split(":")[1].strip().split()[1] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "test - " not in lines[1] and "(epoch 2)" in lines[1]
    final = re.search(r"test accuracy (\d\.\d+)", result.stdout)
    assert final is not None and f"test {float(final.group(1)):.4f} (epoch 3)" in lines[2]
    quiet = cli("run", str(path), "--store", str(tmp_path / "runs.db"), "--no-progress")
    assert "epoch" not in quiet.stderr


def test_the_epoch_line_labels_an_older_evaluation_with_its_epoch() -> None:
    line = epoch_line(5, 10, 450, 0.1234, 0.9, {"accuracy": 0.969}, 4)
    assert line == "epoch 5/10: step 450, loss 0.1234, train 0.9000, test 0.9690 (epoch 4)"
    assert epoch_line(1, 10, 90, 0.5, 0.5, {}, 0).endswith("test -")
