"""The Gaussian advantage model against Monte Carlo, and the paper's variance claim measured on a small task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ccl
from ccl.theory import gaussian_advantage, gaussian_best_advantage


@pytest.mark.parametrize(
    ("mu_m", "s_m", "mu_n", "s_n"), [(0.2, 0.3, 1.0, 0.6), (0.5, 1.0, 0.8, 0.4), (0.0, 1.0, 0.0, 1.0)]
)
@pytest.mark.parametrize("fpr", [0.001, 0.01, 0.1, 0.5])
def test_gaussian_advantage_matches_monte_carlo(mu_m, s_m, mu_n, s_n, fpr):
    rng = np.random.default_rng(0)
    n = 400_000
    members = rng.normal(mu_m, s_m, n)
    nonmembers = rng.normal(mu_n, s_n, n)
    tau = np.quantile(nonmembers, fpr)  # threshold whose empirical FPR is fpr
    measured = np.mean(members <= tau) - np.mean(nonmembers <= tau)
    predicted = float(gaussian_advantage(mu_m, s_m, mu_n, s_n, fpr=fpr))
    # binomial standard error of the TPR plus the quantile's error, with margin
    assert abs(measured - predicted) < 5 * np.sqrt(0.25 / n) + 3e-3


def test_gaussian_advantage_broadcasts():
    fprs = np.array([0.001, 0.01, 0.1])
    sigmas = np.array([[0.1], [0.5], [1.0]])
    out = gaussian_advantage(0.2, sigmas, 1.0, 0.5, fpr=fprs)
    assert out.shape == (3, 3)
    for i, s in enumerate(sigmas[:, 0]):
        for j, f in enumerate(fprs):
            assert out[i, j] == pytest.approx(float(gaussian_advantage(0.2, s, 1.0, 0.5, fpr=f)))


def test_larger_member_spread_lowers_advantage_where_tau_is_above_mu_member():
    sigmas = np.linspace(0.3, 1.0, 20)
    adv = gaussian_advantage(0.1, sigmas, 1.5, 0.5, fpr=0.3)
    assert np.all(np.diff(adv) < 0)
    # ... but at a small FPR whose threshold lies below mu_member, the spread helps the attacker (slides' caveat)
    adv_small = gaussian_advantage(1.0, sigmas, 1.5, 0.5, fpr=1e-3)
    assert np.all(np.diff(adv_small) > 0)


@pytest.mark.parametrize(
    ("mu_m", "s_m", "mu_n", "s_n"),
    [(0.2, 0.3, 1.0, 0.6), (0.5, 1.0, 0.8, 0.4), (0.3, 0.5, 1.0, 0.5), (1.0, 0.5, 0.2, 0.5)],
)
def test_best_advantage_is_the_maximum_over_fpr(mu_m, s_m, mu_n, s_n):
    fprs = np.linspace(1e-6, 1 - 1e-6, 200_001)
    grid = gaussian_advantage(mu_m, s_m, mu_n, s_n, fpr=fprs)
    best = gaussian_best_advantage(mu_m, s_m, mu_n, s_n)
    assert float(best.advantage) == pytest.approx(max(grid.max(), 0.0), abs=1e-6)
    if best.advantage > 0:
        assert float(gaussian_advantage(mu_m, s_m, mu_n, s_n, fpr=best.fpr)) == pytest.approx(float(best.advantage))


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="`fpr`"):
        gaussian_advantage(0, 1, 0, 1, fpr=0.0)
    with pytest.raises(ValueError, match="`sigma_member`.*> 0"):
        gaussian_advantage(0, -1, 0, 1, fpr=0.1)
    with pytest.raises(ValueError, match="`mu_nonmember`.*finite"):
        gaussian_best_advantage(0, 1, float("nan"), 1)


def _train_member_loss_variance(name: str, **params) -> float:
    """A 5-class task with label noise that a small MLP overfits; SGD with weight decay (as the paper's recipes)."""
    g = torch.Generator().manual_seed(0)
    n, d, c = 256, 20, 5
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, c, generator=g) + 2.0 * torch.randn(n, c, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d, 128), torch.nn.Tanh(), torch.nn.Linear(128, c))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    loss_fn = ccl.losses.create(name, **params)
    for epoch in range(50):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n, 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        member_ce = ccl.losses.functional.cross_entropy(model(x), y, reduction="none")
    return member_ce.var().item()


def test_concave_term_keeps_member_loss_variance_higher_than_ce():
    var_ce = _train_member_loss_variance("ce")
    var_ccel = _train_member_loss_variance("ccel", alpha=0.5)
    var_ccql = _train_member_loss_variance("ccql", alpha=0.5)
    # measured (seed 0): CE 0.024, CCEL 0.25, CCQL 0.24; require a clear factor, not a coin flip
    assert var_ccel > 3 * var_ce
    assert var_ccql > 3 * var_ce
