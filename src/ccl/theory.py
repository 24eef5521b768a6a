"""The Gaussian model of the loss-threshold attack (Liu et al., ICML 2024, slide "Membership Advantage").

Model: the loss of a member is `N(mu_member, sigma_member^2)` and of a non-member `N(mu_nonmember,
sigma_nonmember^2)`; the attack says "member" when `loss <= tau`. With `tau` chosen so that the false-positive
rate is `fpr`, i.e. `Phi((tau - mu_nonmember) / sigma_nonmember) = fpr`, the membership advantage is

    Adv(fpr) = Phi((Phi^-1(fpr) * sigma_nonmember + mu_nonmember - mu_member) / sigma_member) - fpr.

A larger member-loss spread `sigma_member` shrinks the advantage wherever `tau > mu_member` (the regime of the
paper's argument); at a small `fpr` with `tau < mu_member` it grows instead, so the model informs, it does not
guarantee.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import ArrayLike

from ._checks import expected
from .errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["GaussianOptimum", "gaussian_advantage", "gaussian_best_advantage"]


def _phi(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _phi_inv(p: np.ndarray) -> np.ndarray:
    return torch.special.ndtri(torch.from_numpy(np.asarray(p, dtype=np.float64))).numpy()


def _real(name: str, value: ArrayLike) -> np.ndarray:
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidArgumentTypeError(expected(name, "a real number or an array of real numbers", value))
    return arr.astype(np.float64)


def _as_params(mu_member, sigma_member, mu_nonmember, sigma_nonmember, *extra: tuple[str, np.ndarray]):
    named = []
    for name, value in (
        ("mu_member", mu_member),
        ("sigma_member", sigma_member),
        ("mu_nonmember", mu_nonmember),
        ("sigma_nonmember", sigma_nonmember),
    ):
        arr = _real(name, value)
        if not np.all(np.isfinite(arr)):
            raise InvalidArgumentError(expected(name, "finite", value))
        if name.startswith("sigma") and not np.all(arr > 0):
            raise InvalidArgumentError(expected(name, "> 0 (a standard deviation)", value))
        named.append((name, arr))
    named += extra
    shape: tuple[int, ...] = ()
    for name, arr in named:
        try:
            shape = np.broadcast_shapes(shape, arr.shape)
        except ValueError:
            raise InvalidArgumentError(
                expected(name, f"a shape that broadcasts with the other arguments' {shape}", arr.shape)
            ) from None
    return np.broadcast_arrays(*(arr for _, arr in named))


def gaussian_advantage(
    mu_member: ArrayLike,
    sigma_member: ArrayLike,
    mu_nonmember: ArrayLike,
    sigma_nonmember: ArrayLike,
    *,
    fpr: ArrayLike,
) -> np.ndarray:
    """Advantage (TPR - FPR) of the loss-threshold attack at false-positive rate `fpr` under the Gaussian model.

    All arguments broadcast against each other (numpy rules). Returns a float64 array (0-d for scalars).

    Example:
        >>> float(gaussian_advantage(0.1, 0.1, 1.0, 0.5, fpr=0.01))  # doctest: +ELLIPSIS
        0.0...
    """
    fpr_arr = _real("fpr", fpr)
    if not np.all((fpr_arr > 0) & (fpr_arr < 1)):
        raise InvalidArgumentError(expected("fpr", "in the open interval (0, 1)", fpr))
    mu_m, s_m, mu_n, s_n, fpr_arr = _as_params(mu_member, sigma_member, mu_nonmember, sigma_nonmember, ("fpr", fpr_arr))
    return _phi((_phi_inv(fpr_arr) * s_n + mu_n - mu_m) / s_m) - fpr_arr


class GaussianOptimum(NamedTuple):
    """The best one-sided threshold under the Gaussian model: its advantage, threshold and false-positive rate."""

    advantage: np.ndarray
    threshold: np.ndarray
    fpr: np.ndarray


def gaussian_best_advantage(
    mu_member: ArrayLike,
    sigma_member: ArrayLike,
    mu_nonmember: ArrayLike,
    sigma_nonmember: ArrayLike,
) -> GaussianOptimum:
    """Advantage of the loss-threshold attack at its best threshold (the maximum of `gaussian_advantage` over fpr).

    The optimum lies where the two densities cross (a quadratic in tau); both crossings are evaluated and the
    better kept. When no threshold helps (e.g. members have the larger mean loss) the advantage is 0 and the
    threshold is -inf (the attack flags nothing).
    """
    mu_m, s_m, mu_n, s_n = _as_params(mu_member, sigma_member, mu_nonmember, sigma_nonmember)
    a = 1 / s_m**2 - 1 / s_n**2
    b = -2 * (mu_m / s_m**2 - mu_n / s_n**2)
    c = mu_m**2 / s_m**2 - mu_n**2 / s_n**2 + 2 * np.log(s_m / s_n)
    with np.errstate(divide="ignore", invalid="ignore"):
        quadratic = np.abs(a) > 1e-12 * np.maximum(1 / s_m**2, 1 / s_n**2)
        disc = np.sqrt(np.maximum(b**2 - 4 * a * c, 0.0))
        root1 = np.where(quadratic, (-b - disc) / (2 * a), -c / b)
        root2 = np.where(quadratic, (-b + disc) / (2 * a), -c / b)
    candidates = np.stack([root1, root2])  # (2, ...)
    candidates = np.where(np.isfinite(candidates), candidates, -np.inf)

    def adv(tau):
        return _phi((tau - mu_m) / s_m) - _phi((tau - mu_n) / s_n)

    values = np.stack([adv(candidates[0]), adv(candidates[1])])
    values = np.where(np.isfinite(candidates), values, 0.0)
    best = np.argmax(values, axis=0)
    advantage = np.take_along_axis(values, best[None], axis=0)[0]
    threshold = np.take_along_axis(candidates, best[None], axis=0)[0]
    flat = advantage <= 0
    advantage = np.where(flat, 0.0, advantage)
    threshold = np.where(flat, -np.inf, threshold)
    return GaussianOptimum(advantage, threshold, _phi((threshold - mu_n) / s_n))
