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

__all__ = ["ShadowClassifierAttack", "shadow_features"]


def shadow_features(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`(..., N, A, C)` logits to `(..., N, 2C)` features: sorted posterior (mean over A) and one-hot label."""
    probs = torch.from_numpy(logits).softmax(-1).mean(-2).numpy()  # (..., N, C)
    sorted_probs = -np.sort(-probs, axis=-1)
    onehot = np.eye(probs.shape[-1])[labels]  # (N, C)
    return np.concatenate([sorted_probs, np.broadcast_to(onehot, probs.shape)], axis=-1)


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
        x = shadow_features(inputs.reference_logits, inputs.labels).reshape(-1, 2 * inputs.target_logits.shape[-1])
        y = inputs.reference_in.reshape(-1)
        rng = np.random.default_rng(self.seed)
        if x.shape[0] > self.max_rows:
            keep = rng.choice(x.shape[0], self.max_rows, replace=False)
            x, y = x[keep], y[keep]
        if y.all() or not y.any():
            raise InvalidArgumentError(
                expected(
                    "reference_in",
                    "both IN and OUT records (the shadow classifier learns to tell them apart)",
                    "only IN" if y.all() else "only OUT",
                )
            )
        gen = torch.Generator().manual_seed(self.seed)
        d = x.shape[1]
        w1 = torch.randn(d, self.hidden, generator=gen, dtype=torch.float32) / d**0.5
        w2 = torch.randn(self.hidden, 1, generator=gen, dtype=torch.float32) / self.hidden**0.5
        params = [
            w1.requires_grad_(),
            torch.zeros(self.hidden, dtype=torch.float32, requires_grad=True),
            w2.requires_grad_(),
            torch.zeros(1, dtype=torch.float32, requires_grad=True),
        ]

        def forward(feats: torch.Tensor) -> torch.Tensor:
            return (torch.relu(feats @ params[0] + params[1]) @ params[2] + params[3]).squeeze(-1)

        xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
        pos_weight = torch.tensor((1 - y.mean()) / y.mean(), dtype=torch.float32)  # balance members and non-members
        opt = torch.optim.Adam(params, lr=self.lr)
        for _ in range(self.steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(xt), yt, pos_weight=pos_weight)
            loss.backward()
            opt.step()
        with torch.no_grad():
            feats = shadow_features(inputs.target_logits, inputs.labels).astype(np.float32)
            return forward(torch.from_numpy(feats)).double().numpy()
