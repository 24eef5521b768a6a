"""The run directory: created once, never overwritten silently, resumable.

`prepare_run_dir` writes the resolved `config.yaml` and `run.json` (code version and git commit, library
versions, command line) into a new directory, or checks an existing one before `--resume` continues it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from . import __version__
from ._io import remove_stale_temporaries, write_json, write_text
from .config import ExperimentConfig

__all__ = ["RunDirectoryError", "prepare_run_dir"]


class RunDirectoryError(ValueError):
    """The run directory is missing, incomplete, corrupt, or would be overwritten."""


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_run_dir(run_dir: Path, config: ExperimentConfig, *, resume: bool) -> ExperimentConfig:
    """Creates a new run directory, or checks an existing one for `resume`. Never overwrites silently."""
    config_file = run_dir / "config.yaml"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not resume:
            raise RunDirectoryError(
                f"{run_dir} already exists and is not empty. Pass --resume to continue the run "
                "in it, or choose another --out."
            )
        if not config_file.exists():
            raise RunDirectoryError(f"{run_dir} is not a ccl run directory (no config.yaml); cannot resume it.")
        remove_stale_temporaries(run_dir)
    elif resume and not run_dir.exists():
        raise RunDirectoryError(f"Nothing to resume: {run_dir} does not exist.")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(config_file, config.to_yaml())
    write_json(
        run_dir / "run.json",
        {
            "ccl_version": __version__,
            "git_commit": _git_commit(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "command": sys.argv,
            "cwd_relative": os.path.relpath(run_dir),
        },
    )
    return config
