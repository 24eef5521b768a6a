"""Train a Hugging Face model with the Convex-Concave Loss through `transformers.Trainer`, and watch what it does
to the members' losses.

`ccl_compute_loss(...)` turns any ccl loss into a `compute_loss_func` for `Trainer` (it reads `outputs.logits`,
so it works for every `...ForSequenceClassification` model too). `MemberLossCallback` is a TrainerCallback that,
at the end of each epoch, computes the per-record cross-entropy of the members (the training records) and logs
its mean and variance (`member_loss_mean`, `member_loss_var`, also in `trainer.state.log_history`).

The model here is a tiny tabular classifier built from its config (`TabularConfig`, `TabularClassifier`, a
`PreTrainedModel`): nothing is downloaded, no pretrained weights or tokenizer. Swap in your own model, e.g.
`AutoModelForSequenceClassification.from_pretrained(...)` with tokenized text, and keep the loss and callback.

Run it (CPU, a few seconds; needs `pip install transformers accelerate`):

    python examples/hf_ccl.py --epochs 20
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutput

import ccl


# ----------------------------------------------------------------------------------------------------------
# A tiny model built from its config (no download)
# ----------------------------------------------------------------------------------------------------------
class TabularConfig(PretrainedConfig):
    model_type = "ccl-tabular-mlp"

    def __init__(self, num_features: int = 20, hidden_size: int = 64, num_labels: int = 2, **kwargs: Any) -> None:
        self.num_features = num_features
        self.hidden_size = hidden_size
        super().__init__(num_labels=num_labels, **kwargs)


class TabularClassifier(PreTrainedModel):
    """An MLP over a record's features; returns `SequenceClassifierOutput(logits=...)` like HF classifiers."""

    config_class = TabularConfig

    def __init__(self, config: TabularConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(
            nn.Linear(config.num_features, config.hidden_size),
            nn.ReLU(),
            nn.Linear(config.hidden_size, config.num_labels),
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.reset_parameters()

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None, **_: Any) -> SequenceClassifierOutput:
        return SequenceClassifierOutput(logits=self.net(features))


class RecordDataset(torch.utils.data.Dataset):
    """Records as the dicts `Trainer` feeds its model: `{"features": x[i], "labels": y[i]}`."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "labels": self.y[i]}


# ----------------------------------------------------------------------------------------------------------
# ccl's loss as a `compute_loss_func`, and the members' loss statistics as a callback
# ----------------------------------------------------------------------------------------------------------
def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def ccl_compute_loss(name: str = "ccel", **options: Any) -> Callable[..., torch.Tensor]:
    """A `Trainer(compute_loss_func=...)` computing `ccl.losses.create(name, **options)`. With
    `num_items_in_batch` (the records of the whole accumulated batch), the per-record losses are summed and
    divided by it, as Trainer expects from a `compute_loss_func`, so gradient accumulation gives the mean."""
    loss_fn = ccl.losses.create(name, **options)

    def compute_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        per_record = loss_fn.per_sample(_logits(outputs), labels)
        if num_items_in_batch is None:
            return per_record.mean()
        return per_record.sum() / num_items_in_batch

    return compute_loss


class MemberLossCallback(TrainerCallback):
    """At the end of each epoch: mean and variance of the members' per-record cross-entropy.

    `members` are the training records `(features, labels)`. Each epoch's statistics go to `history` and to
    `state.log_history` (so `trainer_state.json` keeps them); the model is put back in train mode.
    """

    def __init__(self, members: tuple[torch.Tensor, torch.Tensor], *, batch_size: int = 1024) -> None:
        self.x, self.y = members
        self.batch_size = batch_size
        self.history: list[dict[str, float]] = []

    @torch.no_grad()
    def member_losses(self, model: nn.Module) -> torch.Tensor:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            losses = [
                F.cross_entropy(
                    _logits(model(features=self.x[i : i + self.batch_size].to(device))).float(),
                    self.y[i : i + self.batch_size].to(device),
                    reduction="none",
                )
                for i in range(0, len(self.y), self.batch_size)
            ]
        finally:
            model.train(was_training)
        return torch.cat(losses)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs: Any
    ) -> None:
        losses = self.member_losses(model).double()
        row = {
            "epoch": float(state.epoch or 0.0),
            "step": state.global_step,
            "member_loss_mean": float(losses.mean()),
            "member_loss_var": float(losses.var(unbiased=False)),
        }
        self.history.append(row)
        state.log_history.append(dict(row))


def run(
    *,
    epochs: int = 5,
    alpha: float = 0.5,
    num_samples: int = 400,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    output_dir: str | None = None,
) -> tuple[Trainer, MemberLossCallback]:
    """Trains the tiny classifier on ccl's synthetic task (the first half of the records are the members)."""
    data = ccl.data.load("synthetic", num_samples=num_samples, num_features=20, num_classes=5, seed=seed)
    members = data.x[: num_samples // 2], data.y[: num_samples // 2]
    torch.manual_seed(seed)
    model = TabularClassifier(TabularConfig(num_features=data.input_shape[0], num_labels=data.num_classes))
    callback = MemberLossCallback(members)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            optim="sgd",
            lr_scheduler_type="constant",
            weight_decay=0.0,
            seed=seed,
            use_cpu=True,
            save_strategy="no",
            logging_strategy="epoch",
            report_to="none",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=RecordDataset(*members),
            compute_loss_func=ccl_compute_loss("ccel", alpha=alpha),
            callbacks=[callback],
        )
        trainer.train()
    return trainer, callback


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _, callback = run(epochs=args.epochs, alpha=args.alpha, seed=args.seed)
    for row in callback.history:
        mean, var = row["member_loss_mean"], row["member_loss_var"]
        print(f"epoch {row['epoch']:5.1f}  members' loss: mean {mean:.4f}  variance {var:.4f}  sd {math.sqrt(var):.4f}")


if __name__ == "__main__":
    main()
