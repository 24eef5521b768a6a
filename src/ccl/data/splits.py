"""Membership splits: who trains the target, who the reference models, who is never trained on.

`membership_split` is the LiRA/RMIA design. From `n` records and a seed:

- `population`: records no model trains on (RMIA's population sample, and held-out data);
- `reserve` (empty unless asked for): the defender's records, which no audited model trains on as a member
  and no attack queries: early stopping's validation split, adversarial regularisation's reference
  non-members, distillation's transfer set. Every model of the split (target and references alike, the
  attacker knowing the recipe) uses the same reserve;
- the rest is the audit pool. The target trains on a random half of it (`target_in`), so its members and
  non-members are disjoint and balanced;
- `reference_in (K, pool)`: reference model k trains on the records where it is True. Models come in
  complementary pairs (model 2j trains on a random half of the pool, model 2j+1 on the other half), so each
  record is IN for exactly half of the models (LiRA's design) and has IN and OUT observations. The pool has an
  even size, so the target and every reference model train on exactly as many records.

`shadow_split` is the classic design of Shokri et al. and the CCL paper's code: four disjoint equal parts,
target in / target out / shadow in / shadow out.

Splits are saved as `.npz` (atomically) with the run and reload bit-for-bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._checks import check_in_range, check_positive_int, expected
from .._io import atomic_path
from ..errors import InvalidArgumentError, RunDirectoryError

__all__ = ["MembershipSplit", "membership_split", "shadow_split"]


@dataclass(frozen=True)
class MembershipSplit:
    """Index arrays into a dataset of `num_records` records.

    Attributes:
        pool: `(P,)` indices of the audited records.
        target_in: `(P,)` bool, the target model's members among `pool`.
        reference_in: `(K, P)` bool, reference model k's members among `pool`.
        population: `(Z,)` indices of records no model trains on.
        seed: the seed the split was drawn with.
        reserve: `(R,)` indices of the defender's records (never audited, never in the population).
    """

    pool: np.ndarray
    target_in: np.ndarray
    reference_in: np.ndarray
    population: np.ndarray
    num_records: int
    seed: int
    reserve: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        p = self.pool.shape[0]
        assert self.target_in.shape == (p,) and self.reference_in.shape[1:] == (p,)
        assert not np.intersect1d(self.pool, self.population).size, "pool and population overlap"
        assert not np.intersect1d(self.reserve, np.r_[self.pool, self.population]).size, "the reserve overlaps"

    @property
    def num_references(self) -> int:
        return int(self.reference_in.shape[0])

    @property
    def target_members(self) -> np.ndarray:
        return self.pool[self.target_in]

    @property
    def target_nonmembers(self) -> np.ndarray:
        return self.pool[~self.target_in]

    def reference_members(self, k: int) -> np.ndarray:
        return self.pool[self.reference_in[k]]

    def with_references(self, num_references: int) -> MembershipSplit:
        """The same split with `num_references` reference models; the first models keep their members, so
        raising K reuses every model trained so far."""
        return membership_split(
            self.num_records,
            num_references=num_references,
            seed=self.seed,
            population_fraction=self.population.size / self.num_records,
            reserve_fraction=self.reserve.size / self.num_records,
        )

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                pool=self.pool,
                target_in=self.target_in,
                reference_in=self.reference_in,
                population=self.population,
                reserve=self.reserve,
                num_records=self.num_records,
                seed=self.seed,
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> MembershipSplit:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                reserve = f["reserve"] if "reserve" in f.files else np.zeros(0, np.int64)
                return cls(
                    f["pool"],
                    f["target_in"],
                    f["reference_in"],
                    f["population"],
                    int(f["num_records"]),
                    int(f["seed"]),
                    reserve,
                )
        except Exception as err:  # OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError, ...
            raise RunDirectoryError(
                f"Cannot read the membership split {path} ({type(err).__name__}: {err}); it is missing or corrupt."
            ) from None


def membership_split(
    num_records: int,
    *,
    num_references: int = 0,
    seed: int = 0,
    population_fraction: float = 0.1,
    reserve_fraction: float = 0.0,
) -> MembershipSplit:
    """Draws the LiRA/RMIA split described in the module docstring (the reserve follows the population in the
    seed's permutation, so a split without a reserve is the same as before reserves existed).

    The draws for the pool, the target and each reference model use separate streams derived from `seed`,
    so the reference masks of the first k models do not change when `num_references` grows.
    """
    n = check_positive_int("num_records", num_records, minimum=4)
    k = check_positive_int("num_references", num_references, minimum=0)
    frac = check_in_range("population_fraction", population_fraction, low=0.0, high=0.9)
    res_frac = check_in_range("reserve_fraction", reserve_fraction, low=0.0, high=0.9)
    if frac + res_frac > 0.9:
        raise InvalidArgumentError(
            expected("reserve_fraction", f"at most {0.9 - frac:g} with population_fraction {frac:g}", res_frac)
        )
    seed = check_positive_int("seed", seed, minimum=0)
    root = np.random.SeedSequence(seed)
    rng_pool, rng_target, rng_refs = (np.random.default_rng(s) for s in root.spawn(3))
    order = rng_pool.permutation(n)
    n_pop = int(round(frac * n))
    n_res = int(round(res_frac * n))
    n_pop += (n - n_pop - n_res) % 2  # an even pool: every model then trains on exactly half of it
    population, pool = np.sort(order[:n_pop]), np.sort(order[n_pop + n_res :])
    reserve = np.sort(order[n_pop : n_pop + n_res])
    p = pool.size
    if p < 2:
        raise InvalidArgumentError(
            expected("population_fraction", "a value that leaves at least 2 records to audit", frac)
        )
    target_in = np.zeros(p, bool)
    target_in[rng_target.permutation(p)[: p // 2]] = True
    # Models come in complementary pairs: a random half of the pool for model 2j, the other half for model 2j+1.
    # Every record is IN for exactly half of the models (K even), every model has exactly p / 2 members (so K
    # models can train in lockstep), and the pairs are drawn in order from one stream, so the first models'
    # members stay fixed when K grows.
    reference_in = np.zeros((k, p), bool)
    for j in range(0, k, 2):
        heads = rng_refs.permutation(p)[: p // 2]
        reference_in[j, heads] = True
        if j + 1 < k:
            reference_in[j + 1] = ~reference_in[j]
    return MembershipSplit(pool, target_in, reference_in, population, n, int(seed), reserve)


def shadow_split(num_records: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Four disjoint, equal parts: target in/out and shadow in/out (Shokri et al.; the CCL paper's code)."""
    n = check_positive_int("num_records", num_records, minimum=4)
    seed = check_positive_int("seed", seed, minimum=0)
    order = np.random.default_rng(seed).permutation(n)
    q = n // 4
    parts = [np.sort(order[i * q : (i + 1) * q]) for i in range(4)]
    return dict(zip(("target_in", "target_out", "shadow_in", "shadow_out"), parts, strict=True))
