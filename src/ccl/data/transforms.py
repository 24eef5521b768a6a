"""Transforms of a whole dataset, applied by the pipeline before any model sees the data."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .datasets import Dataset

__all__ = ["standardize"]


def standardize(dataset: Dataset, *, fit_index: np.ndarray) -> Dataset:
    """Tabular features centred and scaled to unit variance, with the mean and standard deviation of the records
    `fit_index` (the pipeline passes the audit pool: the records the target and the reference models may train
    on, never the population). A constant feature is only centred. Image data (records of shape (C, H, W)) is
    returned unchanged. Without it, raw-scale features (e.g. values up to thousands) make SGD diverge or fit
    only the majority class."""
    if dataset.x.ndim != 2:
        return dataset
    fit = dataset.x[torch.as_tensor(np.asarray(fit_index), dtype=torch.long)].double()
    mean, std = fit.mean(0), fit.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return dataclasses.replace(dataset, x=((dataset.x.double() - mean) / std).float())
