"""The audit pipeline, in the order the data flows: preflight -> plan -> execute -> score -> results.

For each seed, one membership split is drawn and shared by every defense (a paired comparison). For each
(defense, seed), the target and `num_references` reference models are planned as content-keyed jobs, trained
(or found in the cache) by an executor, queried without augmentation (unless `flip_queries`), scored by every
attack the setup supports, and written as a typed result. The aggregate over seeds is written once, at the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import data
from .._io import atomic_path, write_json
from ..config import ExperimentConfig
from ..data import MembershipSplit
from ..data.canaries import add_canaries
from ..data.transforms import standardize
from ..errors import ConfigError
from ..results import Aggregate, DefenseResult, aggregate, save_scores, write_aggregate
from ..run_dir import RunDirectory
from ..summary import summarize
from ..timing import phase, timed
from ..training import FitResult, Runtime, fit, predict_logits, resolve_device, torch_threads
from .execute import ExecutionContext, Executor, LocalExecutor, ModelCache
from .plan import model_seed, plan_jobs, result_key
from .preflight import preflight
from .score import score_defense
from .statistics import needed_statistics
from .supplied import (
    check_supplied_target,
    load_members,
    supplied_notes,
    supplied_split,
    supplied_target_logits,
    supplied_target_statistics,
)

__all__ = ["choose_threads", "run_audit", "run_train"]

#: Below this many parameters a model is "small": one CPU thread trains it fastest, because torch's threads
#: oversubscribe a shared machine (measured: one seed of `ccl demo` took 68 s with 1 thread, 317 s with 2 on a
#: 2-core machine with another process running).
SMALL_MODEL = 1_000_000


def choose_threads(
    config: ExperimentConfig, dataset, runtime: Runtime, *, recorded: int | None = None, local: bool = True
) -> Runtime:
    """The runtime with `threads` set when the user left it open on a CPU: the number a resumed run `recorded`,
    else 1 for a small model, else (training here, `local`) torch's current default; a Ray executor sets its
    tasks' own. Recorded in run.json with the other runtime options: on a CPU the thread count changes
    floating-point sums, hence results (by ~1e-7 in logits), so a resume keeps it (`RunDirectory.check_threads`)."""
    if runtime.threads is not None or resolve_device(runtime.device).type != "cpu":
        return runtime
    if recorded is not None:
        return runtime.replace(threads=recorded)
    params = sum(p.numel() for p in config.build_model(dataset, seed=0).parameters())
    if params < SMALL_MODEL:
        return runtime.replace(threads=1)
    return runtime.replace(threads=torch.get_num_threads()) if local else runtime


def _cpu_threads(runtime: Runtime) -> int | None:
    """The thread count that determines a CPU model's weights (`plan_jobs`); None on an accelerator."""
    return runtime.threads if resolve_device(runtime.device).type == "cpu" else None


@timed()
def run_audit(
    config: ExperimentConfig,
    run_dir: str | os.PathLike,
    *,
    runtime: Runtime | None = None,
    resume: bool = False,
    cache_dir: str | os.PathLike | None = None,
    executor: Executor | None = None,
    data_dir: str | os.PathLike | None = None,
    keep_checkpoints: bool = False,
    command: Sequence[str] | None = None,
) -> Aggregate:
    """Runs every (defense, seed) of `config` into `run_dir` and returns the aggregate.

    With `resume=True` the directory must hold a run whose stored configuration `config` only adds work to
    (`ccl.run_dir.check_resume`); finished results are kept and trained models come from the cache
    (`cache_dir`, default `run_dir/models`). `data_dir` is where downloaded datasets are cached. Reference
    models' checkpoints are deleted once their outputs are stored, unless `keep_checkpoints`.

    Tabular features are standardised (`config.standardizes`) with statistics of each seed's audit pool."""
    runtime = runtime or Runtime()
    rd = RunDirectory(run_dir)
    rd.check(config, resume=resume)  # before the dataset loads: a bad --out or resume fails at once
    cache = ModelCache(cache_dir if cache_dir is not None else rd.layout.models)
    with phase("preflight"):
        dataset = preflight(config, runtime, data_dir=data_dir)  # before the run directory exists
    recorded = rd.recorded_threads() if resume else None
    runtime = choose_threads(config, dataset, runtime, recorded=recorded, local=executor is None)
    if runtime.threads is None and resolve_device(runtime.device).type == "cpu" and executor is not None:
        runtime = runtime.replace(threads=getattr(executor, "task_threads", None))  # Ray: each task's own count
    executor = executor or LocalExecutor()
    bar = None
    members = None
    if config.supplied_target:  # its files are read now: a bad one fails before the run directory exists
        members = load_members(config.target_members, len(dataset))
        check_supplied_target(config, dataset)
    # the models answer perturbed queries only when a label-only attack may run
    label_only = config.attacks is None or any(a.startswith("label_only") for a in config.attacks)
    with rd.open(config, resume=resume, runtime=runtime, command=command), torch_threads(runtime.threads):
        if runtime.progress:
            from tqdm.auto import tqdm

            total = sum(models_per_setting(config, d) for d in config.defenses) * len(config.seeds)
            bar = tqdm(total=total, desc="models", unit="model")
        tick = bar.update if bar is not None else None
        try:
            results: list[DefenseResult] = []
            for seed in config.seeds:
                prepared = _prepare_seed(config, dataset, members, seed, rd)
                ctx = ExecutionContext(
                    prepared.data,
                    prepared.query_index,
                    config.flip_queries,
                    runtime,
                    cache,
                    keep_checkpoints,
                    num_pool=prepared.split.pool.size,
                    label_only=label_only,
                    statistics=needed_statistics(config.attacks),
                )
                for defense in config.defenses:
                    results.append(_audit_defense(config, defense, prepared, rd, ctx, executor, tick))
        finally:
            if bar is not None:
                bar.close()
        with phase("summary"):
            agg = aggregate(results, order=[d.label for d in config.defenses], fprs=config.fprs)
            summary = summarize(rd.path, agg, results, min_effect=config.min_effect)
            write_aggregate(rd.path, agg, summary=summary.to_dict())
    return agg


@dataclass(frozen=True)
class _Seed:
    """One seed's split and the data its models see: the dataset (with canaries, standardised), the queried
    records (pool, then population), their labels and flat features, and which pool records are canaries."""

    seed: int
    split: MembershipSplit
    data: data.Dataset
    is_canary: np.ndarray
    query_index: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    population_features: np.ndarray


def _prepare_seed(config: ExperimentConfig, dataset, members, seed: int, rd: RunDirectory) -> _Seed:
    """Draws the seed's split (around the supplied target's members, if any), adds the canaries, saves the
    split and standardises the features with the audit pool's statistics."""
    draw = supplied_split if config.supplied_target else data.membership_split
    first = (members, len(dataset)) if config.supplied_target else (len(dataset),)
    split = draw(
        *first,
        num_references=config.num_references,
        seed=seed,
        population_fraction=config.population_fraction,
        reserve_fraction=config.reserve_fraction,
    )
    seed_data, is_canary = dataset, np.zeros(split.pool.size, bool)
    if config.canaries:
        canaries = {"num": config.canaries, "kind": config.canary_kind, "seed": seed}
        seed_data, split, is_canary = add_canaries(dataset, split, **canaries)
    split.save(rd.split_file(seed))
    query_index = np.concatenate([split.pool, split.population])
    labels = seed_data.y[torch.as_tensor(query_index)].numpy()
    if config.standardizes:
        seed_data = standardize(seed_data, fit_index=split.pool[~is_canary])
    flat = seed_data.x.reshape(len(seed_data), -1).numpy()
    return _Seed(seed, split, seed_data, is_canary, query_index, labels, flat[split.pool], flat[split.population])


def _audit_defense(config, defense, s: _Seed, rd: RunDirectory, ctx, executor: Executor, tick) -> DefenseResult:
    """One (defense, seed) result: the stored one when its key still matches, else its models are trained (or
    taken from the cache), queried and scored, and the result is saved (its metrics.json last)."""
    per_model = models_per_setting(config, defense)
    key = result_key(config, defense, s.seed)
    stored = rd.layout.result(defense.slug, s.seed)
    if stored.exists():
        done = DefenseResult.load(stored)
        if done.result_key == key:
            if tick:
                tick(per_model)
            return done
    cache = ctx.cache
    chosen, selection = defense, None
    if defense.selects:  # the defense's recipe is chosen first, on the reserve; its models train with the choice
        with phase("train"):
            chosen, selection = select_recipe(config, defense, s, ctx, executor, tick)
    jobs = plan_jobs(config, chosen, s.seed, s.split, threads=_cpu_threads(ctx.runtime))
    trained = jobs[1:] if config.supplied_target else jobs  # a supplied target is not trained
    if config.supplied_target and tick:
        tick(1)
    with phase("train"):  # training and querying the models, or finding them in the cache
        executor.run(trained, ctx, on_done=tick)
    outputs = [cache.outputs(j, s.query_index) for j in trained]
    extras = [cache.extras(j) for j in trained]
    if config.supplied_target:  # no perturbed queries of a supplied target: label-only attacks skip it
        pool = s.query_index[: s.split.pool.size]  # a checkpoint's statistics are measured; logits have none
        extras.insert(0, supplied_target_statistics(config, s.data, pool, ctx.runtime, ctx.statistics))
        outputs.insert(0, supplied_target_logits(config, s.data, s.query_index, ctx.runtime))
    logits = np.stack(outputs)  # (1 + K, Q, [A,] C)
    with phase("score"):  # the attacks and their evaluations
        result, arrays = score_defense(
            config,
            s.labels,
            s.split,
            defense,
            s.seed,
            logits,
            result_key=key,
            target_log=cache.folder(jobs[0]) / "log.jsonl",
            is_canary=s.is_canary,
            dp_epsilon=cache.info(jobs[0]).get("epsilon"),
            extras=extras,
            features=s.features,
            population_features=s.population_features,
        )
    # DP-SGD: the target's accounting, for an auditor to recompute its epsilon (None otherwise)
    result.dp_accounting = cache.info(jobs[0]).get("dp_accounting")
    result.recipe = {k: v for k, v in chosen.recipe(config.train).to_dict().items() if k != "seed"}
    result.selection = selection
    if config.supplied_target:  # what was supplied, and whether it looks trained on these records
        result.notes[:0] = supplied_notes(config, s.data, logits, s.labels, s.split)
    out_dir = rd.result_dir(defense.slug, s.seed)
    with phase("score"):  # the per-record arrays and the result: part of scoring
        save_scores(out_dir, arrays)
        result.save(out_dir)  # written last: its presence marks the result complete
    return result


def models_per_setting(config: ExperimentConfig, defense) -> int:
    """The models one (defense, seed) trains: its target and references, and a candidate target per point of its
    recipe's choice (the chosen one is the target itself, found in the cache)."""
    return 1 + config.num_references + (len(defense.candidates()) if defense.selects else 0)


def select_recipe(config: ExperimentConfig, defense, s: _Seed, ctx, executor: Executor, tick):
    """The point of `defense`'s recipe choice with the best accuracy on the defender's reserve, and what was
    chosen from what: one candidate target per point, trained on the target's members with the target's seed
    and scored on the reserve, records no audited model trains on (the first best wins a tie)."""
    candidates = defense.candidates()
    jobs = [plan_jobs(config, c, s.seed, s.split, threads=_cpu_threads(ctx.runtime))[0] for c in candidates]
    reserve = s.split.reserve
    executor.run(jobs, dataclasses.replace(ctx, validation_index=reserve), on_done=tick)
    labels = s.data.y[torch.as_tensor(reserve)].numpy()
    accuracy = [float((ctx.cache.validation_logits(j, reserve).argmax(-1) == labels).mean()) for j in jobs]
    return _chosen(candidates, accuracy, records=int(reserve.size))


def _chosen(candidates: list, accuracy: list[float], *, records: int) -> tuple:
    """The most accurate candidate (the first of a tie) and the record of the choice for metrics.json."""
    best = int(np.argmax(accuracy))
    return candidates[best], {
        "metric": "accuracy on the defender's reserve",
        "records": records,
        "candidates": [{"train": c.train, "accuracy": a} for c, a in zip(candidates, accuracy, strict=True)],
        "chosen": candidates[best].train,
    }


@timed()
def run_train(
    config: ExperimentConfig,
    run_dir: str | os.PathLike,
    *,
    runtime: Runtime | None = None,
    resume: bool = False,
    data_dir: str | os.PathLike | None = None,
    command: Sequence[str] | None = None,
) -> FitResult:
    """`ccl train`: one model with the config's one defense on the target's members of its one seed, with
    the audit's seed rule (the model is the audit's target for that seed), into `run_dir/model`."""
    runtime = runtime or Runtime()
    if len(config.defenses) != 1 or len(config.seeds) != 1:
        raise ConfigError("`ccl train` trains one model: give one --loss and one seed.")
    rd = RunDirectory(run_dir)
    rd.check(config, resume=resume)  # before the dataset loads: a bad --out or resume fails at once
    dataset = preflight(config, runtime, data_dir=data_dir)
    runtime = choose_threads(config, dataset, runtime, recorded=rd.recorded_threads() if resume else None)
    seed = config.seeds[0]
    with rd.open(config, resume=resume, runtime=runtime, command=command), torch_threads(runtime.threads):
        split = data.membership_split(
            len(dataset),
            seed=seed,
            population_fraction=config.population_fraction,
            reserve_fraction=config.reserve_fraction,
        )
        split.save(rd.split_file(seed))
        if config.standardizes:
            dataset = standardize(dataset, fit_index=split.pool)
        target_seed = model_seed(seed, 0)
        reserve = dataset.subset(split.reserve) if split.reserve.size else None

        def train_one(spec, folder: Path) -> FitResult:
            return fit(
                config.build_model(dataset, seed=target_seed),
                spec.build(),
                dataset.subset(split.target_members),
                heldout=dataset.subset(split.target_nonmembers),
                recipe=spec.recipe(config.train).replace(seed=target_seed),
                runtime=runtime,
                checkpoint_dir=folder,
                resume=True,
                procedure=spec.procedure(),
                reserve=reserve,
            )

        chosen, selection = config.defenses[0], None
        if chosen.selects:  # each candidate under candidates/, the chosen one's checkpoint copied to model/
            chosen, selection = _choose_trained(chosen, train_one, rd.path / "candidates", reserve)
            _copy_checkpoint(rd.path / "candidates" / chosen.slug, rd.path / "model")
        result = train_one(chosen, rd.path / "model")
        last = {k: v for k, v in result.history[-1].items() if k != "seconds"}
        if result.dp_accounting is not None:  # DP-SGD: what Opacus' accountant needs to recompute the epsilon
            last["dp_accounting"] = result.dp_accounting.to_dict()
        if selection is not None:
            last["selection"] = selection
        write_json(rd.layout.aggregate, {"defense": config.defenses[0].label, "seed": seed, **last})
    return result


def _choose_trained(defense, train_one, folder: Path, reserve) -> tuple:
    """`ccl train`'s recipe choice: each candidate trained into `folder/<slug>` and scored on the reserve."""
    candidates, accuracy = defense.candidates(), []
    for candidate in candidates:
        model = train_one(candidate, folder / candidate.slug).model
        accuracy.append(float((predict_logits(model, reserve[0]).argmax(-1) == reserve[1].numpy()).mean()))
    return _chosen(candidates, accuracy, records=len(reserve[1]))


def _copy_checkpoint(source: Path, dest: Path) -> None:
    """The chosen candidate's finished checkpoint and log as `dest`'s (each file written atomically), so that
    `fit` resumes it without training again."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint.pt", "log.jsonl"):
        if (source / name).exists() and not (dest / name).exists():
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(source / name, tmp)
