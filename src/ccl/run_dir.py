"""The run directory: created once, never overwritten, locked while in use, and the one owner of `--resume`.

Its layout (which file lives where) is `ccl.layout.RunLayout`'s: `config.yaml` holds the resolved experiment
(recipe, defenses, seeds, attacks; never a runtime option), `run.json` one entry per command run on the
directory (command, ccl version, git commit, library versions, UTC time, runtime options, and the wall and CPU
seconds of each phase, `ccl.timing`), `.lock` is held
(flock) by the process working in the directory and names its pid.

What `--resume` may change (`check_resume`): runtime options (device, progress, ...; not the CPU threads:
`check_threads`), and it may add seeds, defenses, reference models and attacks; the work already done is
reused and only the new work runs.
Anything else (the dataset, the model, the recipe, the population, bootstrap, FPRs, query augmentation,
stacking, standardisation) would change the recipe of finished work, and is refused with a message that says
how to start a new run instead. A resume starts from the stored `config.yaml`, never from the defaults.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from ._io import dumps_json, exclusive_lock, remove_stale_temporaries, write_text
from .config import ExperimentConfig, load_config, merge
from .errors import CclError, ConfigError, RunDirectoryError, RunLockedError
from .layout import RunLayout
from .timing import PhaseTimer, active_timer
from .training import Runtime

__all__ = ["RunDirectory", "RunDirectoryError", "check_resume", "invocation_record"]

#: Settings that fix the recipe of finished work: a resume must keep them.
_FIXED = (
    "dataset",
    "dataset_options",
    "model",
    "model_options",
    "train",
    "population_fraction",
    "reserve_fraction",
    "flip_queries",
    "bootstrap",
    "stacked",
    "fprs",
    "standardize",
    "canaries",
    "canary_kind",
    "leave_one_out",
    "target_members",
    "target_checkpoint",
    "target_logits",
)
#: The command-line flag of each setting, for messages.
_FLAG = {
    "dataset_options": "--data-option",
    "model_options": "--model-option",
    "train": "a training-recipe flag (--epochs, --lr, ...)",
}


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def invocation_record(*, command: Sequence[str] | None, runtime: Runtime, resume: bool) -> dict[str, Any]:
    """What run.json keeps of one command run on a directory."""
    return {
        "command": list(command) if command is not None else list(sys.argv),
        "resume": resume,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ccl_version": __version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "runtime": runtime.to_dict(),
    }


def _describe_change(key: str, old: Any, new: Any) -> str:
    if key == "train":
        changed = [k for k in old if old[k] != new.get(k)]
        return ", ".join(f"train.{k} {old[k]!r} -> {new.get(k)!r}" for k in changed)
    return f"{key} {old!r} -> {new!r}"


def check_resume(stored: ExperimentConfig, new: ExperimentConfig, *, where: Path | str = "the run") -> None:
    """Raises `ConfigError` unless `new` only adds work to `stored` (more seeds, defenses, reference models or
    attacks); everything that fixes the recipe of finished work must be equal."""
    old_d, new_d = stored.to_dict(), new.to_dict()
    for key in _FIXED:
        if old_d[key] != new_d[key]:
            flag = _FLAG.get(key, "--" + key.replace("_", "-"))
            raise ConfigError(
                f"--resume cannot change {_describe_change(key, old_d[key], new_d[key])} ({flag}): finished work in "
                f"{where} was done with the stored value. Start a new run with another --out (trained models are "
                "reused where they match through --cache-dir), or resume without that change."
            )
    lost = [s for s in stored.seeds if s not in new.seeds]
    if lost:
        raise ConfigError(f"--resume may add seeds but not drop them: {lost} are part of {where}.")
    labels = [d.label for d in new.defenses]
    lost = [d.label for d in stored.defenses if d.label not in labels]
    if lost:
        raise ConfigError(f"--resume may add defenses but not drop them: {lost} are part of {where}.")
    if new.num_references < stored.num_references:
        raise ConfigError(
            f"--resume may raise --num-references but not lower it ({stored.num_references} -> "
            f"{new.num_references}); start a new run for fewer reference models."
        )
    if stored.attacks is None and new.attacks is not None:
        raise ConfigError(f"{where} runs every attack the setup supports; --resume cannot restrict --attacks.")
    if stored.attacks is not None and new.attacks is not None:
        lost = [a for a in stored.attacks if a not in new.attacks]
        if lost:
            raise ConfigError(f"--resume may add attacks but not drop them: {lost} are part of {where}.")


class RunDirectory:
    """One run's folder. `RunDirectory(path).open(config, ...)` creates it (or checks it for resume), takes its
    lock and records the invocation; everything that writes into it happens inside that block."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.layout = RunLayout(self.path)

    @property
    def config_file(self) -> Path:
        return self.layout.config

    @property
    def run_file(self) -> Path:
        return self.layout.invocations

    def split_file(self, seed: int) -> Path:
        return self.layout.split(seed)

    def result_dir(self, slug: str, seed: int) -> Path:
        return self.layout.result_dir(slug, seed)

    # ------------------------------------------------------------------------------------------------------
    def check_target(self, *, resume: bool) -> None:
        """Checks `--out` before anything is trained: a path that is (or lies below) a file, an existing run
        without --resume, or a resume of nothing fail now with the path named."""
        for parent in [self.path, *self.path.parents]:
            if parent.exists() and not parent.is_dir():
                raise RunDirectoryError(
                    f"--out {self.path}: {parent} is a file, not a directory; choose another --out."
                )
            if parent.exists():
                break
        if self.path.is_dir() and any(self.path.iterdir()):
            if not resume:
                raise RunDirectoryError(
                    f"{self.path} already exists and is not empty. Pass --resume to continue the run in it, or "
                    "choose another --out."
                )
            if not self.config_file.is_file():
                raise RunDirectoryError(f"{self.path} is not a ccl run directory (no config.yaml); cannot resume it.")
        elif resume:
            raise RunDirectoryError(f"Nothing to resume: {self.path} does not exist or is empty.")

    def check(self, config: ExperimentConfig, *, resume: bool) -> None:
        """Everything `open` checks before it touches the directory: `--out` (`check_target`) and, for a resume,
        that `config` only adds work to the stored one (`check_resume`). Cheap: callers run it before slow work."""
        self.check_target(resume=resume)
        if resume:
            check_resume(self.stored_config(), config, where=self.path)

    def stored_raw(self) -> dict[str, Any]:
        """The stored config.yaml as a mapping; a corrupt one is named."""
        if not self.config_file.is_file():
            raise RunDirectoryError(f"{self.path} is not a ccl run directory (no config.yaml).")
        try:
            raw = load_config(self.config_file)
        except ConfigError as err:
            raise RunDirectoryError(f"The run's {self.config_file} is corrupt: {err}") from None
        complete = ExperimentConfig().to_dict()  # ccl writes every key: a missing one means a cut file
        missing = [k for k in complete if k not in raw]
        if not missing and isinstance(raw.get("train"), dict):
            missing = [f"train.{k}" for k in complete["train"] if k not in raw["train"]]
        if missing:
            raise RunDirectoryError(
                f"The run's {self.config_file} is truncated or incomplete (no {', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}); it will not be rewritten with defaults. Restore it, or "
                "start a new run in another --out."
            )
        return raw

    def stored_config(self) -> ExperimentConfig:
        try:
            return ExperimentConfig.from_dict(self.stored_raw())
        except ConfigError as err:
            raise RunDirectoryError(f"The run's {self.config_file} is not a valid configuration: {err}") from None

    def resume_config(self, *overrides: dict[str, Any] | None) -> ExperimentConfig:
        """The stored configuration with `overrides` (a YAML file's, the flags') applied, checked to only add
        work (see `check_resume`)."""
        stored = self.stored_config()
        new = ExperimentConfig.from_dict(merge(self.stored_raw(), *overrides))
        check_resume(stored, new, where=self.path)
        return new

    def invocations(self) -> list[dict[str, Any]]:
        if not self.run_file.exists():
            return []
        try:
            return list(json.loads(self.run_file.read_text())["invocations"])
        except (ValueError, KeyError, TypeError):
            return []  # an unreadable history is not worth stopping a run for; the new entry starts a new one

    def recorded_threads(self) -> int | None:
        """The CPU threads the run's last recorded invocation trained with (run.json; None: not recorded)."""
        used = [
            r["runtime"].get("threads")
            for r in self.invocations()
            if isinstance(r, dict) and isinstance(r.get("runtime"), dict)
        ]
        used = [t for t in used if t is not None]
        return used[-1] if used else None

    def check_threads(self, runtime: Runtime) -> None:
        """On a CPU the number of torch threads changes results (sums in another order: ~1e-7 in logits, enough to
        move a metric), so a resume must run with the threads the run's models were trained with (run.json)."""
        used = self.recorded_threads()
        if used is not None and runtime.threads is not None and runtime.threads != used:
            raise RunDirectoryError(
                f"--threads {runtime.threads}: this run's models were trained with {used} CPU thread(s), and the "
                f"thread count changes results on a CPU; resume with --threads {used} (the default), or start a "
                "new run."
            )

    @contextlib.contextmanager
    def open(
        self,
        config: ExperimentConfig,
        *,
        resume: bool,
        runtime: Runtime | None = None,
        command: Sequence[str] | None = None,
    ) -> Iterator[RunDirectory]:
        """Creates the directory (or checks it for `resume`), holds its lock, removes temporary files of dead
        writers, writes config.yaml and appends this invocation to run.json; yields self."""
        self.check(config, resume=resume)
        if resume:
            self.check_threads(runtime or Runtime())
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirectoryError(f"Cannot create the run directory {self.path}: {err.strerror}.") from None
        try:
            with exclusive_lock(self.layout.lock, what=f"The run directory {self.path}"):
                remove_stale_temporaries(self.path, recursive=True)
                write_text(self.config_file, config.to_yaml())
                history = self.invocations() + [
                    invocation_record(command=command, runtime=runtime or Runtime(), resume=resume)
                ]
                write_text(self.run_file, dumps_json({"invocations": history}))
                timer = active_timer()
                if timer is not None:
                    timer.invocation = (str(self.path), len(history) - 1)
                try:
                    yield self
                finally:
                    if timer is not None:  # also after an error or Ctrl-C: the time spent so far
                        self._write_timing(timer)
        except CclError:
            if created and not resume and self._only_bookkeeping():
                self._remove_bookkeeping()
            raise

    def record_timing(self, timer: PhaseTimer) -> None:
        """Updates the seconds per phase of the invocation `timer` was active in (run.json's "timing") with
        the phases since (the report, drawn after the lock is released); skipped when another process holds
        the directory now."""
        what = f"The run directory {self.path}"
        with contextlib.suppress(RunLockedError), exclusive_lock(self.layout.lock, what=what):
            self._write_timing(timer)

    def _write_timing(self, timer: PhaseTimer) -> None:
        """Writes `timer`'s phases into its invocation's entry of run.json (atomically; the lock held)."""
        if timer.invocation is None or Path(timer.invocation[0]) != self.path:
            return
        history, index = self.invocations(), timer.invocation[1]
        if index < len(history):
            history[index]["timing"] = timer.to_dict()
            with contextlib.suppress(OSError):  # never hide the run's own outcome behind a bookkeeping error
                write_text(self.run_file, dumps_json({"invocations": history}))

    def _only_bookkeeping(self) -> bool:
        return {p.name for p in self.path.iterdir()} <= set(RunLayout.BOOKKEEPING)

    def _remove_bookkeeping(self) -> None:
        for name in RunLayout.BOOKKEEPING:
            (self.path / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()
