"""Membership-inference attacks: each turns model outputs (`AttackInputs`) into one score per record.

Example:
    >>> inputs = ccl.attacks.AttackInputs(target_logits, labels, reference_logits, reference_in)  # doctest: +SKIP
    >>> scores = ccl.attacks.create("lira").score(inputs)  # doctest: +SKIP
    >>> ccl.metrics.evaluate(scores, is_member)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._registry import Registry
from .base import Attack
from .inputs import AttackInputs, NotEnoughReferencesError
from .label_only import LabelOnlyAttack
from .lira import LiRA
from .qmia import QMIA
from .rmia import RMIA
from .shadow import ShadowClassifierAttack
from .statistic import BoundaryDistanceAttack, GradientNormAttack, StatisticAttack
from .threshold import ThresholdAttack

__all__ = [
    "ACCESS_LEVELS",
    "access_level",
    "describe",
    "Attack",
    "BoundaryDistanceAttack",
    "GradientNormAttack",
    "AttackInputs",
    "LabelOnlyAttack",
    "LiRA",
    "NotEnoughReferencesError",
    "QMIA",
    "RMIA",
    "ShadowClassifierAttack",
    "StatisticAttack",
    "ThresholdAttack",
    "available",
    "create",
    "runnable",
    "score_all",
]

_REGISTRY: Registry[Attack] = Registry("attack")
# Yeom et al.'s loss attack uses one global threshold; Song & Mittal fit theirs per class.
_REGISTRY.register("loss", ThresholdAttack, defaults={"signal": "loss"}, doc="threshold on the loss (global)")
for _signal in ("confidence", "entropy", "modified_entropy"):
    _REGISTRY.register(
        _signal,
        ThresholdAttack,
        defaults={"signal": _signal, "per_class": True},
        doc=f"threshold on the {_signal.replace('_', ' ')} (per class)",
    )
_REGISTRY.register("shadow_classifier", ShadowClassifierAttack, doc="Shokri et al.'s attack classifier")
_REGISTRY.register("lira", LiRA, defaults={"online": True}, doc="LiRA, online (IN and OUT Gaussians)")
_REGISTRY.register("lira_offline", LiRA, defaults={"online": False}, doc="LiRA, offline (OUT only)")
_REGISTRY.register("rmia", RMIA, defaults={"offline": False}, doc="RMIA, online")
_REGISTRY.register("rmia_offline", RMIA, defaults={"offline": True}, doc="RMIA, offline (parameter a)")
_REGISTRY.register(
    "label_only_augmentation",
    LabelOnlyAttack,
    defaults={"kind": "augment"},
    doc="label-only (Choquette-Choo et al. 2021): fraction of augmented copies still classified correctly",
)
_REGISTRY.register(
    "label_only_noise",
    LabelOnlyAttack,
    defaults={"kind": "noise"},
    doc="label-only: fraction of copies under Gaussian noise of increasing scale still classified correctly",
)
_REGISTRY.register(
    "label_only_boundary",
    BoundaryDistanceAttack,
    doc="label-only: distance to the decision boundary (random directions + bisection), Gaussians per record",
)
_REGISTRY.register(
    "gradient",
    GradientNormAttack,
    doc="white-box (Nasr et al. 2019): norm of the loss gradient w.r.t. the weights, Gaussians per record",
)
_REGISTRY.register("qmia", QMIA, doc="QMIA (Bertran et al. 2023): margin above a quantile regressed on the population")


#: The levels of access to the target, weakest first: its predicted labels, its released scores, its weights.
ACCESS_LEVELS = ("labels", "scores", "weights")


def access_level(name: str) -> str:
    """What an auditor needs from the target to run the registered attack `name`: "labels", "scores" or
    "weights" (an unknown name, e.g. from an older run, reads as "scores")."""
    if name not in _REGISTRY.available():
        return "scores"
    return create(name).access


def create(name: str, **params: Any) -> Attack:
    """Builds a registered attack by name, e.g. `create("lira", variance="global")`."""
    return _REGISTRY.create(name, **params)


def available() -> list[str]:
    """The names `create` accepts."""
    return _REGISTRY.available()


def runnable(attack: Attack, inputs: AttackInputs) -> bool:
    """Whether `inputs` hold what `attack` needs: reference models, a population (with the reference models'
    outputs on it when the attack uses reference models), and the optional fields it names in `needs_inputs`
    (the label-only attacks' predicted labels on perturbed copies, QMIA's features)."""
    if inputs.num_references < attack.min_references:
        return False
    if attack.needs_population:
        if inputs.population_target_logits is None:
            return False
        if len(inputs.population_target_logits) < attack.min_population:
            return False
        if attack.min_references > 0 and inputs.population_reference_logits is None:
            return False
    return all(getattr(inputs, name) is not None for name in getattr(attack, "needs_inputs", ()))


def score_all(inputs: AttackInputs, *, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Scores of every named attack (default: every registered attack that `inputs` can support)."""
    if names is None:
        attacks = [create(n) for n in available()]
        attacks = [a for a in attacks if runnable(a, inputs)]
    else:
        attacks = [create(n) for n in names]
    return {attack.name: attack.score(inputs) for attack in attacks}


def describe(name: str) -> tuple[str, dict]:
    """(one-line description, {parameter: default}) of a registered name."""
    return _REGISTRY.describe(name)
