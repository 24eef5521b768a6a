"""Typed configuration of an experiment, its YAML form, how layers of settings merge, and defense specs.

An `ExperimentConfig` is everything that determines a run's results: the data, the model, the training
`Recipe`, the defenses, seeds, reference models and attacks. How the run executes (device, progress bars,
threads) is a `ccl.training.Runtime`, kept apart: it is never stored as part of the recipe, so changing it
never invalidates a model.

Settings come in layers, later ones winning: the defaults, a base (the demo's settings, or a resumed run's
`config.yaml`), the YAML file of `--config`, then the flags given on the command line (`merge`). YAML is read
with `safe_load`; an unknown key is an error that suggests the closest valid key, or the section it belongs to.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import attacks, data, defenses, metrics, models
from ._checks import check_in_range, check_positive_int, expected, unknown_name
from .errors import CclError, ConfigError
from .training import Recipe, Runtime, defense_label

__all__ = [
    "ConfigError",
    "DefenseSpec",
    "ExperimentConfig",
    "load_config",
    "expand_defense",
    "merge",
    "parse_defense",
    "parse_runtime",
    "yaml_value",
]


@dataclass(frozen=True)
class DefenseSpec:
    """A defense with its parameters and, optionally, its own training recipe: `DefenseSpec("ccel",
    {"alpha": 0.2})`, `DefenseSpec("dpsgd", {"epsilon": 8}, {"lr": 0.5, "batch_size": 64})`. `loss` names a loss
    of `ccl.losses` or a procedure of `ccl.defenses` (YAML: `name:`, or the older `loss:`).

    `train` changes the experiment's recipe for this defense only: its target and its reference models train
    with it (the attacker knows the recipe). A list value (`{"lr": [0.1, 0.5]}`) is a choice made for utility on
    the defender's reserve (`candidates`; `ccl.audit.pipeline` trains a candidate target per point and keeps the
    most accurate on the reserve). The label shows the recipe: `dpsgd(epsilon=8)@batch_size=64,lr=0.5`."""

    loss: str
    params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return defense_label(self.loss, self.params, self.train)

    @property
    def family(self) -> str:
        """The defense's name without its parameters: the points of a sweep share it."""
        return self.loss

    @property
    def slug(self) -> str:
        """A file-name-safe form of the label."""
        return "".join(c if c.isalnum() or c in "._=-" else "_" for c in self.label.replace("(", "_")).strip("_")

    @property
    def selects(self) -> bool:
        """Whether a recipe key lists values to choose from on the defender's reserve."""
        return any(_choices(k, v) is not None for k, v in self.train.items())

    def candidates(self) -> list[DefenseSpec]:
        """One spec per point of the recipe's lists (their product, in the order given); `[self]` if none."""
        points: list[dict[str, Any]] = [{}]
        for key, value in self.train.items():
            values = _choices(key, value) or [value]
            points = [{**p, key: v} for p in points for v in values]
        return [DefenseSpec(self.loss, dict(self.params), p) for p in points]

    def recipe(self, base: Recipe) -> Recipe:
        """The experiment's recipe `base` with this defense's changes (one point: no list)."""
        if self.selects:
            raise ConfigError(f"Defense {self.label}: choose one point of its recipe first (`candidates`).")
        return base.replace(**self.train) if self.train else base

    def build(self):
        """The training loss."""
        return defenses.create(self.loss, **self.params).loss

    def procedure(self):
        """What the defense does to training beyond its loss (`ccl.defenses.Procedure`)."""
        return defenses.create(self.loss, **self.params).procedure

    def identity(self) -> dict[str, Any]:
        """What a result's key holds of the defense (the recipe only when it has its own: older keys hold)."""
        ident: dict[str, Any] = {"loss": self.loss, "params": dict(self.params)}
        if self.train:
            ident["train"] = dict(self.train)
        return ident

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.loss, "params": dict(self.params)}
        if self.train:
            out["train"] = dict(self.train)
        return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping with a key twice (YAML's loaders keep the last one silently) and
    reads `1e-6` and `5e-1` as numbers, as YAML 1.2 does (PyYAML follows YAML 1.1, which wants a dot: `1.0e-6`)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_value(text: str) -> Any:
    """One YAML value (a flag's `KEY=VALUE`, a defense parameter) read as a config file's values are."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # SafeLoader: no code runs


def _scalar(text: str) -> Any:
    try:
        value = yaml_value(text)
    except yaml.YAMLError:  # e.g. `alpha=[`: the text itself, which the defense's check then names
        return text
    return value if isinstance(value, (int, float, str, bool)) else text


def _split_params(text: str) -> list[str]:
    """`a=1,b=[1,2],c=0.1..0.9/5` to its items: commas inside brackets belong to a list."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [i.strip() for i in items if i.strip()]


def _number(text: str, spec: str) -> float | int:
    try:
        value = yaml_value(text)
    except yaml.YAMLError:
        value = text
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(expected("defense", f"numbers in a sweep, in {spec!r}", text))
    return value


def _sweep_values(text: str, spec: str) -> list | None:
    """`[0.1,0.5]` -> [0.1, 0.5]; `0.1..0.9/5` -> 5 evenly spaced values from 0.1 to 0.9; else None."""
    if text.startswith("[") and text.endswith("]"):
        values = [_scalar(v.strip()) for v in text[1:-1].split(",") if v.strip()]
        if not values:
            raise ConfigError(expected("defense", f"a non-empty list of values, in {spec!r}", text))
        return values
    if ".." in text:
        bounds, slash, count = text.partition("/")
        low, _, high = bounds.partition("..")
        if not slash or not count.strip().isdigit() or int(count) < 2:
            raise ConfigError(
                expected("defense", f"a range LOW..HIGH/COUNT with COUNT >= 2 (e.g. 0.1..0.9/5), in {spec!r}", text)
            )
        lo, hi, n = _number(low.strip(), spec), _number(high.strip(), spec), int(count)
        return [float(f"{lo + (hi - lo) * i / (n - 1):.10g}") for i in range(n)]
    return None


def _choices(key: str, value: Any) -> list | None:
    """The values to choose from when a recipe key lists several, else None (`milestones` is a list itself: a
    list of lists is its choice)."""
    if key == "milestones":
        return list(value) if isinstance(value, list) and value and isinstance(value[0], list) else None
    return list(value) if isinstance(value, list) else None


def _parse_train(train: Any, spec: Any) -> dict[str, Any]:
    """A defense's own recipe: keys of `Recipe` but `seed` (the audit's), each a value or a list to choose from;
    every point must make a valid recipe."""
    if not isinstance(train, dict):
        raise ConfigError(expected("defense train", "a mapping of recipe keys to values (e.g. {lr: 0.5})", train))
    valid = _TRAIN_KEYS - {"seed"}
    for key in train:
        if key not in valid:
            close = difflib.get_close_matches(str(key), sorted(valid), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            why = " (each model's seed is the audit's)" if key == "seed" else ""
            raise ConfigError(
                f"Unknown recipe key {key!r}{why} in the defense {spec!r}.{hint} "
                f"Valid keys: {', '.join(sorted(valid))}."
            )
    out = {k: _as_field_type(k, _choices(k, v) or v) for k, v in train.items()}
    for key, value in out.items():
        values = _choices(key, value) or [value]
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(expected("defense train", f"distinct values of {key!r} in {spec!r}", values))
        for v in values:
            try:
                Recipe(**{key: v})
            except CclError as err:
                raise ConfigError(f"Defense {spec!r}, recipe key {key!r}: {err}") from None
    return out


_FLOAT_KEYS = {f.name for f in dataclasses.fields(Recipe) if f.type in ("float", float)}


def _as_field_type(key: str, value: Any) -> Any:
    """`lr=1` as 1.0: a float field of the recipe holds floats, so `lr=1` and `lr=1.0` are one recipe."""
    if isinstance(value, list):
        return [_as_field_type(key, v) for v in value]
    if key in _FLOAT_KEYS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _split_spec(spec: str) -> tuple[str, dict[str, list], dict[str, Any]]:
    """`NAME:key=value,...@recipe_key=value,...` to the name, its parameters' values (each a list: a sweep) and
    its own recipe."""
    head, at, recipe = spec.partition("@")
    name, _, rest = head.partition(":")
    axes: dict[str, list] = {}
    for item in _split_params(rest):
        key, value = _key_value_item(item, spec, axes)
        swept = _sweep_values(value, spec)
        axes[key] = swept if swept is not None else [_scalar(value)]
    train: dict[str, Any] = {}
    if at and not recipe.strip():
        raise ConfigError(
            expected("defense", "recipe keys after '@' (e.g. dpsgd:epsilon=8@lr=0.5,batch_size=64)", spec)
        )
    for item in _split_params(recipe):
        key, value = _key_value_item(item, spec, train)
        listed = _sweep_values(value, spec)
        train[key] = listed if listed is not None else _scalar(value)
    return name.strip(), axes, train


def _key_value_item(item: str, spec: str, seen: dict) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
        raise ConfigError(
            expected(
                "defense", "NAME, NAME:key=value,... or NAME:key=value@recipe_key=value (e.g. ccel:alpha=0.2)", spec
            )
        )
    if key.strip() in seen:  # `alpha=0.1,alpha=0.2` would silently keep the last
        raise ConfigError(expected("defense", f"each key once, but {key.strip()!r} is given twice", spec))
    return key.strip(), value.strip()


def expand_defense(spec: str | dict | DefenseSpec) -> list[DefenseSpec]:
    """A defense spec with sweeps to one checked `DefenseSpec` per point: `ccel:alpha=[0.1,0.5]`,
    `ccel:alpha=0.1..0.9/5`, and the product over several swept parameters (`ccel:alpha=[0.1,0.5],beta=[1,2]`).
    In YAML a list value in `params` is a sweep too. A list in the defense's own recipe (`@lr=[0.1,0.5]`, YAML
    `train: {lr: [0.1, 0.5]}`) is not a sweep: it is chosen on the defender's reserve (`DefenseSpec.candidates`)."""
    if isinstance(spec, DefenseSpec):
        return [parse_defense(spec)]
    if isinstance(spec, dict):
        _check_keys("defense", spec, {"name", "loss", "params", "train"})
        if ("name" in spec) == ("loss" in spec):
            raise ConfigError(expected("defense", "its name under 'name:' (or the older 'loss:'), once", spec))
        params = spec.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(expected("defense params", "a mapping of parameter names to values", params))
        name = str(spec.get("name", spec.get("loss")))
        axes = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in params.items()}
        train, label = spec.get("train") or {}, name
    elif isinstance(spec, str):
        (name, axes, train), label = _split_spec(spec), spec
    else:
        raise ConfigError(expected("defense", "a string like 'ccel:alpha=0.2' or a mapping", spec))
    for key, values in axes.items():
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(expected("defense", f"distinct values of {key!r} in {label!r}", values))
    points = [{}]
    for key, values in axes.items():
        points = [{**p, key: v} for p in points for v in values]
    train = _parse_train(train, label)  # checked once here, not once per point
    return [parse_defense(DefenseSpec(name, p, dict(train))) for p in points]


def parse_defense(spec: str | dict | DefenseSpec) -> DefenseSpec:
    """`"ccel:alpha=0.2,beta=1"` or `{"loss": "ccel", "params": {"alpha": 0.2}}` to a checked `DefenseSpec`
    (one point: a sweep is refused here; `expand_defense` expands it)."""
    if isinstance(spec, DefenseSpec):
        result = spec
    else:
        points = expand_defense(spec)
        if len(points) != 1:
            raise ConfigError(expected("defense", "one setting (use expand_defense for a sweep)", spec))
        return points[0]
    if result.loss not in defenses.available():
        raise ConfigError(unknown_name("defense", result.loss, defenses.available()))
    try:
        defenses.create(result.loss, **result.params)  # validates parameter names and values now, not hours into a run
    except (ValueError, TypeError) as err:
        raise ConfigError(f"Defense {result.label}: {err}") from None
    # no recipe of its own: the defense's default one (DP-SGD's), shown in its label like any other
    train = _parse_train(result.train or defenses.default_recipe(result.loss), result.label)
    return DefenseSpec(result.loss, dict(result.params), train)


_TRAIN_KEYS = {f.name for f in dataclasses.fields(Recipe)}
#: The defender's reserve when a defense needs one and `reserve_fraction` is not given: a fifth of the records.
RESERVE_FRACTION = 0.2

#: The fewest reference models for the leave-one-out evaluation (LiRA needs 2 IN and 2 OUT per record).
LEAVE_ONE_OUT_MIN = 4
_RUNTIME_KEYS = {f.name for f in dataclasses.fields(Runtime)}
#: The most reference models per (defense, seed) and bootstrap resamples a configuration may ask for: far above
#: what any audit uses (LiRA's papers train up to 256), far below what would overflow an array's size.
MAX_REFERENCES = 10_000
MAX_BOOTSTRAP = 1_000_000


def _placement_hint(section: str, key: str) -> str:
    """Where a misplaced key belongs: `epochs` at the top level lives under `train:`, and so on."""
    top = {f.name for f in dataclasses.fields(ExperimentConfig)}
    if section == "config":
        if key in _TRAIN_KEYS:
            return f" It belongs in the training recipe: write it under 'train:' ('train: {{{key}: ...}}')."
        if key in _RUNTIME_KEYS:
            return f" It is a runtime option: write it under 'runtime:' ('runtime: {{{key}: ...}}')."
        if key in ("loss", "defense"):
            return " Defenses are listed under 'defenses:' (e.g. 'defenses: [ce, ccel:alpha=0.5]')."
    if section == "train" and key in _RUNTIME_KEYS:
        return f" {key!r} is a runtime option, not part of the recipe: write it under 'runtime:'."
    if section in ("train", "runtime") and key in top:
        return f" It is a top-level key: write it at the top level, not under '{section}:'."
    return ""


def _check_keys(section: str, given: Any, valid: set[str]) -> None:
    if not isinstance(given, dict):
        raise ConfigError(expected(section, "a mapping of keys to values", given))
    for key in given:
        if key not in valid:
            hint = _placement_hint(section, str(key))
            if not hint:
                close = difflib.get_close_matches(str(key), sorted(valid), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown key {key!r} in {section}.{hint} Valid keys: {', '.join(sorted(valid))}.")


def _recipe(raw: Any) -> Recipe:
    if isinstance(raw, Recipe):
        return raw
    raw = {} if raw is None else raw
    _check_keys("train", raw, _TRAIN_KEYS)
    try:
        return Recipe(**raw)
    except CclError as err:
        raise ConfigError(f"train: {err}") from None


def parse_runtime(raw: Any) -> Runtime:
    """The `runtime:` section (device, channels_last, compile, eval_every, progress, threads) to a `Runtime`."""
    if isinstance(raw, Runtime):
        return raw
    raw = {} if raw is None else raw
    _check_keys("runtime", raw, _RUNTIME_KEYS)
    try:
        return Runtime(**raw)
    except CclError as err:
        raise ConfigError(f"runtime: {err}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ExperimentConfig:
    """What to train, how, and how to attack it.

    `defenses` lists the losses to compare (one for `ccl audit`); each is trained with the `train` recipe on
    every seed. `num_references` reference models per (defense, seed) are trained exactly like the target.
    `stacked` says whether reference models train stacked with `torch.func` ("auto": for the `mlp`
    architecture, where stacking is several times faster on a CPU; "on"; "off"): the two paths agree to about
    1e-6, not bit for bit, so the choice is part of the recipe, never a timing.
    """

    dataset: str = "digits"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=dict)
    train: Recipe = field(default_factory=Recipe)
    defenses: list[DefenseSpec] = field(default_factory=lambda: [DefenseSpec("ce")])
    seeds: list[int] = field(default_factory=lambda: [0])
    num_references: int = 8
    population_fraction: float = 0.1
    reserve_fraction: float | None = None  # the defender's reserve; None: RESERVE_FRACTION if a defense needs one
    attacks: list[str] | None = None  # None: every attack the setup supports
    flip_queries: bool = False  # query the original and the flipped image (images only); no augmentation otherwise
    bootstrap: int = 200  # bootstrap resamples for confidence intervals (0: none)
    stacked: str = "auto"  # "auto" | "on" | "off"
    fprs: list[float] = field(default_factory=lambda: list(metrics.DEFAULT_FPRS))  # where TPR is reported
    standardize: bool | str = "auto"  # tabular features to mean 0, variance 1: "auto" (user files), true, false
    canaries: int = 0  # canary records added to the audit pool, each IN for half the models (even; 0: none)
    canary_kind: str = "mislabeled"  # "mislabeled" | "ood" (see ccl.data.canaries)
    leave_one_out: bool | str = "auto"  # every model as the target, pooled: "auto" (with >= 4 reference models)
    target_members: str | None = None  # a model trained elsewhere: its members (.npy indices or boolean mask)
    target_checkpoint: str | None = None  # ... and its weights for `model` (state dict; weights_only loading)
    target_logits: str | None = None  # ... or its outputs (N, C) on every record
    # the verdicts' practical thresholds (`ccl.summary.MIN_EFFECT`: auc, accuracy and tpr, the last two in points);
    # they only change the summary, never a result, so a resume may change them
    min_effect: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def _set(self, name: str, value: Any) -> None:
        """Stores a normalised value: the config is frozen once built, so only validation writes to it."""
        object.__setattr__(self, name, value)

    def validate(self) -> None:
        """Checks every field and stores its normalised form (resolved paths, expanded defenses, sorted FPRs)."""
        self._check_data_and_model()
        self._check_defenses_and_seeds()
        self._check_counts()
        self._check_supplied_target()
        self._check_attacks_and_fprs()
        self._check_min_effect()

    def _check_min_effect(self) -> None:
        if not isinstance(self.min_effect, dict):
            raise ConfigError(expected("min_effect", "a mapping such as {auc: 0.01, accuracy: 1}", self.min_effect))
        for key, value in self.min_effect.items():
            if key not in ("auc", "accuracy", "tpr"):
                raise ConfigError(unknown_name("min_effect key", key, ("auc", "accuracy", "tpr")))
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ConfigError(expected(f"min_effect {key}", "a non-negative number", value))
        self._set("min_effect", {k: float(v) for k, v in self.min_effect.items()})

    def _check_data_and_model(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(expected("dataset", "a dataset name or a path to a .npz file", self.dataset))
        kind = data.file_kind(self.dataset)  # a user's file: .npz, .csv, .parquet, or an image folder ("dir/")
        if self.dataset not in data.available() and kind is None:
            raise ConfigError(unknown_name("dataset", self.dataset, data.available()))
        if kind is not None:  # stored resolved: a resume from another directory finds it
            folder = "/" if kind == "image_folder" else ""
            self._set("dataset", str(Path(self.dataset).expanduser().resolve()) + folder)
        for name in ("dataset_options", "model_options"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(expected(name, "a mapping of option names to values", getattr(self, name)))
        reserved = sorted({"num_classes", "input_shape", "seed"} & set(self.model_options))
        if reserved:  # they come from the data and the seed rule
            raise ConfigError(expected("model_options", "options other than those ccl sets from the data", reserved))
        if isinstance(self.model, str) and models.is_user_model(self.model):
            try:
                models.describe(self.model)  # imports it now: a bad path fails before any work
            except CclError as err:
                raise ConfigError(str(err)) from None
        elif not isinstance(self.model, str) or self.model not in models.available():
            raise ConfigError(unknown_name("model", self.model, models.available()))
        path = self.dataset_options.get("path")
        if isinstance(path, str) and self.dataset in ("npz", "csv", "parquet", "image_folder"):
            resolved = str(Path(path).expanduser().resolve()) + ("/" if path.endswith("/") else "")
            self._set("dataset_options", {**self.dataset_options, "path": resolved})
        self._set("train", _recipe(self.train))

    def _check_defenses_and_seeds(self) -> None:
        if isinstance(self.defenses, (str, dict)) or not isinstance(self.defenses, Sequence):
            raise ConfigError(expected("defenses", "a list of defenses such as [ce, ccel:alpha=0.5]", self.defenses))
        self._set("defenses", [point for d in self.defenses for point in expand_defense(d)])
        if not self.defenses:
            raise ConfigError(expected("defenses", "at least one defense", []))
        labels = [d.label for d in self.defenses]
        if len(set(labels)) != len(labels):
            raise ConfigError(expected("defenses", "distinct defenses", labels))
        for d in self.defenses:  # stopping after the recipe's last epoch is ce under another name
            stop = d.params.get("epochs") if d.loss == "early_stop" else None
            if stop is not None and stop > self.train.epochs:  # equal: a sweep's "no early stopping" end
                what = f"at most the recipe's {self.train.epochs} epochs (more would release the ce model)"
                raise ConfigError(f"Defense {d.label}: " + expected("epochs", what, stop))
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            self._set("seeds", [self.seeds])
        if not isinstance(self.seeds, Sequence) or not self.seeds or not all(_is_int(s) for s in self.seeds):
            raise ConfigError(expected("seeds", "a non-empty list of integers", self.seeds))
        if any(s < 0 for s in self.seeds):
            raise ConfigError(expected("seeds", "non-negative integers", self.seeds))
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(expected("seeds", "distinct seeds", self.seeds))
        self._set("seeds", list(self.seeds))

    def _check_counts(self) -> None:
        try:
            check_positive_int("num_references", self.num_references, minimum=0)
            check_in_range("population_fraction", self.population_fraction, low=0.0, high=0.9)
            check_positive_int("bootstrap", self.bootstrap, minimum=0)
            check_positive_int("canaries", self.canaries, minimum=0)
        except CclError as err:
            raise ConfigError(str(err)) from None
        for key, most in (("num_references", MAX_REFERENCES), ("bootstrap", MAX_BOOTSTRAP)):
            if getattr(self, key) > most:  # e.g. 10^20 from YAML: numpy cannot even allocate its masks
                raise ConfigError(expected(key, f"an integer <= {most:,}", getattr(self, key)))
        self._resolve_reserve()
        if self.stacked not in ("auto", "on", "off"):
            raise ConfigError(expected("stacked", "one of 'auto', 'on', 'off'", self.stacked))
        if self.canaries % 2:
            raise ConfigError(
                expected("canaries", "an even number (each canary is IN for half the models)", self.canaries)
            )
        if self.canary_kind not in ("mislabeled", "ood"):
            raise ConfigError(expected("canary_kind", "'mislabeled' or 'ood'", self.canary_kind))
        if self.leave_one_out not in (True, False, "auto"):
            raise ConfigError(expected("leave_one_out", "true, false or 'auto'", self.leave_one_out))
        if self.leave_one_out is True and self.num_references < LEAVE_ONE_OUT_MIN:
            raise ConfigError(
                expected("num_references", f"at least {LEAVE_ONE_OUT_MIN} with leave_one_out", self.num_references)
            )
        if self.standardize not in (True, False, "auto"):
            raise ConfigError(expected("standardize", "true, false or 'auto'", self.standardize))
        if not isinstance(self.flip_queries, bool):
            raise ConfigError(expected("flip_queries", "true or false", self.flip_queries))

    def _check_supplied_target(self) -> None:
        for name in ("target_members", "target_checkpoint", "target_logits"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str) or not Path(value).expanduser().is_file():
                    raise ConfigError(expected(name, "the path of an existing file", value))
                self._set(name, str(Path(value).expanduser().resolve()))
        supplied = self.target_checkpoint is not None or self.target_logits is not None
        if self.target_checkpoint is not None and self.target_logits is not None:
            raise ConfigError("Give --target-checkpoint or --target-logits, not both.")
        if supplied != (self.target_members is not None):
            raise ConfigError(
                "A supplied target needs both its members (--target-members) and its weights (--target-checkpoint) "
                "or outputs (--target-logits)."
            )
        if supplied and self.canaries:
            raise ConfigError(
                "Canaries must be in the target's training set: they cannot be used with a supplied target."
            )
        if supplied and self.defenses[0].selects:
            raise ConfigError(
                f"The supplied target was trained with one recipe, but {self.defenses[0].label} chooses among several: "
                "give each recipe key one value after '@' (e.g. dpsgd:epsilon=8@lr=0.5,momentum=0)."
            )
        if supplied and len(self.defenses) != 1:
            raise ConfigError(
                expected(
                    "defenses",
                    "one defense: the recipe the supplied target was trained with",
                    [d.label for d in self.defenses],
                )
            )

    def _check_attacks_and_fprs(self) -> None:
        if self.attacks is not None:
            if isinstance(self.attacks, str) or not isinstance(self.attacks, Sequence):
                raise ConfigError(expected("attacks", "a list of attack names", self.attacks))
            for name in self.attacks:
                if name not in attacks.available():
                    raise ConfigError(unknown_name("attack", name, attacks.available()))
            self._set("attacks", list(self.attacks))
        if isinstance(self.fprs, (str, bytes)) or not isinstance(self.fprs, Sequence) or not self.fprs:
            raise ConfigError(expected("fprs", "a non-empty list of false-positive rates in (0, 1)", self.fprs))
        for f in self.fprs:
            try:
                check_in_range("fprs", f, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
            except CclError as err:
                raise ConfigError(str(err)) from None
        self._set("fprs", sorted(float(f) for f in self.fprs))

    def _resolve_reserve(self) -> None:
        """`reserve_fraction` None becomes `RESERVE_FRACTION` when a defense learns from the defender's reserve,
        0 otherwise; stored resolved, so a resumed run keeps its split whatever defenses it adds."""
        # the defenses that learn from the reserve, and those whose recipe is chosen on it
        needs = [d.label for d in self.defenses if d.procedure().needs_reserve or d.selects]
        given = self.reserve_fraction
        if self.reserve_fraction is None:
            self._set("reserve_fraction", RESERVE_FRACTION if needs else 0.0)
        try:
            check_in_range("reserve_fraction", self.reserve_fraction, low=0.0, high=0.9)
        except CclError as err:
            raise ConfigError(str(err)) from None
        self._set("reserve_fraction", float(self.reserve_fraction))
        if self.population_fraction + self.reserve_fraction > 0.9:
            why = f" (the default when {', '.join(needs)} run)" if given is None else ""
            raise ConfigError(
                f"`reserve_fraction` {self.reserve_fraction:g}{why} and `population_fraction` "
                f"{self.population_fraction:g} leave too little to audit: together they may be at most 0.9. Lower "
                "--population-fraction or set --reserve-fraction lower."
            )
        if needs and self.reserve_fraction == 0:
            raise ConfigError(
                f"{', '.join(needs)} learn(s) from (or choose a recipe on) the defender's reserve, records no audited "
                "model trains on, and "
                "reserve_fraction is 0 (a resumed run keeps the value it started with): set --reserve-fraction "
                f"above 0 (e.g. {RESERVE_FRACTION}) in a new run."
            )

    @property
    def supplied_target(self) -> bool:
        """Whether the target was trained elsewhere (its checkpoint or outputs are given), not by ccl."""
        return self.target_checkpoint is not None or self.target_logits is not None

    @property
    def uses_leave_one_out(self) -> bool:
        """Whether every model is also evaluated as the target ("auto": with at least 4 reference models)."""
        if self.leave_one_out == "auto":  # not for a supplied target: its references follow another recipe
            return self.num_references >= LEAVE_ONE_OUT_MIN and not self.supplied_target
        return bool(self.leave_one_out)

    @property
    def standardizes(self) -> bool:
        """Whether tabular features are standardised: "auto" does it for the user's own files and leaves the
        registered datasets as their papers use them (digits in [0, 1], Purchase/Texas/Location binary)."""
        if self.standardize == "auto":
            if self.supplied_target:  # the supplied target saw the features as they are
                return False
            kind = data.file_kind(self.dataset) or self.dataset
            return kind in ("npz", "csv", "parquet")
        return bool(self.standardize)

    def build_model(self, dataset, *, seed: int):
        """The configured architecture for `dataset` (a `ccl.data.Dataset`), its initial weights drawn from `seed`."""
        return models.create(
            self.model,
            num_classes=dataset.num_classes,
            input_shape=dataset.input_shape,
            seed=seed,
            **self.model_options,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "dataset_options": dict(self.dataset_options),
            "model": self.model,
            "model_options": dict(self.model_options),
            "train": self.train.to_dict(),
            "defenses": [d.to_dict() for d in self.defenses],
            "seeds": list(self.seeds),
            "num_references": self.num_references,
            "population_fraction": self.population_fraction,
            "reserve_fraction": self.reserve_fraction,
            "attacks": None if self.attacks is None else list(self.attacks),
            "flip_queries": self.flip_queries,
            "bootstrap": self.bootstrap,
            "stacked": self.stacked,
            "fprs": list(self.fprs),
            "standardize": self.standardize,
            "canaries": self.canaries,
            "canary_kind": self.canary_kind,
            "leave_one_out": self.leave_one_out,
            "target_members": self.target_members,
            "target_checkpoint": self.target_checkpoint,
            "target_logits": self.target_logits,
            **({"min_effect": dict(self.min_effect)} if self.min_effect else {}),  # stored only when set
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        _check_keys("config", raw, valid)
        try:
            return cls(**raw)
        except TypeError as err:
            raise ConfigError(str(err)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


#: Sections whose mappings merge key by key across layers (the others are replaced whole).
_MERGED_SECTIONS = ("train", "runtime", "dataset_options", "model_options")


def merge(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Merges raw settings, later layers winning: top-level keys are replaced, but `train`, `runtime`,
    `dataset_options` and `model_options` merge key by key (a flag `--lr` changes the lr, not the recipe)."""
    out: dict[str, Any] = {}
    for layer in layers:
        if not layer:
            continue
        for key, value in layer.items():
            if key in _MERGED_SECTIONS and isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            elif key in _MERGED_SECTIONS and isinstance(value, dict):
                out[key] = dict(value)
            else:
                out[key] = value
    return out


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML config file with a safe loader (no code runs from it) as a plain mapping; a key given twice
    in one mapping is an error, not the last value kept."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"The config file {path} is a directory; give a YAML file.")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # SafeLoader: no code runs
    except FileNotFoundError:
        raise ConfigError(f"No such config file: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"The config file {path} is not UTF-8 text; give a YAML file.") from None
    except OSError as err:
        raise ConfigError(f"Cannot read the config file {path}: {err.strerror}.") from None
    except RecursionError:
        raise ConfigError(f"Cannot parse {path} as YAML: it is nested too deeply for a configuration.") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"Cannot parse {path} as YAML{where}: {problem}.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(expected("config file", "a YAML mapping at the top level", type(raw).__name__))
    return raw
