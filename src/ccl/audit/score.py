"""Step 3 of an audit: from the models' outputs to attack scores, utility and the loss statistics.

The target's members and non-members come from the split (disjoint, balanced); reference models' outputs on
the same records and on the population (records no model trained on) feed the attacks that need them. Accuracy
is measured on records the target never trained on.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import attacks, bounds, evaluation, metrics, signals
from ..config import DefenseSpec, ExperimentConfig
from ..data import MembershipSplit
from ..errors import ConfigError
from ..results import DefenseResult
from ..theory import gaussian_best_advantage
from ..timing import phase
from .statistics import STATISTIC_ATTACKS

__all__ = ["attack_names", "score_defense"]


def attack_names(config: ExperimentConfig, inputs: attacks.AttackInputs, *, skip: Collection[str] = ()) -> list[str]:
    """The configured attacks but those in `skip`, or every attack the inputs support."""
    if config.attacks is None:
        return [n for n in attacks.available() if attacks.runnable(attacks.create(n), inputs)]
    named = [n for n in config.attacks if n not in skip]
    for name in named:
        if not attacks.runnable(attacks.create(name), inputs):
            raise ConfigError(
                f"Attack {name!r} needs inputs this setup lacks (reference models, a population, the records' "
                f"features or perturbed-query labels; num_references={inputs.num_references})."
            )
    return named


def _skipped_without_weights(config: ExperimentConfig, extras: list[dict[str, np.ndarray]] | None) -> dict[str, str]:
    """The statistic attacks named in --attacks that a supplied target's logits cannot serve (only its checkpoint
    can be queried and differentiated): attack -> the note that says so."""
    if not config.supplied_target or not config.attacks or not extras:
        return {}
    return {
        name: f"The {name} attack was skipped: it measures the target's {stat.replace('_', ' ')}, which needs its "
        "weights (--target-checkpoint), not its outputs (--target-logits)."
        for name, stat in STATISTIC_ATTACKS.items()
        if name in config.attacks and stat not in extras[0]
    }


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


#: Attacks left out of the leave-one-out evaluation: the shadow classifier and QMIA train one attack model per
#: target (M times their single-target cost).
NOT_POOLED = ("shadow_classifier", "qmia")
#: The delta of the (epsilon, delta) lower bounds reported next to each attack.
EPSILON_DELTA = 1e-5
#: The one-run audit (Steinke et al.) runs on the canaries when there are at least this many.
ONE_RUN_MIN_CANARIES = 50


def _epsilon(scores: np.ndarray, truth: np.ndarray, seed: int) -> float:
    """The (epsilon, EPSILON_DELTA) lower bound that the attack's best threshold rules out at 95% confidence."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.DegenerateMetricWarning)
        return float(bounds.epsilon_lower_bound(scores, truth, delta=EPSILON_DELTA, seed=seed).epsilon)


#: Attacks whose pooled metrics get bootstrap intervals (each interval is `bootstrap` ROC computations per
#: evaluation); the others get point estimates, their spread over seeds still in the aggregate.
BOOTSTRAPPED = ("loss", "lira", "rmia")
#: Fractions of the most vulnerable records measured separately.
VULNERABLE_FRACTIONS = (0.01, 0.05)


def _pooled_evaluations(
    config: ExperimentConfig,
    names: list[str],
    logits: np.ndarray,
    labels: np.ndarray,
    pop_labels: np.ndarray,
    masks: np.ndarray,
    is_canary: np.ndarray,
    seed: int,
    pool: np.ndarray,
    model_inputs: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, dict]], dict[str, np.ndarray], list[dict], dict[str, np.ndarray]]:
    """Leave-one-out scores of every pooled attack, and the pooled metrics on random records, canaries and the
    most vulnerable records; `model_inputs`: the models' label-only inputs and statistics (`_every_model`). Returns
    (evaluation -> attack -> metrics, attack -> (M, P) scores, the table of the most vulnerable records,
    {"vulnerable_records": their pool indices, "vulnerable_models": the models that
    measure them})."""
    p = masks.shape[1]
    has_pop = logits.shape[1] > p
    loo: dict[str, np.ndarray] = {}
    for name in names:
        if name in NOT_POOLED:
            continue
        try:
            with phase(f"leave_one_out/{name}"):
                loo[name] = evaluation.leave_one_out_scores(
                    attacks.create(name),
                    logits[:, :p],
                    labels,
                    masks,
                    population_logits=logits[:, p:] if has_pop else None,
                    population_labels=pop_labels if has_pop else None,
                    **(model_inputs or {}),
                )
        except attacks.NotEnoughReferencesError:
            continue
    random_records, canaries = np.nonzero(~is_canary)[0], np.nonzero(is_canary)[0]
    opts = {"fprs": config.fprs, "n_resamples": config.bootstrap, "seed": seed}
    quick = {**opts, "n_resamples": 0}  # point estimates only: intervals for the headline attacks (cost)
    evals: dict[str, dict[str, dict]] = {"pooled": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.DegenerateMetricWarning)
        for name, sc in loo.items():
            o = opts if name in BOOTSTRAPPED else quick
            with phase("evaluation/pooled"):
                pooled = evaluation.pooled_metrics(sc, masks, records=random_records, **o)
                pooled["epsilon_lb"] = _epsilon(sc[:, random_records].ravel(), masks[:, random_records].ravel(), seed)
                evals["pooled"][name] = pooled
            if canaries.size:
                with phase("evaluation/canaries"):
                    evals.setdefault("canaries", {})[name] = _canary_metrics(sc, masks, canaries, seed, o)
        with phase("evaluation/vulnerable"):
            table, chosen_arrays = _vulnerable_evaluations(evals, loo, masks, random_records, labels, pool, seed, opts)
    return evals, loo, table, chosen_arrays


def _canary_metrics(scores: np.ndarray, masks: np.ndarray, canaries: np.ndarray, seed: int, opts: dict) -> dict:
    """One attack's pooled metrics on the canaries, with the one-run audit when there are enough of them."""
    canary = evaluation.pooled_metrics(scores, masks, records=canaries, **opts)
    canary["epsilon_lb"] = _epsilon(scores[:, canaries].ravel(), masks[:, canaries].ravel(), seed)
    if canaries.size >= ONE_RUN_MIN_CANARIES:  # the target's canaries: one training run
        k = max(1, canaries.size // 10)
        canary["one_run_epsilon_lb"] = bounds.one_run_audit_from_scores(
            scores[0, canaries], masks[0, canaries], k_pos=k, k_neg=k, delta=EPSILON_DELTA
        )
    return canary


def _vulnerable_evaluations(evals, loo, masks, random_records, labels, pool, seed: int, opts: dict):
    """Adds the pooled metrics on the most vulnerable records (ranked by the first of LiRA, RMIA, loss) to
    `evals`; returns the table of those records and the arrays that name them and their measuring models."""
    quick = {**opts, "n_resamples": 0}
    table: list[dict] = []
    chosen_arrays: dict[str, np.ndarray] = {}
    chooser = next((a for a in ("lira", "rmia", "loss") if a in loo), next(iter(loo), None))
    if chooser is None:
        return table, chosen_arrays
    ranked, gap, measure = evaluation.rank_by_leakage(
        loo[chooser], masks, records=random_records, seed=np.random.SeedSequence([seed, 0x5EED])
    )
    for fraction in VULNERABLE_FRACTIONS:
        top = evaluation.top_fraction(ranked, fraction)
        evals[f"vulnerable_{100 * fraction:g}pct"] = {
            name: evaluation.pooled_metrics(
                sc, masks, records=top, models=measure, **(opts if name in BOOTSTRAPPED else quick)
            )
            for name, sc in loo.items()
        }
    listed = evaluation.top_fraction(ranked, max(VULNERABLE_FRACTIONS))
    chosen_arrays["vulnerable_records"] = listed
    chosen_arrays["vulnerable_models"] = measure
    for i, leakage in zip(listed, gap, strict=False):
        table.append({"record": int(pool[i]), "label": int(labels[i]), "leakage": float(leakage), "attack": chooser})
    return table, chosen_arrays


def _every_model(label_only: dict) -> dict[str, Any]:
    """Every model's inputs for the leave-one-out evaluation (target first): `perturbed_labels`, kind -> (M, P, Q)
    predicted labels; `statistics`, statistic -> (M, P); each left out without them."""
    out: dict[str, Any] = {}
    for group, names, key in (
        ("perturbed_labels", ("perturbed", "noise"), "{}_{}_labels"),
        ("statistics", tuple(STATISTIC_ATTACKS.values()), "{}_{}"),
    ):
        for name in names:
            target, refs = label_only.get(key.format("target", name)), label_only.get(key.format("reference", name))
            if target is not None and refs is not None:
                out.setdefault(group, {})[name] = np.concatenate([target[None], refs])
    return out


def _label_only_inputs(extras: list[dict[str, np.ndarray]] | None, has_refs: bool) -> dict[str, np.ndarray]:
    """The label-only attacks' `AttackInputs` fields from every model's stored labels on the perturbed queries
    (`<kind>_labels`, kinds "augment" and "noise") and the statistic attacks' fields from every model's stored
    statistics (`ccl.audit.statistics`); empty when the models were not asked."""
    label_only: dict[str, np.ndarray] = {}
    if extras and all("augment_labels" in e for e in extras):
        for kind, field in (("augment", "perturbed"), ("noise", "noise")):
            label_only[f"target_{field}_labels"] = extras[0][f"{kind}_labels"]
            if has_refs:
                label_only[f"reference_{field}_labels"] = np.stack([e[f"{kind}_labels"] for e in extras[1:]])
    for stat in STATISTIC_ATTACKS.values():  # the statistic attacks' (N,) and (K, N)
        if extras and all(stat in e for e in extras):
            label_only[f"target_{stat}"] = extras[0][stat]
            if has_refs:
                label_only[f"reference_{stat}"] = np.stack([e[stat] for e in extras[1:]])
    return label_only


def _single_target_metrics(
    config: ExperimentConfig, scores: dict[str, np.ndarray], truth: np.ndarray, records: np.ndarray, seed: int
) -> dict[str, dict]:
    """Each attack's metrics (with bootstrap intervals) and epsilon lower bound on the target's `records`;
    an unresolvable FPR (too few non-members) is NaN (null in JSON)."""
    results = {}
    with phase("evaluation/target"), warnings.catch_warnings():
        warnings.simplefilter("ignore", metrics.DegenerateMetricWarning)
        for name, sc in scores.items():
            results[name] = metrics.evaluate(
                sc[records], truth, fprs=config.fprs, n_resamples=config.bootstrap, seed=seed
            ).as_dict()
            results[name]["epsilon_lb"] = _epsilon(sc[records], truth, seed)
    return results


def _attack_scores(inputs: attacks.AttackInputs, names: list[str]) -> dict[str, np.ndarray]:
    """Each attack's scores of the target's records `(P,)`, one attack at a time (phase "attack/NAME")."""
    scores: dict[str, np.ndarray] = {}
    for name in names:
        with phase(f"attack/{name}"):
            scores |= attacks.score_all(inputs, names=[name])
    return scores


def _attack_inputs(logits, labels_all, split: MembershipSplit, label_only, features, population_features):
    """The attacks' inputs from `logits (1 + K, Q, A, C)` (target first; queries: the pool, then the
    population): QMIA needs the population's target outputs even without references."""
    p = split.pool.size
    target, refs = logits[0], logits[1:]
    has_refs = refs.shape[0] > 0
    has_pop = split.population.size > 0 and has_refs
    pop_for_target = split.population.size > 0
    return attacks.AttackInputs(
        target[:p],
        labels_all[:p],
        refs[:, :p] if has_refs else None,
        split.reference_in if has_refs else None,
        population_target_logits=target[p:] if pop_for_target else None,
        population_labels=labels_all[p:] if pop_for_target else None,
        population_reference_logits=refs[:, p:] if has_pop else None,
        features=features,
        population_features=population_features if pop_for_target else None,
        **label_only,
    )


def _target_utility(target: np.ndarray, labels_all: np.ndarray, audited_nonmembers: np.ndarray, num_population: int):
    """The target's loss on every query `(Q,)` (its un-augmented query), whether it predicts each correctly, and
    the held-out mask over the queries: the pool's audited non-members (canaries excluded) and the population."""
    target_loss = signals.loss(target[:, 0], labels_all)
    predicted = target[:, 0].argmax(-1) == labels_all
    held_out = np.r_[audited_nonmembers, np.ones(num_population, bool)]
    return target_loss, predicted, held_out


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
    is_canary: np.ndarray | None = None,
    dp_epsilon: float | None = None,
    extras: list[dict[str, np.ndarray]] | None = None,
    features: np.ndarray | None = None,
    population_features: np.ndarray | None = None,
) -> tuple[DefenseResult, dict[str, np.ndarray]]:
    """Runs the attacks on `logits (1 + K, Q, [A,] C)` (target first; queries: the pool, then the population),
    measures utility, and returns the result and the per-record arrays to store with it. `attacks` holds the
    single-target metrics on the random (non-canary) records; `evaluations`, with the leave-one-out evaluation,
    the pooled metrics on random records ("pooled"), on canaries ("canaries") and on the most vulnerable ones."""
    if logits.ndim == 3:
        logits = logits[:, :, None, :]  # (M, Q, A=1, C)
    p = split.pool.size
    is_canary = np.zeros(p, bool) if is_canary is None else is_canary
    labels, pop_labels = labels_all[:p], labels_all[p:]
    target, has_refs = logits[0], logits.shape[0] > 1
    has_pop = split.population.size > 0 and has_refs
    label_only = _label_only_inputs(extras, has_refs)
    inputs = _attack_inputs(logits, labels_all, split, label_only, features, population_features)
    skipped, is_member, random_records = _skipped_without_weights(config, extras), split.target_in, ~is_canary
    names = attack_names(config, inputs, skip=skipped)
    scores = _attack_scores(inputs, names)
    results = _single_target_metrics(config, scores, is_member[random_records], random_records, seed)
    evals, loo, vulnerable, chosen = {}, {}, [], {}
    if config.uses_leave_one_out:
        masks = np.vstack([split.target_in[None], split.reference_in])
        queried = logits[:, : p + (split.population.size if has_pop else 0)]
        evals, loo, vulnerable, chosen = _pooled_evaluations(
            config, names, queried, labels, pop_labels, masks, is_canary, seed, split.pool, _every_model(label_only)
        )
    nonmembers = ~is_member & random_records
    target_loss, predicted, held_out = _target_utility(target, labels_all, nonmembers, split.population.size)
    members = is_member & random_records
    member_loss, nonmember_loss = target_loss[:p][members], target_loss[:p][nonmembers]
    test_acc = float(predicted[held_out].mean())
    notes = _notes(config, test_acc, labels_all[held_out], split.population.size, scores) + list(skipped.values())
    gauss = gaussian_fits(member_loss, nonmember_loss)
    result = DefenseResult(
        defense=defense.label,
        slug=defense.slug,
        spec=defense.to_dict(),
        seed=seed,
        result_key=result_key,
        train_acc=float(predicted[:p][members].mean()),
        test_acc=test_acc,
        member_loss_mean=float(member_loss.mean()),
        member_loss_std=float(member_loss.std()),
        nonmember_loss_mean=float(nonmember_loss.mean()),
        nonmember_loss_std=float(nonmember_loss.std()),
        gaussian_predicted_advantage=gauss["loss"]["advantage"],
        gaussian_fits=gauss,
        num_references=int(logits.shape[0] - 1),
        num_members=int(members.sum()),
        num_nonmembers=int(nonmembers.sum()),
        num_population=int(split.population.size),
        fprs=list(config.fprs),
        attacks=results,
        target_history=_history(target_log),
        notes=notes,
        evaluations=evals,
        vulnerable_records=vulnerable,
        num_canaries=int(is_canary.sum()),
        dp_epsilon=dp_epsilon,
        majority_rate=float(np.bincount(labels_all[held_out]).max() / held_out.sum()),
    )
    arrays = {"is_member": is_member, "labels": labels, "target_loss": target_loss[:p], "scores": scores}
    arrays |= {"heldout_correct": predicted[held_out], "is_canary": is_canary}
    arrays |= {"masks": np.vstack([split.target_in[None], split.reference_in]), **chosen}
    arrays["loo"] = {k: v.astype(np.float32) for k, v in loo.items()}
    return result, arrays
