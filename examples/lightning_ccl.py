"""Train with the Convex-Concave Loss inside PyTorch Lightning, and watch what it does to the members' losses.

`CCLClassifier` is a LightningModule that trains any `nn.Module` with a ccl loss (`ccl.losses.create("ccel",
alpha=0.5)` by default). `MemberLossStats` is a Callback that, at the end of each training epoch, computes the
per-record cross-entropy of the members (the training records) and logs its mean and variance
(`member_loss_mean`, `member_loss_var`): membership-inference attacks threshold exactly this loss, and CCL's
concave term keeps its variance up so that members do not all sit at a loss near 0.

Run it (CPU, a few seconds; needs `pip install lightning`):

    python examples/lightning_ccl.py --epochs 20

To audit the trained model, give `ccl audit` the same architecture as your own model
(`--model my_pkg.my_mod:build`) or use the pipeline's `ccl.training` API.
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ccl


class CCLClassifier(L.LightningModule):
    """A classifier trained with a ccl loss (`loss`, `**loss_options` go to `ccl.losses.create`) and SGD."""

    def __init__(
        self, model: nn.Module, *, loss: str = "ccel", lr: float = 0.1, momentum: float = 0.9, **loss_options
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = ccl.losses.create(loss, **loss_options)
        self.lr, self.momentum = lr, momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class MemberLossStats(L.Callback):
    """Logs the mean and variance of the members' per-record cross-entropy at the end of each training epoch.

    `members` are the training records `(x, y)`; the statistics are also kept in `history`, one dict per epoch.
    The model is evaluated in eval mode without gradients and put back in train mode.
    """

    def __init__(self, members: tuple[torch.Tensor, torch.Tensor], *, batch_size: int = 1024) -> None:
        self.x, self.y = members
        self.batch_size = batch_size
        self.history: list[dict[str, float]] = []

    @torch.no_grad()
    def member_losses(self, pl_module: L.LightningModule) -> torch.Tensor:
        was_training = pl_module.training
        pl_module.eval()
        try:
            losses = [
                F.cross_entropy(
                    pl_module(self.x[i : i + self.batch_size].to(pl_module.device)).float(),
                    self.y[i : i + self.batch_size].to(pl_module.device),
                    reduction="none",
                )
                for i in range(0, len(self.y), self.batch_size)
            ]
        finally:
            pl_module.train(was_training)
        return torch.cat(losses)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        losses = self.member_losses(pl_module).double()
        stats = {"member_loss_mean": float(losses.mean()), "member_loss_var": float(losses.var(unbiased=False))}
        self.history.append({"epoch": trainer.current_epoch, **stats})
        pl_module.log_dict(stats, on_step=False, on_epoch=True)


def run(
    *,
    epochs: int = 5,
    alpha: float = 0.5,
    num_samples: int = 400,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
) -> tuple[CCLClassifier, MemberLossStats, L.Trainer]:
    """Trains an MLP on ccl's synthetic task (the first half of the records are the members) with CCEL."""
    L.seed_everything(seed, verbose=False)
    data = ccl.data.load("synthetic", num_samples=num_samples, num_features=20, num_classes=5, seed=seed)
    members = data.x[: num_samples // 2], data.y[: num_samples // 2]
    model = ccl.models.create(
        "mlp", num_classes=data.num_classes, input_shape=data.input_shape, hidden=(64,), activation="relu", seed=seed
    )
    module = CCLClassifier(model, loss="ccel", alpha=alpha, lr=lr)
    stats = MemberLossStats(members)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[stats],
    )
    loader = DataLoader(TensorDataset(*members), batch_size=batch_size, shuffle=True)
    trainer.fit(module, loader)
    return module, stats, trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _, stats, _ = run(epochs=args.epochs, alpha=args.alpha, seed=args.seed)
    for row in stats.history:
        mean, var = row["member_loss_mean"], row["member_loss_var"]
        print(f"epoch {row['epoch']:3d}  members' loss: mean {mean:.4f}  variance {var:.4f}  sd {math.sqrt(var):.4f}")


if __name__ == "__main__":
    main()
