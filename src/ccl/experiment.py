"""The experiment pipeline behind `ccl audit` and `ccl compare`: train, attack, measure, save.

For each seed, one membership split is drawn and shared by every defense (a paired comparison). For each
(defense, seed), the target and `num_references` reference models are trained with the same loss, the same
hyperparameters and the same number of epochs (the attacker knows the recipe), queried without augmentation
(unless `flip_queries`), and every attack the setup supports scores the audited records.

Run directory:
    config.yaml             the resolved configuration
    run.json                code version, library versions, command line
    splits/seed-<s>.npz     membership splits
    models/<key>/           one folder per trained model, named by a hash of what determines it (dataset, model,
                            recipe, defense, members, seed): checkpoint.pt, log.jsonl, outputs.npz
    results/<defense>/seed-<s>/scores.npz, metrics.json
    metrics.json, table.csv, report.html, plots/*.png

Trained models are cached by key, so a re-run, a `--resume` or a larger `num_references` reuses what exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import attacks, data, metrics, signals
from ._io import atomic_path, write_json
from .config import DefenseSpec, ExperimentConfig
from .data import Dataset, MembershipSplit
from .run_dir import RunDirectoryError, prepare_run_dir
from .stacked import MAX_STACK, fit_stacked, predict_stacked, use_stacked
from .theory import gaussian_best_advantage
from .training import fit, predict_logits, resolve_device

__all__ = ["ModelJob", "RunDirectoryError", "load_dataset", "run_experiment", "train_models"]

# Fields of TrainConfig that do not change the trained weights' recipe, left out of cache keys.
_NOT_RECIPE = {"progress", "eval_every", "device", "compile"}


@dataclass(frozen=True)
class ModelJob:
    """One model to train: its role, the records it trains on, and the seed of its weights and batches."""

    role: str  # "target" or "reference-<k>"
    defense: DefenseSpec
    members: np.ndarray  # indices into the dataset
    seed: int


def load_dataset(config: ExperimentConfig) -> Dataset:
    return data.load(config.dataset, **config.dataset_options)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_key(config: ExperimentConfig, job: ModelJob) -> str:
    """A hash of everything that determines the trained model."""
    recipe = {k: v for k, v in config.train.to_dict().items() if k not in _NOT_RECIPE and k != "seed"}
    return _digest(
        {
            "dataset": config.dataset,
            "dataset_options": config.dataset_options,
            "model": config.model,
            "model_options": config.model_options,
            "recipe": recipe,
            "defense": job.defense.to_dict(),
            "members": hashlib.sha256(np.ascontiguousarray(job.members, dtype=np.int64).tobytes()).hexdigest(),
            "seed": job.seed,
        }
    )[:20]


def result_key(config: ExperimentConfig, defense: DefenseSpec, seed: int) -> str:
    """A hash of everything that determines one (defense, seed) result: a resumed run recomputes a result
    whose recipe, attacks or number of reference models changed since it was written."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("seeds", "defenses", "stacked")}
    settings["train"] = {k: v for k, v in settings["train"].items() if k not in _NOT_RECIPE}
    return _digest({"settings": settings, "defense": defense.to_dict(), "seed": seed})[:20]


def _model_seed(seed: int, role_index: int) -> int:
    """Independent seeds for the target (index 0) and each reference model (index k + 1)."""
    return int(np.random.SeedSequence([seed, role_index, 7]).generate_state(1)[0] % 2**31)


def jobs_for(config: ExperimentConfig, defense: DefenseSpec, seed: int, split: MembershipSplit) -> list[ModelJob]:
    jobs = [ModelJob("target", defense, split.target_members, _model_seed(seed, 0))]
    for k in range(split.num_references):
        jobs.append(ModelJob(f"reference-{k}", defense, split.reference_members(k), _model_seed(seed, k + 1)))
    return jobs


def _train_stacked(
    config: ExperimentConfig,
    dataset: Dataset,
    jobs: list[ModelJob],
    query_index: np.ndarray,
    checkpoint: str | None = None,
) -> list[np.ndarray]:
    """Trains `jobs` (one defense, equal member counts) stacked; returns each model's logits on `query_index`."""
    configs = [dataclasses.replace(config.train, seed=j.seed) for j in jobs]
    stack = fit_stacked(
        [config.build_model(dataset, seed=j.seed) for j in jobs],
        jobs[0].defense.build(),
        dataset.x,
        dataset.y,
        [j.members for j in jobs],
        configs=configs,
        checkpoint=checkpoint,
    )
    device = resolve_device(config.train.device)
    logits = predict_stacked(
        stack, dataset.x[torch.as_tensor(query_index)], flip_queries=config.flip_queries, device=device
    )
    return list(logits)


def _train_one(
    config: ExperimentConfig, dataset: Dataset, job: ModelJob, folder: Path, query_index: np.ndarray
) -> np.ndarray:
    model = config.build_model(dataset, seed=job.seed)
    train_cfg = dataclasses.replace(config.train, seed=job.seed)
    heldout_index = np.setdiff1d(query_index, job.members)
    result = fit(
        model,
        job.defense.build(),
        dataset.subset(job.members),
        heldout=dataset.subset(heldout_index) if heldout_index.size else None,
        config=train_cfg,
        checkpoint_dir=folder,
        description=f"{job.defense.label} {job.role}",
    )
    return predict_logits(
        result.model, dataset.x[torch.as_tensor(query_index)], device=train_cfg.device, flip_queries=config.flip_queries
    )


def train_models(
    config: ExperimentConfig,
    dataset: Dataset,
    jobs: list[ModelJob],
    query_index: np.ndarray,
    cache: Path,
    *,
    on_done: Callable[[], None] | None = None,
) -> np.ndarray:
    """Trains (or loads from the cache) every job's model; returns their logits on `query_index`, stacked
    `(len(jobs), Q, [A,] C)`. Each model's outputs are saved as soon as it is trained."""
    keys = [model_key(config, job) for job in jobs]  # hashes every job's member indices: once
    outputs: dict[int, np.ndarray] = {}
    todo = []
    for i in range(len(jobs)):
        folder = cache / keys[i]
        out_file = folder / "outputs.npz"
        if out_file.exists():
            try:
                with np.load(out_file, allow_pickle=False) as f:
                    if np.array_equal(f["query_index"], query_index):
                        outputs[i] = f["logits"]
                        if on_done:
                            on_done()
                        continue
            except Exception as err:
                raise RunDirectoryError(
                    f"The cached model outputs {out_file} are corrupt ({err}); delete the folder {folder} and resume."
                ) from err
        todo.append(i)
    # The target trains alone (its per-epoch log feeds the report); reference models stacked where faster.
    refs = [i for i in todo if jobs[i].role != "target"]
    groups = [[i] for i in todo if jobs[i].role == "target"]
    if use_stacked(config, dataset, len(refs)):
        groups += [refs[j : j + MAX_STACK] for j in range(0, len(refs), MAX_STACK)]
    else:
        groups += [[i] for i in refs]
    for group in groups:
        if len(group) > 1:
            group_key = "-".join(keys[i] for i in group)
            ckpt = cache / "stacked" / (hashlib.sha256(group_key.encode()).hexdigest()[:20] + ".pt")
            logits = _train_stacked(config, dataset, [jobs[i] for i in group], query_index, checkpoint=str(ckpt))
        else:
            logits = [_train_one(config, dataset, jobs[i], cache / keys[i], query_index) for i in group]
        for i, lg in zip(group, logits, strict=True):
            folder = cache / keys[i]
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / "outputs.npz") as tmp, open(tmp, "wb") as fh:
                np.savez(fh, logits=lg, query_index=query_index)
            write_json(
                folder / "job.json",
                {
                    "role": jobs[i].role,
                    "defense": jobs[i].defense.to_dict(),
                    "seed": jobs[i].seed,
                    "num_members": int(jobs[i].members.size),
                },
            )
            outputs[i] = lg
            if on_done:
                on_done()
    return np.stack([outputs[i] for i in range(len(jobs))])


def _attack_metrics(
    config: ExperimentConfig, inputs: attacks.AttackInputs, is_member: np.ndarray, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    names = config.attacks
    if names is None:
        names = [n for n in attacks.available() if attacks.runnable(attacks.create(n), inputs)]
    else:
        for name in names:
            if not attacks.runnable(attacks.create(name), inputs):
                raise ValueError(
                    f"Attack {name!r} needs reference models or a population this setup lacks "
                    f"(num_references={inputs.num_references})."
                )
    scores = attacks.score_all(inputs, names=names)
    with warnings.catch_warnings():  # an unresolvable FPR (too few non-members) is NaN; the report says why
        warnings.simplefilter("ignore", metrics.DegenerateMetricWarning)
        results = {
            name: metrics.evaluate(s, is_member, n_resamples=config.bootstrap, seed=seed).as_dict()
            for name, s in scores.items()
        }
    return scores, results


def evaluate_defense(
    config: ExperimentConfig,
    dataset: Dataset,
    split: MembershipSplit,
    defense: DefenseSpec,
    seed: int,
    cache: Path,
    out_dir: Path,
    *,
    on_done: Callable[[], None] | None = None,
) -> dict:
    """Trains target and references for one (defense, seed), runs the attacks, writes scores and metrics."""
    query_index = np.concatenate([split.pool, split.population])
    jobs = jobs_for(config, defense, seed, split)
    logits = train_models(config, dataset, jobs, query_index, cache, on_done=on_done)  # (1 + K, Q, [A,] C)
    if logits.ndim == 3:
        logits = logits[:, :, None, :]  # (M, Q, A=1, C)
    p, labels_all = split.pool.size, dataset.y[torch.as_tensor(query_index)].numpy()
    labels, pop_labels = labels_all[:p], labels_all[p:]
    target, refs = logits[0], logits[1:]
    has_pop = split.population.size > 0 and refs.shape[0] > 0
    inputs = attacks.AttackInputs(
        target[:p],
        labels,
        refs[:, :p] if refs.shape[0] else None,
        split.reference_in if refs.shape[0] else None,
        population_target_logits=target[p:] if has_pop else None,
        population_labels=pop_labels if has_pop else None,
        population_reference_logits=refs[:, p:] if has_pop else None,
    )
    is_member = split.target_in
    scores, results = _attack_metrics(config, inputs, is_member, seed)

    # utility and the loss distributions the paper is about
    target_loss = signals.loss(target[:, 0], labels_all)  # (Q,) cross-entropy of the un-augmented query
    predicted = target[:, 0].argmax(-1) == labels_all
    held_out = np.r_[~is_member, np.ones(split.population.size, bool)]
    member_loss, nonmember_loss = target_loss[:p][is_member], target_loss[:p][~is_member]
    gauss = gaussian_best_advantage(
        member_loss.mean(), max(member_loss.std(), 1e-12), nonmember_loss.mean(), max(nonmember_loss.std(), 1e-12)
    )
    log_file = cache / model_key(config, jobs[0]) / "log.jsonl"
    history = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []
    summary = {
        "defense": defense.label,
        "slug": defense.slug,
        "result_key": result_key(config, defense, seed),
        "loss": defense.to_dict(),
        "seed": seed,
        "train_acc": float(predicted[:p][is_member].mean()),
        "test_acc": float(predicted[held_out].mean()),
        "member_loss_mean": float(member_loss.mean()),
        "member_loss_std": float(member_loss.std()),
        "nonmember_loss_mean": float(nonmember_loss.mean()),
        "nonmember_loss_std": float(nonmember_loss.std()),
        "gaussian_predicted_advantage": float(gauss.advantage),
        "num_references": int(refs.shape[0]),
        "num_members": int(is_member.sum()),
        "num_nonmembers": int((~is_member).sum()),
        "num_population": int(split.population.size),
        "attacks": results,
        "target_history": history,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "scores.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            is_member=is_member,
            labels=labels,
            target_loss=target_loss[:p],
            **{f"score_{k}": v for k, v in scores.items()},
        )
    write_json(out_dir / "metrics.json", summary)  # written last: its presence marks the result complete
    return summary


def _check_attacks_can_run(config: ExperimentConfig) -> None:
    """Named attacks that the setup cannot support fail now, not after hours of training."""
    for name in config.attacks or []:
        attack = attacks.create(name)
        if config.num_references < attack.min_references:
            raise ValueError(
                f"Attack {name!r} needs at least {attack.min_references} reference models; "
                f"num_references is {config.num_references}."
            )
        if attack.needs_population and config.population_fraction == 0:
            raise ValueError(f"Attack {name!r} needs a population: set population_fraction above 0.")


def run_experiment(
    config: ExperimentConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Runs every (defense, seed) of `config` into `run_dir` and returns the aggregated metrics.

    Completed (defense, seed) results are skipped on resume; trained models come from the cache
    (`cache_dir`, default `run_dir/models`).
    """
    from .report import aggregate  # noqa: PLC0415

    run_dir = Path(run_dir)
    _check_attacks_can_run(config)
    dataset = load_dataset(config)  # before the run directory exists: a failed download leaves nothing behind
    prepare_run_dir(run_dir, config, resume=resume)
    cache = Path(cache_dir) if cache_dir is not None else run_dir / "models"
    per_model = 1 + config.num_references
    total = per_model * len(config.defenses) * len(config.seeds)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="models", unit="model")
    tick = (lambda: bar.update(1)) if bar is not None else None
    try:
        for seed in config.seeds:
            split_file = run_dir / "splits" / f"seed-{seed}.npz"
            split = data.membership_split(
                len(dataset),
                num_references=config.num_references,
                seed=seed,
                population_fraction=config.population_fraction,
            )
            split.save(split_file)
            for defense in config.defenses:
                out_dir = run_dir / "results" / defense.slug / f"seed-{seed}"
                if (out_dir / "metrics.json").exists():
                    done = json.loads((out_dir / "metrics.json").read_text())
                    if done.get("result_key") == result_key(config, defense, seed):
                        if bar is not None:
                            bar.update(per_model)
                        continue
                evaluate_defense(config, dataset, split, defense, seed, cache, out_dir, on_done=tick)
    finally:
        if bar is not None:
            bar.close()
    return aggregate(run_dir)
