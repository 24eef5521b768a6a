"""Step 3 of an audit: from the models' outputs to attack scores, utility and the loss statistics.

The target's members and non-members come from the split (disjoint, balanced); reference models' outputs on
the same records and on the population (records no model trained on) feed the attacks that need them. Accuracy
is measured on records the target never trained on.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from .. import attacks, metrics, signals
from ..config import DefenseSpec, ExperimentConfig
from ..data import MembershipSplit
from ..errors import ConfigError
from ..results import DefenseResult
from ..theory import gaussian_best_advantage

__all__ = ["attack_names", "score_defense"]


def attack_names(config: ExperimentConfig, inputs: attacks.AttackInputs) -> list[str]:
    """The configured attacks, or every attack the inputs support."""
    if config.attacks is None:
        return [n for n in attacks.available() if attacks.runnable(attacks.create(n), inputs)]
    for name in config.attacks:
        if not attacks.runnable(attacks.create(name), inputs):
            raise ConfigError(
                f"Attack {name!r} needs reference models or a population this setup lacks "
                f"(num_references={inputs.num_references})."
            )
    return list(config.attacks)


def _history(log_file: Path) -> list[dict]:
    """The target's per-epoch log without wall-clock timings (results must not depend on the machine's load)."""
    if not log_file.exists():
        return []
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def score_defense(
    config: ExperimentConfig,
    labels_all: np.ndarray,
    split: MembershipSplit,
    defense: DefenseSpec,
    seed: int,
    logits: np.ndarray,
    *,
    result_key: str,
    target_log: Path,
) -> tuple[DefenseResult, dict[str, np.ndarray]]:
    """Runs the attacks on `logits (1 + K, Q, [A,] C)` (target first; queries: the pool, then the population)
    and measures utility. Returns the result and the per-record arrays to store with it."""
    if logits.ndim == 3:
        logits = logits[:, :, None, :]  # (M, Q, A=1, C)
    p = split.pool.size
    labels, pop_labels = labels_all[:p], labels_all[p:]
    target, refs = logits[0], logits[1:]
    has_refs = refs.shape[0] > 0
    has_pop = split.population.size > 0 and has_refs
    inputs = attacks.AttackInputs(
        target[:p],
        labels,
        refs[:, :p] if has_refs else None,
        split.reference_in if has_refs else None,
        population_target_logits=target[p:] if has_pop else None,
        population_labels=pop_labels if has_pop else None,
        population_reference_logits=refs[:, p:] if has_pop else None,
    )
    is_member = split.target_in
    scores = attacks.score_all(inputs, names=attack_names(config, inputs))
    with warnings.catch_warnings():  # an unresolvable FPR (too few non-members) is NaN (null in JSON)
        warnings.simplefilter("ignore", metrics.DegenerateMetricWarning)
        results = {
            name: metrics.evaluate(s, is_member, fprs=config.fprs, n_resamples=config.bootstrap, seed=seed).as_dict()
            for name, s in scores.items()
        }

    target_loss = signals.loss(target[:, 0], labels_all)  # (Q,) cross-entropy of the un-augmented query
    predicted = target[:, 0].argmax(-1) == labels_all
    held_out = np.r_[~is_member, np.ones(split.population.size, bool)]
    member_loss, nonmember_loss = target_loss[:p][is_member], target_loss[:p][~is_member]
    gauss = gaussian_best_advantage(
        member_loss.mean(), max(member_loss.std(), 1e-12), nonmember_loss.mean(), max(nonmember_loss.std(), 1e-12)
    )
    result = DefenseResult(
        defense=defense.label,
        slug=defense.slug,
        spec=defense.to_dict(),
        seed=seed,
        result_key=result_key,
        train_acc=float(predicted[:p][is_member].mean()),
        test_acc=float(predicted[held_out].mean()),
        member_loss_mean=float(member_loss.mean()),
        member_loss_std=float(member_loss.std()),
        nonmember_loss_mean=float(nonmember_loss.mean()),
        nonmember_loss_std=float(nonmember_loss.std()),
        gaussian_predicted_advantage=float(gauss.advantage),
        num_references=int(refs.shape[0]),
        num_members=int(is_member.sum()),
        num_nonmembers=int((~is_member).sum()),
        num_population=int(split.population.size),
        fprs=list(config.fprs),
        attacks=results,
        target_history=_history(target_log),
    )
    arrays = {"is_member": is_member, "labels": labels, "target_loss": target_loss[:p], "scores": scores}
    return result, arrays
