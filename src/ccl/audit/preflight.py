"""Step 0 of an audit: every check that can fail runs before the run directory exists or a model trains.

A failed check leaves nothing behind, so a retry needs no `rm`. Checked: optional dependencies, the device, the
attacks against the number of reference models and the population, the data (it loads, it has two classes or
more, augmentation only for images), and that the architecture builds for the data and takes its records.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .. import attacks, data
from .._checks import expected
from ..config import ExperimentConfig
from ..data import Dataset
from ..errors import ConfigError, DataError, InvalidArgumentError, MissingDependencyError
from ..training import Runtime, resolve_device

__all__ = ["check_attacks", "check_dependencies", "load_dataset", "preflight"]

#: What each optional feature imports, and the extra that installs it.
EXTRAS = {"report": ("matplotlib", "report"), "digits": ("sklearn", "data"), "dpsgd": ("opacus", "dp")}


def check_dependencies(*features: str) -> None:
    """Raises `MissingDependencyError` naming `pip install 'ccl[EXTRA]'` for the first missing feature."""
    for feature in features:
        module, extra = EXTRAS[feature]
        if importlib.util.find_spec(module) is None:
            what = {"report": "the report's plots", "dpsgd": "DP-SGD (the dpsgd defense)"}.get(
                feature, f"the {feature!r} dataset"
            )
            raise MissingDependencyError(
                f"{what} need {module}, which is not installed: pip install 'ccl[{extra}]' (or 'ccl[all]'). "
                "Nothing was trained."
            )


def check_attacks(config: ExperimentConfig) -> None:
    """Named attacks that the setup cannot support fail now, not after hours of training."""
    for name in config.attacks or []:
        attack = attacks.create(name)
        if config.num_references < attack.min_references:
            raise ConfigError(
                f"Attack {name!r} needs at least {attack.min_references} reference models; "
                f"--num-references is {config.num_references}."
            )
        if attack.needs_population and config.population_fraction == 0:
            raise ConfigError(f"Attack {name!r} needs a population: set --population-fraction above 0.")


def load_dataset(config: ExperimentConfig, *, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Loads the configured data; `data_dir` is where downloaded datasets are cached (a runtime choice, never
    part of the configuration)."""
    if config.dataset == "digits":
        check_dependencies("digits")
    options = dict(config.dataset_options)
    if data_dir is not None and config.dataset in data.available() and "cache" in data.parameters(config.dataset):
        options.setdefault("cache", os.fspath(data_dir))
    return data.load(config.dataset, **options)


def check_data(config: ExperimentConfig, dataset: Dataset) -> None:
    classes = int(torch.unique(dataset.y).numel())
    if classes < 2:
        raise DataError(f"The dataset {config.dataset!r} has {classes} class; membership audits need at least 2.")
    images = dataset.x.ndim == 4
    if config.train.augment and not images:
        raise ConfigError(
            expected("augment", "off for non-image data (records of shape (C, H, W))", f"on, for {config.dataset!r}")
        )
    if config.flip_queries and not images:
        raise ConfigError(
            expected(
                "flip_queries", "off for non-image data (records of shape (C, H, W))", f"on, for {config.dataset!r}"
            )
        )
    model = config.build_model(dataset, seed=0)
    if not any(p.requires_grad for p in model.parameters()):
        raise InvalidArgumentError(
            f"The model {config.model!r} has no trainable parameters: there is nothing to train (does it register "
            "its layers as attributes of an nn.Module?)."
        )
    out = _probe(config, model, dataset, training=False)
    if out.ndim != 2 or out.shape[1] != dataset.num_classes:
        raise InvalidArgumentError(
            f"The model {config.model!r} returns shape {tuple(out.shape)}; expected (N, {dataset.num_classes})."
        )
    _probe(config, model, dataset, training=True)


def _probe(config: ExperimentConfig, model: torch.nn.Module, dataset: Dataset, *, training: bool) -> torch.Tensor:
    """The model's outputs on two records, in eval mode or as a training step computes them (with a backward
    pass); an error of the model's own code (of any type: it may be the user's) is one line naming the model."""
    model.train(training)
    try:
        with torch.set_grad_enabled(training):
            out = model(dataset.x[:2])
            if training:
                out.float().sum().backward()
    except Exception as err:
        when = "in training mode (forward and backward)" if training else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InvalidArgumentError(
            f"The model {config.model!r} cannot take the records of {config.dataset!r} (shape "
            f"{tuple(dataset.input_shape)}){' ' + when if when else ''}: {type(err).__name__}: {first}"
        ) from None
    return out.detach()


def preflight(config: ExperimentConfig, runtime: Runtime, *, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Runs every check and returns the loaded dataset."""
    resolve_device(runtime.device)
    check_attacks(config)
    check_dependencies(*sorted({d.loss for d in config.defenses if d.loss in EXTRAS}))  # dpsgd: Opacus
    dataset = load_dataset(config, data_dir=data_dir)
    check_data(config, dataset)
    split = data.membership_split(
        len(dataset), num_references=0, seed=0, population_fraction=config.population_fraction
    )
    check_population(config, split.population.size)
    return dataset


def check_population(config: ExperimentConfig, size: int) -> None:
    """A named attack that needs more population records than the data leaves fails now, not after training
    (an attack left to the default is skipped instead)."""
    for name in config.attacks or []:
        attack = attacks.create(name)
        if attack.needs_population and size < attack.min_population:
            raise ConfigError(
                f"Attack {name!r} needs at least {attack.min_population} population records; --population-fraction "
                f"{config.population_fraction:g} of {config.dataset!r} leaves {size}: raise it or use more data."
            )
