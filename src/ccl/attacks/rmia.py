"""The Robust Membership Inference Attack, RMIA (Zarifzadeh, Liu, Cheng, Shokri, ICML 2024).

For a record `x` and a population record `z` (one the target did not train on),
`LR(x, z) = [Pr(x | theta) / Pr(x)] / [Pr(z | theta) / Pr(z)]`, with `Pr(. | theta)` the target's probability
of the true label (averaged over augmented queries) and `Pr(.)` its average over reference models. The score of
`x` is the fraction of population records with `LR(x, z) >= gamma`.

- Online: `Pr(x)` is the mean over all reference models (IN and OUT).
- Offline: only OUT models, corrected for their missing IN half: `Pr(x) = ((1 + a) * P_out(x) + (1 - a)) / 2`.

`LR(x, z) >= gamma` is `ratio(z) <= ratio(x) / gamma`, so the score is a sorted search of each `ratio(x)` among
the sorted `ratio(z)`: time `O((N + Z) log Z)`, memory `O(N + Z)`, never an `N x Z` matrix.
"""

from __future__ import annotations

import numpy as np
import torch

from .._checks import check_in_range
from .base import Attack
from .inputs import AttackInputs, NotEnoughReferencesError

__all__ = ["RMIA", "probability_ratio"]


def _true_class_prob(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`(..., N, A, C)` -> `(..., N)`: probability of the label, averaged over queries."""
    log_p = torch.from_numpy(logits).log_softmax(-1)
    idx = torch.from_numpy(labels)[:, None, None].expand(*log_p.shape[:-1], 1)
    return log_p.gather(-1, idx).squeeze(-1).exp().mean(-1).numpy()


def probability_ratio(
    target_logits: np.ndarray,
    reference_logits: np.ndarray,
    reference_in: np.ndarray,
    labels: np.ndarray,
    *,
    offline: bool,
    a: float,
) -> np.ndarray:
    """`Pr(x | theta) / Pr(x)` for each record `(N,)`."""
    p_target = _true_class_prob(target_logits, labels)  # (N,)
    p_ref = _true_class_prob(reference_logits, labels)  # (K, N)
    if offline:
        out = ~reference_in
        count = out.sum(0)
        if int(count.min()) < 1:
            raise NotEnoughReferencesError("Offline RMIA needs at least 1 OUT reference model per record.")
        p_out = (p_ref * out).sum(0) / count
        p_x = 0.5 * ((1 + a) * p_out + (1 - a))
    else:
        p_x = p_ref.mean(0)
    return p_target / np.maximum(p_x, 1e-300)


class RMIA(Attack):
    """RMIA; `offline=True` uses only OUT reference models with the correction parameter `a`."""

    needs_population = True

    def __init__(self, *, offline: bool = False, a: float = 0.3, gamma: float = 1.0) -> None:
        self.offline = bool(offline)
        self.a = check_in_range("a", a, low=0.0, high=1.0)
        self.gamma = check_in_range("gamma", gamma, low=0.0, low_inclusive=False)
        self.name = "rmia_offline" if offline else "rmia"
        self.min_references = 1

    def score(self, inputs: AttackInputs) -> np.ndarray:
        inputs.require_references(self.name, self.min_references)
        inputs.require_population(self.name)
        opts = {"offline": self.offline, "a": self.a}
        ratio_x = probability_ratio(
            inputs.target_logits, inputs.reference_logits, inputs.reference_in, inputs.labels, **opts
        )
        ratio_z = np.sort(
            probability_ratio(
                inputs.population_target_logits,
                inputs.population_reference_logits,
                inputs.population_reference_in,
                inputs.population_labels,
                **opts,
            )
        )
        return np.searchsorted(ratio_z, ratio_x / self.gamma, side="right") / ratio_z.size
