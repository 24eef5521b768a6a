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

Each procedure is one module of this package (`dpsgd`, `early_stop`, `advreg`, `distillation`, `hamp`): its
settings, a `Procedure` subclass, and the `DefenseHooks` through which the one training loop and the audit call
it (`ccl._hooks`); adding a defense is one module and `register`. `create(name, **params)` returns a `Defense`:
its loss and its `Procedure`. The syntax on the command line is
the losses' one, `name:key=value,...` (e.g. `dpsgd:epsilon=8`, `early_stop:epochs=10`), and the reference models
of an audit train with exactly the target's defense (the attacker knows the recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import losses
from .._checks import unknown_name
from .._hooks import DefenseHooks, Procedure, TrainingSetup
from .._registry import Registry
from ..errors import InvalidArgumentError
from . import advreg, distillation, dpsgd, early_stop, hamp
from .advreg import AdvReg
from .base import Defense
from .distillation import Distillation
from .dpsgd import DPSGD
from .early_stop import EarlyStop
from .hamp import HAMP, HAMPLoss, hamp_modify, hamp_soft_label_confidence

__all__ = [
    "DPSGD",
    "HAMP",
    "AdvReg",
    "Defense",
    "DefenseHooks",
    "Distillation",
    "EarlyStop",
    "HAMPLoss",
    "Procedure",
    "TrainingSetup",
    "available",
    "create",
    "default_recipe",
    "describe",
    "hamp_modify",
    "hamp_soft_label_confidence",
    "parameters",
    "register",
]


_REGISTRY: Registry[Defense] = Registry("defense")


def register(name: str, factory: Callable[..., Defense], *, doc: str = "") -> None:
    """Adds a defense: `factory(**params)` returns its `Defense` (check the parameters there, with messages that
    say why). Its parameters are the factory's keyword arguments, for `describe` and the command line."""
    _REGISTRY.register(name, factory, doc=doc)


#: A defense's own training recipe when its entry gives none (a module's `RECIPE`; DP-SGD's says why).
_RECIPES: dict[str, dict[str, Any]] = {}

for _module in (dpsgd, early_stop, advreg, distillation, hamp):
    register(_module.NAME, _module.create, doc=_module.DOC)
    if getattr(_module, "RECIPE", None):
        _RECIPES[_module.NAME] = dict(_module.RECIPE)


def default_recipe(name: str) -> dict[str, Any]:
    """The recipe keys a defense trains with when its entry gives no `train:` (`{}`: the experiment's recipe).
    A list is chosen on the defender's reserve (`ccl.config.DefenseSpec.candidates`)."""
    return {k: list(v) if isinstance(v, list) else v for k, v in _RECIPES.get(name, {}).items()}


def available() -> list[str]:
    """Every defense: the losses of `ccl.losses` and the procedures above."""
    return sorted({*losses.available(), *_REGISTRY.available()})


def create(name: str, **params: Any) -> Defense:
    """A defense by name, e.g. `create("ccel", alpha=0.5)`, `create("dpsgd", epsilon=8)`."""
    if name in _REGISTRY.available():
        return _REGISTRY.create(name, **params)
    if name in losses.available():
        return Defense(losses.create(name, **params), Procedure())
    raise InvalidArgumentError(unknown_name("defense", name, available()))


def describe(name: str) -> tuple[str, dict]:
    if name in _REGISTRY.available():
        return _REGISTRY.describe(name)
    return losses.describe(name)


def parameters(name: str) -> list[str]:
    if name in _REGISTRY.available():
        return _REGISTRY.parameters(name)
    return losses.parameters(name)
