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
"""

from __future__ import annotations

import numpy as np
import torch

from .. import signals
from .._checks import check_choice
from .base import Attack
from .inputs import AttackInputs, NotEnoughReferencesError

__all__ = ["LiRA", "gaussian_fit"]

_MIN_STD = 1e-6


def gaussian_fit(phi: np.ndarray, mask: np.ndarray, *, variance: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std `(N, A)` of `phi (K, N, A)` over the models where `mask (K, N)` is True."""
    w = mask[:, :, None].astype(np.float64)  # (K, N, 1)
    count = w.sum(0)  # (N, 1)
    mean = (w * phi).sum(0) / count  # (N, A)
    sq = (w * (phi - mean) ** 2).sum(0)  # (N, A)
    if variance == "per_example":
        std = np.sqrt(sq / (count - 1))
    else:  # pooled within-record variance, one number per query index
        std = np.broadcast_to(np.sqrt(sq.sum(0) / (count - 1).sum(0)), mean.shape)
    return mean, np.maximum(std, _MIN_STD)


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
        labels = inputs.labels[:, None]  # (N, 1) broadcasts over the query axis
        phi_target = signals.scaled_logit(inputs.target_logits, labels)  # (N, A)
        phi_ref = signals.scaled_logit(inputs.reference_logits, labels)  # (K, N, A)
        mu_out, s_out = gaussian_fit(phi_ref, masks["OUT"], variance=variance)
        if self.online:
            mu_in, s_in = gaussian_fit(phi_ref, masks["IN"], variance=variance)
            per_query = _log_normal_pdf(phi_target, mu_in, s_in) - _log_normal_pdf(phi_target, mu_out, s_out)
        else:
            per_query = torch.special.log_ndtr(torch.from_numpy((phi_target - mu_out) / s_out)).numpy()
        return per_query.mean(-1)
