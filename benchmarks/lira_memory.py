"""Single-target online LiRA: peak extra memory and CPU time of three implementations on the same inputs.

    python benchmarks/lira_memory.py                 # N=50,000, K=64, C=10, 3 rounds (about 2 minutes, 2 cores)
    python benchmarks/lira_memory.py --quick         # N=2,000, K=16, 1 round: a smoke run
    python benchmarks/run.py --only lira_memory      # the same figures inside the benchmark set

The three:
- `ccl`: `ccl.attacks.LiRA` as it is now (records a chunk at a time, `ccl.attacks.lira.CHUNK_BYTES`).
- `ccl_before`: ccl's LiRA before chunking (`src/ccl/attacks/lira.py` at commit 99b1b9b), kept here as the
  baseline: the scaled logit of all the reference logits at once with `ccl.signals.scaled_logit`, then the
  Gaussian fits over `(K, N, A)`.
- `tf_privacy`: a port, written from its description, of TensorFlow Privacy's LiRA (`advanced_mia.py`:
  `calculate_statistic(option="logit")` per reference model, then `compute_score_lira(option="both",
  fix_variance=False, median_or_mean="mean")`): the statistic `log p_y - log(sum of the other p)` from float64
  probabilities one model at a time, per-record lists of the IN and OUT statistics, their NaN-aware means and
  stds (ddof=0) one record at a time, and scipy's normal log-pdf. Its scores are not ccl's (ddof=0 and no std
  floor): the run reports their correlation, and the maximum difference between `ccl_before` and `ccl`.

How memory is measured: each implementation scores in a fresh process (so no allocator state carries over).
The process builds `AttackInputs` from float32 logits, scores a 50-record slice once (imports and first-call
costs), resets the kernel's peak-RSS mark (`5 > /proc/self/clear_refs`, Linux), reads VmRSS, scores once, and
reads the peak (VmHWM). Peak extra = VmHWM - VmRSS before: every page the call touched counts, whoever
allocated it (numpy, torch, Python objects). tracemalloc would not be faithful here: torch's CPU allocator
bypasses it, and `ccl_before`'s largest temporaries are torch tensors. A thread polling RSS would miss short
peaks inside C code. The figure is that peak over the bytes of the float32 reference logits `(K, N, C)`, the
issue's unit (128 MB at N=50,000, K=64, C=10). CPU time is `time.process_time()` around the same call (all
threads of the process). The rounds interleave the implementations, so a busy machine slows all alike; the
figures are medians over rounds.

The probes run with glibc's default allocator settings, also under `benchmarks/run.py` (which fixes
MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ for its timings): with those, the pages freed while building
the inputs stay resident and are reused, and ccl's chunked scoring then measured 0 MB extra, which says nothing
about its working set. Cross-check: tracemalloc, which sees all of ccl's allocations now (numpy only), counted
19 MB at the full size, beside 24 MB of RSS here.

Not in these figures: building `AttackInputs` from float32 logits stores a float64 copy (2x the float32 logits,
in `ccl.attacks.inputs`); it is measured the same way and reported as `inputs_build_extra`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMPLEMENTATIONS = ("ccl_before", "ccl", "tf_privacy")
FULL = dict(n=50_000, k=64, c=10, rounds=3)
QUICK = dict(n=2_000, k=16, c=10, rounds=1)
ALLOCATOR_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


# ---------------------------------------------------------------------------------------------------- the three
def ccl_now(inputs) -> np.ndarray:
    import ccl

    return ccl.attacks.LiRA(online=True, variance="per_example").score(inputs)


def ccl_before(inputs) -> np.ndarray:
    """ccl's online LiRA with a per-record variance before chunking (its input checks left out)."""
    from ccl import signals

    def gaussian_fit(phi, mask):  # (K, N, A), (K, N) -> mean, std (N, A)
        w = mask[:, :, None].astype(np.float64)  # (K, N, 1)
        count = w.sum(0)  # (N, 1)
        mean = (w * phi).sum(0) / count  # (N, A)
        sq = (w * (phi - mean) ** 2).sum(0)  # (N, A)
        return mean, np.maximum(np.sqrt(sq / (count - 1)), 1e-6)

    def log_pdf(x, mean, std):
        return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)

    y = inputs.labels[:, None]  # (N, 1)
    phi_target = signals.scaled_logit(inputs.target_logits, y)  # (N, A)
    phi_ref = signals.scaled_logit(inputs.reference_logits, y)  # (K, N, A), from float64 temporaries (K, N, A, C)
    mu_in, s_in = gaussian_fit(phi_ref, inputs.reference_in)
    mu_out, s_out = gaussian_fit(phi_ref, ~inputs.reference_in)
    return (log_pdf(phi_target, mu_in, s_in) - log_pdf(phi_target, mu_out, s_out)).mean(-1)


def _logit_statistic(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """TF Privacy's "logit" statistic of one model: `log(p_y + eps) - log(sum_{k != y} p_k + eps)`, `(N, C) -> (N,)`."""
    p = np.exp(logits - logits.max(1, keepdims=True)).astype(np.float64)  # (N, C)
    p /= p.sum(1, keepdims=True)
    rows = np.arange(len(labels))
    p_true = p[rows, labels].copy()  # (N,)
    p[rows, labels] = 0.0
    return np.log(p_true + 1e-45) - np.log(p.sum(1) + 1e-45)


def _fill_nan_with_column_mean(a: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(a), np.nanmean(a, axis=0), a)


def tf_privacy(inputs) -> np.ndarray:
    """A port of TensorFlow Privacy's LiRA (see the module docstring); higher means member, as in ccl."""
    import scipy.stats

    k, n, a, _ = inputs.reference_logits.shape
    labels = inputs.labels
    stat = np.stack(
        [np.stack([_logit_statistic(inputs.reference_logits[m, :, q], labels) for q in range(a)], 1) for m in range(k)]
    )  # (K, N, A)
    stat_target = np.stack([_logit_statistic(inputs.target_logits[:, q], labels) for q in range(a)], 1)  # (N, A)
    log_pr = {}
    for side, mask in (("in", inputs.reference_in), ("out", ~inputs.reference_in)):
        per_record = [stat[mask[:, j], j] for j in range(n)]  # N arrays (m_j, A)
        mean = _fill_nan_with_column_mean(np.array([np.nanmean(s, axis=0) for s in per_record]))  # (N, A)
        std = _fill_nan_with_column_mean(np.array([np.nanstd(s, axis=0) for s in per_record]))  # (N, A)
        log_pr[side] = scipy.stats.norm.logpdf(stat_target, mean, std + 1e-30)
    return (log_pr["in"] - log_pr["out"]).mean(1)


SCORERS = {"ccl_before": ccl_before, "ccl": ccl_now, "tf_privacy": tf_privacy}


# ---------------------------------------------------------------------------------------------------- one probe
def _status(key: str) -> int:
    """A field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def probe(name: str, n: int, k: int, c: int, scores_path: str) -> dict:
    """In a fresh process: builds the inputs, scores once with `name` and measures peak extra RSS and CPU time."""
    from ccl.attacks import AttackInputs

    rng = np.random.default_rng(0)
    target32 = rng.normal(size=(n, c)).astype(np.float32)
    reference32 = rng.normal(size=(k, n, c)).astype(np.float32)  # (K, N, C): the unit of the figures
    labels = rng.integers(0, c, n)
    reference_in = np.argsort(rng.random((k, n)), axis=0) < k // 2  # every record IN for half of the models
    _reset_peak()
    before_build = _status("VmRSS")
    inputs = AttackInputs(target32, labels, reference32, reference_in)
    build_extra = _status("VmHWM") - before_build

    score = SCORERS[name]
    few = slice(0, 50)
    score(AttackInputs(target32[few], labels[few], reference32[:, few], reference_in[:, few]))  # first-call costs
    _reset_peak()
    before = _status("VmRSS")
    t0 = time.process_time()
    scores = score(inputs)
    cpu = time.process_time() - t0
    peak_extra = _status("VmHWM") - before
    np.save(scores_path, scores)
    return {
        "peak_extra_bytes": peak_extra,
        "cpu_s": cpu,
        "logits_bytes": reference32.nbytes,
        "inputs_build_extra_bytes": build_extra,
    }


# ---------------------------------------------------------------------------------------------------- the run
def measure(*, n: int, k: int, c: int, rounds: int) -> dict:
    """Runs every implementation `rounds` times, each in a fresh process, interleaved; medians and the scores'
    agreement."""
    runs = {name: [] for name in IMPLEMENTATIONS}
    env = {key: value for key, value in os.environ.items() if key not in ALLOCATOR_SETTINGS}  # glibc's defaults
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for name in IMPLEMENTATIONS:
                path = str(Path(tmp) / f"{name}.npy")
                out = subprocess.run(
                    [sys.executable, __file__, "--probe", name, str(n), str(k), str(c), path],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                )
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        scores = {name: np.load(Path(tmp) / f"{name}.npy") for name in IMPLEMENTATIONS}
    logits_bytes = runs["ccl"][0]["logits_bytes"]
    summary = {}
    for name, rs in runs.items():
        peaks = [r["peak_extra_bytes"] / logits_bytes for r in rs]
        cpus = [r["cpu_s"] for r in rs]
        summary[name] = {
            "peak_extra_x_logits": statistics.median(peaks),
            "peak_extra_x_logits_range": [min(peaks), max(peaks)],
            "peak_extra_mb": statistics.median(r["peak_extra_bytes"] for r in rs) / 1e6,
            "cpu_s": statistics.median(cpus),
            "cpu_s_range": [min(cpus), max(cpus)],
        }
    return {
        "n": n,
        "k": k,
        "c": c,
        "rounds": rounds,
        "logits_mb": logits_bytes / 1e6,
        "inputs_build_extra_x_logits": runs["ccl"][0]["inputs_build_extra_bytes"] / logits_bytes,
        "max_abs_diff_ccl_vs_before": float(np.abs(scores["ccl"] - scores["ccl_before"]).max()),
        "corr_ccl_vs_tf_privacy": float(np.corrcoef(scores["ccl"], scores["tf_privacy"])[0, 1]),
        "implementations": summary,
    }


def figures(quick: bool) -> list[dict]:
    """The figures in `benchmarks/run.py`'s format: peak extra memory of each (goal for ccl: <= 1x the float32
    reference logits) and ccl's CPU time against the TF Privacy port's (goal: <= 1x)."""
    m = measure(**(QUICK if quick else FULL))
    size = f"N={m['n']},K={m['k']},C={m['c']}"
    impl = m["implementations"]
    out = []
    for name in IMPLEMENTATIONS:
        share = impl[name]["peak_extra_x_logits"]
        goal = name == "ccl" and not quick
        out.append(
            {
                "name": f"lira_memory/peak_extra/{name}/{size}",
                "value": share,
                "unit": "x the float32 reference logits",
                "goal": "<= 1 (N=50,000, K=64)" if name == "ccl" else "(report)",
                "met": share <= 1 if goal else None,
                **impl[name],
            }
        )
    ratio = impl["ccl"]["cpu_s"] / impl["tf_privacy"]["cpu_s"]
    out.append(
        {
            "name": f"lira_memory/cpu_time/ccl_vs_tf_privacy/{size}",
            "value": ratio,
            "unit": "x the TF Privacy port's CPU s",
            "goal": "<= 1 (N=50,000, K=64)",
            "met": ratio <= 1 if not quick else None,
            **{f"{name}_cpu_s": impl[name]["cpu_s"] for name in IMPLEMENTATIONS},
            "max_abs_diff_ccl_vs_before": m["max_abs_diff_ccl_vs_before"],
            "corr_ccl_vs_tf_privacy": m["corr_ccl_vs_tf_privacy"],
            "inputs_build_extra_x_logits": m["inputs_build_extra_x_logits"],
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        name, n, k, c, path = argv[1:6]
        print(json.dumps(probe(name, int(n), int(k), int(c), path)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--rounds", type=int, help="fresh processes per implementation (default 3, quick 1)")
    parser.add_argument("--out", type=Path, help="also write the measurements to this JSON file")
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.rounds:
        size["rounds"] = args.rounds
    m = measure(**size)
    shape = f"N={m['n']:,} records x K={m['k']} reference models x C={m['c']} classes"
    print(f"{shape}: float32 reference logits of {m['logits_mb']:.0f} MB")
    print(f"{'implementation':14s} {'peak extra (x logits)':>22s} {'peak extra MB':>14s} {'CPU s':>8s}")
    for name, r in m["implementations"].items():
        lo, hi = r["peak_extra_x_logits_range"]
        share = f"{r['peak_extra_x_logits']:.2f} ({lo:.2f}-{hi:.2f})"
        print(f"{name:14s} {share:>22s} {r['peak_extra_mb']:14.0f} {r['cpu_s']:8.2f}")
    print(f"max |ccl - ccl_before| = {m['max_abs_diff_ccl_vs_before']:.2e}")
    print(f"correlation of ccl's and the TF Privacy port's scores = {m['corr_ccl_vs_tf_privacy']:.6f}")
    print(f"AttackInputs from the float32 logits: {m['inputs_build_extra_x_logits']:.2f}x extra (its float64 copy)")
    if args.out:
        args.out.write_text(json.dumps(m, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
