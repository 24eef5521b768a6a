"""Label-only membership inference (Choquette-Choo, Tramèr, Carlini, Papernot, ICML 2021; Li and Zhang, CCS 2021).

A defense may change the confidence scores a model releases (round them, perturb them as MemGuard does, release
the top-1 label only), but not its predicted labels without giving up accuracy. These attacks read predicted
labels only: a member keeps its true label under more perturbations of its input than a non-member does.

- Queries (`perturbed_queries`): `Q` perturbed copies of each record, deterministic by seed.
  - `kind="augment"` (the data-augmentation attack): images `(N, C, H, W)` are randomly cropped with zero padding
    (4 pixels) and flipped horizontally with probability 1/2 (`ccl.data.transforms.augment_batch`, the training
    augmentation); other records get Gaussian noise `N(0, scale^2 std_j^2)` on each feature `j`.
  - `kind="noise"` (the noise-robustness attack): Gaussian noise of increasing scale, copy `q = 0..Q-1` with
    standard deviation `scale * (q + 1) / Q * std_j` on each feature (or pixel) `j`. The fraction of copies
    that keep their label is then a discretised area under the accuracy-versus-noise curve, a proxy for the
    distance to the decision boundary.
  `std_j` is the per-feature standard deviation over the records (pass `std` to use one for every call).
- Score: the fraction of the `Q` copies predicted as the true label (`correct_fraction`; higher: member).
- Calibrated (`calibrated=True`, or by default when reference models' labels are given with `K >= 2`): the target's
  fraction minus the mean fraction of the reference models that did not train on the record (OUT), the
  difference calibration of Watson, Guo, Cormode and Sablayrolles (ICLR 2022): a record every model keeps
  (an easy one) no longer looks like a member. Every record needs at least one OUT reference model.

The two kinds are the same computation on differently generated queries: one class, `LabelOnlyAttack`, reads
`target_perturbed_labels` (`kind="augment"`) or `target_noise_labels` (`kind="noise"`) and the matching
reference fields of `AttackInputs`, registered as `label_only_augmentation` and `label_only_noise`.

The decision-boundary-distance attack (Choquette-Choo et al. Sec. 4.3; Li and Zhang's boundary attack), which
needs adaptive queries, is `label_only_boundary` (`ccl.attacks.boundary`, `ccl.attacks.statistic`); `kind="noise"`
approximates that distance with `Q` non-adaptive queries.

Scores take the `Q + 1` values `0, 1/Q, ..., 1` (calibrated: differences of such fractions); many records tie,
so TPR at a low FPR is coarse unless `Q` is large.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .._checks import check_choice, check_in_range, check_positive_int, expected
from .._device import resolve_device
from ..data.transforms import augment_batch
from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from .base import Attack
from .inputs import AttackInputs, NotEnoughReferencesError

__all__ = [
    "KINDS",
    "LabelOnlyAttack",
    "calibrated_correct_fraction",
    "chunk_seed",
    "correct_fraction",
    "labels_on_perturbed_queries",
    "predict_perturbed_labels",
    "perturbed_queries",
]

KINDS = ("augment", "noise")
#: the `AttackInputs` fields (target, reference models) each kind reads
FIELDS = {
    "augment": ("target_perturbed_labels", "reference_perturbed_labels"),
    "noise": ("target_noise_labels", "reference_noise_labels"),
}
NAMES = {"augment": "label_only_augmentation", "noise": "label_only_noise"}
#: records per chunk in `predict_perturbed_labels` (part of what determines its queries)
CHUNK = 1024


# ----------------------------------------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------------------------------------
def check_seed(seed: Any) -> int:
    """A non-negative integer seed (numpy's SeedSequence takes no negative ones)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgumentTypeError(expected("seed", "a non-negative integer", seed))
    if seed < 0:
        raise InvalidArgumentError(expected("seed", "a non-negative integer", seed))
    return int(seed)


def _records(x: Any) -> torch.Tensor:
    xt = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if not xt.is_floating_point():
        raise InvalidArgumentTypeError(expected("x", "floating-point records (N, ...)", xt.dtype))
    if xt.ndim < 2 or xt.shape[0] < 1:
        raise InvalidArgumentError(expected("x", "a non-empty batch of records of shape (N, ...)", tuple(xt.shape)))
    return xt.detach()


def _feature_std(xt: torch.Tensor, std: Any) -> torch.Tensor:
    """Per-feature standard deviations: `std` checked (broadcastable to a record), or over the records of `xt`."""
    if std is None:
        return xt.std(0, unbiased=False)
    sd = std.detach() if isinstance(std, torch.Tensor) else torch.as_tensor(np.asarray(std, dtype=np.float64))
    what = f"per-feature standard deviations broadcastable to {tuple(xt.shape[1:])}"
    try:
        shape = torch.broadcast_shapes(sd.shape, xt.shape[1:])
    except RuntimeError:
        raise InvalidArgumentError(expected("std", what, f"shape {tuple(sd.shape)}")) from None
    if shape != xt.shape[1:]:
        raise InvalidArgumentError(expected("std", what, f"shape {tuple(sd.shape)}"))
    sd = sd.to(device=xt.device, dtype=xt.dtype)
    if not bool(torch.isfinite(sd).all()) or bool((sd < 0).any()):
        raise InvalidArgumentError(expected("std", "finite non-negative standard deviations", "other values"))
    return sd


def perturbed_queries(
    x: Any,
    *,
    kind: str,
    num: int,
    scale: float | None = None,
    seed: int = 0,
    std: Any = None,
    padding: int = 4,
) -> Any:
    """`num` perturbed copies `(Q, N, ...)` of the records `x (N, ...)`, deterministic by `seed`.

    Args:
        x: records, a floating-point torch tensor or numpy array (the result has the same kind, dtype and
            device); images are `(N, C, H, W)`.
        kind: "augment" (images: random crop with zero `padding` + horizontal flip, `scale` unused; other
            records: Gaussian noise of standard deviation `scale * std_j`) or "noise" (Gaussian noise of
            standard deviation `scale * (q + 1) / num * std_j` for copy `q`, images included).
        num: the number of copies `Q`.
        scale: the noise scale in units of each feature's standard deviation (required unless images are
            augmented).
        seed: the random stream; the same seed gives the same copies (on the same device). Query every model of
            an audit with the same seed, so that the reference models see the target's queries.
        std: per-feature standard deviations broadcastable to `x.shape[1:]`; default: over the records of `x`
            (pass one, e.g. the population's, when querying records in several calls).
    """
    kind = check_choice("kind", kind, KINDS)
    num = check_positive_int("num", num)
    seed = check_seed(seed)
    xt = _records(x)
    g = torch.Generator(device=xt.device).manual_seed(seed)
    if kind == "augment" and xt.ndim == 4:
        padding = check_positive_int("padding", padding, minimum=0)
        out = torch.stack([augment_batch(xt, g, padding=padding) for _ in range(num)])
    else:
        if scale is None:
            what = "images" if xt.ndim == 4 else "records that are not images (N, C, H, W)"
            raise InvalidArgumentError(
                expected(
                    "scale", f"a noise scale >= 0 (in feature standard deviations) for kind={kind!r} on {what}", None
                )
            )
        scale = check_in_range("scale", scale, low=0.0)
        sd = _feature_std(xt, std)
        steps = torch.ones(num) if kind == "augment" else torch.arange(1, num + 1) / num
        sigma = (scale * steps).to(xt.dtype).to(xt.device).view(-1, *([1] * xt.ndim))  # (Q, 1, ..., 1)
        noise = torch.randn((num, *xt.shape), generator=g, device=xt.device, dtype=xt.dtype)
        out = xt[None] + sigma * sd * noise
    return out if isinstance(x, torch.Tensor) else out.cpu().numpy()


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of the `chunk`-th block of `CHUNK` records in `predict_perturbed_labels`."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


@torch.no_grad()
def predict_perturbed_labels(
    model: nn.Module,
    x: torch.Tensor,
    *,
    kind: str,
    num: int,
    scale: float | None = None,
    seed: int = 0,
    std: Any = None,
    device: str | torch.device = "auto",
) -> np.ndarray:
    """The model's predicted labels `(N, Q)` int64 on `perturbed_queries` of `x`, in eval mode.

    The queries are drawn on the CPU (the same on every device) in blocks of `CHUNK` records, block `b` with
    `seed=chunk_seed(seed, b)`, and `std` defaults to the standard deviation over all of `x`: with the same
    `x`, options and seed, every model gets the same queries. The model is moved to `device`; the memory is
    that of `CHUNK * Q` records (about 400 MB for 32 copies of 32x32x3 images in float32)."""
    xt = _records(x).cpu()
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    model.to(device)
    try:
        labels = labels_on_perturbed_queries(
            lambda q: model(q.to(device)), xt, kind=kind, num=num, scale=scale, seed=seed, std=std
        )
    finally:
        model.train(was_training)
    return labels.numpy().astype(np.int64)


@torch.no_grad()
def labels_on_perturbed_queries(
    forward, x: torch.Tensor, *, kind: str, num: int, scale: float | None, seed: int, std: Any = None
) -> torch.Tensor:
    """The argmax of `forward(q) -> (..., B, C)` on the queries of `predict_perturbed_labels`, `(..., N, Q)` on
    the CPU: blocks of `CHUNK` records of the CPU records `x`, block `b` drawn with `chunk_seed(seed, b)`, `std`
    by default over all of `x`. `forward` may answer for several models at once (leading dimensions)."""
    sd = _feature_std(x, std)
    out = []
    for b, start in enumerate(range(0, x.shape[0], CHUNK)):
        queries = perturbed_queries(
            x[start : start + CHUNK], kind=kind, num=num, scale=scale, seed=chunk_seed(seed, b), std=sd
        )
        out.append(torch.stack([forward(q).argmax(-1).cpu() for q in queries], -1))
    return torch.cat(out, -2)


# ----------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------
def correct_fraction(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`(..., N, Q)` predicted labels and `(N,)` true labels to `(..., N)`: the fraction of queries correct."""
    return (np.asarray(predicted) == np.asarray(labels)[:, None]).mean(-1)


def calibrated_correct_fraction(
    target: np.ndarray, reference: np.ndarray, reference_in: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """`correct_fraction(target) - mean over OUT reference models k of correct_fraction(reference[k])`, `(N,)`."""
    out = ~reference_in
    count = out.sum(0)
    if count.size and int(count.min()) < 1:
        raise NotEnoughReferencesError(
            f"The calibrated label-only attack needs at least 1 OUT reference model per record, but "
            f"{int((count < 1).sum())} record(s) have none: train more reference models (in IN/OUT pairs)."
        )
    ref = correct_fraction(reference, labels)  # (K, N)
    return correct_fraction(target, labels) - (ref * out).sum(0) / count


class LabelOnlyAttack(Attack):
    """The label-only attack on queries of `kind` ("augment" or "noise"); see the module docstring.

    `calibrated`: None (default) calibrates with the reference models' labels when they are given for `K >= 2`
    models, True requires them, False uses the target's fraction alone."""

    access = "labels"

    def __init__(self, *, kind: str = "augment", calibrated: bool | None = None) -> None:
        self.kind = check_choice("kind", kind, KINDS)
        if calibrated is not None and not isinstance(calibrated, bool):
            raise InvalidArgumentTypeError(
                expected(
                    "calibrated", "True, False or None (calibrate when reference models' labels are given)", calibrated
                )
            )
        self.calibrated = calibrated
        self.name = NAMES[self.kind]

    @property
    def min_references(self) -> int:  # type: ignore[override]
        return 2 if self.calibrated else 0

    @property
    def needs_inputs(self) -> tuple[str, ...]:
        """The optional `AttackInputs` fields that must be present (`ccl.attacks.runnable` reads it)."""
        target, reference = FIELDS[self.kind]
        return (target, reference) if self.calibrated else (target,)

    def score(self, inputs: AttackInputs) -> np.ndarray:
        target_field, reference_field = FIELDS[self.kind]
        hint = (
            f"pass the models' predicted labels on perturbed copies of each record (`{target_field}` (N, Q) for "
            f"the target, `{reference_field}` (K, N, Q) for the reference models; see "
            f"ccl.attacks.label_only.predict_perturbed_labels with kind={self.kind!r})."
        )
        inputs.require_inputs(self.name, (target_field,), hint)
        target = getattr(inputs, target_field)
        reference = getattr(inputs, reference_field)
        calibrate = (
            self.calibrated if self.calibrated is not None else (reference is not None and inputs.num_references >= 2)
        )
        if not calibrate:
            return correct_fraction(target, inputs.labels)
        inputs.require_references(self.name, 2)
        inputs.require_inputs(self.name, (reference_field,), hint)
        return calibrated_correct_fraction(target, reference, inputs.reference_in, inputs.labels)
