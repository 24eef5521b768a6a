"""Auditing a model trained elsewhere: a user's architecture, trained with plain PyTorch, supplied to ccl."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

import ccl
from ccl import cli
from ccl.config import ConfigError, ExperimentConfig
from ccl.results import load_scores

MODULE = """
import torch

def build(num_classes, input_shape, seed=None):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, num_classes))
"""


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    (tmp_path / "user_net.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib

    return importlib.import_module("user_net")


def test_a_model_trained_elsewhere_is_audited_and_the_loss_auc_recomputes_by_hand(tmp_path, user_model):
    data = ccl.data.load("digits")
    rng = np.random.default_rng(0)
    members = np.sort(rng.choice(len(data), 150, replace=False))
    torch.manual_seed(0)
    model = user_model.build(10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data.x[members], data.y[members]
    for _ in range(100):  # plain PyTorch, outside ccl: overfits the 150 members
        for i in range(0, 150, 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.save(tmp_path / "members.npy", members)
    out = tmp_path / "audit"
    argv = [
        "audit",
        "--dataset",
        "digits",
        "--model",
        "user_net:build",
        "--target-checkpoint",
        "model.pt",
        "--target-members",
        "members.npy",
        "--epochs",
        "20",
        "--batch-size",
        "32",
        "--lr",
        "0.1",
        "--schedule",
        "constant",
        "--num-references",
        "4",
        "--bootstrap",
        "0",
        "--attacks",
        "loss",
        "lira",
        "--quiet",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    result = json.loads((out / "results" / "ce" / "seed-0" / "metrics.json").read_text())
    split = ccl.data.MembershipSplit.load(out / "splits" / "seed-0.npz")
    assert set(split.target_members) <= set(members) and split.target_in.sum() == (~split.target_in).sum()
    assert not set(split.target_nonmembers) & set(members)
    model.eval()
    with torch.no_grad():
        logits = model(data.x[split.pool]).double()  # ccl scores in float64 from the float32 logits
        loss = torch.nn.functional.cross_entropy(logits, data.y[split.pool], reduction="none")
    by_hand = ccl.metrics.roc_auc(-loss.numpy(), split.target_in)  # the loss attack ranks by the loss
    assert result["attacks"]["loss"]["auc"] == pytest.approx(by_hand, abs=1e-9)
    assert by_hand > 0.6  # the supplied model overfits: the audit sees it
    assert "supplied" in result["notes"][0] and "recipe" in result["notes"][0]
    assert "not trained by ccl" in (out / "report.html").read_text()
    assert len(list((out / "models").glob("*/outputs.npz"))) == 4  # the references only
    scores = load_scores(out / "results" / "ce" / "seed-0")
    np.testing.assert_allclose(scores["target_loss"], loss.numpy(), rtol=1e-5, atol=1e-6)


def test_supplied_outputs_instead_of_weights(tmp_path, user_model):
    data = ccl.data.load("digits")
    members = np.zeros(len(data), bool)
    members[:400] = True
    logits = np.random.default_rng(0).normal(size=(len(data), 10)).astype(np.float32)
    logits[np.arange(400), data.y[:400].numpy()] += 3  # members: confident
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "mask.npy", members)
    out = tmp_path / "audit"
    assert (
        cli.main(
            [
                "audit",
                "--dataset",
                "digits",
                "--target-logits",
                "logits.npy",
                "--target-members",
                "mask.npy",
                "--epochs",
                "2",
                "--num-references",
                "2",
                "--bootstrap",
                "0",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "results" / "ce" / "seed-0" / "metrics.json").read_text())
    assert result["attacks"]["loss"]["auc"] > 0.9


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target_checkpoint": "model.pt"}, "needs both its members"),
        ({"target_members": "members.npy"}, "needs both its members"),
        ({"target_members": "members.npy", "target_checkpoint": "model.pt", "target_logits": "model.pt"}, "not both"),
        ({"target_members": "missing.npy", "target_checkpoint": "model.pt"}, "`target_members`"),
        ({"target_members": "members.npy", "target_checkpoint": "model.pt", "canaries": 2}, "Canaries"),
    ],
)
def test_supplied_target_options_are_checked(tmp_path, monkeypatch, changes, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "members.npy", np.arange(10))
    torch.save({}, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict({"dataset": "digits", **changes})


def test_report_exports_the_table_for_pipelines(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "compare",
                "--dataset",
                "synthetic",
                "--data-option",
                "num_samples=160",
                "--epochs",
                "2",
                "--num-references",
                "4",
                "--bootstrap",
                "0",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["report", str(out), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["defense"] == "ce"
    assert cli.main(["report", str(out), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("defense,seeds,test_acc")
    assert cli.main(["report", str(out), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("| defense | test acc |") and "leave-one-out" in md
