"""Step 1 of an audit: the model jobs, each content-keyed by everything that determines its weights.

For one (defense, seed), the target and `num_references` reference models are trained with the same defense and
the same recipe (the attacker knows it), on the members the membership split gives them. A job's key is a hash
of the dataset (its name and options, or the file's SHA-256), the architecture, the recipe (with the job's
seed), the defense, the members and the trainer; runtime options are not part of it, so changing the device or
the progress bar never invalidates a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DefenseSpec, ExperimentConfig
from ..data import MembershipSplit
from ..training import Recipe

__all__ = ["ModelJob", "dataset_identity", "digest", "model_seed", "plan_jobs", "result_key", "stacking"]

#: Architectures that "auto" trains stacked: on a CPU, stacking K small MLPs with torch.func is several times
#: faster than training them one by one; for convolutional networks it often is not (on a GPU, pass "on").
STACK_BY_DEFAULT = frozenset({"mlp"})


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=32)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_identity(config: ExperimentConfig) -> dict[str, Any]:
    """What identifies the data: name and options, and for a user's file its SHA-256 (not its path)."""
    ident: dict[str, Any] = {"dataset": config.dataset, "options": config.dataset_options}
    file = config.dataset if config.dataset.endswith(".npz") else config.dataset_options.get("path")
    if config.dataset in ("npz",) or config.dataset.endswith(".npz"):
        path = Path(file)
        stat = path.stat()
        options = {k: v for k, v in config.dataset_options.items() if k != "path"}
        ident = {
            "dataset": "npz",
            "sha256": _file_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size),
            "options": options,
        }
    ident["standardize"] = config.standardizes
    if config.canaries:
        ident["canaries"] = {"num": config.canaries, "kind": config.canary_kind}
    return ident


def stacking(config: ExperimentConfig) -> bool:
    """Whether reference models train stacked: decided from the recipe alone ("on", "off", or "auto": for the
    architectures in `STACK_BY_DEFAULT`), never from a timing, so the same command gives the same numbers."""
    if config.stacked == "auto":
        return config.model in STACK_BY_DEFAULT
    return config.stacked == "on"


def model_seed(seed: int, role_index: int) -> int:
    """Independent seeds for the target (index 0) and each reference model (index k + 1) of an audit seed."""
    return int(np.random.SeedSequence([seed, role_index, 7]).generate_state(1)[0] % 2**31)


@dataclass(frozen=True, eq=False)
class ModelJob:
    """One model to train: everything a worker needs, and the key its outputs are stored under.

    `trainer` is "single" (trained alone by `ccl.training.fit`) or "stacked" (trained with the other stacked
    jobs of its group by `ccl.stacked.fit_stacked`); the two agree to ~1e-6, so it is part of the key."""

    key: str
    role: str  # "target" or "reference-<k>"
    defense: DefenseSpec
    model: str
    model_options: dict[str, Any]
    recipe: Recipe  # with this job's seed
    members: np.ndarray  # indices into the dataset
    trainer: str  # "single" | "stacked"
    group: str  # jobs of one group may train stacked together (same defense, recipe and member count)

    @property
    def seed(self) -> int:
        return self.recipe.seed


def _members_hash(members: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(members, dtype=np.int64).tobytes()).hexdigest()


def plan_jobs(config: ExperimentConfig, defense: DefenseSpec, seed: int, split: MembershipSplit) -> list[ModelJob]:
    """The target (trained alone: its per-epoch log feeds the report) and the reference models of one
    (defense, seed)."""
    data_id = dataset_identity(config)
    stacked = stacking(config) and split.num_references > 1 and defense.procedure().stackable
    group = digest({"defense": defense.to_dict(), "seed": seed, "recipe": config.train.to_dict()})[:12]
    jobs = []
    for index in range(1 + split.num_references):
        members = split.target_members if index == 0 else split.reference_members(index - 1)
        recipe = config.train.replace(seed=model_seed(seed, index))
        trainer = "stacked" if stacked and index > 0 else "single"
        key = digest(
            {
                "data": data_id,
                "model": config.model,
                "model_options": config.model_options,
                "recipe": recipe.to_dict(),
                "defense": defense.to_dict(),
                "members": _members_hash(members),
                "trainer": trainer,
            }
        )[:20]
        role = "target" if index == 0 else f"reference-{index - 1}"
        jobs.append(
            ModelJob(key, role, defense, config.model, dict(config.model_options), recipe, members, trainer, group)
        )
    return jobs


def result_key(config: ExperimentConfig, defense: DefenseSpec, seed: int) -> str:
    """A hash of everything that determines one (defense, seed) result: a resumed run recomputes a result whose
    reference models or attacks changed since it was written."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("seeds", "defenses", "dataset")}
    return digest({"settings": settings, "data": dataset_identity(config), "defense": defense.to_dict(), "seed": seed})[
        :20
    ]
