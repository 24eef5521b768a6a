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
import torch

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


def qq_correlation(x: np.ndarray) -> float:
    """The correlation of the normal QQ plot of `x` (1: exactly Gaussian; below ~0.98: visibly not)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    if x.size < 3 or x.std() == 0:
        return float("nan")
    probs = (np.arange(1, x.size + 1) - 0.375) / (x.size + 0.25)  # Blom's plotting positions
    quantiles = torch.special.ndtri(torch.from_numpy(probs)).numpy()
    return float(np.corrcoef(quantiles, x)[0, 1])


def _logit_confidence(loss: np.ndarray) -> np.ndarray:
    """phi = log p_y - log(1 - p_y) from the cross-entropy (p_y = exp(-loss)), stable for tiny losses."""
    loss = np.maximum(np.asarray(loss, dtype=np.float64), 1e-30)
    return -loss - np.log(-np.expm1(-loss))


def gaussian_fits(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> dict[str, dict[str, float]]:
    """The paper's Gaussian model of the loss attack, fitted twice: on the cross-entropy itself (the paper's
    choice; members' losses pile up near 0, far from Gaussian) and on LiRA's logit-scaled confidence
    `phi = log(p_y / (1 - p_y))`, where both groups are closer to Gaussian. A threshold on either is the same
    attack (phi decreases with the loss), so both predictions compare with the measured loss-attack advantage.
    Each fit records the means, standard deviations, the predicted best advantage and the QQ correlations."""
    out = {}
    for scale, (m, n) in {
        "loss": (member_loss, nonmember_loss),
        "logit": (-_logit_confidence(member_loss), -_logit_confidence(nonmember_loss)),  # negated: members lower
    }.items():
        mu_m, sd_m, mu_n, sd_n = float(m.mean()), float(m.std()), float(n.mean()), float(n.std())
        best = gaussian_best_advantage(mu_m, max(sd_m, 1e-12), mu_n, max(sd_n, 1e-12))
        out[scale] = {
            "member_mean": mu_m,
            "member_std": sd_m,
            "nonmember_mean": mu_n,
            "nonmember_std": sd_n,
            "advantage": float(best.advantage),
            "fpr": float(best.fpr),
            "qq_member": qq_correlation(m),
            "qq_nonmember": qq_correlation(n),
        }
    return out


def _notes(
    config: ExperimentConfig, test_acc: float, heldout_labels: np.ndarray, num_population: int, scores: dict
) -> list[str]:
    """Warnings a reader needs next to the numbers: a target that learnt nothing, a population too small."""
    notes = []
    majority = float(np.bincount(heldout_labels).max() / heldout_labels.size)
    if test_acc <= majority + 0.005:
        notes.append(
            f"The target's test accuracy ({100 * test_acc:.1f}%) is at or below the majority-class rate "
            f"({100 * majority:.1f}%): it has learnt nothing, so attack results near AUC 0.5 say nothing about "
            "privacy. Check the learning rate, the epochs and the features' scale (standardize)."
        )
    rmia = [a for a in scores if a.startswith("rmia")]
    if rmia and num_population < 1 / min(config.fprs):
        notes.append(
            f"RMIA compares each record with a population of {num_population} records, too few to resolve an FPR "
            f"of {100 * min(config.fprs):g}% (it needs at least {round(1 / min(config.fprs))}); raise "
            "--population-fraction or use more data."
        )
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    return notes


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
    test_acc = float(predicted[held_out].mean())
    notes = _notes(config, test_acc, labels_all[held_out], split.population.size, scores)
    gauss = gaussian_fits(member_loss, nonmember_loss)
    result = DefenseResult(
        defense=defense.label,
        slug=defense.slug,
        spec=defense.to_dict(),
        seed=seed,
        result_key=result_key,
        train_acc=float(predicted[:p][is_member].mean()),
        test_acc=test_acc,
        member_loss_mean=float(member_loss.mean()),
        member_loss_std=float(member_loss.std()),
        nonmember_loss_mean=float(nonmember_loss.mean()),
        nonmember_loss_std=float(nonmember_loss.std()),
        gaussian_predicted_advantage=gauss["loss"]["advantage"],
        gaussian_fits=gauss,
        num_references=int(refs.shape[0]),
        num_members=int(is_member.sum()),
        num_nonmembers=int((~is_member).sum()),
        num_population=int(split.population.size),
        fprs=list(config.fprs),
        attacks=results,
        target_history=_history(target_log),
        notes=notes,
    )
    arrays = {
        "is_member": is_member,
        "labels": labels,
        "target_loss": target_loss[:p],
        "scores": scores,
        "heldout_correct": predicted[held_out],
    }
    return result, arrays
