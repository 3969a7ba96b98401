"""Digests of the final parameters of shipped protocols, run briefly on the simulators.

A refactoring that must not change behaviour is checked by running the same protocols before
and after it and comparing these digests: the sha256 of every final parameter array (the
shadow parameters of the newest checkpoint, and the codes the bench held, when quantized), one
digest per protocol. The runs go through the ``labep`` command line and the store is read with
:mod:`sqlite3` and :mod:`numpy` alone, so the script depends on nothing inside labep's
package layout.

    python benchmarks/param_digests.py            # write benchmarks/param_digests.json
    python benchmarks/param_digests.py --check    # compare with it; exit 1 on any difference
    python benchmarks/param_digests.py --only oim_xor --check

The cases cover the estimators (symmetric, one-sided with a random sign, finite nudge,
thermal covariance, the non-conservative correction), the models (layered Hopfield with
ResNet skips, layered and dense OIM, the polariton lattice with a PCA encoding, Adam and a
cosine schedule, the non-reciprocal network), quantized and stochastically rounded writes,
and samples left out of updates (phases that do not settle). Runs from the repository root
(the MNIST cases read ``../shared/data/mnist`` and are left out, with a note, without it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).with_suffix(".json")
MNIST = ROOT.parent / "shared" / "data" / "mnist"
MNIST_SHORT = ["dataset.train.stop=160", "dataset.test.start=9900", "dataset.test.stop=9950",
               f"dataset.path={MNIST}"]

#: name -> (protocol file, --set overrides, needs MNIST)
CASES: dict[str, tuple[str, list[str], bool]] = {
    "quickstart_symmetric": ("quickstart.yaml", [
        "training.epochs=1", "model.sizes=[64, 32, 10]"], False),
    "quickstart_one_sided_random_sign": ("quickstart.yaml", [
        "training.epochs=1", "model.sizes=[64, 24, 10]", "estimator.name=one_sided",
        "estimator.random_sign=true", "estimator.beta=0.3"], False),
    "hopfield_unsettled_faults": ("quickstart.yaml", [
        "training.epochs=1", "model.sizes=[64, 32, 10]", "phases.free.max_steps=6",
        "phases.nudged.max_steps=4", "phases.nudged.tolerance=0.01", "faults.policy=skip",
        "writes.accumulate=2"], False),  # 929 samples used, 509 left out
    "hopfield_resnet": ("hopfield_resnet_mnist.yaml", [
        "training.epochs=1", "model.sizes=[784, 16, 16, 16, 16, 10]", "model.skip_every=2",
        "model.skips=[[1, 5]]", "training.learning_rates=[0.1]", *MNIST_SHORT], True),
    "thermal_covariance_xor": ("thermal_xor.yaml", [
        "training.epochs=4", "phases.readout_average=64"], False),
    "finite_nudge_xor": ("thermal_xor.yaml", [
        "training.epochs=4", "phases.readout_average=64", "estimator.name=finite_nudge",
        "estimator.beta=0.5"], False),
    "oim_layered_quantized": ("oim_xor.yaml", [
        "training.epochs=3", "bench.options.device.bits=6", "bench.options.weight_range=2.0",
        "bench.options.bias_range=2.0", "writes.rounding=stochastic"],
        False),
    "oim_dense": ("oim_dense_xor.yaml", ["training.epochs=3"], False),
    "oim_adaptive_digits": ("oim_digits.yaml", [
        "training.epochs=1", "model.sizes=[64, 16, 10]", "dataset.test_fraction=0.9"], False),
    "polariton_xor": ("polariton_xor.yaml", ["training.epochs=2"], False),
    "polariton_pca_adam": ("polariton_digits.yaml", [
        "training.epochs=1", "dataset.train.stop=64", "phases.free.max_steps=3000",
        "phases.nudged.max_steps=3000", *MNIST_SHORT[1:]], True),
    "nonreciprocal_corrected": ("nonreciprocal_digits.yaml", [
        "training.epochs=1", "model.sizes=[64, 16, 10]", "dataset.test_fraction=0.9"], False),
}


def labep_command() -> str:
    """The ``labep`` script installed beside this interpreter."""
    return str(Path(sys.executable).with_name("labep"))


def digest(store: Path) -> str:
    """sha256 over the newest checkpoint's arrays (kinds ``checkpoint`` and ``codes``), by
    kind and name: each array's name, dtype, shape and bytes."""
    db = sqlite3.connect(store)
    try:
        (step,) = db.execute("SELECT MAX(step) FROM arrays WHERE kind = 'checkpoint'").fetchone()
        rows = db.execute("SELECT kind, name, npy FROM arrays WHERE step = ? AND kind IN "
                          "('checkpoint', 'codes') ORDER BY kind, name", (step,)).fetchall()
    finally:
        db.close()
    sha = hashlib.sha256()
    for kind, name, blob in rows:
        array = np.load(io.BytesIO(blob), allow_pickle=False)
        sha.update(f"{kind}/{name}/{array.dtype.str}/{array.shape}".encode())
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()


def run_case(name: str, workdir: Path) -> str:
    protocol, overrides, _ = CASES[name]
    store = workdir / f"{name}.db"
    command = [labep_command(), "run", str(ROOT / "protocols" / protocol), "--store", str(store),
               "--no-progress"]
    for item in overrides:
        command += ["--set", item]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: labep run failed ({done.returncode}):\n{done.stderr}")
    return digest(store)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the reference")
    parser.add_argument("--only", action="append", default=[], choices=sorted(CASES))
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    args = parser.parse_args(argv)
    names = args.only or list(CASES)
    skipped = [n for n in names if CASES[n][2] and not MNIST.is_dir()]
    names = [n for n in names if n not in skipped]
    for name in skipped:
        print(f"{name}: left out ({MNIST} not found)")
    found: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            started = time.perf_counter()
            found[name] = run_case(name, Path(tmp))
            print(f"{name}: {found[name][:16]} ({time.perf_counter() - started:.1f} s)",
                  flush=True)
    if not args.check:
        args.reference.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.reference}")
        return 0
    reference = json.loads(args.reference.read_text())
    differ = [n for n in names if reference.get(n) != found[n]]
    for name in differ:
        print(f"DIFFERS: {name}: {found[name]} != reference {reference.get(name)}")
    print(f"{len(names) - len(differ)} of {len(names)} protocols bit-identical to the reference")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
