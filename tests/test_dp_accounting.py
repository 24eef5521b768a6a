"""DP-SGD's accounting is recorded: each DP model's job.json and each result's metrics.json hold the noise
multiplier, sample rate, steps, accountant and delta with the epsilon spent, and Opacus' own accountant,
given those numbers alone, recomputes that epsilon (what an auditor does to check the guarantee)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("opacus")

import ccl  # noqa: E402
from ccl import defenses  # noqa: E402
from ccl.audit import run_audit, run_train  # noqa: E402
from ccl.config import ExperimentConfig  # noqa: E402
from ccl.defenses.dpsgd import DPAccounting, DPTrainer  # noqa: E402
from ccl.results import DefenseResult  # noqa: E402
from ccl.training import Runtime  # noqa: E402

QUIET = Runtime(progress=False)
KEYS = {"noise_multiplier", "sample_rate", "steps", "accountant", "delta", "epsilon"}


def recomputed_epsilon(record: dict) -> float:
    """The epsilon Opacus' accountant gives for the recorded inputs, nothing of ccl involved."""
    from opacus.accountants import create_accountant

    acc = create_accountant(record["accountant"])
    acc.history = [(record["noise_multiplier"], record["sample_rate"], record["steps"])]
    return acc.get_epsilon(delta=record["delta"])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_trainers_accounting_is_recomputed_by_opacus(accountant):
    dp = defenses.create("dpsgd", epsilon=3.0, delta=1e-5, accountant=accountant).procedure
    model = ccl.models.create("mlp", num_classes=3, input_shape=(6,), hidden=(8,), seed=0)
    trainer = DPTrainer(model, dp, num_records=500, batch_size=50, epochs=4)
    spent = trainer.accounting(4)
    assert isinstance(spent, DPAccounting) and set(spent.to_dict()) == KEYS
    assert (spent.sample_rate, spent.steps, spent.accountant, spent.delta) == (0.1, 40, accountant, 1e-5)
    assert spent.noise_multiplier == trainer.noise_multiplier and spent.epsilon == trainer.epsilon(4)
    assert 2.9 <= spent.epsilon <= 3.0  # calibrated to 3 from below
    assert spent.epsilon == pytest.approx(recomputed_epsilon(spent.to_dict()), abs=1e-6)
    assert trainer.accounting(2).steps == 20 and trainer.accounting(2).epsilon < spent.epsilon


def test_a_dp_audit_records_the_accounting_in_job_json_and_metrics_json(tmp_path):
    config = ExperimentConfig.from_dict(
        {
            "dataset": "digits",
            "model_options": {"hidden": [16]},
            "population_fraction": 0.7,
            "num_references": 2,
            "bootstrap": 5,
            "attacks": ["loss"],
            "defenses": ["ce", "dpsgd:epsilon=2@lr=0.1"],
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.1, "schedule": "constant"},
        }
    )
    run_audit(config, tmp_path / "run", runtime=QUIET)
    raw = {
        p.parent.parent.name: json.loads(p.read_text())
        for p in (tmp_path / "run" / "results").glob("*/seed-0/metrics.json")
    }
    dp = next(r for slug, r in raw.items() if slug.startswith("dpsgd"))
    ce = next(r for slug, r in raw.items() if not slug.startswith("dpsgd"))
    assert ce["dp_accounting"] is None
    record = dp["dp_accounting"]
    assert set(record) == KEYS and record["accountant"] == "rdp" and record["delta"] == 1e-5
    members = dp["num_members"]
    assert record["sample_rate"] == 32 / members and record["steps"] == 2 * round(members / 32)
    assert record["epsilon"] == dp["dp_epsilon"] and 1.9 <= record["epsilon"] <= 2.0
    assert recomputed_epsilon(record) == pytest.approx(record["epsilon"], abs=1e-6)

    jobs = [json.loads(p.read_text()) for p in (tmp_path / "run" / "models").glob("*/job.json")]
    dp_jobs = [j for j in jobs if j["defense"]["name"] == "dpsgd"]
    assert len(dp_jobs) == 3  # the target and both reference models, each trained with DP-SGD
    for job in dp_jobs:
        assert set(job["dp_accounting"]) == KEYS and job["dp_accounting"]["epsilon"] == job["epsilon"]
        assert recomputed_epsilon(job["dp_accounting"]) == pytest.approx(job["epsilon"], abs=1e-6)
    assert all(j["dp_accounting"] is None for j in jobs if j["defense"]["name"] != "dpsgd")

    del dp["dp_accounting"]  # a result written before the accounting was recorded still loads
    assert DefenseResult.from_dict(dp).dp_accounting is None


def test_ccl_train_writes_the_accounting_into_its_metrics_json(tmp_path):
    config = ExperimentConfig.from_dict(
        {
            "dataset": "digits",
            "model_options": {"hidden": [16]},
            "defenses": ["dpsgd:noise_multiplier=1.5,accountant=prv"],
            "train": {"epochs": 1, "batch_size": 64, "lr": 0.1},
        }
    )
    result = run_train(config, tmp_path / "run", runtime=QUIET)
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["dp_accounting"]
    assert record == result.dp_accounting.to_dict()
    assert record["noise_multiplier"] == 1.5 and record["accountant"] == "prv" and record["steps"] >= 1
    assert recomputed_epsilon(record) == pytest.approx(record["epsilon"], abs=1e-6)
