"""The distance from a record to the decision boundary, measured with predicted labels only.

Choquette-Choo, Tramèr, Carlini and Papernot (ICML 2021, Sec. 4.3) and Li and Zhang (CCS 2021) find it with
HopSkipJump (Chen, Jordan and Wainwright, S&P 2020): members lie farther from the boundary than non-members, and a
defense that changes its released scores (MemGuard, HAMP) cannot hide a label without giving up accuracy. For
tabular records (and cheaply for images) a search along random directions with bisection finds the same kind of
distance with a fixed number of queries:

- `D` directions per record, Gaussian and normalised, scaled per feature by the features' standard deviation
  `std_j`: the point at distance `t` along direction `u` is `x + t * sqrt(d) * std * u`, so `t` is the root mean
  square shift per feature, in standard deviations.
- Along each direction, one query at `max_distance` (no label change there: the distance is `max_distance`,
  censored), then bisection on a log scale over `[max_distance / 2**10, max_distance]`, keeping the nearest
  point found whose label differs from the true one. The distance of the record is the smallest over its
  directions (an upper bound on the true distance; equal to it along the best direction).
- A record the model already misclassifies has distance 0 (one query).

With `queries = 1 + D * S` queries per record (`S` per direction), the default `D = max(1, (queries - 1) // 10)`
gives 10 bisection steps per direction: a relative precision of `2**(10 / 2**9) - 1 = 1.4%`. Everything is
batched: each bisection step asks every model for the labels of every record's `D` current points at once
(`predict` takes a batch per model, `(K, B, ...)`), in blocks of `CHUNK` records, block `b` drawing its directions
with `chunk_seed(seed, b)`: every model searches the same directions, so their distances compare record by record.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .._checks import check_in_range, check_positive_int, expected
from ..errors import InvalidArgumentError
from .label_only import _feature_std, _records, check_seed, chunk_seed

__all__ = ["CHUNK", "MAX_DISTANCE", "QUERIES", "boundary_distances", "default_directions", "line_search_distance"]

#: the default number of label queries per record and model
QUERIES = 128
#: the default largest distance searched, in root-mean-square standard deviations per feature
MAX_DISTANCE = 8.0
#: the bisection's range is `[max_distance / 2**RANGE_BITS, max_distance]` (on a log scale)
RANGE_BITS = 10
#: records searched at a time (each block draws its directions with `chunk_seed(seed, block)`)
CHUNK = 256


def default_directions(queries: int) -> int:
    """The number of directions `D` a budget of `queries` per record buys: about 10 bisection steps each."""
    return max(1, (queries - 1) // 10)


def _directions(shape: tuple[int, ...], num: int, seed: int) -> torch.Tensor:
    """`(N, D, d)` unit directions, Gaussian then normalised, drawn on the CPU by `seed`."""
    g = torch.Generator().manual_seed(seed)
    n, d = shape[0], math.prod(shape[1:])
    u = torch.randn((n, num, d), generator=g, dtype=torch.float64)
    return u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _search_block(
    predict, x: torch.Tensor, y: torch.Tensor, sd: torch.Tensor, *, k: int, d_num: int, steps: int, seed: int, hi: float
) -> torch.Tensor:
    """`(K, n)` distances of the block `x (n, ...)` for K models; see the module docstring."""
    n, shape = x.shape[0], x.shape[1:]
    width = math.sqrt(math.prod(shape))
    u = (_directions(tuple(x.shape), d_num, seed) * sd.reshape(1, 1, -1).double() * width).to(x.dtype)  # (n, D, d)
    flat = x.reshape(n, 1, -1)

    def wrong(t: torch.Tensor) -> torch.Tensor:
        """Whether the label at `x + t u` differs from the true one, `t (K, n, D)` -> `(K, n, D)` bool."""
        points = (flat[None] + t[..., None].to(x.dtype) * u[None]).reshape(k, n * d_num, *shape)
        return predict(points).reshape(k, n, d_num) != y[None, :, None]

    log_hi = torch.full((k, n, d_num), math.log(hi), dtype=torch.float64)
    log_lo = log_hi - RANGE_BITS * math.log(2)
    found = wrong(log_hi.exp())  # (K, n, D): a label change within reach
    for _ in range(steps - 1):
        mid = (log_lo + log_hi) / 2
        flip = wrong(mid.exp())
        log_hi = torch.where(flip, mid, log_hi)
        log_lo = torch.where(flip, log_lo, mid)
    dist = torch.where(found, log_hi.exp(), torch.full_like(log_hi, hi)).amin(-1)  # (K, n)
    clean = predict(x[None].expand(k, *x.shape)) != y[None]  # (K, n): misclassified already
    return torch.where(clean, torch.zeros_like(dist), dist)


def boundary_distances(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x,
    labels,
    *,
    queries: int = QUERIES,
    num_models: int = 1,
    directions: int | None = None,
    max_distance: float = MAX_DISTANCE,
    seed: int = 0,
    std=None,
) -> np.ndarray:
    """The distances `(K, N)` float64 of the records `x (N, ...)` to the decision boundary of K models, from
    predicted labels only (see the module docstring).

    Args:
        predict: `(K, B, ...)` points (one batch per model) -> `(K, B)` predicted labels; it may answer on any
            device (its result is moved to the CPU).
        x: the records, floating-point, on the CPU.
        labels: `(N,)` true labels.
        queries: label queries per record and model: 1 on the record itself, the rest split over the directions.
        num_models: K.
        directions: `D` (default `default_directions(queries)`); each gets `(queries - 1) // D` queries.
        max_distance: the largest distance searched (root mean square standard deviations per feature).
        seed: the directions' random stream; every model of an audit is searched with the same one.
        std: per-feature standard deviations (default: over the records of `x`).

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # doctest: +SKIP
        >>> boundary_distances(lambda q: (q @ w.T).argmax(-1), x, y)  # doctest: +SKIP
    """
    queries = check_positive_int("queries", queries, minimum=2)
    d_num = default_directions(queries) if directions is None else check_positive_int("directions", directions)
    steps = (queries - 1) // d_num
    if steps < 1:
        raise InvalidArgumentError(
            expected("directions", f"at most {queries - 1} (queries - 1) for queries={queries}", d_num)
        )
    max_distance = check_in_range("max_distance", max_distance, low=0.0, low_inclusive=False)
    seed = check_seed(seed)
    xt = _records(x).cpu()
    y = torch.as_tensor(np.asarray(labels)).long().cpu()
    sd = _feature_std(xt, std)

    def labels_cpu(points: torch.Tensor) -> torch.Tensor:
        return predict(points).cpu()

    out = [
        _search_block(
            labels_cpu,
            xt[start : start + CHUNK],
            y[start : start + CHUNK],
            sd,
            k=num_models,
            d_num=d_num,
            steps=steps,
            seed=chunk_seed(seed, b),
            hi=max_distance,
        )
        for b, start in enumerate(range(0, xt.shape[0], CHUNK))
    ]
    return torch.cat(out, -1).numpy().astype(np.float64)


def line_search_distance(
    predict_one: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: int, direction: torch.Tensor, *, grid
) -> float:
    """The first `t` of the sorted `grid` at which `predict_one(x + t * direction)` is not `y` (`inf` if none):
    the brute-force line search that tests check the bisection against."""
    points = x[None] + torch.as_tensor(grid, dtype=x.dtype)[:, None] * direction.reshape(1, -1).to(x.dtype)
    wrong = (predict_one(points.reshape(len(grid), *x.shape)) != y).numpy()
    return float(grid[int(np.argmax(wrong))]) if wrong.any() else math.inf
