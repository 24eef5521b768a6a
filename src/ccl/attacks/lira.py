"""The Likelihood Ratio Attack, LiRA (Carlini, Chien, Nasr, Song, Terzis, Tramer, S&P 2022).

For each record, the scaled logit `phi = log p_y - log(1 - p_y)` of the reference models that trained on it
(IN) and of those that did not (OUT) are modelled as Gaussians.

- Online: `score = log N(phi_target; mu_in, s_in) - log N(phi_target; mu_out, s_out)`.
- Offline (OUT models only): the one-sided test `score = log Pr[Z <= phi_target]`, `Z ~ N(mu_out, s_out)`.

With several augmented queries per record (axis `A`), means and spreads are fitted per query and the per-query
scores averaged. `variance="per_example"` fits one spread per record; `"global"` pools the within-record
variance over all records (better with fewer than ~64 reference models, as the paper finds); `"auto"` picks
global below 64 reference models. Means and variances use all available IN/OUT observations of each record
(unbiased variance, ddof=1); spreads are floored at 1e-6.

Memory: the reference logits `(K, N, A, C)` are turned into phi a chunk of records at a time (`CHUNK_BYTES` of
logits), and only per-record moments `(N, A)` are kept, so the temporaries never grow with N (they were 5.5x the
float32 logits at N=50,000, K=64, C=10 with all records at once). Each record's fit is independent and the
global variance is a sum of per-record moments, so the scores do not depend on the chunking.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import signals
from .._checks import check_choice
from .base import Attack
from .inputs import AttackInputs, NotEnoughReferencesError

__all__ = [
    "CHUNK_BYTES",
    "LiRA",
    "gaussian_fit",
    "gaussian_moments",
    "gaussian_spread",
    "records_per_chunk",
    "scaled_logit_moments",
]

_MIN_STD = 1e-6

#: Bytes of float64 reference logits turned into phi at a time (8 MiB): the largest temporary is one copy of a
#: chunk (`signals.scaled_logit_float64`), and a chunk this size still runs at numpy's full speed.
CHUNK_BYTES = 8 * 2**20


def gaussian_moments(phi: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count `(N, 1)`, mean `(N, A)` and sum of squared deviations `(N, A)` of `phi (K, N, A)` over the models
    where `mask (K, N)` is True."""
    w = mask[:, :, None].astype(np.float64)  # (K, N, 1)
    count = w.sum(0)  # (N, 1)
    mean = (w * phi).sum(0) / count  # (N, A)
    sq = (w * (phi - mean) ** 2).sum(0)  # (N, A)
    return count, mean, sq


def gaussian_spread(count: np.ndarray, sq: np.ndarray, *, variance: str) -> np.ndarray:
    """Std `(N, A)` from the moments of `gaussian_moments`: per record, or the within-record variance pooled over
    all records (one number per query index); floored at 1e-6."""
    if variance == "per_example":
        std = np.sqrt(sq / (count - 1))
    else:
        std = np.broadcast_to(np.sqrt(sq.sum(0) / (count - 1).sum(0)), sq.shape)
    return np.maximum(std, _MIN_STD)


def gaussian_fit(phi: np.ndarray, mask: np.ndarray, *, variance: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std `(N, A)` of `phi (K, N, A)` over the models where `mask (K, N)` is True."""
    count, mean, sq = gaussian_moments(phi, mask)
    return mean, gaussian_spread(count, sq, variance=variance)


def records_per_chunk(reference_logits: np.ndarray, *, chunk_bytes: int) -> int:
    """How many records of `reference_logits (K, N, A, C)` make `chunk_bytes` of float64 logits (at least 1)."""
    k, _, a, c = reference_logits.shape
    return max(1, chunk_bytes // (8 * k * a * c))


def scaled_logit_moments(
    target_logits: np.ndarray,
    reference_logits: np.ndarray,
    labels: np.ndarray,
    masks: dict[str, np.ndarray],
    *,
    chunk_records: int,
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """The target's phi `(N, A)` and, for each mask `(K, N)`, the `gaussian_moments` of the reference models'
    phi, computed `chunk_records` records at a time.

    Args:
        target_logits: `(N, A, C)` float64, validated (as `AttackInputs` stores them).
        reference_logits: `(K, N, A, C)` float64, validated.
        labels: `(N,)` int.
        masks: side name -> `(K, N)` bool, the models whose phi each side's moments use.
        chunk_records: records per step; bounds the temporaries to about that many records' logits.
    """
    n = labels.shape[0]
    phi_target, parts = [], {side: [] for side in masks}
    for start in range(0, n, chunk_records):
        rows = slice(start, start + chunk_records)
        y = labels[rows, None]  # (n, 1) broadcasts over the query axis
        phi_target.append(signals.scaled_logit_float64(target_logits[rows], y))  # (n, A)
        phi_ref = signals.scaled_logit_float64(reference_logits[:, rows], y)  # (K, n, A)
        for side, mask in masks.items():
            parts[side].append(gaussian_moments(phi_ref, mask[:, rows]))
    moments = {side: tuple(np.concatenate(m) for m in zip(*chunks, strict=True)) for side, chunks in parts.items()}
    return np.concatenate(phi_target), moments


def _log_normal_pdf(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)


class LiRA(Attack):
    """LiRA; `online=False` is the offline variant. See the module docstring."""

    def __init__(self, *, online: bool = True, variance: str = "auto") -> None:
        self.online = bool(online)
        self.variance = check_choice("variance", variance, ("auto", "per_example", "global"))
        self.name = "lira" if online else "lira_offline"
        # two IN and two OUT observations per record, so that the spreads can be estimated
        self.min_references = 4

    def _resolved_variance(self, k: int) -> str:
        if self.variance == "auto":
            return "global" if k < 64 else "per_example"
        return self.variance

    def score(self, inputs: AttackInputs) -> np.ndarray:
        inputs.require_references(self.name, self.min_references)
        variance = self._resolved_variance(inputs.num_references)
        need = 2 if variance == "per_example" else 1
        masks = {"OUT": ~inputs.reference_in}
        if self.online:
            masks["IN"] = inputs.reference_in
        for side, mask in masks.items():
            fewest = int(mask.sum(0).min())
            if fewest < need:
                raise NotEnoughReferencesError(
                    f"{self.name} with variance={variance!r} needs at least {need} {side} reference model(s) per "
                    f"record, but a record has {fewest}: train more reference models"
                    + (" or use variance='global'." if variance == "per_example" else ".")
                )
        if variance == "global" and any(int(m.sum()) <= m.shape[1] for m in masks.values()):
            raise NotEnoughReferencesError(
                f"{self.name} with a global variance needs some record with 2 or more IN and OUT observations."
            )
        phi_target, moments = scaled_logit_moments(
            inputs.target_logits,
            inputs.reference_logits,
            inputs.labels,
            masks,
            chunk_records=records_per_chunk(inputs.reference_logits, chunk_bytes=CHUNK_BYTES),
        )  # (N, A) and, per side, (N, 1), (N, A), (N, A)
        fits = {
            side: (mean, gaussian_spread(count, sq, variance=variance)) for side, (count, mean, sq) in moments.items()
        }
        mu_out, s_out = fits["OUT"]
        if self.online:
            mu_in, s_in = fits["IN"]
            per_query = _log_normal_pdf(phi_target, mu_in, s_in) - _log_normal_pdf(phi_target, mu_out, s_out)
        else:
            per_query = torch.special.log_ndtr(torch.from_numpy((phi_target - mu_out) / s_out)).numpy()
        return per_query.mean(-1)
