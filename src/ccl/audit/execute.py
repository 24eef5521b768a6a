"""Step 2 of an audit: train the planned jobs (or find them in the cache) and keep each model's outputs.

The interface a distributed executor implements is `Executor.run(jobs, context)`: jobs in, each job's outputs
(its logits on the query records) and checkpoint out, under `cache/<job.key>/`, written atomically; a job whose
outputs are already in the cache is never trained again (idempotent by key). `train_group` is the unit of work:
one job alone, or up to `MAX_STACK` stacked jobs of one group, trained by the one training loop.

Cache layout (`cache/<key>/`): checkpoint.pt and log.jsonl (single jobs), outputs.npz (logits and the query
index they answer), job.json (what the job was). Stacked groups checkpoint under `cache/stacked/`. Once a
model's outputs are stored, a reference model's checkpoint (and any distillation teacher's) is deleted unless
`keep_checkpoints` (the target's is kept: it is the audited model). While a job
trains, its folder holds a lock: two processes sharing a `--cache-dir` never train one model twice at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .._io import exclusive_lock, write_bytes, write_json
from ..data import Dataset
from ..errors import RunDirectoryError
from ..models import create as create_model
from ..stacked import MAX_STACK, fit_stacked, predict_stacked
from ..training import Runtime, fit, predict_logits, resolve_device
from .plan import ModelJob
from .statistics import ModelAccess, StackedAccess, missing_statistics, model_statistics

__all__ = [
    "Executor",
    "ExecutionContext",
    "LocalExecutor",
    "ModelCache",
    "group_jobs",
    "train_group",
]


class ModelCache:
    """Trained models' outputs, content-keyed: `cache/<key>/outputs.npz`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for parent in [self.root, *self.root.parents]:  # the first one that exists must be a directory
            if parent.exists():
                if not parent.is_dir():
                    where = f"{self.root} is a file" if parent == self.root else f"{self.root}: {parent} is a file"
                    raise RunDirectoryError(f"--cache-dir {where}, not a directory; choose another --cache-dir.")
                break

    def folder(self, job: ModelJob) -> Path:
        return self.root / job.key

    def outputs(self, job: ModelJob, query_index: np.ndarray, *, needs: tuple[str, ...] = ()) -> np.ndarray | None:
        """The cached logits of `job` on `query_index`, or None when it has not been trained (for them), or
        was trained without the statistics `needs` (`ccl.audit.statistics`). The files are checked against the
        SHA-256 digests in job.json first (`verify`)."""
        path = self.folder(job) / "outputs.npz"
        if not path.exists():
            return None
        raw = path.read_bytes()
        self.verify(job, raw)
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as f:
                stale = "augment_labels" in f.files and (  # labels on other queries: train again
                    "label_only_format" not in f.files or int(f["label_only_format"]) != LABEL_ONLY_FORMAT
                )
                stale = stale or bool(missing_statistics(f, needs))
                if np.array_equal(f["query_index"], query_index) and not stale:
                    return f["logits"]
        except Exception as err:
            raise RunDirectoryError(
                f"The cached model outputs {path} are corrupt ({type(err).__name__}); delete the folder "
                f"{path.parent} and resume."
            ) from None
        return None

    def verify(self, job: ModelJob, outputs: bytes) -> None:
        """Checks the cached files of `job` (`outputs`: the bytes of its outputs.npz) against the digests its
        job.json recorded when they were stored: a bit flip, a truncation or an edited value is named, never
        used. (A cache written before ccl stored digests is not checked.)"""
        digests = self.info(job).get("sha256")
        if not isinstance(digests, dict):
            return
        for name, digest in sorted(digests.items()):
            path = self.folder(job) / name
            data = outputs if name == "outputs.npz" else (path.read_bytes() if path.exists() else b"")
            if hashlib.sha256(data).hexdigest() != digest:
                raise RunDirectoryError(
                    f"The cached file {path} does not match the SHA-256 digest its job.json recorded (edited, "
                    f"truncated or corrupt); delete the folder {path.parent} and resume to train the model again."
                )

    def save(
        self,
        job: ModelJob,
        logits: np.ndarray,
        query_index: np.ndarray,
        *,
        epsilon: float | None = None,
        dp_accounting: dict | None = None,
        extras: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Stores the outputs and job.json, which records the SHA-256 of outputs.npz and of the training log
        (checked on load); outputs.npz is written last: its presence marks the model complete."""
        folder = self.folder(job)
        folder.mkdir(parents=True, exist_ok=True)
        extras = dict(extras or {})
        if "augment_labels" in extras:  # how the label-only queries were drawn (`outputs` checks it)
            extras["label_only_format"] = np.asarray(LABEL_ONLY_FORMAT)
        buffer = io.BytesIO()
        np.savez(buffer, logits=logits, query_index=query_index, **extras)
        digests = {"outputs.npz": hashlib.sha256(buffer.getvalue()).hexdigest()}
        if (folder / "log.jsonl").exists():
            digests["log.jsonl"] = hashlib.sha256((folder / "log.jsonl").read_bytes()).hexdigest()
        write_json(
            folder / "job.json",
            {
                "role": job.role,
                "defense": job.defense.to_dict(),
                "seed": job.seed,
                "trainer": job.trainer,
                "num_members": int(job.members.size),
                "epsilon": epsilon,  # DP-SGD: the epsilon this model spent; None otherwise
                # DP-SGD: noise_multiplier, sample_rate, steps, accountant, delta, epsilon (ccl.dp.DPAccounting)
                "dp_accounting": dp_accounting,
                "sha256": digests,  # of the files stored with it, checked on load (`verify`)
            },
        )
        write_bytes(folder / "outputs.npz", buffer.getvalue())  # written last: marks completion

    def extras(self, job: ModelJob) -> dict[str, np.ndarray]:
        """The arrays stored with a model's logits (the label-only attacks' predicted labels)."""
        with np.load(self.folder(job) / "outputs.npz", allow_pickle=False) as f:
            return {k: f[k] for k in f.files if k not in _NOT_EXTRAS}

    def validation_logits(self, job: ModelJob, validation_index: np.ndarray) -> np.ndarray | None:
        """A candidate target's logits on the defender's reserve (`validation_index`), stored when it was trained
        for a recipe choice; None when they are not stored (for these records)."""
        path = self.folder(job) / "outputs.npz"
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as f:
            if "validation_index" in f.files and np.array_equal(f["validation_index"], validation_index):
                return f["validation_logits"]
        return None

    def info(self, job: ModelJob) -> dict:
        """What job.json records of a trained model (epsilon spent and its accounting, trainer, digests, ...); {}
        for a model that has none (a supplied target). A truncated or corrupt job.json is named: its epsilon
        must not silently vanish from the results."""
        path = self.folder(job) / "job.json"
        if not path.exists():
            return {}
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RunDirectoryError(
                f"The cached model record {path} is corrupt or truncated ({type(err).__name__}); delete the folder "
                f"{path.parent} and resume to train the model again."
            ) from None
        if not isinstance(record, dict):
            raise RunDirectoryError(f"The cached model record {path} is not a JSON object; delete {path.parent}.")
        return record

    @contextlib.contextmanager
    def locked(self, jobs: list[ModelJob]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for job in sorted(jobs, key=lambda j: j.key):
                stack.enter_context(exclusive_lock(self.folder(job) / ".lock", what=f"The cached model {job.key}"))
            yield


@dataclass
class ExecutionContext:
    """What every job of one audit shares: the data, the records to query, how to run."""

    dataset: Dataset
    query_index: np.ndarray
    flip_queries: bool
    runtime: Runtime
    cache: ModelCache
    keep_checkpoints: bool = False  # keep reference models' checkpoints (the target's is always kept)
    num_pool: int = 0  # the first `num_pool` query records are the audit pool (label-only queries run on them)
    label_only: bool = True  # ask each model for its labels on perturbed copies of the pool (label-only attacks)
    statistics: tuple[str, ...] = ()  # measure these on the pool (`ccl.audit.statistics`: boundary, gradient)
    # a recipe choice: each (single) job also answers these records of the defender's reserve (never audited)
    validation_index: np.ndarray | None = None

    def is_done(self, job: ModelJob) -> bool:
        """Whether the cache holds everything this context asks of `job` (its statistics, and its reserve
        answers if asked)."""
        if self.cache.outputs(job, self.query_index, needs=self.statistics) is None:
            return False
        return self.validation_index is None or self.cache.validation_logits(job, self.validation_index) is not None


#: Label-only attacks: perturbed copies of each pool record, and the scale of the tabular noise (in units of each
#: feature's standard deviation over the pool). Every model answers the same copies (one seed).
LABEL_ONLY_QUERIES = 16
LABEL_ONLY_SCALE = 0.5
LABEL_ONLY_SEED = 0x1AB
#: Stored beside the labels: how the queries were drawn. 2: in blocks of `label_only.CHUNK` records (the queries
#: of `predict_perturbed_labels`). Cached labels without it (1: one draw over the whole pool, which held
#: `Q x pool` records in memory) came from other queries, so those models are trained again, never mixed.
LABEL_ONLY_FORMAT = 2


@torch.no_grad()
def perturbed_labels(forward_all, x_pool: torch.Tensor) -> dict[str, np.ndarray]:
    """`{"augment_labels", "noise_labels"}`, each `(K, P, Q)`: the predicted labels of K models (`forward_all(x)
    -> (K, B, C)`) on `LABEL_ONLY_QUERIES` perturbed copies of the pool records, for the label-only attacks.

    The copies are those of `ccl.attacks.label_only.predict_perturbed_labels` with `seed=LABEL_ONLY_SEED` and
    the pool's standard deviations: drawn in blocks of `CHUNK` records, so the memory is that of `CHUNK * Q`
    records, whatever the pool's size."""
    from ..attacks.label_only import labels_on_perturbed_queries

    x = x_pool.float().cpu()
    return {
        f"{kind}_labels": labels_on_perturbed_queries(
            forward_all, x, kind=kind, num=LABEL_ONLY_QUERIES, scale=LABEL_ONLY_SCALE, seed=LABEL_ONLY_SEED
        ).numpy()
        for kind in ("augment", "noise")
    }


#: What outputs.npz holds beside the attacks' extras.
_NOT_EXTRAS = ("logits", "query_index", "label_only_format", "validation_logits", "validation_index")


@torch.no_grad()
def forward_all_numpy(forward_all, x: torch.Tensor, *, batch: int = 1024) -> np.ndarray:
    """`(K, N, C)` logits of `forward_all(x) -> (K, B, C)` on `x`, in batches, as float32 numpy."""
    return np.concatenate([forward_all(x[i : i + batch]).float().cpu().numpy() for i in range(0, len(x), batch)], 1)


def _extras(access, ctx: ExecutionContext, x_pool: torch.Tensor, y_pool: torch.Tensor) -> dict[str, np.ndarray]:
    """What each model stores beside its logits, `(K, ...)` per name: its labels on the label-only attacks'
    perturbed queries, and the statistics the audit's attacks need (`ccl.audit.statistics`)."""
    if not ctx.num_pool:
        return {}
    extras = perturbed_labels(access.forward_all, x_pool) if ctx.label_only else {}
    if ctx.statistics:
        extras |= model_statistics(
            ctx.statistics,
            num_models=access.num_models,
            predict_each=torch.no_grad()(access.predict_each),
            functional=access.functional,
            x=x_pool,
            y=y_pool,
        )
    return extras


def _build(job: ModelJob, dataset: Dataset) -> torch.nn.Module:
    return create_model(
        job.model, num_classes=dataset.num_classes, input_shape=dataset.input_shape, seed=job.seed, **job.model_options
    )


def train_group(jobs: list[ModelJob], ctx: ExecutionContext) -> list[np.ndarray]:
    """Trains `jobs` (one single job, or stacked jobs of one group) and returns their logits on the query
    records; each job's outputs are saved to the cache before this returns."""
    data, query = ctx.dataset, torch.as_tensor(ctx.query_index)
    runtime = ctx.runtime.replace(progress=False) if len(jobs) > 1 else ctx.runtime
    with ctx.cache.locked(jobs):
        if len(jobs) == 1 and jobs[0].trainer == "single":
            job = jobs[0]
            heldout_index = np.setdiff1d(ctx.query_index, job.members)
            result = fit(
                _build(job, data),
                job.defense.build(),
                data.subset(job.members),
                heldout=data.subset(heldout_index) if heldout_index.size else None,
                recipe=job.recipe,
                runtime=runtime,
                checkpoint_dir=ctx.cache.folder(job),
                description=f"{job.defense.label} {job.role}",
                procedure=job.defense.procedure(),
                reserve=data.subset(job.reserve) if job.reserve is not None else None,
            )
            logits = [predict_logits(result.model, data.x[query], device=runtime.device, flip_queries=ctx.flip_queries)]
            epsilons = [result.epsilon]
            accountings = [None if result.dp_accounting is None else result.dp_accounting.to_dict()]
            access = ModelAccess(result.model, resolve_device(runtime.device))
        else:
            name = hashlib.sha256("-".join(j.key for j in jobs).encode()).hexdigest()[:20]
            stack = fit_stacked(
                [_build(j, data) for j in jobs],
                jobs[0].defense.build(),
                data.x,
                data.y,
                [j.members for j in jobs],
                recipe=jobs[0].recipe,
                seeds=[j.seed for j in jobs],
                runtime=runtime,
                checkpoint=ctx.cache.root / "stacked" / f"{name}.pt",
                stop_after=jobs[0].defense.procedure().last_epoch(jobs[0].recipe),
            )
            device = resolve_device(runtime.device)
            logits = list(predict_stacked(stack, data.x[query], flip_queries=ctx.flip_queries, device=device))
            epsilons = accountings = [None] * len(jobs)
            access = StackedAccess(stack, device)
        extras = _extras(access, ctx, data.x[query[: ctx.num_pool]], data.y[query[: ctx.num_pool]])
        if ctx.validation_index is not None:  # a candidate of a recipe choice: its answers on the reserve
            val = torch.as_tensor(ctx.validation_index)
            extras["validation_logits"] = forward_all_numpy(access.forward_all, data.x[val])
            extras["validation_index"] = np.broadcast_to(ctx.validation_index, (len(jobs), val.numel()))
        # queries see the released outputs (HAMP modifies them)
        logits = jobs[0].defense.procedure().query_transform(access.forward_all, logits, data.x, seed=jobs[0].seed)
        for k, (job, lg, eps, spent) in enumerate(zip(jobs, logits, epsilons, accountings, strict=True)):
            extra = {n: v[k] for n, v in extras.items()}
            ctx.cache.save(job, lg, ctx.query_index, epsilon=eps, dp_accounting=spent, extras=extra)
        if not ctx.keep_checkpoints:  # outputs are stored: a reference model's weights are not needed again
            if len(jobs) > 1 or jobs[0].trainer == "stacked":
                (ctx.cache.root / "stacked" / f"{name}.pt").unlink(missing_ok=True)
            else:
                if jobs[0].role != "target":
                    (ctx.cache.folder(jobs[0]) / "checkpoint.pt").unlink(missing_ok=True)
                shutil.rmtree(ctx.cache.folder(jobs[0]) / "teacher", ignore_errors=True)  # distillation's teacher
    return logits


def group_jobs(jobs: list[ModelJob]) -> list[list[ModelJob]]:
    """Single jobs alone; stacked jobs of one group in chunks of at most `MAX_STACK` (in plan order)."""
    groups: list[list[ModelJob]] = []
    stacked: dict[str, list[ModelJob]] = {}
    for job in jobs:
        if job.trainer == "stacked":
            stacked.setdefault(job.group, []).append(job)
        else:
            groups.append([job])
    for members in stacked.values():
        groups += [members[i : i + MAX_STACK] for i in range(0, len(members), MAX_STACK)]
    return groups


class Executor(Protocol):
    """Trains jobs into the cache. Implementations must be idempotent by key and leave only complete files."""

    def run(
        self, jobs: list[ModelJob], ctx: ExecutionContext, *, on_done: Callable[[int], None] | None = None
    ) -> None: ...


class LocalExecutor:
    """Trains the jobs in this process, one group after another."""

    def run(self, jobs: list[ModelJob], ctx: ExecutionContext, *, on_done: Callable[[int], None] | None = None) -> None:
        todo = []
        for job in jobs:
            if not ctx.is_done(job):
                todo.append(job)
            elif on_done:
                on_done(1)
        for group in group_jobs(todo):
            train_group(group, ctx)
            if on_done:
                on_done(len(group))
