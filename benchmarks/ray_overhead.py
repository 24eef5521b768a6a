"""What the Ray executor costs on one machine: `run_audit` with the local executor and with the Ray executor.

    python benchmarks/ray_overhead.py                   # digits, K=16, small MLP, stacked off and on
    python benchmarks/ray_overhead.py --epochs 20 --repeats 5 --out ray.json

One Ray instance is started on this machine's cores (its start and the workers' first imports are reported
apart: they are paid once per process, not per audit). Then, for `--stacked off` and `--stacked on`, the same
audit runs three ways, each into a fresh run directory and cache:
- local:        `LocalExecutor`, one model after another in this process;
- ray serial:   `RayExecutor(cpus_per_model=<all cores>)`: one task at a time, the same work as local, so
                `ray serial / local` is the executor's overhead (goal <= 1.2x) and
                `(ray serial - local) / tasks` the seconds each task costs beyond its training;
- ray parallel: `RayExecutor(cpus_per_model=1)`: as many tasks at once as cores, what a user gets.
Each audit trains with one torch thread (what `run_audit` chooses for a small model), in every executor.
Every Ray run's metrics are checked byte for byte against the local run's. Timings are medians over
`--repeats`, after one untimed audit of each executor: Ray keeps as many idle workers as the last tasks'
shape needs and starts new ones (seconds of imports each) when the shape changes, which a user who keeps one
setting never pays. Like benchmarks/run.py, the script re-executes itself with glibc's heap trimming fixed
(`--raw-allocator`: without); the environment reaches Ray's workers too.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import ray

from ccl.audit import LocalExecutor, run_audit
from ccl.audit.ray_executor import RayExecutor
from ccl.config import ExperimentConfig
from ccl.training import Runtime

QUIET = Runtime(progress=False)
STABLE_ALLOCATOR = {"MALLOC_TRIM_THRESHOLD_": str(256 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}


def config(args: argparse.Namespace, stacked: str, **changes) -> ExperimentConfig:
    settings = {
        "dataset": "digits",
        "model": "mlp",
        "model_options": {"hidden": [args.hidden]},
        "num_references": args.references,
        "bootstrap": 20,
        "defenses": args.defenses,
        "stacked": stacked,
        "train": {"epochs": args.epochs, "batch_size": 64, "lr": 0.05},
    }
    return ExperimentConfig.from_dict({**settings, **changes})


def metric_files(run: Path) -> list[Path]:
    return [run / "metrics.json", *sorted(run.glob("results/*/seed-*/metrics.json"))]


def timed_audit(cfg: ExperimentConfig, run: Path, executor) -> float:
    t0 = time.perf_counter()
    run_audit(cfg, run, runtime=QUIET, executor=executor)
    return time.perf_counter() - t0


def same_metrics(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(x, b / x.relative_to(a), shallow=False) for x in metric_files(a))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--references", type=int, default=16, help="reference models K (default 16)")
    parser.add_argument("--epochs", type=int, default=10, help="default 10")
    parser.add_argument("--hidden", type=int, default=128, help="MLP hidden width (default 128)")
    parser.add_argument("--defenses", nargs="+", default=["ce"], help="default: ce")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each audit (median; default 3)")
    parser.add_argument("--raw-allocator", action="store_true", help="keep glibc's default heap trimming")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="Ray's CPUs (default: all cores)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if not args.raw_allocator and "MALLOC_TRIM_THRESHOLD_" not in os.environ:  # as benchmarks/run.py does;
        argv = sys.argv[1:] if argv is None else argv  # Ray's workers inherit the environment
        env = {**os.environ, **STABLE_ALLOCATOR}
        return subprocess.run([sys.executable, __file__, *argv], env=env, check=False).returncode
    warnings.filterwarnings("ignore", category=UserWarning)  # the audit's small-data notes

    t0 = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    init_s = time.perf_counter() - t0
    figures: dict = {"ray_init_s": init_s, "num_cpus": args.num_cpus, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="ccl-ray-bench-") as tmp:
        root = Path(tmp)
        # warm-up: imports in this process and in every worker (paid once per process, reported apart)
        warmup = 0.0
        for stacked in ("off", "on"):
            warm = config(args, stacked, num_references=2, train={"epochs": 1, "batch_size": 64, "lr": 0.05})
            timed_audit(warm, root / f"warm-{stacked}-local", LocalExecutor())
            warmup += timed_audit(warm, root / f"warm-{stacked}-ray", RayExecutor(cpus_per_model=1))
        figures["worker_warmup_s"] = warmup
        print(f"ray.init {init_s:.2f} s; first Ray audit (worker imports) {figures['worker_warmup_s']:.2f} s")
        print(
            f"digits, mlp hidden={args.hidden}, K={args.references}, epochs={args.epochs}, "
            f"defenses={args.defenses}, {args.num_cpus} Ray CPUs, median of {args.repeats}"
        )
        print(
            f"{'stacked':8s} {'tasks':>5s} {'local s':>8s} {'ray serial s':>12s} {'ratio':>6s} "
            f"{'overhead s/task':>15s} {'ray parallel s':>14s} {'speedup':>7s} identical"
        )
        ok = True
        for stacked in ("off", "on"):
            cfg = config(args, stacked)
            times: dict[str, list[float]] = {"local": [], "serial": [], "parallel": []}
            tasks = 0
            identical = True
            for name in ("local", "serial", "parallel"):
                cpus = {"local": None, "serial": args.num_cpus, "parallel": 1}[name]
                for r in range(-1, args.repeats):  # r = -1: untimed, so that Ray's worker pool has its shape
                    executor = LocalExecutor() if cpus is None else RayExecutor(cpus_per_model=cpus)
                    seconds = timed_audit(cfg, root / f"{stacked}-{r}-{name}", executor)
                    if r >= 0:
                        times[name].append(seconds)
                    if cpus is not None:
                        tasks = executor.submitted_tasks
            for r in range(-1, args.repeats):
                local_run = root / f"{stacked}-{r}-local"
                identical &= all(same_metrics(local_run, root / f"{stacked}-{r}-{n}") for n in ("serial", "parallel"))
            local, serial, parallel = (statistics.median(times[k]) for k in ("local", "serial", "parallel"))
            ratio = serial / local
            per_task = (serial - local) / tasks
            ok &= ratio <= 1.2 and identical
            figures["modes"][stacked] = {
                "tasks": tasks,
                "local_s": local,
                "ray_serial_s": serial,
                "ratio": ratio,
                "overhead_s_per_task": per_task,
                "ray_parallel_s": parallel,
                "speedup": local / parallel,
                "identical": identical,
            }
            print(
                f"{stacked:8s} {tasks:5d} {local:8.2f} {serial:12.2f} {ratio:5.2f}x {per_task:15.3f} "
                f"{parallel:14.2f} {local / parallel:6.2f}x {identical}"
            )
    ray.shutdown()
    print(f"goal: ray serial / local <= 1.2x with identical metrics: {'met' if ok else 'NOT MET'}")
    if args.out:
        from ccl._io import write_json

        write_json(args.out, figures)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
