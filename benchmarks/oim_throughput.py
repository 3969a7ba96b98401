"""Relaxation throughput of labep's OIM simulator against two PyTorch autograd Euler loops.

What is measured
----------------
The free phase (no nudge) of a 784-500-10 layered oscillator Ising machine
(:class:`labep.models.oim.LayeredOIM`, the network of ``protocols/oim_mnist.yaml``) with the
energy

    E(phi) = - sum_l sum_ij J_l[i, j] cos(phi_{l-1,i} - phi_{l,j})
             - sum_i (h_i cos phi_i + g_i sin phi_i) - (K_s / 2) sum_i cos(2 phi_i)

is integrated by explicit Euler steps phi <- phi - eps dE/dphi, three ways:

``labep``
    ``OIMSimulator.relax`` (the numba kernel, parallel over the samples of a batch) with
    ``OIMSimulatorOptions(dtype, dt=eps, integrator='euler')`` and
    ``Settle(tolerance=1e-30, max_steps=steps)``, so every sample runs exactly ``steps`` steps
    (checked on ``relax(...).steps``). Each timed call includes the per-batch clamp (phi_0 and
    the clamp kernel's cos(phi_0) J_1, sin(phi_0) J_1), since every batch has new inputs. The
    numba JIT is warmed on a batch outside the timed set first. numpy's BLAS is limited to one
    thread during labep's calls, as ``Trainer.run`` does (the kernel owns the cores).

``torch-reference``
    The way the seed paper's reference code does it: every step the TOTAL energy is built with
    autograd on, each coupling term as an explicit pairwise sum over a (batch, n_{l-1}, n_l)
    tensor ``J_l * cos(phi_{l-1}[:, :, None] - phi_l[:, None, :])`` (the clamped input layer's
    pairs included, recomputed every step), plus the bias and SHIL terms;
    ``grad = torch.autograd.grad(E.sum(), phi)``; ``phi = phi - eps * grad``.

``torch-factorized``
    The same autograd Euler loop with each coupling term written through
    cos(a - b) = cos a cos b + sin a sin b as matrix products,
    ``((cos phi_{l-1} @ J_l) * cos phi_l).sum() + ((sin phi_{l-1} @ J_l) * sin phi_l).sum()``.

All three use labep's initial parameters (``model.init_params(stream(seed, 0))``, K_s from
``--shil``, default 0.1 so that every energy term is present), the same inputs (the first
``--batches`` mini-batches of ``--batch`` MNIST training images of the protocol's dataset, via
``load_dataset``), the same step eps (``--dt``), the same number of steps (``--steps``), the same
start (phase pi/2 for every free unit) and the same precision (``--dtype``, default float32).
In the torch loops only the clamped input phases are constant; the free phases (layers 1..L,
concatenated as labep's state) are the leaf tensor being updated. The timing is the sum over
batches of the relaxation calls (time.perf_counter), the torch side after a short warm-up;
throughput is relaxations (samples) per second.

The final phases are compared as max over samples and units of |angle(exp(i (phi_a - phi_b)))|
(labep's against each torch variant's, and the two torch variants'), with the number of entries
above 1e-3 rad; before timing, the torch energies are checked against ``LayeredOIM.energy`` in
float64 (at the start state and at random phases). In float32 the same relaxations are then run
in float64, untimed (labep on every batch, torch-factorized on the first; skip with
``--no-precision-check``): in float64 labep and torch agree to ~1e-12 rad, while float32
rounding alone moves a few final phases by ~1e-3 rad. Those are units whose local stiffness
(the Hessian diagonal) is near zero after ``--steps`` steps (a relaxation of 200 steps of 0.1
has not reached its equilibrium: the residual max |dE/dphi| is printed), where a 1e-7 rounding
of the field is amplified by 1 / stiffness; the float32 gap between labep and torch is of the
size of each one's gap to float64.

numba, torch and (outside labep's calls) numpy's BLAS get ``--threads`` threads (default 2).
On a 2-core machine anything else running can slow a 2-thread loop many times over: compare
runs on an idle machine or use ``--repeats N`` (fastest of N interleaved runs); the load average
is printed with the results. torch-reference is slow (a pairwise tensor of 784 x 500 per sample
per step); ``--reference-batches N`` times it on the first N batches only (the output says so).

How to run
----------
From the repository root (the protocol's default data path is relative to it)::

    python benchmarks/oim_throughput.py                         # defaults: 20 batches of 20
    python benchmarks/oim_throughput.py --repeats 3 --reference-batches 5
    python benchmarks/oim_throughput.py --batches 2 --steps 50  # quick smoke run
    python benchmarks/oim_throughput.py --dtype float64 --json
    python benchmarks/oim_throughput.py --data /data/mnist --threads 1

Needs torch (``pip install -e ".[torch]"``); without it only labep's side runs.
"""

from __future__ import annotations

import os

# numba sizes its thread pool from NUMBA_NUM_THREADS when it is first imported (labep imports
# it): set it first. ``--threads`` then picks how many of the pool (and of torch's) are used.
THREADS = 2
os.environ.setdefault("NUMBA_NUM_THREADS", str(THREADS))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
from machine import (  # noqa: E402
    best_of,
    blas_thread_counts,
    blas_threads,
    load_average,
    log,
    print_machine,
)

from labep import __version__ as labep_version  # noqa: E402
from labep.data.builtin import IdxConfig  # noqa: E402
from labep.hardware.bench import Settle  # noqa: E402
from labep.models import Params  # noqa: E402
from labep.models.oim import LayeredOIM  # noqa: E402
from labep.protocol.text import ProtocolError  # noqa: E402
from labep.run.assembly import build_model, stream  # noqa: E402
from labep.run.validate import load_protocol  # noqa: E402
from labep.simulators.oim import OIMSimulator, OIMSimulatorOptions  # noqa: E402

try:
    import torch
except ImportError:  # the torch side is optional
    torch = None  # type: ignore[assignment]


DEFAULT_PROTOCOL = Path(__file__).resolve().parents[1] / "protocols" / "oim_mnist.yaml"
START_PHASE = math.pi / 2
TORCH_WARMUP_STEPS = 5
METHODS = ("labep", "torch-reference", "torch-factorized")
GAP_LIMIT = 1e-3  # rad: the agreement expected of equal equilibria in float32


@dataclass
class MethodResult:
    """The figures of one way of relaxing."""

    method: str
    samples_per_second: float
    seconds: float
    samples: int
    batches: int
    details: dict[str, Any] = field(default_factory=dict)










# -- labep ----------------------------------------------------------------------------------


def make_bench(model: LayeredOIM, params: Params, dtype: str, dt: float) -> OIMSimulator:
    """labep's OIM simulator with plain Euler steps of ``dt``, holding ``params``."""
    options = OIMSimulatorOptions(dtype=dtype, dt=dt, integrator="euler",
                                  rest_phase=START_PHASE)
    bench = OIMSimulator(model, options)
    bench.open()
    bench.write(params)
    return bench


def run_labep(bench: OIMSimulator, batches: list[np.ndarray], warmup: np.ndarray,
              steps: int) -> tuple[MethodResult, np.ndarray]:
    """Time ``relax`` on every batch; the final phases of all samples."""
    settle = Settle(tolerance=1e-30, max_steps=steps)
    with blas_threads(1):  # as Trainer.run: the numba kernel owns the cores
        # compiles (or loads) the kernel; also leaves the clamp cache on inputs that no timed
        # batch has, so every timed call pays its own clamp
        bench.relax(warmup, settle=Settle(tolerance=1e-30, max_steps=2))
        states, seconds, residuals = [], 0.0, []
        for x in batches:
            began = time.perf_counter()
            relaxation = bench.relax(x, settle=settle)
            seconds += time.perf_counter() - began
            if not np.all(relaxation.steps == steps):
                raise RuntimeError(f"labep ran {sorted(set(relaxation.steps.tolist()))} steps, "
                                   f"not exactly {steps}")
            states.append(relaxation.state)
            residuals.append(float(np.max(relaxation.residual)))
    samples = sum(len(x) for x in batches)
    result = MethodResult("labep", samples / max(seconds, 1e-12), seconds, samples,
                          len(batches), {"final_max_residual": max(residuals)})
    return result, np.concatenate(states)


# -- the torch Euler loops ------------------------------------------------------------------


class TorchOIM:
    """The layered OIM energy in PyTorch, summed per sample, and an autograd Euler loop.

    ``couplings[l]`` is J_{l+1} of shape (n_l, n_{l+1}); ``phi`` is the (batch, state_size)
    tensor of the free phases [phi_1, ..., phi_L]; ``input_phase`` is the clamped phi_0.
    """

    def __init__(self, model: LayeredOIM, params: Params, dtype: torch.dtype,
                 factorized: bool) -> None:
        layers = range(1, model.n_layers + 1)
        self.couplings = [torch.tensor(params[f"J{i}"], dtype=dtype) for i in layers]
        self.h = [torch.tensor(params[f"h{i}"], dtype=dtype) for i in layers]
        self.g = [torch.tensor(params[f"g{i}"], dtype=dtype) for i in layers]
        self.slices = model.layer_slices[1:]
        self.shil = model.shil
        self.dtype = dtype
        self.numpy_dtype = np.dtype(np.float32 if dtype == torch.float32 else np.float64)
        self.coupling_energy = self._factorized if factorized else self._pairwise

    @staticmethod
    def _pairwise(below: torch.Tensor, here: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        """sum_ij J_ij cos(phi_below,i - phi_here,j) per sample, over a (batch, n, m) tensor."""
        return torch.sum(J * torch.cos(below[:, :, None] - here[:, None, :]), dim=(1, 2))

    @staticmethod
    def _factorized(below: torch.Tensor, here: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
        """The same sum through cos(a - b) = cos a cos b + sin a sin b, as matrix products."""
        return (torch.sum((torch.cos(below) @ J) * torch.cos(here), dim=1)
                + torch.sum((torch.sin(below) @ J) * torch.sin(here), dim=1))

    def energy(self, input_phase: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """E per sample: every coupling (the clamped layer's too), the biases h, g and SHIL."""
        energy = torch.zeros(phi.shape[0], dtype=phi.dtype)
        below = input_phase
        for J, h, g, (start, stop) in zip(self.couplings, self.h, self.g, self.slices,
                                          strict=True):
            here = phi[:, start:stop]
            energy = energy - self.coupling_energy(below, here, J)
            energy = energy - torch.cos(here) @ h - torch.sin(here) @ g
            energy = energy - 0.5 * self.shil * torch.sum(torch.cos(2.0 * here), dim=1)
            below = here
        return energy

    def relax(self, x: torch.Tensor, steps: int, dt: float, state_size: int) -> torch.Tensor:
        """phi_0 = arccos(2x - 1) clamped; ``steps`` Euler steps phi <- phi - dt dE/dphi from
        pi/2, dE/dphi by autograd on the total energy; phases wrapped to [0, 2 pi)."""
        input_phase = torch.arccos(torch.clamp(2.0 * x - 1.0, -1.0, 1.0))
        phi = torch.full((x.shape[0], state_size), START_PHASE, dtype=self.dtype,
                         requires_grad=True)
        for _ in range(steps):
            (grad,) = torch.autograd.grad(self.energy(input_phase, phi).sum(), phi)
            with torch.no_grad():
                phi = phi - dt * grad
            phi.requires_grad_(True)
        return torch.remainder(phi.detach(), 2.0 * math.pi)


def run_torch(net: TorchOIM, name: str, batches: list[np.ndarray], warmup: np.ndarray,
              steps: int, dt: float, state_size: int) -> tuple[MethodResult, np.ndarray]:
    """Warm up, then time the Euler loop on every batch; the final phases of all samples."""
    assert torch is not None
    net.relax(torch.from_numpy(warmup.astype(net.numpy_dtype)), TORCH_WARMUP_STEPS, dt,
              state_size)
    states, seconds = [], 0.0
    for x in batches:
        began = time.perf_counter()
        phi = net.relax(torch.from_numpy(x.astype(net.numpy_dtype)), steps, dt, state_size)
        seconds += time.perf_counter() - began
        states.append(phi.numpy().astype(np.float64))
    samples = sum(len(x) for x in batches)
    result = MethodResult(name, samples / max(seconds, 1e-12), seconds, samples, len(batches))
    return result, np.concatenate(states)


def energy_check(model: LayeredOIM, params: Params, x: np.ndarray) -> dict[str, float]:
    """max |E_torch - E_labep| / max |E_labep| of both torch energies, in float64, at the start
    state and at random phases (the torch energy functions are what the loops differentiate)."""
    assert torch is not None
    state = np.full((x.shape[0], model.state_size), START_PHASE)
    # a few random phases too, so that sin and cos of every layer are non-trivial
    rng = np.random.default_rng(12345)
    state = np.concatenate([state, rng.uniform(0.0, 2.0 * math.pi, state.shape)])
    inputs = np.concatenate([x, x]).astype(np.float64)
    expected = model.energy(inputs, state, params)
    input_phase = torch.from_numpy(model.input_phases(inputs))
    out = {}
    for label, factorized in (("torch-reference", False), ("torch-factorized", True)):
        net = TorchOIM(model, params, torch.float64, factorized)
        got = net.energy(input_phase, torch.from_numpy(state)).numpy()
        out[label] = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
    return out


def precision_floor(model: LayeredOIM, params: Params, batches: list[np.ndarray],
                    warmup: np.ndarray, args: argparse.Namespace,
                    finals: dict[str, np.ndarray]) -> dict[str, Any]:
    """How far float32 rounding alone moves the final phases: labep in float64 on every batch,
    and torch-factorized in float64 on the first batch (the two implementations should then
    agree to ~1e-12); every float32 result is compared with labep's float64 phases."""
    with blas_threads(args.threads):
        bench = make_bench(model, params, "float64", args.dt)
        exact = run_labep(bench, [x.astype(np.float64) for x in batches],
                          warmup.astype(np.float64), args.steps)[1]
        bench.close()
    floor = {f"{name} float32 vs labep float64": circular_gap(finals[name], exact)
             for name in METHODS if name in finals}
    if torch is not None:
        net = TorchOIM(model, params, torch.float64, factorized=True)
        first = run_torch(net, "torch-factorized", batches[:1], warmup, args.steps, args.dt,
                          model.state_size)[1]
        floor["torch-factorized float64 vs labep float64 (batch 1)"] = circular_gap(first, exact)
    return floor


# -- report ---------------------------------------------------------------------------------


def circular_gap(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """max over samples and units of |angle(exp(i (a - b)))| in radians, the number of
    (sample, unit) entries above GAP_LIMIT and how many samples were compared."""
    n = min(len(a), len(b))
    gap = np.abs(np.angle(np.exp(1j * (a[:n] - b[:n]))))
    return {"max": float(np.max(gap)), "above_limit": int(np.count_nonzero(gap > GAP_LIMIT)),
            "entries": int(gap.size), "samples": n}




def print_table(report: dict[str, Any]) -> None:
    cfg = report["setup"]
    print(f"labep OIM relaxation throughput: {'-'.join(map(str, cfg['sizes']))}, batch "
          f"{cfg['batch']}, {cfg['steps']} Euler steps of dt {cfg['dt']:g} from phase pi/2, "
          f"free phase, K_s {cfg['shil']:g}, {cfg['dtype']}")
    print()
    repeats = report["repeats"]
    median = f"{'median samples/s':>18}" if repeats > 1 else ""
    header = f"{'method':<18}{'samples/s':>12}{'seconds':>10}{'samples':>9}{median}"
    if repeats > 1:
        print(f"fastest of {repeats} interleaved runs per method")
    print(header)
    print("-" * len(header))
    for name, r in report["methods"].items():
        median = (f"{r['details']['median_samples_per_second']:>18.2f}" if repeats > 1 else "")
        print(f"{name:<18}{r['samples_per_second']:>12.2f}{r['seconds']:>10.2f}"
              f"{r['samples']:>9}{median}")
    print()
    skipped = report.get("torch_skipped")
    if skipped:
        print(f"torch side skipped: {skipped}")
    else:
        for name, value in report["ratios"].items():
            print(f"{name + ' (samples/s):':<42}{value:.1f}x")
        print()
        print("final phases, max over samples and units of |angle(exp(i (phi_a - phi_b)))| "
              f"(entries above {report['phase_difference_limit']:g} rad):")
        for name, gap in report["phase_difference"].items():
            print(f"  {name:<54}{gap['max']:.2e} rad  ({gap['above_limit']} of "
                  f"{gap['entries']}, {gap['samples']} samples)")
        floor = report["precision_floor"]
        if floor:
            print("precision floor (the same relaxations in float64, untimed):")
            for name, gap in floor.items():
                print(f"  {name:<54}{gap['max']:.2e} rad  ({gap['above_limit']} of "
                      f"{gap['entries']}, {gap['samples']} samples)")
        print("max |E_torch - E_labep| / max |E_labep| (float64, start and random states): "
              + ", ".join(f"{k} {v:.1e}" for k, v in report["energy_check"].items()))
        if 0 < cfg["reference_batches"] < cfg["batches"]:
            print(f"NOTE: torch-reference was timed on the first {cfg['reference_batches']} of "
                  f"the {cfg['batches']} batches only (--reference-batches); the others on all.")
    residual = report["methods"]["labep"]["details"]["final_max_residual"]
    print(f"labep after {cfg['steps']} steps: max residual |dE/dphi| {residual:.2e} "
          "(each relax(...).steps checked equal to --steps)")
    print_machine(report, " (1 during labep's calls)")


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Relaxation throughput of labep's OIM simulator vs PyTorch autograd loops.")
    parser.add_argument("--protocol", default=str(DEFAULT_PROTOCOL),
                        help="protocol whose model sizes, seed and dataset are used "
                        "(default: protocols/oim_mnist.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="protocol override (repeatable)")
    parser.add_argument("--data", help="folder of the IDX files (override dataset.path)")
    parser.add_argument("--batch", type=int, default=20, help="samples per batch (default 20)")
    parser.add_argument("--batches", type=int, default=20,
                        help="batches timed per method (default 20)")
    parser.add_argument("--reference-batches", type=int, metavar="N",
                        help="time torch-reference on the first N batches only (default: all)")
    parser.add_argument("--steps", type=int, default=200,
                        help="Euler steps per relaxation, every method (default 200)")
    parser.add_argument("--dt", type=float, default=0.1, help="Euler step eps (default 0.1)")
    parser.add_argument("--shil", type=float, default=0.1,
                        help="SHIL strength K_s (default 0.1)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"threads for numba, torch and numpy's BLAS (default {THREADS}; "
                        "at most NUMBA_NUM_THREADS)")
    parser.add_argument("--repeats", type=int, default=1, metavar="N",
                        help="run every method N times (interleaved), report the fastest")
    parser.add_argument("--skip-reference", action="store_true",
                        help="do not run torch-reference")
    parser.add_argument("--no-precision-check", action="store_true",
                        help="in float32, skip the untimed float64 runs that show how far "
                        "float32 rounding alone moves the final phases")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = load_average()
    if min(args.batch, args.batches, args.steps, args.repeats) < 1:
        raise SystemExit("--batch, --batches, --steps and --repeats must be at least 1")
    reference_batches = args.batches if args.reference_batches is None else min(
        args.reference_batches, args.batches)
    if reference_batches < 1:
        raise SystemExit("--reference-batches must be at least 1")
    if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
        raise SystemExit(f"--threads must be in 1..{numba.config.NUMBA_NUM_THREADS} "
                         "(NUMBA_NUM_THREADS, read when numba is imported)")
    overrides = [f"model.shil={args.shil}"]
    if args.data is not None:
        overrides.append(f"dataset.path={args.data}")
    try:
        protocol = load_protocol(args.protocol, [*overrides, *args.overrides]).protocol
    except ProtocolError as err:
        raise SystemExit(str(err)) from None
    if protocol.model.kind != "layered_oim" or not isinstance(protocol.dataset, IdxConfig):
        raise SystemExit("this benchmark needs a layered_oim model on an IDX dataset")
    numba.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)

    data = protocol.dataset.load()
    needed = (args.batches + 1) * args.batch  # the timed batches and a warm-up batch
    if len(data.train_labels) < needed:
        raise SystemExit(f"the dataset has {len(data.train_labels)} training images; "
                         f"{needed} are needed")
    images = data.train_inputs.astype(args.dtype)
    batches = [images[i * args.batch:(i + 1) * args.batch] for i in range(args.batches)]
    warmup = images[args.batches * args.batch:needed]
    model = build_model(protocol.model)
    assert isinstance(model, LayeredOIM)
    params = model.init_params(stream(protocol.seed, 0))

    skipped = None if torch is not None else "torch is not importable (pip install torch)"
    skipped_reference = args.skip_reference or skipped is not None
    rounds: dict[str, list[MethodResult]] = {}
    finals: dict[str, np.ndarray] = {}
    runners: dict[str, Callable[[], tuple[MethodResult, np.ndarray]]] = {}
    with blas_threads(args.threads):
        bench = make_bench(model, params, args.dtype, args.dt)
        runners["labep"] = lambda: run_labep(bench, batches, warmup, args.steps)
        energies: dict[str, float] = {}
        if skipped is None:
            log("checking the torch energies against LayeredOIM.energy ...")
            energies = energy_check(model, params, batches[0])
            torch_dtype = torch.float32 if args.dtype == "float32" else torch.float64
            for name in METHODS[1:]:
                if name == "torch-reference" and skipped_reference:
                    continue
                net = TorchOIM(model, params, torch_dtype, name == "torch-factorized")
                use = batches[:reference_batches] if name == "torch-reference" else batches
                runners[name] = (lambda net=net, use=use, name=name: run_torch(
                    net, name, use, warmup, args.steps, args.dt, model.state_size))
        else:
            log(f"{skipped}; the torch side is skipped")
        for round_ in range(args.repeats):
            tag = f" (round {round_ + 1}/{args.repeats})" if args.repeats > 1 else ""
            for name, runner in runners.items():
                log(f"{name}: relaxing ...{tag}")
                result, finals[name] = runner()
                log(f"  {result.samples_per_second:.2f} samples/s, {result.seconds:.2f} s")
                rounds.setdefault(name, []).append(result)
        bench.close()
    results = {name: best_of(runs) for name, runs in rounds.items()}

    labep = results["labep"]
    ratios = {f"labep / {name}": labep.samples_per_second / results[name].samples_per_second
              for name in METHODS[1:] if name in results}
    gaps = {f"labep vs {name}": circular_gap(finals["labep"], finals[name])
            for name in METHODS[1:] if name in finals}
    if "torch-reference" in finals and "torch-factorized" in finals:
        gaps["torch-reference vs torch-factorized"] = circular_gap(
            finals["torch-reference"], finals["torch-factorized"])
    floor: dict[str, Any] = {}
    if args.dtype == "float32" and not args.no_precision_check:
        log("precision floor: the same relaxations in float64 (untimed) ...")
        floor = precision_floor(model, params, batches, warmup, args, finals)
    report: dict[str, Any] = {
        "setup": {
            "sizes": list(model.sizes), "batch": args.batch, "batches": args.batches,
            "reference_batches": reference_batches if not skipped_reference else 0,
            "steps": args.steps, "dt": args.dt, "shil": args.shil, "dtype": args.dtype,
            "start_phase": START_PHASE, "integrator": "euler", "seed": protocol.seed,
            "protocol": str(args.protocol),
        },
        "repeats": args.repeats,
        "methods": {name: asdict(r) for name, r in results.items()},
        "ratios": ratios,
        "phase_difference": gaps,
        "phase_difference_limit": GAP_LIMIT,
        "precision_floor": floor,
        "energy_check": energies,
        "torch_skipped": skipped,
        "load_average_1min": {"start": load_before, "end": load_average()},
        "threads": {
            "numba": numba.get_num_threads(),
            "numba_env": os.environ.get("NUMBA_NUM_THREADS"),
            "numba_layer": numba.threading_layer(),
            "torch": None if torch is None else torch.get_num_threads(),
            "numpy_blas": blas_thread_counts(),
            "cpus": os.cpu_count(),
        },
        "versions": {
            "labep": labep_version,
            "numba": numba.__version__,
            "numpy": np.__version__,
            "torch": None if torch is None else torch.__version__,
            "python": sys.version.split()[0],
        },
        "command": shlex.join(["python", *sys.argv]),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
