"""The shipped protocols, run briefly on the simulators, end with the parameters recorded in
benchmarks/param_digests.json (bit for bit): a refactoring changed no behaviour."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "param_digests.py"


def test_final_parameters_match_the_reference(capsys):
    spec = importlib.util.spec_from_file_location("param_digests", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(["--check"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "DIFFERS" not in out
