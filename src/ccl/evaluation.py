"""Evaluations that do not underestimate leakage (Aerni, Zhang and Tramèr, "Evaluations of Machine Learning
Privacy Defenses are Misleading", CCS 2024).

An audit trains 1 + K models of one recipe on records whose membership is known for every model (the
membership matrix `masks (M, P)`: row 0 the target, then the reference models). Three evaluations use them:

- **Leave-one-out (pooled).** Each model in turn is the target and the other models are its references; the
  (model, record) pairs of all M models are pooled into one ROC, so a low FPR has M times more non-member
  pairs behind it. The scores are sound only if, **given the target, its references' masks are independent
  of the target's membership of each record**: otherwise the references' composition tells the attack what
  the target's outputs do not. `membership_split` draws reference models in complementary pairs (model 2k
  trains on a record exactly when model 2k+1 does not), so a reference model's partner is left out of its
  references (`reference_sets`); with it, online RMIA and offline LiRA over-claimed epsilon-DP releases'
  epsilon in up to 77% of audits, without it they stay within the nominal 5% (`tests/test_loo_soundness.py`).
  Any other mask design is checked (`check_reference_independence`) and warned about. Intervals come from a
  two-way bootstrap that resamples models and records (the pairs of one model, or of one record, are
  dependent; resampling pairs as if independent would be too narrow). LiRA and
  RMIA are scored in one pass: their per-record sums and sums of squares are taken over each target's
  references with one product by the `(M, M)` reference matrix, so M targets cost about one scoring, not M.
- **Canaries.** Records inserted into the pool (`ccl.data.canaries`), in the training set of half the models;
  the pooled evaluation restricted to them.
- **The most vulnerable records.** Each record's leakage is the gap between its mean leave-one-out score over
  the models that trained on it and over those that did not; the top fraction is chosen on one half of the
  models and the pooled metrics are measured on the other half, so the choice does not overfit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from . import signals
from ._checks import expected
from .attacks import Attack, AttackInputs, LiRA, NotEnoughReferencesError, ThresholdAttack
from .attacks.lira import _MIN_STD, _log_normal_pdf
from .attacks.rmia import RMIA, _true_class_prob
from .attacks.threshold import fit_thresholds, oriented_signal
from .errors import InvalidArgumentError
from .metrics import DegenerateMetricWarning, _roc_metrics, roc_metrics_weighted, tpr_key

__all__ = [
    "LEAVE_ONE_OUT_VERSION",
    "check_reference_independence",
    "complementary_partners",
    "leave_one_out_scores",
    "leave_one_out_scores_slow",
    "pooled_metrics",
    "rank_by_leakage",
    "record_leakage",
    "reference_sets",
    "top_fraction",
    "vulnerable_records",
]


#: Changes whenever the leave-one-out scores of the same models change, so that resumed runs recompute their
#: pooled results (`ccl.audit.plan.result_key`). 2: complementary partners are no longer references.
LEAVE_ONE_OUT_VERSION = 2


# ----------------------------------------------------------------------------------------------------------
# Which models serve as each target's references
# ----------------------------------------------------------------------------------------------------------
def complementary_partners(masks: np.ndarray) -> np.ndarray:
    """`(M,)` the model whose mask is the exact complement of model j's (`masks (M, P)`), or -1 where none is.
    `membership_split` draws reference models in such pairs; two independent random halves of P records are
    complements with probability 2^-P, so a match is the design, not chance."""
    masks = np.asarray(masks, dtype=bool)
    keys = {row.tobytes(): j for j, row in enumerate(np.packbits(masks, axis=1))}
    flipped = np.packbits(~masks, axis=1)
    return np.array([keys.get(row.tobytes(), -1) for row in flipped], dtype=np.int64)


def reference_sets(masks: np.ndarray, *, partners: np.ndarray | None = None) -> np.ndarray:
    """`(M, M)` bool: `uses[j, k]` when model k is a reference of model j as the target. Every other model,
    except those whose mask is `~masks[j]` (j's complementary partner; every such model, should two share a
    mask), or the `partners` given (`(M,)`, -1 for none): keeping one would hand the attack the target's
    membership."""
    masks = np.asarray(masks, dtype=bool)
    m = masks.shape[0]
    uses = ~np.eye(m, dtype=bool)
    if partners is not None:
        partners = np.asarray(partners)
        has = partners >= 0
        uses[np.flatnonzero(has), partners[has]] = False
        return uses
    by_mask: dict[bytes, list[int]] = {}
    for k, row in enumerate(np.packbits(masks, axis=1)):
        by_mask.setdefault(row.tobytes(), []).append(k)
    for j, row in enumerate(np.packbits(~masks, axis=1)):
        uses[j, by_mask.get(row.tobytes(), [])] = False
    return uses


#: |z| above which `check_reference_independence` warns: a correlation this far from 0 has probability below
#: 1e-6 per model under independence, so the warning does not fire by chance on a sound design.
_INDEPENDENCE_Z = 5.0


def check_reference_independence(masks: np.ndarray, uses: np.ndarray) -> float:
    """Warns when, for some target j, the number of its references that trained on a record is correlated with
    j's own membership of the record (the leave-one-out scores are then biased: the references' composition
    leaks the target's membership). Returns the largest |z| = |correlation| x sqrt(P) over the targets, about
    N(0, 1) when the masks are independent."""
    masks = np.asarray(masks, dtype=np.float64)
    counts = uses.astype(np.float64) @ masks  # (M, P): IN references of each record, per target
    p = masks.shape[1]
    worst = 0.0
    for j in range(masks.shape[0]):
        a, b = masks[j] - masks[j].mean(), counts[j] - counts[j].mean()
        norm = math.sqrt(float(a @ a) * float(b @ b))
        if norm > 0:
            worst = max(worst, abs(float(a @ b)) / norm * math.sqrt(p))
    if worst > _INDEPENDENCE_Z:
        warnings.warn(
            f"Leave-one-out: a target's membership of a record is correlated with how many of its references "
            f"trained on it (|z| = {worst:.1f}), so the references' masks leak the target's membership and the "
            "pooled scores overstate leakage. Draw the masks independently of each other, or in complementary "
            "pairs as ccl.data.membership_split does (the partner is then left out), or pass `references`.",
            UserWarning,
            stacklevel=3,
        )
    return worst


def _resolve_references(masks: np.ndarray, references: np.ndarray | None) -> np.ndarray:
    m = masks.shape[0]
    if references is None:
        uses = reference_sets(masks)
    else:
        uses = np.asarray(references)
        if uses.shape != (m, m) or uses.dtype != bool:
            got = f"{uses.dtype} array of shape {uses.shape}"
            raise InvalidArgumentError(expected("references", f"a ({m}, {m}) bool array", got))
        if uses.diagonal().any():
            what = "False on the diagonal (no model is its own reference)"
            raise InvalidArgumentError(expected("references", what, "a True diagonal entry"))
        if not uses.any(1).all():
            what = "at least one reference for every model"
            raise InvalidArgumentError(expected("references", what, f"none for model {int(np.argmin(uses.any(1)))}"))
    check_reference_independence(masks, uses)
    return uses


# ----------------------------------------------------------------------------------------------------------
# Leave-one-out scores
# ----------------------------------------------------------------------------------------------------------
def leave_one_out_scores_slow(
    attack: Attack,
    logits: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    *,
    population_logits: np.ndarray | None = None,
    population_labels: np.ndarray | None = None,
    perturbed_labels: dict[str, np.ndarray] | None = None,
    statistics: dict[str, np.ndarray] | None = None,
    references: np.ndarray | None = None,
) -> np.ndarray:
    """`(M, P)` scores: model j as the target, its references (`references (M, M)`, default `reference_sets`)
    as the attack's reference models, one `attack.score` call each. The obviously correct reference for the
    fast paths; the only path for attacks without one. `perturbed_labels` maps "perturbed" and "noise" to every
    model's `(M, P, Q)` predicted labels (the label-only attacks); `statistics` maps "boundary_distance" and
    "gradient_norm" to every model's `(M, P)` statistic (`ccl.attacks.statistic`)."""
    masks = np.asarray(masks, dtype=bool)
    uses = _resolve_references(masks, references)
    out = np.empty(masks.shape, dtype=np.float64)
    for j in range(masks.shape[0]):
        others = np.flatnonzero(uses[j])
        has_pop = population_logits is not None
        fields = {}
        for field, values in (perturbed_labels or {}).items():
            fields[f"target_{field}_labels"] = values[j]
            fields[f"reference_{field}_labels"] = values[others]
        for stat, values in (statistics or {}).items():
            fields[f"target_{stat}"], fields[f"reference_{stat}"] = values[j], values[others]
        inputs = AttackInputs(
            logits[j],
            labels,
            logits[others],
            masks[others],
            population_target_logits=population_logits[j] if has_pop else None,
            population_labels=population_labels if has_pop else None,
            population_reference_logits=population_logits[others] if has_pop else None,
            **fields,
        )
        out[j] = attack.score(inputs)
    return out


def _over_references(uses: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`(M, ...)` sums of `x (M, ...)` over each target's references: row j sums the rows k with `uses[j, k]`."""
    return np.tensordot(uses.astype(np.float64), x, axes=(1, 0))


def _loo_moments(phi: np.ndarray, w: np.ndarray, uses: np.ndarray, need: int, name: str, variance: str, side: str):
    """Means `(M, P, A)`, sums of squared deviations `(M, P, A)` and counts `(M, P, 1)` of `phi (M, P, A)` over
    model j's references (`uses (M, M)`) where `w (M, P)`, for each row j."""
    wf = w[:, :, None].astype(np.float64)
    centre = phi.mean(0, keepdims=True)  # shifts out the common offset: sums of squares lose no precision
    x = phi - centre
    count_j = _over_references(uses, wf)  # (M, P, 1)
    fewest = int(count_j.min()) if count_j.size else need
    if fewest < need:
        raise NotEnoughReferencesError(
            f"{name} with variance={variance!r} needs at least {need} {side} reference model(s) per record when "
            f"each model in turn is the target, but a record has {fewest}: train more reference models."
        )
    mean_j = _over_references(uses, wf * x) / count_j
    sq_j = np.maximum(_over_references(uses, wf * x**2) - count_j * mean_j**2, 0.0)
    return mean_j + centre, sq_j, count_j


def _loo_gaussian(
    phi: np.ndarray, w: np.ndarray, uses: np.ndarray, variance: str, need: int, name: str, side: str, pooled=None
):
    """Means and stds `(M, P, A)` of `phi (M, P, A)` over model j's references where `w (M, P)`, for row j; as
    `ccl.attacks.lira.gaussian_fit` computes them on those models. For the global variance, `pooled` is the
    `(M, 1, A)` std over all records (the caller computes it chunk by chunk)."""
    mean_j, sq_j, count_j = _loo_moments(phi, w, uses, need, name, variance, side)
    std = np.sqrt(sq_j / (count_j - 1)) if variance == "per_example" else np.broadcast_to(pooled, mean_j.shape)
    return mean_j, np.maximum(std, _MIN_STD)


#: Records scored at a time by the leave-one-out LiRA: its float64 temporaries are about ten (M, CHUNK, A)
#: arrays, so memory stays bounded whatever N.
LOO_CHUNK = 2048


def _lira_loo(attack: LiRA, logits: np.ndarray, labels: np.ndarray, masks: np.ndarray, uses: np.ndarray):
    """LiRA's scores of every row, each with the variance its own number of references resolves to (as
    `LiRA.score` would): with "auto" and 64 references for the target but 63 for a reference model (its partner
    left out), the rows differ, and each kind is scored with its own variance."""
    modes = np.array([attack._resolved_variance(int(n)) for n in uses.sum(1)])
    out = np.empty(masks.shape)
    for variance in dict.fromkeys(modes.tolist()):
        rows = modes == variance
        out[rows] = _lira_loo_variance(attack, logits, labels, masks, uses, variance)[rows]
    return out


def _lira_loo_variance(attack: LiRA, logits, labels, masks: np.ndarray, uses: np.ndarray, variance: str):
    import torch

    m, p = masks.shape
    need = 2 if variance == "per_example" else 1
    chunks = [slice(i, min(i + LOO_CHUNK, p)) for i in range(0, p, LOO_CHUNK)]

    # phi (M, P, A) float64 is kept (a fifth of the float32 logits for 10 classes); it is computed chunk by chunk
    phi_all = np.concatenate([signals.scaled_logit(logits[:, sl], labels[sl, None]) for sl in chunks], axis=1)

    sides = {"OUT": ~masks, **({"IN": masks} if attack.online else {})}
    pooled: dict[str, np.ndarray | None] = dict.fromkeys(sides)
    if variance == "global":  # first pass: the within-record variance pooled over all records, per model
        sums = {side: [0.0, 0.0] for side in sides}
        for sl in chunks:
            for side, w in sides.items():
                _, sq_j, count_j = _loo_moments(phi_all[:, sl], w[:, sl], uses, need, attack.name, variance, side)
                sums[side][0] = sums[side][0] + sq_j.sum(1, keepdims=True)
                sums[side][1] = sums[side][1] + (count_j - 1).sum(1, keepdims=True)
        if any(np.any(dof <= 0) for _, dof in sums.values()):
            raise NotEnoughReferencesError(
                f"{attack.name} with a global variance needs some record with 2 or more IN and OUT references."
            )
        pooled = {side: np.sqrt(sq / dof) for side, (sq, dof) in sums.items()}
    out = np.empty((m, p))
    for sl in chunks:
        phi = phi_all[:, sl]
        fit = {
            side: _loo_gaussian(phi, w[:, sl], uses, variance, need, attack.name, side, pooled[side])
            for side, w in sides.items()
        }
        mu_out, s_out = fit["OUT"]
        if attack.online:
            mu_in, s_in = fit["IN"]
            per_query = _log_normal_pdf(phi, mu_in, s_in) - _log_normal_pdf(phi, mu_out, s_out)
        else:
            per_query = torch.special.log_ndtr(torch.from_numpy((phi - mu_out) / s_out)).numpy()
        out[:, sl] = per_query.mean(-1)
    return out


def _rmia_loo(attack: RMIA, logits, labels, masks, pop_logits, pop_labels, uses: np.ndarray) -> np.ndarray:
    def p_reference(p: np.ndarray, out: np.ndarray) -> np.ndarray:
        """`Pr(x)` of row j from its references: all of them (online) or their OUT ones (offline)."""
        if not attack.offline:
            return _over_references(uses, p) / uses.sum(1, keepdims=True)
        w = out.astype(np.float64)
        count = _over_references(uses, w)
        if int(count.min()) < 1:
            raise NotEnoughReferencesError("Offline RMIA needs at least 1 OUT reference model per record.")
        p_out = _over_references(uses, w * p) / count
        return 0.5 * ((1 + attack.a) * p_out + (1 - attack.a))

    p_x = _true_class_prob(logits, labels)  # (M, P)
    with np.errstate(divide="ignore", over="ignore"):  # ratios of near-zero probabilities: inf ranks last
        return _rmia_search(attack, p_x, _true_class_prob(pop_logits, pop_labels), masks, p_reference)


def _rmia_search(attack: RMIA, p_x, p_z, masks, p_reference) -> np.ndarray:
    ratio_x = p_x / np.maximum(p_reference(p_x, ~masks), 1e-300)
    ratio_z = np.sort(p_z / np.maximum(p_reference(p_z, np.ones(p_z.shape, bool)), 1e-300), axis=1)
    return np.stack(
        [
            np.searchsorted(ratio_z[j], ratio_x[j] / attack.gamma, side="right") / ratio_z.shape[1]
            for j in range(p_x.shape[0])
        ]
    )


def _threshold_loo(attack: ThresholdAttack, logits: np.ndarray, labels: np.ndarray, masks, uses) -> np.ndarray:
    """The threshold attacks with every model's signal computed once, `(M, P)`; then each target's thresholds
    are fitted on its references' signals, as `ThresholdAttack.score` fits them."""
    signal = oriented_signal(attack.signal, logits, labels)  # (M, P)
    flat_labels = np.broadcast_to(labels, signal.shape)
    out = np.empty(signal.shape)
    for j in range(signal.shape[0]):
        others = np.flatnonzero(uses[j])
        thresholds = fit_thresholds(
            signal[others].ravel(),
            masks[others].ravel(),
            flat_labels[others].ravel(),
            num_classes=logits.shape[-1],
            per_class=attack.per_class,
        )
        out[j] = signal[j] - thresholds[labels]
    return out


def leave_one_out_scores(
    attack: Attack,
    logits: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    *,
    population_logits: np.ndarray | None = None,
    population_labels: np.ndarray | None = None,
    perturbed_labels: dict[str, np.ndarray] | None = None,
    statistics: dict[str, np.ndarray] | None = None,
    references: np.ndarray | None = None,
) -> np.ndarray:
    """`(M, P)` scores of every model as the target (`logits (M, P, [A,] C)`, `masks (M, P)` its members).

    Model j's references are `references[j]` (`(M, M)` bool), by default `reference_sets(masks)`: every other
    model except j's complementary partner, so that given the target, its references' masks are independent of
    its membership of each record (checked: `check_reference_independence` warns otherwise). LiRA, RMIA and
    the threshold attacks take a one-pass path (equal to `leave_one_out_scores_slow` up to rounding, tested);
    other attacks loop over the models. LiRA's one-pass path needs enough IN and OUT references per record rather than
    `min_references` models, so with K = 4 reference models (3 references for a reference model as the
    target: the target and the other pair) the pooled LiRA still runs, with a global variance."""
    if logits.ndim == 3:
        logits = logits[:, :, None, :]
    if population_logits is not None and population_logits.ndim == 3:
        population_logits = population_logits[:, :, None, :]
    masks = np.asarray(masks, dtype=bool)
    if isinstance(attack, (LiRA, RMIA, ThresholdAttack)):
        uses = _resolve_references(masks, references)
        if isinstance(attack, ThresholdAttack):
            return _threshold_loo(attack, logits, labels, masks, uses)
        if isinstance(attack, LiRA):  # needs enough IN and OUT references per record (checked per row)
            return _lira_loo(attack, logits, labels, masks, uses)
        if population_logits is None:
            raise NotEnoughReferencesError(f"{attack.name} needs a population.")
        return _rmia_loo(attack, logits, labels, masks, population_logits, population_labels, uses)
    return leave_one_out_scores_slow(
        attack,
        logits,
        labels,
        masks,
        population_logits=population_logits,
        population_labels=population_labels,
        perturbed_labels=perturbed_labels,
        statistics=statistics,
        references=references,
    )


# ----------------------------------------------------------------------------------------------------------
# Pooled metrics with a two-way bootstrap
# ----------------------------------------------------------------------------------------------------------
def pooled_metrics(
    scores: np.ndarray,
    masks: np.ndarray,
    *,
    records: np.ndarray | None = None,
    models: np.ndarray | None = None,
    fprs: Sequence[float] = (1e-3, 1e-2),
    n_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict:
    """AUC, advantage and TPR at each FPR of the (model, record) pairs of `scores (M, P)` (truth: `masks`),
    restricted to `records` (indices) and `models` (indices), with intervals from a bootstrap that resamples
    models and records (with replacement) and takes every pair of the resampled ones. Keys as
    `ccl.metrics.AttackMetrics.as_dict`, plus the counts of models, records and pairs."""
    models = np.arange(scores.shape[0]) if models is None else np.asarray(models)
    records = np.arange(scores.shape[1]) if records is None else np.asarray(records)
    s, m = scores[np.ix_(models, records)], masks[np.ix_(models, records)]
    point = _roc_metrics(s.ravel(), m.ravel(), fprs)
    names = ["auc", "advantage", *(tpr_key(f) for f in fprs)]
    if np.isnan(point[0]):
        warnings.warn("pooled metrics need both members and non-members.", DegenerateMetricWarning, stacklevel=2)
    boots = np.full((n_resamples, len(names)), np.nan)
    if n_resamples and models.size > 1 and records.size > 1:
        rng = np.random.default_rng(seed)
        weights = (  # each resampled pair's count: its model's count times its record's
            np.outer(
                np.bincount(rng.integers(0, models.size, models.size), minlength=models.size),
                np.bincount(rng.integers(0, records.size, records.size), minlength=records.size),
            ).ravel()
            for _ in range(n_resamples)
        )
        boots[:] = roc_metrics_weighted(s.ravel(), m.ravel(), weights, fprs)
    tail = 50 * (1 - confidence)
    out: dict = {}
    for k, name in enumerate(names):
        out[name] = float(point[k])
        col = boots[:, k]
        if np.isnan(point[k]) or np.isnan(col).all():
            out[name + "_ci"] = [math.nan, math.nan]
        else:
            lo, hi = np.nanpercentile(col, [tail, 100 - tail])
            out[name + "_ci"] = [float(lo), float(hi)]
    out.update(
        n_members=int(m.sum()),
        n_nonmembers=int(m.size - m.sum()),
        n_models=int(models.size),
        n_records=int(records.size),
        n_pairs=int(m.size),
    )
    return out


# ----------------------------------------------------------------------------------------------------------
# The most vulnerable records
# ----------------------------------------------------------------------------------------------------------
def record_leakage(scores: np.ndarray, masks: np.ndarray, *, models: np.ndarray | None = None) -> np.ndarray:
    """`(P,)` per-record leakage: mean score over the `models` that trained on the record minus the mean over
    those that did not (NaN where one side is empty)."""
    models = np.arange(scores.shape[0]) if models is None else np.asarray(models)
    s, m = scores[models], masks[models]
    n_in, n_out = m.sum(0), (~m).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m, s, 0).sum(0) / n_in - np.where(~m, s, 0).sum(0) / n_out


def rank_by_leakage(
    scores: np.ndarray, masks: np.ndarray, *, records: np.ndarray | None = None, seed=0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits the models in two halves at random (`seed`: anything `np.random.default_rng` takes) and ranks
    `records` by `record_leakage` on the first half. Returns (the records, most vulnerable first; their leakage;
    the other half of the models, which measures them without the choice overfitting)."""
    records = np.arange(scores.shape[1]) if records is None else np.asarray(records)
    order = np.random.default_rng(seed).permutation(scores.shape[0])
    choose, measure = np.sort(order[: order.size // 2]), np.sort(order[order.size // 2 :])
    gap = record_leakage(scores, masks, models=choose)[records]
    rank = np.argsort(-np.nan_to_num(gap, nan=-np.inf), kind="mergesort")
    return records[rank], gap[rank], measure


def top_fraction(ranked: np.ndarray, fraction: float) -> np.ndarray:
    """The first `fraction` of `ranked` (at least one)."""
    return ranked[: max(1, int(round(fraction * ranked.size)))]


def vulnerable_records(
    scores: np.ndarray,
    masks: np.ndarray,
    *,
    fraction: float,
    records: np.ndarray | None = None,
    fprs: Sequence[float] = (1e-3, 1e-2),
    n_resamples: int = 200,
    seed: int = 0,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Chooses the top `fraction` of `records` by `record_leakage` on a random half of the models and returns
    (the pooled metrics of the other half on them, the chosen record indices, their leakage on the choosing
    half)."""
    ranked, gap, measure = rank_by_leakage(scores, masks, records=records, seed=seed)
    chosen = top_fraction(ranked, fraction)
    metrics = pooled_metrics(
        scores, masks, records=chosen, models=measure, fprs=fprs, n_resamples=n_resamples, seed=seed
    )
    return metrics, chosen, gap[: chosen.size]
