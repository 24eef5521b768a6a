"""Typed configuration of an experiment, its YAML form, and defense specs such as `ccel:alpha=0.2`.

An `ExperimentConfig` is everything that determines a run's results. It is read from YAML with `safe_load`
and validated: an unknown key is an error that suggests the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import attacks, data, losses, models
from ._checks import check_in_range, check_positive_int, expected, unknown_name
from .training import TrainConfig

__all__ = ["ConfigError", "DefenseSpec", "ExperimentConfig", "load_config", "parse_defense"]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and what is expected."""


@dataclass(frozen=True)
class DefenseSpec:
    """A training loss with its parameters, e.g. `DefenseSpec("ccel", {"alpha": 0.2})`."""

    loss: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.params:
            return self.loss
        return f"{self.loss}(" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"

    @property
    def slug(self) -> str:
        """A file-name-safe form of the label."""
        return "".join(c if c.isalnum() or c in "._=-" else "_" for c in self.label.replace("(", "_")).strip("_")

    def build(self):
        return losses.create(self.loss, **self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "params": dict(self.params)}


def _scalar(text: str) -> Any:
    value = yaml.safe_load(text)
    return value if isinstance(value, (int, float, str, bool)) else text


def parse_defense(spec: str | dict | DefenseSpec) -> DefenseSpec:
    """`"ccel:alpha=0.2,beta=1"` or `{"loss": "ccel", "params": {"alpha": 0.2}}` to a checked `DefenseSpec`."""
    if isinstance(spec, DefenseSpec):
        result = spec
    elif isinstance(spec, dict):
        _check_keys("defense", spec, {"loss", "params"})
        result = DefenseSpec(str(spec.get("loss")), dict(spec.get("params") or {}))
    elif isinstance(spec, str):
        name, _, rest = spec.partition(":")
        params = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(expected("defense", "NAME or NAME:key=value,key=value (e.g. ccel:alpha=0.2)", spec))
            params[key.strip()] = _scalar(value.strip())
        result = DefenseSpec(name.strip(), params)
    else:
        raise ConfigError(expected("defense", "a string like 'ccel:alpha=0.2' or a mapping", spec))
    if result.loss not in losses.available():
        raise ConfigError(unknown_name("loss", result.loss, losses.available()))
    try:
        result.build()  # validates parameter names and values now, not hours into a run
    except (ValueError, TypeError) as err:
        raise ConfigError(f"Defense {result.label}: {err}") from None
    return result


def _check_keys(section: str, given: dict, valid: set[str]) -> None:
    if not isinstance(given, dict):
        raise ConfigError(expected(section, "a mapping of keys to values", given))
    for key in given:
        if key not in valid:
            close = difflib.get_close_matches(str(key), sorted(valid), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown key {key!r} in {section}.{hint} Valid keys: {', '.join(sorted(valid))}.")


_TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class ExperimentConfig:
    """What to train, how, and how to attack it.

    `defenses` lists the losses to compare (one for `ccl audit`); each is trained with `train` on every seed.
    `num_references` reference models per (defense, seed) are trained exactly like the target.
    """

    dataset: str = "digits"
    dataset_options: dict[str, Any] = field(default_factory=dict)
    model: str = "mlp"
    model_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    defenses: list[DefenseSpec] = field(default_factory=lambda: [DefenseSpec("ce")])
    seeds: list[int] = field(default_factory=lambda: [0])
    num_references: int = 8
    population_fraction: float = 0.1
    attacks: list[str] | None = None  # None: every attack the setup supports
    flip_queries: bool = False  # query the original and the flipped image (images only); no augmentation otherwise
    bootstrap: int = 200  # bootstrap resamples for confidence intervals (0: none)
    stacked: str = "auto"  # train reference models stacked with torch.func: "auto" | "on" | "off"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.dataset not in data.available() and not str(self.dataset).endswith(".npz"):
            raise ConfigError(unknown_name("dataset", self.dataset, data.available()))
        if self.model not in models.available():
            raise ConfigError(unknown_name("model", self.model, models.available()))
        if isinstance(self.train, dict):
            _check_keys("train", self.train, _TRAIN_KEYS)
            self.train = TrainConfig(**self.train)
        self.defenses = [parse_defense(d) for d in self.defenses]
        if not self.defenses:
            raise ConfigError(expected("defenses", "at least one defense", []))
        labels = [d.label for d in self.defenses]
        if len(set(labels)) != len(labels):
            raise ConfigError(expected("defenses", "distinct defenses", labels))
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ConfigError(expected("seeds", "a non-empty list of integers", self.seeds))
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(expected("seeds", "distinct seeds", self.seeds))
        check_positive_int("num_references", self.num_references, minimum=0)
        check_in_range("population_fraction", self.population_fraction, low=0.0, high=0.9)
        check_positive_int("bootstrap", self.bootstrap, minimum=0)
        if self.stacked not in ("auto", "on", "off"):
            raise ConfigError(expected("stacked", "one of 'auto', 'on', 'off'", self.stacked))
        if self.attacks is not None:
            for name in self.attacks:
                if name not in attacks.available():
                    raise ConfigError(unknown_name("attack", name, attacks.available()))

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
            "attacks": None if self.attacks is None else list(self.attacks),
            "flip_queries": self.flip_queries,
            "bootstrap": self.bootstrap,
            "stacked": self.stacked,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        valid = {f.name for f in dataclasses.fields(cls)}
        _check_keys("config", raw, valid)
        raw = dict(raw)
        if "train" in raw:
            _check_keys("train", raw["train"] or {}, _TRAIN_KEYS)
            train = dict(raw["train"] or {})
            if "milestones" in train:
                train["milestones"] = tuple(train["milestones"])
            raw["train"] = TrainConfig(**train)
        try:
            return cls(**raw)
        except TypeError as err:
            raise ConfigError(str(err)) from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML config file with `safe_load` (no code runs from it) as a plain mapping."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"No such config file: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"Cannot parse {path} as YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(expected("config file", "a YAML mapping at the top level", type(raw).__name__))
    return raw
