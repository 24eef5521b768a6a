"""The attack interface: an attack turns `AttackInputs` into one score per audited record (higher: member)."""

from __future__ import annotations

import abc

import numpy as np

from .inputs import AttackInputs


class Attack(abc.ABC):
    """Base class. Subclasses set `name` and implement `score`."""

    name: str = "attack"
    #: the fewest reference models the attack can work with (0: it can run without any)
    min_references: int = 0
    #: whether the attack compares records with a population sample (RMIA)
    needs_population: bool = False
    #: what the auditor must be able to do with the target: "scores" (its released outputs), "labels" (its
    #: predicted labels only) or "weights" (white box); the summary names the strongest attack at each level
    access: str = "scores"
    #: the fewest population records it can work with (when it needs a population)
    min_population: int = 1

    @abc.abstractmethod
    def score(self, inputs: AttackInputs) -> np.ndarray:
        """Returns `(N,)` float64 scores, higher meaning more likely a member."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"
