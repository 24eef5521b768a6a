"""A defense's own training recipe, and a recipe chosen for accuracy on the defender's reserve (issue: which
defense, part 1): parsing (command line and YAML), job keys, the choice against an independent computation, and
the choice as users see it (metrics.json, terminal, report, `ccl train`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from ccl import data
from ccl.audit.plan import model_seed, plan_jobs, result_key
from ccl.cli import main
from ccl.config import ConfigError, DefenseSpec, ExperimentConfig, expand_defense, parse_defense
from ccl.defenses import default_recipe
from ccl.training import Recipe, Runtime, fit, predict_logits


def test_command_line_and_yaml_forms_give_one_spec():
    line = parse_defense("dpsgd:epsilon=8@lr=[0.1,0.5],batch_size=64")
    yml = parse_defense({"name": "dpsgd", "params": {"epsilon": 8}, "train": {"lr": [0.1, 0.5], "batch_size": 64}})
    old = parse_defense({"loss": "dpsgd", "params": {"epsilon": 8}, "train": {"lr": [0.1, 0.5], "batch_size": 64}})
    assert line == yml == old
    assert line.label == "dpsgd(epsilon=8)@batch_size=64,lr=[0.1,0.5]"
    assert line.selects and [c.train for c in line.candidates()] == [
        {"lr": 0.1, "batch_size": 64},
        {"lr": 0.5, "batch_size": 64},
    ]
    assert line.to_dict() == {"name": "dpsgd", "params": {"epsilon": 8}, "train": {"lr": [0.1, 0.5], "batch_size": 64}}
    assert parse_defense(line.to_dict()) == line  # config.yaml round trip


def test_a_sweep_of_parameters_keeps_the_recipe_choice_on_every_point():
    points = expand_defense("ccel:alpha=[0.2,0.8]@lr=[0.01,0.1]")
    assert [p.params for p in points] == [{"alpha": 0.2}, {"alpha": 0.8}]
    assert all(p.train == {"lr": [0.01, 0.1]} for p in points)


def test_an_integer_learning_rate_is_the_same_recipe_as_its_float():
    assert parse_defense("ce@lr=1").train == {"lr": 1.0}
    assert parse_defense("ce@lr=1") == parse_defense("ce@lr=1.0")


def test_milestones_is_a_list_value_and_a_list_of_lists_is_its_choice():
    one = parse_defense("ce@schedule=multistep,milestones=[0.3,0.6]")
    assert not one.selects and one.recipe(Recipe()).milestones == (0.3, 0.6)
    two = parse_defense({"name": "ce", "train": {"milestones": [[0.3], [0.6]]}})
    assert two.selects and [c.train["milestones"] for c in two.candidates()] == [[0.3], [0.6]]


def test_dpsgd_gets_its_default_recipe_only_when_its_entry_gives_none():
    assert parse_defense("dpsgd:epsilon=8").train == default_recipe("dpsgd") == {"momentum": 0.0, "lr": [0.1, 0.5, 2.0]}
    assert parse_defense("dpsgd:epsilon=8").selects
    assert parse_defense("dpsgd:epsilon=8@lr=0.05").train == {"lr": 0.05}  # the user's recipe, not merged
    assert parse_defense("ce").train == {} and parse_defense("ce").label == "ce"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("ce@", "recipe keys after '@'"),
        ("ce@seed=3", "each model's seed is the audit's"),
        ("ce@lrr=0.1", "Did you mean 'lr'"),
        ("ce@lr=-1", "recipe key 'lr'"),
        ("ce@lr=[0.1,0.1]", "distinct values of 'lr'"),
        ("ce@lr=0.1,lr=0.2", "'lr' is given twice"),
        ("ce@optimizer=rmsprop", "optimizer"),
        ({"name": "ce", "loss": "ce"}, "under 'name:'"),
        ({"name": "ce", "train": [1]}, "a mapping of recipe keys"),
    ],
)
def test_bad_recipes_of_a_defense_are_refused_with_the_key(spec, words):
    with pytest.raises(ConfigError, match="(?s).*" + __import__("re").escape(words)):
        parse_defense(spec)


def _config(**kw) -> ExperimentConfig:
    base = {"dataset": "digits", "num_references": 2, "population_fraction": 0.5, "bootstrap": 0}
    return ExperimentConfig.from_dict({**base, **kw})


def test_the_defense_recipe_trains_target_and_references_and_is_in_the_keys():
    config = _config(train={"lr": 0.05, "epochs": 3}, defenses=["ce", "ce@lr=0.2", "ce@lr=0.05"])
    split = data.membership_split(1797, seed=0, population_fraction=0.5, num_references=2)
    plain, own, same = (plan_jobs(config, d, 0, split) for d in config.defenses)
    assert all(j.recipe.lr == 0.2 and j.recipe.epochs == 3 for j in own)  # target and every reference
    assert all(j.recipe.lr == 0.05 for j in plain)
    assert {j.key for j in own}.isdisjoint(j.key for j in plain)
    # the same weights under either spelling: one model in the cache, but a result of its own
    assert [j.key for j in same] == [j.key for j in plain]
    assert result_key(config, config.defenses[2], 0) != result_key(config, config.defenses[0], 0)


def test_a_recipe_choice_needs_a_reserve_and_gets_the_default_one():
    config = _config(defenses=["ce@lr=[0.01,0.1]"])
    assert config.reserve_fraction == 0.2
    with pytest.raises(ConfigError, match="choose a recipe on"):
        _config(defenses=["ce@lr=[0.01,0.1]"], reserve_fraction=0.0)


@pytest.fixture(scope="module")
def chosen_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("choice") / "run"
    argv = ["compare", "--dataset", "digits", "--defenses", "ce", "ce@lr=[0.002,0.2]", "--epochs", "3",
            "--num-references", "2", "--population-fraction", "0.5", "--bootstrap", "0", "--attacks", "loss",
            "--seeds", "0", "--quiet", "--out", str(out)]  # fmt: skip
    return out, argv


def test_the_choice_is_the_most_accurate_candidate_on_the_reserve_computed_independently(chosen_run, capsys, quiet):
    out, argv = chosen_run
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(
        (out / "results" / parse_defense("ce@lr=[0.002,0.2]").slug / "seed-0" / "metrics.json").read_text()
    )
    selection = result["selection"]
    config = ExperimentConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    split = data.MembershipSplit.load(out / "splits" / "seed-0.npz")
    assert selection["records"] == split.reserve.size > 0
    assert np.intersect1d(split.reserve, np.concatenate([split.pool, split.population])).size == 0
    ds = data.load("digits")
    for cand in selection["candidates"]:  # each candidate again, by hand: fit on the target's members, score
        recipe = Recipe(**{**config.train.to_dict(), **cand["train"], "seed": model_seed(0, 0)})
        model = config.build_model(ds, seed=model_seed(0, 0))
        fit(model, torch.nn.CrossEntropyLoss(), ds.subset(split.target_members), recipe=recipe,
            runtime=Runtime(progress=False))  # fmt: skip
        x, y = ds.subset(split.reserve)
        assert cand["accuracy"] == pytest.approx(float((predict_logits(model, x).argmax(-1) == y.numpy()).mean()))
    best = max(selection["candidates"], key=lambda c: c["accuracy"])
    assert selection["chosen"] == best["train"] and result["recipe"]["lr"] == best["train"]["lr"]
    assert "Recipes chosen for accuracy on the defender's reserve" in printed
    assert f"ce@lr=[0.002,0.2]: seed 0: lr={best['train']['lr']}" in printed
    report = (out / "report.html").read_text()
    assert "Recipes of their own" in report and "ce@lr=[0.002,0.2]" in report
    from ccl.report import unfinished_note

    assert unfinished_note(out) is None  # the defense's label read back from config.yaml, recipe included
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert summary["choices"]["ce@lr=[0.002,0.2]"][0].startswith(f"seed 0: lr={best['train']['lr']}")


def test_the_references_train_with_the_chosen_recipe_and_a_resume_trains_nothing(chosen_run, quiet, monkeypatch):
    out, argv = chosen_run
    if not (out / "metrics.json").exists():
        assert main(argv) == 0
    config = ExperimentConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    selecting = config.defenses[1]
    chosen = json.loads((out / "results" / selecting.slug / "seed-0" / "metrics.json").read_text())["selection"]
    spec = DefenseSpec(selecting.loss, selecting.params, chosen["chosen"])
    split = data.MembershipSplit.load(out / "splits" / "seed-0.npz")
    for job in plan_jobs(config, spec, 0, split):  # the chosen recipe's target and references are the ones trained
        assert (out / "models" / job.key / "outputs.npz").exists()
    import ccl.audit.execute as execute

    monkeypatch.setattr(execute, "train_group", lambda *a, **k: pytest.fail("a resume trained a model again"))
    assert main([*argv, "--resume"]) == 0


def test_a_supplied_target_refuses_a_recipe_choice(tmp_path):
    members = tmp_path / "m.npy"
    np.save(members, np.arange(10))
    logits = tmp_path / "l.npy"
    np.save(logits, np.zeros((1797, 10), np.float32))
    with pytest.raises(ConfigError, match="give each recipe key one value"):
        _config(defenses=["dpsgd:epsilon=8"], target_members=str(members), target_logits=str(logits))


def test_ccl_train_chooses_among_candidates_and_keeps_the_chosen_model(tmp_path, quiet):
    out = tmp_path / "t"
    argv = ["train", "--dataset", "digits", "--loss", "ce@lr=[0.002,0.2]", "--epochs", "2", "--quiet",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    chosen = metrics["selection"]["chosen"]
    assert chosen == max(metrics["selection"]["candidates"], key=lambda c: c["accuracy"])["train"]
    assert (out / "model" / "checkpoint.pt").exists()
    assert (out / "candidates" / f"ce_lr={chosen['lr']}" / "checkpoint.pt").exists()


def test_report_list_shows_dpsgds_default_recipe_and_the_at_syntax(capsys):
    assert main(["report", "--list"]) == 0
    out = capsys.readouterr().out
    assert "default recipe: @lr=[0.1,0.5,2.0],momentum=0.0" in out and "after '@'" in out
