"""The `dpsgd` defense, DP-SGD through Opacus: calibration, per-sample clipping and noise, Poisson sampling,
accounting.

`ccl` uses three pieces of Opacus (an optional extra: `pip install 'ccl[dp]'`): `GradSampleModule` for the
per-sample gradients, `DPOptimizer` for clipping each to `max_grad_norm`, summing, adding Gaussian noise of
standard deviation `noise_multiplier * max_grad_norm` and averaging over the expected batch size, and the RDP
(or PRV) accountant. The batches are drawn here, with Poisson sampling (each record in each step independently
with probability q = batch_size / n, n / batch_size steps per epoch), from the epoch's seeded generator; the
noise comes from a generator seeded by (seed, epoch) too, so a resumed model is bit-identical to an
uninterrupted one and has spent the same epsilon (it depends only on the number of steps taken).

Plain MLPs (Linear layers and elementwise activations, `is_plain_mlp`) take a faster path by default
(`DPTrainer(per_sample="auto")`, or `"ghost"`): Opacus' hooks keep every record's gradient of every layer (1.35 GB
per step for Purchase100's MLP at batch 256), while the per-sample norms of a Linear layer need only its inputs
a and output gradients delta, `|g_i|^2 = |a_i|^2 |delta_i|^2 (+ |delta_i|^2 for the bias)` ("ghost norms";
Goodfellow, 2015; Li et al., ICLR 2022). One extra backward pass through the activations gives the deltas; each
record's gradient of the logits is then scaled by its clipping factor on the way back, so the ordinary backward
pass leaves the clipped sum in `.grad`, and Opacus' `DPOptimizerFastGradientClipping` adds the same noise as
`DPOptimizer` (given the same generator state) and averages over the expected batch size. A layout where the
formula does not hold (a layer applied twice, inputs with a sequence dimension) gets its norms from `torch.func`
instead. The same update as the hooks up to float rounding (`tests/test_dp_fast_path.py`: against a loop of
single-record backward passes, and against Opacus); 2.5x an ordinary SGD step on Purchase100's MLP against 92x
with the hooks (`python benchmarks/run.py --only dp_step`, benchmarks/RESULTS.md).

The noise moves the weights as well as the gradient: each step adds N(0, (sigma C / B)^2) to every coordinate of
the averaged gradient (B the expected batch size), so under SGD with momentum beta the weights random-walk by
about `lr sigma C / (B (1 - beta)) * sqrt(3 T / 8)` per coordinate after T steps of a cosine schedule. Where the
clipped steps are too small to train, that walk can help more than it blurs: on Location30 with
examples/location30.yaml's recipe (MLP 1024-512-256-128 with Tanh, whose default initial weights shrink the
signal at every layer; lr 0.01, momentum 0.9, batch 128, 800 steps; mean test accuracy of 3 seeds), the
noise-free clipped model reaches only 20.1%; epsilon 4's walk (sigma 2.26: 0.031 per weight; a 1024-wide layer's
weights measured 0.035 after training against 0.018 initially) doubles the inner layers' weights, and it reaches
27.8% against epsilon 16's 22.1%. Without noise but with weights inflated by the same walk at initialisation:
36.9%. The calibration, the clipping and the noise are as specified (tests/test_dp_fast_path.py); the recipe is
not one for DP-SGD. At lr 0.03 the order is the expected one (epsilon 16: 48.2%, epsilon 4: 32.9%), and at lr 0.1
(43.7% and 6.1%, one seed) the walk of epsilon 4 (0.31 per weight) is all the weights hold: tune DP-SGD's
learning rate with its noise, not without it.

Known deviation: a Poisson batch that draws no record at all (probability (1 - q)^n per step: about 1e-58 on
Location30's 2,004 members at q = 0.064, but not negligible on a few dozen records) is skipped without a noisy
step, while the accountant counts every step. The released weights then reveal that such a step was empty.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import check_choice, check_in_range, expected
from .._hooks import DefenseHooks, Procedure, TrainingSetup, legacy_identity
from ..errors import InvalidArgumentError, MissingDependencyError
from .base import Defense, per_sample_loss

__all__ = ["DPSGD", "DPAccounting", "DPTrainer", "calibrate_noise", "create", "epsilon_spent", "is_plain_mlp"]

NAME = "dpsgd"
DOC = "DP-SGD (Opacus): per-sample clipping and noise, epsilon from the accountant"
#: DP-SGD's own recipe when its entry gives none (`ccl.config.DefenseSpec.train`; the rest is the experiment's):
#: plain SGD, because momentum sums the noise of the last 1 / (1 - beta) steps into every update; and the learning
#: rate chosen for accuracy on the defender's reserve among 0.1, 0.5 and 2, because DP-SGD's best learning rate
#: depends on its noise and clipping and is often 10x the non-private one's (Ponomareva et al., "How to DP-fy ML",
#: 2023; Aerni, Zhang and Tramer, CCS 2024, compare against DP-SGD tuned for utility). On the demo's digits at
#: epsilon 8 (3 seeds) this reaches 64.5% test accuracy where CE's recipe reaches 60.2% and CE itself 88.3%; with
#: batches of about all 135 members and 100 epochs as well (the demo's DP-SGD), 71.3% (README, "Each defense at
#: its own recipe").
RECIPE = {"momentum": 0.0, "lr": [0.1, 0.5, 2.0]}

PER_SAMPLE = ("opacus", "ghost", "auto")
# layers without parameters that act on each record alone, element by element or by reshaping it
_ELEMENTWISE = (
    nn.Tanh,
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Flatten,
)
# per-sample gradients of up to this many bytes per parameter tensor at a time: under glibc's largest mmap
# threshold (32 MiB), so the blocks come from the heap again each step instead of fresh pages faulted in
_CHUNK_BYTES = 24 * 2**20


def _opacus():
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "DP-SGD needs Opacus, which is not installed: pip install 'ccl[dp]' (Opacus needs torch >= 2.6)."
        ) from None
    import opacus

    return opacus


@functools.lru_cache(maxsize=64)
def calibrate_noise(epsilon: float, delta: float, *, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier with which `steps` Poisson-sampled steps at `sample_rate` spend at most
    (epsilon, delta), from Opacus' accountant (cached: every model of an audit shares it). It searches to within
    0.01 of epsilon from below; `epsilon_spent` reports what the steps actually spend."""
    _opacus()
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha": still an upper bound
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


@functools.lru_cache(maxsize=64)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple:
    from opacus.accountants.analysis import rdp
    from opacus.accountants.rdp import RDPAccountant

    orders = tuple(RDPAccountant.DEFAULT_ALPHAS)
    return orders, tuple(rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))


def epsilon_spent(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """The epsilon that `steps` DP-SGD steps spend at `delta`, by Opacus' accountant. For RDP the one-step
    curve is computed once and composed linearly (RDP adds up over steps), as the accountant itself does."""
    _opacus()
    if steps == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if accountant == "rdp":
            from opacus.accountants.analysis import rdp

            orders, one = _rdp_of_one_step(noise_multiplier, sample_rate)
            return float(rdp.get_privacy_spent(orders=list(orders), rdp=np.array(one) * steps, delta=delta)[0])
        from opacus.accountants import create_accountant

        acc = create_accountant(accountant)
        acc.history = [(noise_multiplier, sample_rate, steps)]
        return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class DPAccounting:
    """What a DP-SGD model spent, with everything needed to recompute it: `steps` Poisson-sampled steps at
    `sample_rate`, Gaussian noise of `noise_multiplier` times the clipping bound, composed by Opacus'
    `accountant` ("rdp" or "prv") into `epsilon` at `delta`.

    Example (what an auditor runs on the `dp_accounting` of a result's metrics.json or a model's job.json):
        >>> import json
        >>> from opacus.accountants import create_accountant
        >>> record = json.load(open("runs/location30/results/dpsgd_epsilon=4/seed-0/metrics.json"))["dp_accounting"]
        >>> acc = create_accountant(record["accountant"])
        >>> acc.history = [(record["noise_multiplier"], record["sample_rate"], record["steps"])]
        >>> acc.get_epsilon(delta=record["delta"])  # == record["epsilon"]
    """

    noise_multiplier: float
    sample_rate: float  # q = batch_size / n, each record in each step independently with probability q
    steps: int
    accountant: str
    delta: float
    epsilon: float

    def to_dict(self) -> dict[str, float | int | str]:
        return dataclasses.asdict(self)


def is_plain_mlp(model: nn.Module) -> bool:
    """Whether `model` is made of Linear layers and elementwise activations only (no buffers, no dropout), the
    models whose per-sample gradients `DPTrainer(per_sample="ghost")` computes. Their `forward` is assumed to
    treat each record on its own, as Opacus assumes too."""
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    return (
        any(isinstance(m, nn.Linear) for m in leaves)
        and all(isinstance(m, (nn.Linear, *_ELEMENTWISE)) for m in leaves)
        and next(model.buffers(), None) is None
    )


class _ClippedForward(nn.Module):
    """Calls `model`; on the way back, scales each record's gradient of the output by its clipping factor
    `min(1, max_grad_norm / (norm + 1e-6))` (Opacus' formula), the norm that of the record's gradient over all
    trainable parameters, from ghost norms (or `torch.func` where they do not apply). The backward pass then
    leaves the clipped sum of the per-sample gradients in each parameter's `.grad`. The loss must be the mean of
    per-record losses over the batch (as with Opacus' `loss_reduction="mean"`): the gradient of the output is
    multiplied by the batch size."""

    def __init__(self, model: nn.Module, max_grad_norm: float, chunk: int | None = None) -> None:
        super().__init__()
        from torch.func import functional_call, grad, vmap

        self.model = model
        self.max_grad_norm = max_grad_norm
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        self.chunk = chunk or max(1, _CHUNK_BYTES // largest)

        def contribution(params: dict[str, Tensor], xi: Tensor, gi: Tensor) -> Tensor:
            # <model(x_i), g_i>: its gradient in the parameters is record i's gradient of its loss
            return (functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0) * gi).sum()

        self._per_sample = vmap(grad(contribution), in_dims=(None, 0, 0))

        # Ghost norms (Goodfellow, 2015; Li et al., ICLR 2022): a Linear layer applied once to (N, in) inputs a has
        # per-sample weight gradients delta_i a_i^T, whose squared norm is |a_i|^2 |delta_i|^2 (and |delta_i|^2 for
        # the bias), so the norms need the layers' inputs and output gradients only, never the per-sample
        # gradients themselves. Used whenever every trainable parameter is a Linear layer's; else torch.func.
        self._linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        owned = {id(p) for m in self._linears for p in m.parameters()}
        self.ghost = all(id(p) in owned for p in model.parameters() if p.requires_grad)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not self.ghost:
            out, seen = self.model(x), None
        else:  # the hooks live only for this call: the user's model is left as it was (and stays picklable)
            seen = []

            def record(module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                seen.append((module, inputs[0], output, inputs[0]._version, output._version))

            handles = [m.register_forward_hook(record) for m in self._linears]
            try:
                out = self.model(x)
            finally:
                for h in handles:
                    h.remove()
        if out.requires_grad:
            inputs = x.detach()
            layers = [(m, a.detach(), z) for m, a, z, _, _ in seen] if seen and self._ghost_holds(seen) else None
            # the hook sits on an alias: the norms' own backward pass starts at `out` and does not fire it again
            released = out.view_as(out)
            released.register_hook(lambda g: self._clip(inputs, g, out, layers))
            return released
        return out

    @staticmethod
    def _ghost_holds(seen: list) -> bool:
        """Whether `|a_i|^2 |delta_i|^2` gives this forward's norms: each layer (and each parameter) used once,
        on (N, in) inputs, and neither its input nor its output changed in place afterwards (an in-place
        activation would make the recorded output the activation's, not the layer's)."""
        params = [id(p) for m, *_ in seen for p in m.parameters()]
        return (
            len({id(m) for m, *_ in seen}) == len(seen)
            and len(set(params)) == len(params)
            and all(
                a.ndim == 2 and z.requires_grad and a._version == va and z._version == vz for _, a, z, va, vz in seen
            )
        )

    def ghost_norms(self, out: Tensor, out_grad: Tensor, layers: list) -> Tensor:
        """`(N,)` per-sample gradient norms from each Linear layer's inputs and output gradients (one extra
        backward pass through the activations, none through the weights)."""
        deltas = torch.autograd.grad(out, [z for _, _, z in layers], grad_outputs=out_grad, retain_graph=True)
        squares = torch.zeros(out_grad.shape[0], dtype=torch.float64, device=out_grad.device)
        for (module, a, _), delta in zip(layers, deltas, strict=True):
            d2 = delta.double().square().sum(1)
            if module.weight.requires_grad:
                squares += a.double().square().sum(1) * d2
            if module.bias is not None and module.bias.requires_grad:
                squares += d2
        return squares.sqrt().to(out_grad.dtype)

    def norms(self, x: Tensor, out_grad: Tensor) -> Tensor:
        """`(N,)` norms of the per-sample gradients whose output gradients are `out_grad (N, ...)`."""
        params = {k: p.detach() for k, p in self.model.named_parameters() if p.requires_grad}
        squares = []
        for s in range(0, x.shape[0], self.chunk):
            g = self._per_sample(params, x[s : s + self.chunk], out_grad[s : s + self.chunk])
            squares.append(torch.stack([v.flatten(1).square().sum(1) for v in g.values()], 1).sum(1))
        return torch.cat(squares).sqrt()

    def _clip(self, x: Tensor, out_grad: Tensor, out: Tensor, layers: list | None) -> Tensor:
        if x.shape[0] == 0:
            return out_grad
        per_record = out_grad * x.shape[0]  # the loss is the batch mean: record i's own gradient is N times
        norms = self.ghost_norms(out, per_record, layers) if layers is not None else self.norms(x, per_record)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        return per_record * factor.view(-1, *([1] * (per_record.ndim - 1)))


class DPTrainer:
    """One model's DP-SGD state: its (Opacus-compatible) module, the sampling rate, the noise, the steps.

    `per_sample`: how the per-sample gradients are clipped. `"opacus"`: Opacus' `GradSampleModule` hooks and
    `DPOptimizer`, any model Opacus supports. `"ghost"`: plain MLPs only (`is_plain_mlp`), their norms from the
    layers' inputs and output gradients and the clipped sum from one backward pass (see the module's
    docstring); the same update as `"opacus"` up to float rounding, noise included given the same generator
    state. `"auto"` (the default): `"ghost"` where the model allows it, else `"opacus"`."""

    def __init__(
        self, model: nn.Module, dp, *, num_records: int, batch_size: int, epochs: int, per_sample: str = "auto"
    ) -> None:
        _opacus()
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator

        check_choice("per_sample", per_sample, PER_SAMPLE)
        plain = is_plain_mlp(model)
        if per_sample == "ghost" and not plain:
            raise InvalidArgumentError(
                expected(
                    "model",
                    "a plain MLP (Linear layers and elementwise activations) for per_sample='ghost'",
                    type(model).__name__,
                )
            )
        if per_sample == "auto":
            per_sample = "ghost" if plain else "opacus"
        self.per_sample = per_sample
        if self.per_sample == "ghost":
            self.model = model
            self.module = _ClippedForward(model, dp.max_grad_norm)
        else:
            if not ModuleValidator.is_valid(model):
                model = ModuleValidator.fix(model)  # BatchNorm -> GroupNorm: per-sample gradients need no batch stats
            self.model = model
            self.module = GradSampleModule(model, loss_reduction="mean")
        self.dp = dp
        self.num_records = num_records
        self.sample_rate = min(1.0, batch_size / num_records)
        self.steps_per_epoch = max(1, round(1 / self.sample_rate))
        # calibrated for exactly the steps taken: epochs x steps_per_epoch
        self.noise_multiplier = dp.resolve_noise(sample_rate=self.sample_rate, steps=epochs * self.steps_per_epoch)

    def optimizer(self, base: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """`base` wrapped to add the noise and average; with Opacus' hooks it clips the per-sample gradients
        too, with `ghost` they arrive clipped and summed in `.grad`."""
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

        return (DPOptimizerFastGradientClipping if self.per_sample == "ghost" else DPOptimizer)(
            base,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            expected_batch_size=max(1, round(self.sample_rate * self.num_records)),
            loss_reduction="mean",
        )

    def start_epoch(self, optimizer: torch.optim.Optimizer, seed: int, epoch: int, device: torch.device) -> None:
        """Seeds the epoch's noise: resuming at an epoch gives the same noise as running through it."""
        g = torch.Generator(device=device)
        g.manual_seed(int(np.random.SeedSequence([seed, epoch, 0xD9]).generate_state(1)[0]))
        optimizer.generator = g

    def batches(self, generator: torch.Generator, device: torch.device) -> list[Tensor]:
        """The epoch's Poisson batches: `(1, b)` positions of the members, each in with probability q."""
        out = []
        for _ in range(self.steps_per_epoch):
            keep = torch.rand(self.num_records, generator=generator, device=device) < self.sample_rate
            idx = keep.nonzero().flatten()
            out.append(idx[None])
        return out

    def epsilon(self, epochs_done: int) -> float:
        return self.accounting(epochs_done).epsilon

    def accounting(self, epochs_done: int) -> DPAccounting:
        """The privacy spent after `epochs_done` epochs, with the accountant's inputs."""
        steps = epochs_done * self.steps_per_epoch
        return DPAccounting(
            noise_multiplier=float(self.noise_multiplier),
            sample_rate=float(self.sample_rate),
            steps=int(steps),
            accountant=self.dp.accountant,
            delta=float(self.dp.delta),
            epsilon=epsilon_spent(self.noise_multiplier, self.sample_rate, steps, self.dp.delta, self.dp.accountant),
        )


# ----------------------------------------------------------------------------------------------------------
# The defense: its settings, its hooks in the training loop, its factory
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DPSGD(Procedure):
    """DP-SGD's settings; `noise_multiplier` is resolved from `epsilon` when the data size is known."""

    epsilon: float | None
    delta: float
    max_grad_norm: float
    noise_multiplier: float | None
    accountant: str = "rdp"

    @property
    def identity(self) -> str:
        return legacy_identity(dp=self)

    def resolve_noise(self, *, sample_rate: float, steps: int) -> float:
        """The noise multiplier: the given one, or the one Opacus' accountant calibrates to (epsilon, delta) for
        `steps` steps at `sample_rate`."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        return calibrate_noise(
            self.epsilon, self.delta, sample_rate=sample_rate, steps=steps, accountant=self.accountant
        )

    def hooks(self) -> DefenseHooks:
        return _DPHooks(self)


class _DPHooks(DefenseHooks):
    """A `DPTrainer` in the loop: its module, optimizer, noise seeds and batches; the epsilon in each record."""

    mixed_precision = False  # per-sample clipping in float32

    def __init__(self, settings: DPSGD) -> None:
        self.settings = settings
        self.trainer: DPTrainer | None = None

    def wrap(self, model: nn.Module, setup: TrainingSetup) -> tuple[nn.Module, nn.Module]:
        recipe = setup.recipe
        self.trainer = DPTrainer(
            model,
            self.settings,
            num_records=setup.train[0].shape[0],
            batch_size=recipe.batch_size,
            epochs=recipe.epochs,
        )
        return self.trainer.model, self.trainer.module

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        # Opacus' hooks on the first layer, whose input needs no gradient: expected (the loop restores the filters)
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return self.trainer.optimizer(optimizer)

    def start_epoch(self, optimizer: torch.optim.Optimizer, *, seed: int, epoch: int, device: torch.device) -> None:
        self.trainer.start_epoch(optimizer, seed, epoch, device)

    def batches(self, generator: torch.Generator, device: torch.device) -> list[Tensor]:
        return self.trainer.batches(generator, device)

    def end_epoch(self, epoch: int, model: nn.Module, record: dict, setup: TrainingSetup) -> bool:
        record["epsilon"] = self.trainer.epsilon(epoch + 1)
        return False

    def privacy_spent(self, epochs: int) -> DPAccounting:
        return self.trainer.accounting(epochs)


def create(
    *,
    epsilon: float | None = None,
    delta: float = 1e-5,
    max_grad_norm: float = 1.0,
    noise_multiplier: float | None = None,
    accountant: str = "rdp",
    loss: str = "ce",
) -> Defense:
    """`dpsgd`: the noise from `epsilon` (calibrated) or `noise_multiplier` (fixed), one of the two."""
    if (epsilon is None) == (noise_multiplier is None):
        raise InvalidArgumentError(
            expected(
                "epsilon",
                "given (or noise_multiplier instead, not both)",
                f"epsilon={epsilon}, noise_multiplier={noise_multiplier}",
            )
        )
    if epsilon is not None:
        check_in_range("epsilon", epsilon, low=0.0, low_inclusive=False)
    if noise_multiplier is not None:
        check_in_range("noise_multiplier", noise_multiplier, low=0.0)
    check_in_range("delta", delta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    check_in_range("max_grad_norm", max_grad_norm, low=0.0, low_inclusive=False)
    check_choice("accountant", accountant, ("rdp", "prv"))
    loss_fn = per_sample_loss("dpsgd", loss)
    dp = DPSGD(
        None if epsilon is None else float(epsilon),
        float(delta),
        float(max_grad_norm),
        None if noise_multiplier is None else float(noise_multiplier),
        accountant,
    )
    return Defense(loss_fn, dp)
