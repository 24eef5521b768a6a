"""Where each file of a run directory lives: one object that every module asks, so that each name is spelled once.

Paths only: nothing here reads, writes or checks a file (`ccl.run_dir` owns creating, locking and resuming a
run directory; `ccl.results` reads and writes the results).

    config.yaml                            the resolved experiment (`config`)
    run.json                               one entry per command run on the directory (`invocations`)
    .lock                                  held by the process working in the directory (`lock`)
    splits/seed-<s>.npz                    membership splits (`split(seed)`)
    models/<key>/                          one folder per trained model (`models`; its files: `ccl.audit.execute`)
    results/<defense>/seed-<s>/            one (defense, seed) result (`result_dir`):
        metrics.json                           the `DefenseResult` (`result`, written last: marks it complete)
        scores.npz                             its per-record arrays (`scores`)
    metrics.json                           an audit's aggregate over seeds and its summary, or `ccl train`'s
                                           final epoch (`aggregate`)
    table.csv, report.html, plots/<name>.png   the exports (`table`, `report`, `plot(name)`)
    tune.json                              `ccl tune`'s target, settings tried and choice (`tune`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    """The paths of the run directory `root`."""

    root: Path

    #: The file names of one result's folder (also used where only that folder is known).
    RESULT = "metrics.json"
    SCORES = "scores.npz"
    #: What a run directory holds before any work is done: removed again when the first command fails early.
    BOOKKEEPING = ("config.yaml", "run.json", ".lock")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str or any os.PathLike is accepted

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def invocations(self) -> Path:
        return self.root / "run.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def split(self, seed: int) -> Path:
        return self.root / "splits" / f"seed-{seed}.npz"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def result_dir(self, slug: str, seed: int) -> Path:
        return self.root / "results" / slug / f"seed-{seed}"

    def result(self, slug: str, seed: int) -> Path:
        return self.result_dir(slug, seed) / self.RESULT

    def scores(self, slug: str, seed: int) -> Path:
        return self.result_dir(slug, seed) / self.SCORES

    def results(self) -> list[Path]:
        """Every completed result's file, sorted."""
        return sorted((self.root / "results").glob(f"*/seed-*/{self.RESULT}"))

    @property
    def aggregate(self) -> Path:
        return self.root / "metrics.json"

    @property
    def table(self) -> Path:
        return self.root / "table.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def tune(self) -> Path:
        return self.root / "tune.json"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / f"{name}.png"
