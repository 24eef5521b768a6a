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

from .. import data, models
from ..config import DefenseSpec, ExperimentConfig
from ..data import MembershipSplit
from ..data.download import file_digest
from ..evaluation import LEAVE_ONE_OUT_VERSION
from ..training import Recipe

__all__ = ["ModelJob", "dataset_identity", "digest", "model_seed", "plan_jobs", "result_key", "stacking"]

#: Architectures that "auto" trains stacked: on a CPU, stacking K small MLPs with torch.func is several times
#: faster than training them one by one; for convolutional networks it often is not (on a GPU, pass "on").
STACK_BY_DEFAULT = frozenset({"mlp"})


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=32)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """The file's SHA-256, cached by (path, mtime, size): every job of a run hashes the dataset once."""
    return file_digest(path, "sha256")


@lru_cache(maxsize=32)
def _folder_digest(path: str, mtime_ns: int) -> str:
    from ..data.images import folder_digest

    return folder_digest(path)


def dataset_identity(config: ExperimentConfig) -> dict[str, Any]:
    """What identifies the data: name and options, and for a user's file (or image folder) its content hash,
    not its path: an edited file never reuses models trained on the old one."""
    ident: dict[str, Any] = {"dataset": config.dataset, "options": config.dataset_options}
    kind = data.file_kind(config.dataset) or (
        config.dataset if config.dataset in ("npz", "csv", "parquet", "image_folder") else None
    )
    if kind is not None:
        file = config.dataset if data.file_kind(config.dataset) else config.dataset_options.get("path")
        path = Path(file)
        options = {k: v for k, v in config.dataset_options.items() if k != "path"}
        if kind == "image_folder":
            newest = max((p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()), default=0)
            digest = _folder_digest(str(path.resolve()), newest)
        else:
            stat = path.stat()
            digest = _file_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        ident = {"dataset": kind, "sha256": digest, "options": options}
    ident["standardize"] = config.standardizes
    if config.canaries:
        ident["canaries"] = {"num": config.canaries, "kind": config.canary_kind}
    return ident


def model_identity(config: ExperimentConfig) -> dict[str, Any]:
    """The architecture: its name and options, and for a user's model the hash of its source."""
    ident: dict[str, Any] = {"model": config.model, "options": config.model_options}
    if models.is_user_model(config.model):
        ident["source_sha256"] = models.user_model_sha256(config.model)
    return ident


def stacking(config: ExperimentConfig) -> bool:
    """Whether reference models train stacked: decided from the recipe alone ("on", "off", or "auto": for the
    architectures in `STACK_BY_DEFAULT`), never from a timing, so the same command gives the same numbers."""
    if config.stacked == "auto":
        return config.model in STACK_BY_DEFAULT  # a user's model trains one by one unless told "on"
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
    reserve: np.ndarray | None = None  # the defender's reserve (indices), for the defenses that learn from it

    @property
    def seed(self) -> int:
        return self.recipe.seed


def _members_hash(members: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(members, dtype=np.int64).tobytes()).hexdigest()


def plan_jobs(
    config: ExperimentConfig, defense: DefenseSpec, seed: int, split: MembershipSplit, *, threads: int | None = None
) -> list[ModelJob]:
    """The target (trained alone: its per-epoch log feeds the report) and the reference models of one
    (defense, seed). `threads`: the CPU threads that train them; a count other than 1 is part of each key, since
    it changes floating-point sums and so the weights (by ~1e-7): a shared cache never mixes two counts' models
    (one thread, the default for small models, keeps the keys of older runs)."""
    data_id = dataset_identity(config)
    stacked = stacking(config) and split.num_references > 1 and defense.procedure().stackable
    base = defense.recipe(config.train)  # the experiment's recipe with the defense's own keys
    # the defense's own recipe is in `recipe`: the same weights under either spelling share one model
    weights_defense = {"loss": defense.loss, "params": dict(defense.params)}
    group = digest({"defense": weights_defense, "seed": seed, "recipe": base.to_dict()})[:12]
    reserve = split.reserve if defense.procedure().needs_reserve else None
    jobs = []
    for index in range(1 + split.num_references):
        members = split.target_members if index == 0 else split.reference_members(index - 1)
        recipe = base.replace(seed=model_seed(seed, index))
        trainer = "stacked" if stacked and index > 0 else "single"
        content = {
            "data": data_id,
            "model": model_identity(config),
            "recipe": recipe.to_dict(),
            "defense": weights_defense,
            "members": _members_hash(members),
            "trainer": trainer,
        }
        if reserve is not None:  # only for the defenses that use it: the others' keys are unchanged
            content["reserve"] = _members_hash(reserve)
        if threads is not None and threads != 1:
            content["threads"] = int(threads)
        key = digest(content)[:20]
        role = "target" if index == 0 else f"reference-{index - 1}"
        jobs.append(
            ModelJob(
                key, role, defense, config.model, dict(config.model_options), recipe, members, trainer, group, reserve
            )
        )
    return jobs


def result_key(config: ExperimentConfig, defense: DefenseSpec, seed: int) -> str:
    """A hash of everything that determines one (defense, seed) result: a resumed run recomputes a result whose
    reference models or attacks changed since it was written."""
    # the verdicts' thresholds only change the summary: not part of any result
    settings = {k: v for k, v in config.to_dict().items() if k not in ("seeds", "defenses", "dataset", "min_effect")}
    if not settings["reserve_fraction"]:  # no reserve: the same key as before reserves existed
        del settings["reserve_fraction"]
    if config.uses_leave_one_out:  # pooled results from an older leave-one-out design are recomputed
        settings["leave_one_out_version"] = LEAVE_ONE_OUT_VERSION
    if config.supplied_target:  # the supplied files' contents, not their paths
        from .supplied import supplied_identity

        settings["supplied"] = supplied_identity(config)
    return digest(
        {"settings": settings, "data": dataset_identity(config), "defense": defense.identity(), "seed": seed}
    )[:20]
