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

    The MLP reads `[sorted posterior, one-hot label]` (`2C` inputs): `h = relu(x W1 + b1)`, `o = h w2 + b2`,
    trained full-batch with Adam on the binary cross-entropy with `pos_weight` (mean over rows). Two things
    make it cheap without changing it:
    - the one-hot half of `x W1` is a lookup of the label's row of `W1` (an embedding), not a matmul with mostly
      zeros; Adam is elementwise, so splitting `W1` into its two halves changes no update;
    - the gradients are written out (no autograd graph) into buffers allocated once:
      `dL/do = (sigmoid(o) (pw y + 1 - y) - pw y) / M`, `dL/dh = dL/do w2^T` where `h > 0`, and the weights'
      gradients are the matching products (the label rows' gradient sums `dL/dh` per label).
    Equal to autograd on the plain one-hot network to float rounding (tested), at about half its cost."""
    c = sorted_probs.shape[1]
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(2 * c, hidden, generator=gen, dtype=torch.float32) / (2 * c) ** 0.5
    w2 = torch.randn(hidden, 1, generator=gen, dtype=torch.float32) / hidden**0.5
    f32 = {"dtype": torch.float32}  # whatever torch's default dtype is
    w_probs, w_label, b1, b2 = w1[:c].clone(), w1[c:].clone(), torch.zeros(hidden, **f32), torch.zeros(1, **f32)
    params = [w_probs, w_label, b1, w2, b2]
    for p in params:
        p.grad = torch.zeros_like(p)

    def tensors(probs: np.ndarray, lab: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32)), torch.from_numpy(lab.astype(np.int64))

    def hidden_layer(probs: torch.Tensor, lab: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        torch.index_select(w_label + b1, 0, lab, out=out)  # the one-hot half and the bias: a lookup
        return out.addmm_(probs, w_probs).relu_()

    x, lab = tensors(sorted_probs, labels)
    m = x.shape[0]
    pw = (1 - y.mean()) / y.mean()  # pos_weight: members and non-members weigh the same
    yt = torch.from_numpy(y.astype(np.float32))
    slope, offset = (pw * yt + 1 - yt) / m, pw * yt / m  # dL/do = sigmoid(o) * slope - offset
    x_t = x.t().contiguous()
    h, grad_h = torch.empty(m, hidden, **f32), torch.empty(m, hidden, **f32)
    o, grad_o = torch.empty(m, 1, **f32), torch.empty(m, **f32)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        hidden_layer(x, lab, h)
        torch.addmm(b2, h, w2, out=o)
        torch.sigmoid(o.view(-1), out=grad_o).mul_(slope).sub_(offset)
        torch.mm(h.t(), grad_o.view(-1, 1), out=w2.grad)
        torch.sum(grad_o, 0, keepdim=True, out=b2.grad)
        torch.mul(grad_o.view(-1, 1), w2.view(1, -1), out=grad_h)
        torch.ops.aten.threshold_backward.grad_input(grad_h, h, 0.0, grad_input=grad_h)  # zero where h == 0
        torch.mm(x_t, grad_h, out=w_probs.grad)
        w_label.grad.zero_().index_add_(0, lab, grad_h)
        torch.sum(w_label.grad, 0, out=b1.grad)
        opt.step()
    target_x, target_lab = tensors(target_sorted_probs, target_labels)
    out = torch.addmm(b2, hidden_layer(target_x, target_lab, torch.empty(target_x.shape[0], hidden, **f32)), w2)
    return out.squeeze(-1).double().numpy()
