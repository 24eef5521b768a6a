"""CCL's forward + backward against `F.cross_entropy`'s, side by side: wall and CPU seconds, and ratios.

    python benchmarks/ccl_loss.py                    # (4096, 100) and (256, 10), 200 rounds (about 30 s)
    python benchmarks/ccl_loss.py --threads 1        # one torch thread: steadier on a shared machine
    python benchmarks/ccl_loss.py --quick            # 20 rounds: a smoke run
    python benchmarks/run.py --only ccl_loss         # the same figures inside the benchmark set

What runs, on the same logits `(N, C)` (float32, requires grad) and targets:
- `cross_entropy`: `F.cross_entropy(z, y)`, PyTorch's fused kernels, unvalidated: the reference of every ratio;
- `validated_ce`: `ccl.losses.cross_entropy`: the same kernels after ccl's input checks (the checks' cost);
- `floor`: `-log_softmax(z).gather(1, y).mean()` through autograd: cross-entropy again, with the few extra
  operations any loss of `log p_y` adds (what is left of CCL's cost beyond its own arithmetic);
- `autograd`: CCEL written as its plain formula (log_softmax, gather, exp, ...) and differentiated by autograd;
- `before`: ccl's CCEL before the fused node (commit c0b52a4): `F.cross_entropy(reduction="none")` followed by
  a closed-form node on the per-sample CE, validated; three autograd nodes;
- `ccel`, `ccql`: `ccl.losses.ConvexConcaveLoss` as it is now, validated: one `torch.autograd.Function` with
  a closed-form backward (`ccl.losses.functional._LossOfLogits`).
Each step is `z.grad = None; loss(z, y).backward()`, reduction "mean", alpha 0.5.

How: each round runs every variant for a block of steps, in an order shuffled per round, so that a drift of the
machine (other processes, frequency) hits all of them alike; a variant's time is the median over rounds of its
per-step time, its ratio the median over rounds of its block over the same round's cross-entropy block. Wall
time is `time.perf_counter`, CPU time `time.process_time` (all threads of the process): on a loaded machine
wall time grows with the load, CPU time much less. Like benchmarks/run.py, the script re-executes itself with
glibc's heap trimming fixed (`--raw-allocator`: without).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import ccl
from ccl.losses import functional as LF

SIZES = ((4096, 100), (256, 10))
STABLE_ALLOCATOR = {"MALLOC_TRIM_THRESHOLD_": str(256 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}
ALPHA = 0.5
GOAL = 1.1  # issue #29: CCL's forward + backward at most 1.1x F.cross_entropy's at (4096, 100)


# ---------------------------------------------------------------------------------------------------- the variants
def ccel_autograd(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CCEL as its formula, every step through autograd."""
    log_p_y = torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)  # (N,)
    return (ALPHA * -log_p_y - (1 - ALPHA) * torch.exp(torch.exp(log_p_y))).mean()


class _Before(torch.autograd.Function):
    """ccl's node before the fused one (c0b52a4 `_LossOfCrossEntropy`): the closed-form slope on the per-sample CE."""

    @staticmethod
    def forward(ctx, ce, value_and_slope):
        value, slope = value_and_slope(ce)
        value, slope = value.mean(), slope.div_(max(ce.numel(), 1))
        ctx.save_for_backward(slope)
        return value

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope, None


def _before_value_and_slope(ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c0b52a4's `_ccl_value_and_slope` for CCEL (convex "ce", beta 1): the value and its derivative in `ce`."""
    p = torch.exp(-ce)
    minus_f = torch.exp(p)
    minus_f_derivative_times_p = minus_f * p
    value = torch.add(minus_f.mul_(ALPHA - 1), ce, alpha=ALPHA)
    slope = minus_f_derivative_times_p.mul_(1 - ALPHA).add_(ALPHA)
    return value, slope


def ccel_before(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    LF._validate(z, y, "mean")
    ce = F.cross_entropy(z.float(), y, reduction="none")
    out = _Before.apply(ce, _before_value_and_slope)
    LF.check_finite_result(out, z)
    return out


def floor(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(z, 1).gather(1, y[:, None]).mean()


def variants() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    return {
        "cross_entropy": F.cross_entropy,
        "validated_ce": LF.cross_entropy,
        "floor": floor,
        "autograd": ccel_autograd,
        "before": ccel_before,
        "ccel": ccl.losses.create("ccel", alpha=ALPHA),
        "ccql": ccl.losses.create("ccql", alpha=ALPHA),
    }


# ---------------------------------------------------------------------------------------------------- measurement
def measure(n: int, c: int, *, rounds: int, block: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """{variant: {wall_ms, cpu_ms, wall_ratio, cpu_ratio}} per step, medians over interleaved rounds."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g).requires_grad_(True)
    y = torch.randint(0, c, (n,), generator=g)
    fns = variants()

    def run_block(fn) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(block):
            z.grad = None
            fn(z, y).backward()
        return (time.perf_counter() - w0) / block, (time.process_time() - c0) / block

    for fn in fns.values():  # warm-up: first calls, allocator
        run_block(fn)
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            w, t = run_block(fns[name])
            wall[name].append(w)
            cpu[name].append(t)
    ref_w, ref_c = wall["cross_entropy"], cpu["cross_entropy"]
    return {
        name: {
            "wall_ms": 1e3 * statistics.median(wall[name]),
            "cpu_ms": 1e3 * statistics.median(cpu[name]),
            "wall_ratio": statistics.median(a / b for a, b in zip(wall[name], ref_w, strict=True)),
            "cpu_ratio": statistics.median(a / max(b, 1e-9) for a, b in zip(cpu[name], ref_c, strict=True)),
        }
        for name in fns
    }


def figures(quick: bool) -> list[dict]:
    """The figures in benchmarks/run.py's format: one per size and variant, the value its wall-time ratio."""
    out = []
    for n, c in SIZES:
        result = measure(n, c, rounds=20 if quick else 200, block=5 if n * c > 100_000 else 20)
        for name, r in result.items():
            if name == "cross_entropy":
                continue
            goal = name in ("ccel", "ccql") and (n, c) == SIZES[0]
            out.append(
                {
                    "name": f"ccl_loss/{n}x{c}/{name}",
                    "value": r["wall_ratio"],
                    "unit": "x F.cross_entropy (wall)",
                    "goal": f"<= {GOAL}" if goal else "(report)",
                    "met": r["wall_ratio"] <= GOAL if goal else None,
                    **r,
                    "reference_wall_ms": result["cross_entropy"]["wall_ms"],
                    "reference_cpu_ms": result["cross_entropy"]["cpu_ms"],
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 rounds: a smoke run")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--raw-allocator", action="store_true", help="keep glibc's default heap trimming")
    args = parser.parse_args(argv)
    if not args.raw_allocator and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        env = {**os.environ, **STABLE_ALLOCATOR}
        return subprocess.run([sys.executable, __file__, *argv], env=env, check=False).returncode
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"{'figure':34s} {'wall ms':>8s} {'cpu ms':>8s} {'wall x CE':>9s} {'cpu x CE':>9s}  goal")
    figs = figures(args.quick)
    for f in figs:
        print(
            f"{f['name']:34s} {f['wall_ms']:8.3f} {f['cpu_ms']:8.3f} {f['wall_ratio']:9.2f} {f['cpu_ratio']:9.2f}"
            f"  {f['goal']}{'' if f['met'] is None else (' met' if f['met'] else ' NOT MET')}"
        )
    for n, c in SIZES:
        ref = next(f for f in figs if f["name"].startswith(f"ccl_loss/{n}x{c}/"))
        print(
            f"ccl_loss/{n}x{c}/cross_entropy (reference): {ref['reference_wall_ms']:.3f} ms wall, "
            f"{ref['reference_cpu_ms']:.3f} ms cpu"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "figures": figs}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
