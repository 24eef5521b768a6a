"""LiRA a chunk of records at a time: the same scores as all records at once, and a bounded working set.

The reference for the scores is LiRA as it was written before chunking: phi of all the logits at once with
`signals.scaled_logit` (torch, validated), one `gaussian_fit` per side, the score formula. The memory tests are
deterministic: they count the records each step touches and the bytes numpy allocates (tracemalloc), not RSS.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from ccl import attacks, signals
from ccl.attacks import AttackInputs, lira


def _inputs(seed=0, n=30, k=8, c=5, a=1):
    """Random logits; each record IN for exactly half of the reference models."""
    rng = np.random.default_rng(seed)
    reference_in = np.argsort(rng.random((k, n)), axis=0) < k // 2
    return AttackInputs(
        rng.normal(size=(n, a, c)) * 3, rng.integers(0, c, n), rng.normal(size=(k, n, a, c)) * 3, reference_in
    )


def _all_at_once(inp: AttackInputs, *, online: bool, variance: str) -> np.ndarray:
    """LiRA over all records at once, as before chunking."""
    y = inp.labels[:, None]
    phi_target = signals.scaled_logit(inp.target_logits, y)  # (N, A)
    phi_ref = signals.scaled_logit(inp.reference_logits, y)  # (K, N, A)
    mu_out, s_out = lira.gaussian_fit(phi_ref, ~inp.reference_in, variance=variance)
    if not online:
        return torch.special.log_ndtr(torch.from_numpy((phi_target - mu_out) / s_out)).numpy().mean(-1)
    mu_in, s_in = lira.gaussian_fit(phi_ref, inp.reference_in, variance=variance)
    log_pdf = lira._log_normal_pdf
    return (log_pdf(phi_target, mu_in, s_in) - log_pdf(phi_target, mu_out, s_out)).mean(-1)


def test_scaled_logit_float64_matches_scaled_logit():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 50, 3, 6)) * 5  # (K, N, A, C)
    z[0, 0, 0] = [1e4, 0, 0, 0, 0, 0]  # p_y rounds to 1
    z[0, 1, 0] = [-1e4, 0, 0, 0, 0, 0]  # p_y rounds to 0
    y = rng.integers(0, 6, 50)
    y[:2] = 0
    got = signals.scaled_logit_float64(z, y[:, None])
    np.testing.assert_allclose(got, signals.scaled_logit(z, y[:, None]), rtol=1e-12, atol=1e-12)
    assert got[0, 0, 0] == pytest.approx(1e4 - np.log(5))


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("variance", ["per_example", "global"])
@pytest.mark.parametrize("augmentations", [1, 3])
@pytest.mark.parametrize("chunk_records", [1, 7, 1000])
def test_lira_in_chunks_equals_all_records_at_once(monkeypatch, online, variance, augmentations, chunk_records):
    inp = _inputs(seed=1, n=30, k=8, a=augmentations)
    k, _, a, c = inp.reference_logits.shape
    monkeypatch.setattr(lira, "CHUNK_BYTES", chunk_records * 8 * k * a * c)
    got = attacks.LiRA(online=online, variance=variance).score(inp)
    np.testing.assert_allclose(got, _all_at_once(inp, online=online, variance=variance), rtol=1e-10, atol=1e-10)


def test_lira_turns_at_most_a_chunk_of_records_into_phi_per_step(monkeypatch):
    inp = _inputs(seed=2, n=50, k=8)
    k, n, a, c = inp.reference_logits.shape
    monkeypatch.setattr(lira, "CHUNK_BYTES", 7 * 8 * k * a * c + 5)  # 7 records' float64 logits
    seen = []
    phi = signals.scaled_logit_float64

    def recording(logits, labels):
        seen.append(logits.shape)
        return phi(logits, labels)

    monkeypatch.setattr(signals, "scaled_logit_float64", recording)
    got = attacks.LiRA(variance="global").score(inp)
    reference_calls = [s for s in seen if len(s) == 4]  # (K, n, A, C); the target's are (n, A, C)
    assert max(s[1] for s in reference_calls) == 7
    assert sum(s[1] for s in reference_calls) == n  # every record once
    assert max(s[0] for s in seen if len(s) == 3) == 7
    np.testing.assert_allclose(got, _all_at_once(inp, online=True, variance="global"), rtol=1e-10, atol=1e-10)


def test_the_default_chunk_is_a_small_part_of_large_logits():
    """At the benchmark's size (N=50,000, K=64, C=10) a chunk is at most 8 MiB, under 7% of the 128 MB float32
    logits; a chunk is never empty, even when one record alone exceeds the budget."""
    shape = np.empty((64, 50_000, 1, 10), np.float32)  # no pages touched: only the shape is read
    chunk = lira.records_per_chunk(shape, chunk_bytes=lira.CHUNK_BYTES)
    assert chunk * 64 * 10 * 8 <= lira.CHUNK_BYTES <= 0.07 * shape.nbytes
    assert lira.records_per_chunk(shape, chunk_bytes=1) == 1


@pytest.mark.parametrize("online", [True, False])
def test_lira_allocates_a_small_part_of_its_logits(monkeypatch, online):
    """The bytes numpy allocates while scoring, counted by tracemalloc (it sees every numpy buffer; torch's are
    invisible to it, and LiRA's only torch call, offline's log_ndtr, works on an (N, A) array). With 256 KiB
    chunks (2.6% of the 10 MB float64 reference logits here): 0.07x the logits. All records at once, the numpy
    part alone was 0.22x (and torch's temporaries, unseen here, several times the logits)."""
    inp = _inputs(seed=3, n=2000, k=64, c=10)
    monkeypatch.setattr(lira, "CHUNK_BYTES", 256 * 2**10)
    attack = attacks.LiRA(online=online, variance="per_example")
    attack.score(_inputs(seed=3, n=20, k=64, c=10))  # first-call costs (lazy imports) outside the count
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        attack.score(inp)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 0.15 * inp.reference_logits.nbytes
