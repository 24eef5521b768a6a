"""The integration examples (examples/lightning_ccl.py, examples/hf_ccl.py) run a few epochs with ccl's loss, and
their callbacks log the members' loss statistics; skipped when Lightning or transformers is not installed."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import ccl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"ccl_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _check_history(history: list[dict], epochs: int) -> None:
    assert len(history) == epochs
    for row in history:
        assert math.isfinite(row["member_loss_mean"]) and math.isfinite(row["member_loss_var"])
        assert row["member_loss_mean"] > 0 and row["member_loss_var"] > 0
    assert history[-1]["member_loss_mean"] < history[0]["member_loss_mean"]  # the members' loss went down


def test_lightning_example_trains_with_ccel_and_logs_member_loss_stats():
    pytest.importorskip("lightning")
    example = _example("lightning_ccl")
    module, stats, trainer = example.run(epochs=4, num_samples=200)
    assert isinstance(module.loss_fn, ccl.losses.ConvexConcaveLoss) and module.loss_fn.alpha == 0.5
    _check_history(stats.history, 4)
    assert [row["epoch"] for row in stats.history] == [0, 1, 2, 3]
    logged = trainer.callback_metrics
    assert float(logged["member_loss_mean"]) == pytest.approx(stats.history[-1]["member_loss_mean"], rel=1e-5)
    assert float(logged["member_loss_var"]) == pytest.approx(stats.history[-1]["member_loss_var"], rel=1e-5)
    assert module.training  # the callback put the model back in train mode


def test_hf_example_trains_with_ccel_and_logs_member_loss_stats():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # Trainer's dependency
    example = _example("hf_ccl")
    # the compute_loss_func is ccl's loss: the mean over the batch, or the sum over the accumulated batch's size
    logits, labels = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 0, 1])
    expected = ccl.losses.create("ccel", alpha=0.5)(logits, labels)
    compute = example.ccl_compute_loss("ccel", alpha=0.5)
    assert torch.allclose(compute({"logits": logits}, labels), expected)
    assert torch.allclose(compute({"logits": logits}, labels, num_items_in_batch=12), expected / 2)

    trainer, callback = example.run(epochs=4, num_samples=200)
    _check_history(callback.history, 4)
    logged = [row for row in trainer.state.log_history if "member_loss_mean" in row]
    assert logged == callback.history
    train_losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(train_losses) == 4 and train_losses[-1] < train_losses[0]
