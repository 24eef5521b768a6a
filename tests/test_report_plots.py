"""The report's plots: the thinned step curves stay where the full ones are."""

from __future__ import annotations

import numpy as np

from ccl import metrics
from ccl.report import _thin_steps


def test_thinned_roc_keeps_every_point_within_one_cell_and_far_fewer_vertices():
    rng = np.random.default_rng(0)
    m = rng.random(3000) < 0.5
    s = rng.normal(size=3000) + 0.8 * m
    curve = metrics.roc_curve(s, m)
    keep = curve.fpr > 0
    x, y = curve.fpr[keep], np.maximum(curve.tpr[keep], 1e-4)
    tx, ty = _thin_steps(x, y, decades=0.004)
    assert (tx[0], ty[0], tx[-1], ty[-1]) == (x[0], y[0], x[-1], y[-1])
    assert np.isin(tx, x).all() and tx.size < x.size / 3
    # every point of the full curve lies in the grid cell of a kept vertex: within 0.004 decades on both axes
    lx, ly, ltx, lty = np.log10(x), np.log10(y), np.log10(tx), np.log10(ty)
    near = (np.abs(lx[:, None] - ltx[None]) < 0.004) & (np.abs(ly[:, None] - lty[None]) < 0.004)
    assert near.any(1).all()


def test_short_curves_are_left_whole():
    x, y = np.array([0.1, 0.5]), np.array([0.2, 1.0])
    assert all(np.array_equal(a, b) for a, b in zip(_thin_steps(x, y), (x, y), strict=True))
