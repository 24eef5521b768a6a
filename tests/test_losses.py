"""Every loss against a per-sample float64 loop, autograd against closed-form gradients, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

import ccl
from ccl.losses import functional as F

torch.set_default_dtype(torch.float32)


def batch(n=16, c=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    target = torch.randint(0, c, (n,), generator=g)
    return logits, target


def probs_row(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


# ------------------------------------------------------------------ naive per-sample references (pure python)
def naive(name, row, y, **kw):
    p = probs_row(row)
    py = p[y]
    ce = -math.log(py)
    if name == "ce":
        return ce
    if name == "focal":
        return (1 - py) ** kw["gamma"] * ce
    if name == "ccel":
        a = kw["alpha"]
        conv = ce if kw.get("convex", "ce") == "ce" else (1 - py) ** kw["gamma"] * ce
        return kw.get("beta", 1.0) * (a * conv - (1 - a) * math.exp(py))
    if name == "ccql":
        a = kw["alpha"]
        return kw.get("beta", 1.0) * (a * ce - (1 - a) * (py + py * py / 2))
    if name == "label_smoothing":
        eps = kw["smoothing"]
        c = len(row)
        q = [eps / c + (1 - eps) * (k == y) for k in range(c)]
        return -sum(qk * math.log(pk) for qk, pk in zip(q, p, strict=True))
    if name == "confidence_penalty":
        h = -sum(pk * math.log(pk) for pk in p)
        return ce - kw["beta"] * h
    raise AssertionError(name)


CASES = [
    ("ce", {}),
    ("focal", {"gamma": 2.0}),
    ("focal", {"gamma": 0.5}),
    ("ccel", {"alpha": 0.5}),
    ("ccel", {"alpha": 0.2, "beta": 0.05}),
    ("ccel", {"alpha": 0.7, "convex": "focal", "gamma": 1.0}),
    ("ccql", {"alpha": 0.5}),
    ("label_smoothing", {"smoothing": 0.1}),
    ("confidence_penalty", {"beta": 0.1}),
]


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_matches_per_sample_loop(name, params, reduction):
    logits, target = batch()
    loss_fn = ccl.losses.create(name, reduction=reduction, **params)
    got = loss_fn(logits, target)
    ref = torch.tensor(
        [naive(name, row, int(y), **params) for row, y in zip(logits.tolist(), target, strict=True)],
        dtype=torch.float64,
    )
    ref = {"none": ref, "mean": ref.mean(), "sum": ref.sum()}[reduction]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_alpha_one_and_focal_gamma_zero_equal_cross_entropy():
    logits, target = batch(n=64, c=10)
    ref = TF.cross_entropy(logits, target, reduction="none")
    for concave in ("exp", "quadratic"):
        got = F.convex_concave_loss(logits, target, alpha=1.0, concave=concave, reduction="none")
        torch.testing.assert_close(got, ref)
    torch.testing.assert_close(F.focal_loss(logits, target, gamma=0.0, reduction="none"), ref)
    torch.testing.assert_close(F.cross_entropy(logits, target, reduction="none"), ref)
    torch.testing.assert_close(
        F.label_smoothing_loss(logits, target, smoothing=0.1), TF.cross_entropy(logits, target, label_smoothing=0.1)
    )


# ------------------------------------------------------------------ gradients
def dloss_dp(name, p, **kw):
    """Closed-form derivative of the loss as a function of p_y."""
    if name == "ce":
        return -1 / p
    if name == "focal":
        g = kw["gamma"]
        return g * (1 - p) ** (g - 1) * math.log(p) - (1 - p) ** g / p
    if name == "ccel":
        return kw["alpha"] * (-1 / p) - (1 - kw["alpha"]) * math.exp(p)
    if name == "ccql":
        return kw["alpha"] * (-1 / p) - (1 - kw["alpha"]) * (1 + p)
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "params"),
    [c for c in CASES if c[0] in ("ce", "focal", "ccql")] + [("ccel", {"alpha": 0.5}), ("ccel", {"alpha": 0.1})],
)
def test_gradient_wrt_true_logit_is_closed_form(name, params):
    logits, target = batch(n=32, c=6, seed=1)
    logits = logits.double().requires_grad_(True)
    loss = ccl.losses.create(name, reduction="sum", **params)(logits, target)
    (grad,) = torch.autograd.grad(loss, logits)
    got = grad.gather(1, target[:, None]).squeeze(1)
    p = torch.softmax(logits.detach().float(), 1).gather(1, target[:, None]).squeeze(1).tolist()
    ref = torch.tensor([dloss_dp(name, pi, **params) * pi * (1 - pi) for pi in p], dtype=torch.float32)
    torch.testing.assert_close(got.float(), ref, rtol=1e-4, atol=1e-5)


def test_gradient_magnitudes_match_the_paper_table():
    # REFERENCES.md: |dl/dz_y| at alpha=0.5; CE 0.900/0.500/0.100, CCEL 0.500/0.456/0.161 at p=0.1/0.5/0.9.
    for p, ce_ref, ccel_ref in [(0.1, 0.900, 0.500), (0.5, 0.500, 0.456), (0.9, 0.100, 0.161)]:
        z = torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float64, requires_grad=True)
        y = torch.tensor([0])
        for name, ref in (("ce", ce_ref), ("ccel", ccel_ref)):
            (g,) = torch.autograd.grad(ccl.losses.create(name)(z, y), z)
            assert abs(abs(g[0, 0].item()) - ref) < 1e-3


def test_full_gradients_of_label_smoothing_and_confidence_penalty():
    logits, target = batch(n=8, c=4, seed=2)
    z = logits.double().requires_grad_(True)
    p = torch.softmax(z.detach(), 1)
    onehot = TF.one_hot(target, 4).double()
    (g,) = torch.autograd.grad(F.label_smoothing_loss(z, target, smoothing=0.2, reduction="sum"), z)
    torch.testing.assert_close(g.double(), p - (0.8 * onehot + 0.2 / 4), rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(F.confidence_penalty_loss(z, target, beta=0.3, reduction="sum"), z)
    h = -(p * p.log()).sum(1, keepdim=True)
    torch.testing.assert_close(g.double(), p - onehot + 0.3 * p * (p.log() + h), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ numerics
@pytest.mark.parametrize("name", ccl.losses.available())
def test_extreme_logits_give_finite_loss_and_gradient(name):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [0.0, 0.0, 1e4], [3.0, -2.0, 1e4]], requires_grad=True)
    target = torch.tensor([0, 0, 2, 1])
    params = {"gamma": 0.3} if name == "focal" else {}
    loss_fn = ccl.losses.create(name, **params)
    for epoch in (0, 1):
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        loss = loss_fn(logits, target)
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_are_computed_in_float32(dtype):
    logits, target = batch(n=32, c=10)
    low = logits.to(dtype)
    for name in ("ce", "ccel", "ccql", "focal"):
        got = ccl.losses.create(name)(low, target)
        ref = ccl.losses.create(name)(low.float(), target)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin = torch.nn.Linear(10, 10)
        out = lin(logits)
        assert out.dtype == torch.bfloat16
        loss = ccl.losses.create("ccel")(out, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ------------------------------------------------------------------ concave terms (property-based)
@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.01, 0.99))
@pytest.mark.parametrize("term", [F.concave_exp, F.concave_quadratic])
def test_concave_terms_are_decreasing_and_concave(term, a, b, t):
    lo, hi = sorted((a, b))
    f = lambda v: term(torch.tensor(v, dtype=torch.float64)).item()  # noqa: E731
    if hi - lo > 1e-9:
        assert f(lo) > f(hi)
    mid = t * lo + (1 - t) * hi
    assert f(mid) >= t * f(lo) + (1 - t) * f(hi) - 1e-12


def test_custom_concave_callable_is_checked():
    logits, target = batch()
    cube = lambda p: -p - p**3  # noqa: E731  (decreasing, concave on [0, 1])
    got = ccl.losses.ConvexConcaveLoss(alpha=0.3, concave=cube)(logits, target)
    p = torch.softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    ref = (0.3 * TF.cross_entropy(logits, target, reduction="none") + 0.7 * (-p - p**3)).mean()
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="decreasing"):
        ccl.losses.ConvexConcaveLoss(concave=torch.exp)  # the public code's +exp(p_y): increasing
    with pytest.raises(ValueError, match="concave"):
        ccl.losses.ConvexConcaveLoss(concave=lambda p: (1 - p) ** 2)  # decreasing but convex
    with pytest.raises(TypeError, match="concave"):
        ccl.losses.ConvexConcaveLoss(concave=3)


# ------------------------------------------------------------------ RelaxLoss
def test_relaxloss_steps():
    logits, target = batch(n=64, c=5, scale=1.0)
    ce = TF.cross_entropy(logits, target)
    high = ce.item() + 1.0
    low = ce.item() / 4
    # even epochs: |L - alpha|, gradient ascent below alpha
    torch.testing.assert_close(F.relax_loss(logits, target, alpha=high, epoch=0), (ce - high).abs())
    z = logits.clone().requires_grad_(True)
    (g_relax,) = torch.autograd.grad(F.relax_loss(z, target, alpha=high, epoch=2), z)
    (g_ce,) = torch.autograd.grad(TF.cross_entropy(z, target), z)
    torch.testing.assert_close(g_relax, -g_ce)
    # odd epochs, L > alpha: plain CE
    torch.testing.assert_close(F.relax_loss(logits, target, alpha=low, epoch=1), ce)
    # odd epochs, L <= alpha: posterior flattening against soft targets
    p = torch.softmax(logits, 1)
    for upper in (1.0, 0.3):
        rows = []
        for i in range(64):
            y = int(target[i])
            t = min(p[i, y].item(), upper)
            q = torch.full((5,), (1 - t) / 4)
            q[y] = t
            rows.append(-(q * p[i].log()).sum())
        ref = torch.stack(rows)
        got = F.relax_loss(logits, target, alpha=high, epoch=1, upper=upper)
        torch.testing.assert_close(got, ref.mean(), rtol=1e-5, atol=1e-6)
        got = F.relax_loss(logits, target, alpha=high, epoch=1, upper=upper, variant="cifar")
        wrong = (logits.argmax(1) != target).float()
        ref_cifar = (wrong * ref - TF.cross_entropy(logits, target, reduction="none")).mean()
        torch.testing.assert_close(got, ref_cifar, rtol=1e-5, atol=1e-6)


def test_relaxloss_module_follows_set_epoch():
    logits, target = batch(n=64, c=5, scale=1.0)
    alpha = TF.cross_entropy(logits, target).item() + 1.0
    loss_fn = ccl.losses.create("relaxloss", alpha=alpha)
    even = loss_fn(logits, target)
    loss_fn.set_epoch(1)
    odd = loss_fn(logits, target)
    assert not torch.allclose(even, odd)
    with pytest.raises(ValueError, match="reduction"):
        ccl.losses.RelaxLoss(reduction="none")


# ------------------------------------------------------------------ registry and errors
def test_registry_lists_and_rejects_unknown_names():
    names = ccl.losses.available()
    for required in ("ce", "focal", "ccel", "ccql", "label_smoothing", "confidence_penalty", "relaxloss"):
        assert required in names
    with pytest.raises(ValueError, match="Valid losss|ccel") as err:
        ccl.losses.create("cce1")
    assert "ccel" in str(err.value) and "relaxloss" in str(err.value)
    with pytest.raises(ValueError, match="alpah.*alpha"):
        ccl.losses.create("ccel", alpah=0.3)
    assert isinstance(ccl.losses.create("ccql"), ccl.losses.ConvexConcaveLoss)
    assert ccl.losses.create("ccql").concave == "quadratic"


@pytest.mark.parametrize(
    ("build", "exc", "pattern"),
    [
        (lambda: ccl.losses.ConvexConcaveLoss(alpha=1.5), ValueError, r"`alpha`.*\[0, 1\].*1.5"),
        (lambda: ccl.losses.ConvexConcaveLoss(alpha=-0.1), ValueError, r"`alpha`.*-0.1"),
        (lambda: ccl.losses.ConvexConcaveLoss(alpha="0.5"), TypeError, r"`alpha`.*real number"),
        (lambda: ccl.losses.FocalLoss(gamma=-1.0), ValueError, r"`gamma`.*-1.0"),
        (lambda: ccl.losses.ConvexConcaveLoss(reduction="avg"), ValueError, r"`reduction`.*'mean'.*'avg'"),
        (lambda: ccl.losses.ConvexConcaveLoss(concave="log"), ValueError, r"`concave`.*'log'"),
        (lambda: ccl.losses.ConvexConcaveLoss(beta=0.0), ValueError, r"`beta`"),
    ],
)
def test_bad_options_are_named(build, exc, pattern):
    with pytest.raises(exc, match=pattern):
        build()


@pytest.mark.parametrize(
    ("logits", "target", "exc", "pattern"),
    [
        (torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), ValueError, r"`target`.*\[0, 3\).*3"),
        (torch.zeros(4, 3), torch.tensor([0, 1, -1, 0]), ValueError, r"`target`.*-1"),
        (torch.zeros(4, 3), torch.zeros(4), TypeError, r"`target`.*integer.*float32"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), ValueError, r"`target`.*\(4,\).*\(5,\)"),
        (torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), ValueError, r"`target`"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), ValueError, r"`logits`.*\(N, C\).*\(4,\)"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), ValueError, r"`logits`.*finite"),
        (torch.tensor([[0.0, float("inf")]]), torch.tensor([0]), ValueError, r"`logits`.*finite"),
        ([[0.0, 1.0]], torch.tensor([0]), TypeError, r"`logits`.*Tensor"),
    ],
)
@pytest.mark.parametrize("name", ["ce", "ccel", "focal", "label_smoothing", "confidence_penalty", "relaxloss"])
def test_bad_batches_are_named(name, logits, target, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ccl.losses.create(name)(logits, target)


def test_public_names_import():
    for module in (ccl, ccl.losses, ccl.losses.functional, ccl.theory, ccl.attacks, ccl.metrics, ccl.signals):
        for name in module.__all__:
            assert getattr(module, name) is not None


# ------------------------------------------------------------------ the fused fast path against plain autograd
def _autograd_reference(name, logits, target, **kw):
    """The obviously correct version: every term through autograd from a float64 log_softmax."""
    log_p = torch.log_softmax(logits.double(), 1)
    ce = -log_p.gather(1, target[:, None]).squeeze(1)
    p = torch.exp(-ce)
    focal = lambda g: (1 - p).clamp_min(1e-300) ** g * ce  # noqa: E731
    if name == "ce":
        return ce
    if name == "focal":
        return focal(kw["gamma"])
    conv = ce if kw.get("convex", "ce") == "ce" else focal(kw["gamma"])
    concave = -torch.exp(p) if name == "ccel" else -p - p**2 / 2
    return kw.get("beta", 1.0) * (kw["alpha"] * conv + (1 - kw["alpha"]) * concave)


FAST_CASES = [
    ("ce", {}),
    ("focal", {"gamma": 2.0}),
    ("focal", {"gamma": 0.5}),
    ("focal", {"gamma": 1.0}),
    ("ccel", {"alpha": 0.3}),
    ("ccel", {"alpha": 0.5, "beta": 0.05, "convex": "focal", "gamma": 2.0}),
    ("ccql", {"alpha": 0.5}),
    ("ccql", {"alpha": 0.8, "convex": "focal", "gamma": 0.5}),
    ("ccel", {"alpha": 0.4, "convex": "focal", "gamma": 0.0}),
    ("ccel", {"alpha": 0.0}),
    ("ccql", {"alpha": 1.0}),
]


@pytest.mark.parametrize(("name", "params"), FAST_CASES)
@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])
def test_fused_gradient_equals_autograd_of_the_plain_formula(name, params, scale):
    logits, target = batch(n=64, c=7, seed=3, scale=scale)
    z = logits.clone().requires_grad_(True)
    weights = torch.rand(64, generator=torch.Generator().manual_seed(1))  # a non-uniform upstream gradient
    got = ccl.losses.create(name, reduction="none", **params)(z, target)
    (g_got,) = torch.autograd.grad((got * weights).sum(), z)
    z64 = logits.double().requires_grad_(True)
    ref = _autograd_reference(name, z64, target, **params)
    (g_ref,) = torch.autograd.grad((ref * weights.double()).sum(), z64)
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_gradient_comes_back_in_the_logits_dtype(dtype):
    logits, target = batch(n=16, c=5)
    z = logits.to(dtype).requires_grad_(True)
    ccl.losses.create("ccel")(z, target).backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()


def test_closed_form_slopes_leave_the_log_probabilities_they_read_untouched():
    log_p_y = -torch.rand(50, 1) * 3
    for convex, gamma in (("ce", 2.0), ("focal", 0.0), ("focal", 2.0)):
        for concave in ("exp", "quadratic"):
            before = log_p_y.clone()
            F._ccl_value_and_slope(log_p_y, 0.5, 0.3, concave, convex, gamma, 2.0)
            assert torch.equal(log_p_y, before), (convex, gamma, concave)
    before = log_p_y.clone()
    F._focal_of_log_p(log_p_y, 1.0, 2.0)
    assert torch.equal(log_p_y, before)


# ------------------------------------------------------------------ the one fused node: closed form vs autograd
def _fused_terms():
    yield "ce", lambda lp, s: F._focal_of_log_p(lp, s, 0.0)
    yield "focal", lambda lp, s: F._focal_of_log_p(lp, s, 1.5)
    for alpha in (0.0, 0.3, 1.0):
        for concave in ("exp", "quadratic"):
            for convex, beta in (("ce", 1.0), ("focal", 0.2)):
                term = lambda lp, s, a=alpha, f=concave, c=convex, b=beta: F._ccl_value_and_slope(  # noqa: E731
                    lp, s, a, f, c, 1.0, b
                )
                yield f"ccl-{alpha}-{concave}-{convex}", term


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("n", "c"), [(1, 2), (6, 3), (12, 10)])
def test_fused_node_passes_gradcheck_in_float64(reduction, n, c):
    logits, target = batch(n=n, c=c, seed=n)
    z = logits.double().requires_grad_(True)
    for name, term in _fused_terms():
        fn = lambda z, t=term: F._LossOfLogits.apply(z, target[:, None], t, reduction)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, fast_mode=True), name


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("n", "c"), [(1, 2), (64, 7), (300, 100)])
@pytest.mark.parametrize(("name", "params"), FAST_CASES)
def test_fused_loss_and_gradient_equal_autograd_for_every_reduction(name, params, n, c, reduction):
    logits, target = batch(n=n, c=c, seed=c, scale=4.0)
    z = logits.double().requires_grad_(True)  # the public function computes in float32: compare at its precision
    got = ccl.losses.create(name, reduction=reduction, **params)(z, target)
    (g_got,) = torch.autograd.grad(got.sum(), z)
    z64 = logits.double().requires_grad_(True)
    ref = F._reduce(_autograd_reference(name, z64, target, **params), reduction)
    (g_ref,) = torch.autograd.grad(ref.sum(), z64)
    assert got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ["ccel", "ccql", "focal"])
def test_fused_losses_are_one_autograd_node_on_the_logits(name):
    logits, target = batch(n=8, c=4)
    z = logits.requires_grad_(True)
    loss = ccl.losses.create(name)(z, target)
    assert type(loss.grad_fn).__name__ == "_LossOfLogitsBackward"
    assert [type(f).__name__ for f, _ in loss.grad_fn.next_functions if f is not None] == ["AccumulateGrad"]


def test_fused_losses_of_an_empty_batch():
    z = torch.zeros(0, 3, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    for reduction in ("none", "sum"):
        loss = ccl.losses.create("ccel", reduction=reduction)(z, y)
        (g,) = torch.autograd.grad(loss.sum(), z)
        assert loss.shape == ((0,) if reduction == "none" else ()) and g.shape == (0, 3)
    with pytest.raises(ValueError, match="non-empty batch"):
        ccl.losses.create("ccel")(z, y)
