"""Canaries: records inserted into the audit pool to measure worst-case leakage (Aerni et al., CCS 2024).

A random record is usually easy to fit and leaks little; the records a privacy guarantee must protect are the
atypical ones. Canaries stand in for them, and every canary is in the training set of exactly half of the
models (the target's at random; reference models in complementary pairs), like every other pooled record.

Kinds:
- `mislabeled`: a real record with a wrong label (uniform over the other classes), the paper's main choice. It
  models a record the model can fit only by memorising it. The source records are taken from the population
  and removed from it, so no record appears with two labels.
- `ood`: an input from outside the data distribution: Gaussian noise with the data's per-feature mean and
  standard deviation, with a random label. It models an outlier the model has no reason to fit.

Canaries are never used for utility: accuracy is measured on the other records.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .._checks import check_choice, check_positive_int, expected
from ..errors import InvalidArgumentError
from .datasets import Dataset
from .splits import MembershipSplit

__all__ = ["CANARY_KINDS", "add_canaries"]

CANARY_KINDS = ("mislabeled", "ood")


def add_canaries(
    dataset: Dataset, split: MembershipSplit, *, num: int, kind: str = "mislabeled", seed: int = 0
) -> tuple[Dataset, MembershipSplit, np.ndarray]:
    """Appends `num` canaries to `dataset` and to the split's pool. Returns the new dataset, the new split and
    the `(P,)` mask of the canaries in the new pool (they come last)."""
    check_positive_int("canaries", num, minimum=2)
    check_choice("canary_kind", kind, CANARY_KINDS)
    if num % 2:
        raise InvalidArgumentError(expected("canaries", "an even number (each is IN for exactly half the models)", num))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xCA7A]))
    n, c = len(dataset), dataset.num_classes
    population = split.population
    if kind == "mislabeled":
        if num > population.size:
            raise InvalidArgumentError(
                expected("canaries", f"at most the population's {population.size} records (their sources)", num)
            )
        source = np.sort(rng.choice(population, num, replace=False))
        x = dataset.x[torch.as_tensor(source)]
        y = (dataset.y[torch.as_tensor(source)] + torch.as_tensor(rng.integers(1, c, num))) % c
        population = np.setdiff1d(population, source)
    else:
        flat = dataset.x.reshape(n, -1).double()
        noise = torch.as_tensor(rng.standard_normal((num, flat.shape[1])))
        x = (flat.mean(0) + noise * flat.std(0)).float().reshape(num, *dataset.x.shape[1:])
        y = torch.as_tensor(rng.integers(0, c, num))
    new = dataclasses.replace(dataset, x=torch.cat([dataset.x, x]), y=torch.cat([dataset.y, y.long()]))
    canary_idx = np.arange(n, n + num)
    target_in = np.zeros(num, bool)
    target_in[rng.permutation(num)[: num // 2]] = True
    k = split.num_references
    reference_in = np.zeros((k, num), bool)
    for j in range(0, k, 2):
        reference_in[j, rng.permutation(num)[: num // 2]] = True
        if j + 1 < k:
            reference_in[j + 1] = ~reference_in[j]
    new_split = MembershipSplit(
        np.r_[split.pool, canary_idx],
        np.r_[split.target_in, target_in],
        np.concatenate([split.reference_in, reference_in], axis=1),
        population,
        n + num,
        split.seed,
        split.reserve,
    )
    is_canary = np.r_[np.zeros(split.pool.size, bool), np.ones(num, bool)]
    return new, new_split, is_canary
