"""Defenses: a training loss plus what the defense does to training, behind one registry.

Every loss of `ccl.losses` is a defense that only changes the loss. The others change the procedure:

- `dpsgd` (Abadi et al., CCS 2016), through Opacus: Poisson sampling of each batch (rate q = batch_size / n),
  per-sample gradients clipped to `max_grad_norm`, Gaussian noise of standard deviation
  `noise_multiplier * max_grad_norm` added to their sum. With `epsilon=`, the noise multiplier is calibrated by
  Opacus' RDP accountant (`opacus.accountants.utils.get_noise_multiplier`) so that the recipe's epochs spend at
  most (epsilon, delta); with `noise_multiplier=` it is fixed and the epsilon spent is reported. The loss is CE
  (or `loss=` another per-sample loss of `ccl.losses`). Models with BatchNorm are converted by Opacus'
  `ModuleValidator.fix` (BatchNorm -> GroupNorm), so `mlp` and `cnn` work; the CIFAR ResNets and WideResNet too,
  DenseNet with the same replacement. DP-SGD models train one by one (not stacked).
- `early_stop`: the simplest regulariser, and a baseline every defense must beat. With `epochs=E` the released
  model is the one after E epochs (the learning-rate schedule is still the recipe's); with `patience=P`,
  training stops once the validation loss (cross-entropy on the defender's reserve, records no audited model
  trains on) has not improved for P epochs, and the model of the best epoch
  is released (as Keras' `restore_best_weights` or Lightning's best checkpoint do).
- `advreg` (adversarial regularisation; Nasr, Shokri and Houmansadr, CCS 2018): a min-max game between the
  classifier f and an inference model h(f(x), y) that tells members from non-members. Before every classifier
  step, `k` steps train h to maximise its gain `mean log h(f(x), y) + mean log(1 - h(f(x'), y'))` on a batch of
  members x and a batch of reference non-members x' drawn from the defender's reserve (Adam, lr 1e-3); then f
  takes one step on `loss(f(x), y) + alpha * (mean h(f(x), y) - 0.5)`. The paper's Algorithm 1 writes the
  regulariser as `alpha * log h`, which is unbounded below; the authors' code (and RelaxLoss' reproduction)
  use the mean of h, and so does `ccl`. h sees the softmax output and the one-hot label in two branches (the
  paper's architecture, narrower: 128-64 and 64, then 64-1). `alpha=0` trains exactly the plain loss (tested).
- `distillation` (DMP, Shejwalkar and Houmansadr, AAAI 2021): a teacher of the same architecture is trained
  with the recipe on the private members; the released student, from the same initial weights, is trained
  with the recipe only on the defender's reserve (records no audited model trains on), against the teacher's
  soft labels at temperature T: the loss is `T^2 * KL(softmax(t / T) || softmax(s / T))` (Hinton et al.). The
  student never sees a member, so what it leaks it leaks through the teacher's outputs on the reserve. DMP
  also filters the reference set by the teacher's entropy; `ccl` uses the whole reserve.
- `hamp` (Chen and Pattabiraman, NDSS 2024): trains against high-entropy soft labels (`HAMPLoss`, entropy
  `gamma * log C`) with an entropy regulariser (`alpha`), and modifies the released outputs at query time
  (`hamp_modify`): each query's scores are those of a random input (uniform over the data's range), rearranged
  to the query's own rank order, so the predicted label stays. Every attack sees the released outputs, and
  accuracy is measured on them; label-only attacks are unaffected by the modification, by design.

`create(name, **params)` returns a `Defense`: its loss and its `Procedure`. The syntax on the command line is
the losses' one, `name:key=value,...` (e.g. `dpsgd:epsilon=8`, `early_stop:epochs=10`), and the reference models
of an audit train with exactly the target's defense (the attacker knows the recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import losses
from ._checks import check_choice, check_in_range, check_logits_targets, check_positive_int, expected
from ._registry import Registry
from .errors import InvalidArgumentError

__all__ = [
    "AdvReg",
    "DPSGD",
    "Defense",
    "Distillation",
    "HAMPLoss",
    "Procedure",
    "available",
    "create",
    "describe",
    "hamp_modify",
    "parameters",
]


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD's settings; `noise_multiplier` is resolved from `epsilon` when the data size is known."""

    epsilon: float | None
    delta: float
    max_grad_norm: float
    noise_multiplier: float | None
    accountant: str = "rdp"

    def resolve_noise(self, *, sample_rate: float, steps: int) -> float:
        """The noise multiplier: the given one, or the one Opacus' accountant calibrates to (epsilon, delta) for
        `steps` steps at `sample_rate`."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        from .dp import calibrate_noise

        return calibrate_noise(
            self.epsilon, self.delta, sample_rate=sample_rate, steps=steps, accountant=self.accountant
        )


@dataclass(frozen=True)
class Procedure:
    """What a defense does to training beyond its loss (nothing, for a plain loss)."""

    dp: DPSGD | None = None
    stop_after: int | None = None  # early stopping: the model after this many epochs is released
    modify_outputs: str | None = None  # "hamp": the released model's outputs are modified at query time
    patience: int | None = None  # early stopping: stop when the validation loss has not improved for this long
    adversary: AdvReg | None = None  # adversarial regularisation: the inner inference model's settings
    distill: Distillation | None = None  # DMP: a teacher on the members, the released student on the reserve

    @property
    def stackable(self) -> bool:
        """Whether models of this defense may train stacked: those that only change the loss or stop after a
        fixed number of epochs (DP-SGD's per-sample clipping, an inner adversary, a teacher or a patience rule
        train one model at a time)."""
        return self.dp is None and not self.needs_reserve

    @property
    def needs_reserve(self) -> bool:
        """Whether the defense learns from the defender's reserve: records no audited model trains on (the
        inner adversary's non-members, the student's transfer set, the validation split)."""
        return self.patience is not None or self.adversary is not None or self.distill is not None


@dataclass(frozen=True)
class AdvReg:
    """Adversarial regularisation's settings (see the module docstring)."""

    alpha: float  # the weight of the inference model's output in the classifier's loss
    steps: int  # inference-model steps per classifier step (the paper's k)
    lr: float  # the inference model's Adam learning rate


@dataclass(frozen=True)
class Distillation:
    """DMP's settings: the temperature of the soft labels."""

    temperature: float


@dataclass(frozen=True)
class Defense:
    loss: nn.Module
    procedure: Procedure


def _dpsgd(
    *,
    epsilon: float | None = None,
    delta: float = 1e-5,
    max_grad_norm: float = 1.0,
    noise_multiplier: float | None = None,
    accountant: str = "rdp",
    loss: str = "ce",
) -> Defense:
    if (epsilon is None) == (noise_multiplier is None):
        raise InvalidArgumentError(
            expected(
                "epsilon",
                "given (or noise_multiplier instead, not both)",
                f"epsilon={epsilon}, noise_multiplier={noise_multiplier}",
            )
        )
    if epsilon is not None:
        check_in_range("epsilon", epsilon, low=0.0, low_inclusive=False)
    if noise_multiplier is not None:
        check_in_range("noise_multiplier", noise_multiplier, low=0.0)
    check_in_range("delta", delta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    check_in_range("max_grad_norm", max_grad_norm, low=0.0, low_inclusive=False)
    check_choice("accountant", accountant, ("rdp", "prv"))
    loss_fn = _per_sample_loss("dpsgd", loss)
    dp = DPSGD(
        None if epsilon is None else float(epsilon),
        float(delta),
        float(max_grad_norm),
        None if noise_multiplier is None else float(noise_multiplier),
        accountant,
    )
    return Defense(loss_fn, Procedure(dp=dp))


def _per_sample_loss(defense: str, loss: str) -> nn.Module:
    if loss not in losses.available() or loss == "relaxloss":
        valid = [n for n in losses.available() if n != "relaxloss"]
        raise InvalidArgumentError(expected("loss", f"a per-sample loss of {defense}: one of {', '.join(valid)}", loss))
    return losses.create(loss)


def _early_stop(*, epochs: int | None = None, patience: int | None = None, loss: str = "ce") -> Defense:
    if (epochs is None) == (patience is None):
        raise InvalidArgumentError(
            expected(
                "epochs",
                "given (the model after that many epochs is released), or patience instead, not both",
                f"epochs={epochs}, patience={patience}",
            )
        )
    if epochs is not None:
        check_positive_int("epochs", epochs)
    if patience is not None:
        check_positive_int("patience", patience)
    return Defense(
        _per_sample_loss("early_stop", loss) if loss != "relaxloss" else losses.create(loss),
        Procedure(
            stop_after=None if epochs is None else int(epochs), patience=None if patience is None else int(patience)
        ),
    )


def _advreg(*, alpha: float = 3.0, k: int = 1, lr: float = 1e-3, loss: str = "ce") -> Defense:
    check_in_range("alpha", alpha, low=0.0)
    check_positive_int("k", k)
    check_in_range("lr", lr, low=0.0, low_inclusive=False)
    return Defense(_per_sample_loss("advreg", loss), Procedure(adversary=AdvReg(float(alpha), int(k), float(lr))))


def _distillation(*, temperature: float = 1.0, loss: str = "ce") -> Defense:
    check_in_range("temperature", temperature, low=0.0, low_inclusive=False)
    # `loss` trains the teacher; the student always learns the teacher's soft labels
    return Defense(_per_sample_loss("distillation", loss), Procedure(distill=Distillation(float(temperature))))


def hamp_soft_label_confidence(num_classes: int, gamma: float) -> float:
    """The true class's probability p of HAMP's soft label `[p, (1-p)/(C-1), ...]` whose entropy is `gamma`
    times the largest possible, log C (bisection: the entropy falls as p rises from 1/C to 1)."""
    c = num_classes
    target = gamma * math.log(c)

    def entropy(p: float) -> float:
        q = (1 - p) / (c - 1)
        return -(p * math.log(p) if p > 0 else 0.0) - ((c - 1) * q * math.log(q) if q > 0 else 0.0)

    lo, hi = 1.0 / c, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entropy(mid) > target else (lo, mid)
    return (lo + hi) / 2


class HAMPLoss(nn.Module):
    """HAMP's training loss (Chen and Pattabiraman, NDSS 2024): cross-entropy against a high-entropy soft label
    (the true class gets the probability whose label entropy is `gamma * log C`, the others share the rest)
    minus `alpha` times the entropy of the prediction: `-sum_c s_c log p_c - alpha * H(p)`."""

    def __init__(self, *, gamma: float = 0.95, alpha: float = 0.001, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma = check_in_range("gamma", gamma, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.alpha = check_in_range("alpha", alpha, low=0.0)
        self.reduction = check_choice("reduction", reduction, ("none", "mean", "sum"))

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        c = logits.shape[-1]
        p = hamp_soft_label_confidence(c, self.gamma)
        log_p = torch.log_softmax(logits.float(), -1)
        soft = torch.full_like(log_p, (1 - p) / (c - 1)).scatter_(-1, target[:, None], p)
        entropy = -(log_p.exp() * log_p).sum(-1)
        return -(soft * log_p).sum(-1) - self.alpha * entropy

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_logits_targets(logits, target)
        loss = self.per_sample(logits, target)
        return loss.mean() if self.reduction == "mean" else loss.sum() if self.reduction == "sum" else loss


def hamp_modify(logits: np.ndarray, random_logits: np.ndarray) -> np.ndarray:
    """HAMP's output modification: each query's released scores are those of a random input, rearranged to the
    rank order of the query's own scores (so the predicted label stays); returned as log-probabilities.
    `logits (..., C)` and `random_logits (..., C)` of the same shape."""
    real = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    rand = torch.softmax(torch.from_numpy(np.asarray(random_logits, dtype=np.float32)), -1)
    ranks = real.argsort(-1).argsort(-1)  # the rank of each class in the query's own scores
    released = rand.sort(-1).values.gather(-1, ranks)  # the random scores, in that order
    return torch.log(released.clamp_min(1e-30)).numpy()


def _hamp(*, gamma: float = 0.95, alpha: float = 0.001) -> Defense:
    return Defense(HAMPLoss(gamma=gamma, alpha=alpha), Procedure(modify_outputs="hamp"))


def _loss_only(name: str):
    def build(**params: Any) -> Defense:
        return Defense(losses.create(name, **params), Procedure())

    return build


_REGISTRY: Registry[Defense] = Registry("defense")
_REGISTRY.register("dpsgd", _dpsgd, doc="DP-SGD (Opacus): per-sample clipping and noise, epsilon from the accountant")
_REGISTRY.register(
    "early_stop",
    _early_stop,
    doc="release the model after `epochs` epochs, or at the best validation loss with `patience` (reserve data)",
)
_REGISTRY.register(
    "advreg", _advreg, doc="adversarial regularisation (Nasr et al.): an inner inference model, reserve non-members"
)
_REGISTRY.register(
    "distillation",
    _distillation,
    doc="DMP: a teacher on the members, the released student on the reserve's soft labels",
)
_REGISTRY.register(
    "hamp", _hamp, doc="HAMP: high-entropy soft labels, entropy regulariser, modified outputs at query time"
)


def _loss_names() -> list[str]:
    return losses.available()


def available() -> list[str]:
    """Every defense: the losses of `ccl.losses` and the procedures above."""
    return sorted({*_loss_names(), *_REGISTRY.available()})


def create(name: str, **params: Any) -> Defense:
    """A defense by name, e.g. `create("ccel", alpha=0.5)`, `create("dpsgd", epsilon=8)`."""
    if name in _REGISTRY.available():
        return _REGISTRY.create(name, **params)
    if name in _loss_names():
        return _loss_only(name)(**params)
    from ._checks import unknown_name

    raise InvalidArgumentError(unknown_name("defense", name, available()))


def describe(name: str) -> tuple[str, dict]:
    if name in _REGISTRY.available():
        return _REGISTRY.describe(name)
    return losses.describe(name)


def parameters(name: str) -> list[str]:
    if name in _REGISTRY.available():
        return _REGISTRY.parameters(name)
    return losses.parameters(name)
