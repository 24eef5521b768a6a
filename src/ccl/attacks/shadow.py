"""The shadow-model classifier attack (Shokri et al., S&P 2017).

An attack classifier learns to tell members from non-members on the reference (shadow) models' outputs:
features are the posterior sorted in decreasing order plus the one-hot label, targets are the reference models'
membership masks. It then scores the target's outputs. One classifier conditioned on the label replaces
Shokri's one-per-class models, which need far more shadow data per class.
"""

from __future__ import annotations

import numpy as np
import torch

from .._checks import check_positive_int, expected
from ..errors import InvalidArgumentError
from .base import Attack
from .inputs import AttackInputs

__all__ = ["ShadowClassifierAttack", "shadow_features", "sorted_posterior"]


def sorted_posterior(logits: np.ndarray) -> np.ndarray:
    """`(..., N, A, C)` logits to `(..., N, C)`: the posterior (mean over A) sorted in decreasing order."""
    probs = torch.from_numpy(logits).softmax(-1).mean(-2).numpy()
    return -np.sort(-probs, axis=-1)


def shadow_features(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`(..., N, A, C)` logits to `(..., N, 2C)` features: sorted posterior (mean over A) and one-hot label."""
    sorted_probs = sorted_posterior(logits)
    onehot = np.eye(sorted_probs.shape[-1])[labels]  # (N, C)
    return np.concatenate([sorted_probs, np.broadcast_to(onehot, sorted_probs.shape)], axis=-1)


class ShadowClassifierAttack(Attack):
    """Shokri et al.'s attack with a small MLP (one hidden layer), trained full-batch with Adam, seeded."""

    min_references = 1
    name = "shadow_classifier"

    def __init__(
        self, *, hidden: int = 64, steps: int = 300, lr: float = 1e-2, max_rows: int = 100_000, seed: int = 0
    ) -> None:
        self.hidden = check_positive_int("hidden", hidden)
        self.steps = check_positive_int("steps", steps)
        self.lr = float(lr)
        self.max_rows = check_positive_int("max_rows", max_rows)
        self.seed = int(seed)

    def score(self, inputs: AttackInputs) -> np.ndarray:
        inputs.require_references(self.name, self.min_references)
        k, n = inputs.reference_in.shape
        x = sorted_posterior(inputs.reference_logits).reshape(k * n, -1)  # with each row's label: the features
        lab = np.broadcast_to(inputs.labels, (k, n)).reshape(-1)
        y = inputs.reference_in.reshape(-1)
        rng = np.random.default_rng(self.seed)
        if x.shape[0] > self.max_rows:
            keep = rng.choice(x.shape[0], self.max_rows, replace=False)
            x, lab, y = x[keep], lab[keep], y[keep]
        if y.all() or not y.any():
            raise InvalidArgumentError(
                expected(
                    "reference_in",
                    "both IN and OUT records (the shadow classifier learns to tell them apart)",
                    "only IN" if y.all() else "only OUT",
                )
            )
        fit = dict(hidden=self.hidden, steps=self.steps, lr=self.lr, seed=self.seed)
        return _fit_and_score(x, lab, y, sorted_posterior(inputs.target_logits), inputs.labels, **fit)


def _fit_and_score(
    sorted_probs: np.ndarray,
    labels: np.ndarray,
    y: np.ndarray,
    target_sorted_probs: np.ndarray,
    target_labels: np.ndarray,
    *,
    hidden: int,
    steps: int,
    lr: float,
    seed: int,
) -> np.ndarray:
    """Trains the attack MLP on `(sorted posterior, label) -> y` and scores the target's rows.

    The MLP reads `[sorted posterior, one-hot label]` (`2C` inputs). The one-hot half of its first layer is a
    lookup of the label's row of the weights, so it is computed as one (an embedding) instead of a matmul with
    mostly zeros: the same network, initialisation and Adam updates (Adam is elementwise, so splitting the
    first layer's weights into two tensors changes nothing), at about 2/3 of the cost. Equal to the one-hot
    matmul to float rounding (tested against it)."""
    c = sorted_probs.shape[1]
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(2 * c, hidden, generator=gen, dtype=torch.float32) / (2 * c) ** 0.5
    w2 = torch.randn(hidden, 1, generator=gen, dtype=torch.float32) / hidden**0.5
    w_probs, w_label = w1[:c].clone().requires_grad_(), w1[c:].clone().requires_grad_()
    b1 = torch.zeros(hidden, dtype=torch.float32, requires_grad=True)
    w2.requires_grad_()
    b2 = torch.zeros(1, dtype=torch.float32, requires_grad=True)

    def forward(probs: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        first = torch.addmm((w_label + b1).index_select(0, lab), probs, w_probs)  # probs @ W + W_label[lab] + b1
        return torch.addmm(b2, torch.relu(first), w2).squeeze(-1)

    def tensors(probs: np.ndarray, lab: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32)), torch.from_numpy(lab.astype(np.int64))

    xt, lt = tensors(sorted_probs, labels)
    yt = torch.from_numpy(y.astype(np.float32))
    pos_weight = torch.tensor((1 - y.mean()) / y.mean(), dtype=torch.float32)  # balance members and non-members
    opt = torch.optim.Adam([w_probs, w_label, b1, w2, b2], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(xt, lt), yt, pos_weight=pos_weight)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return forward(*tensors(target_sorted_probs, target_labels)).double().numpy()
