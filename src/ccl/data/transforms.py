"""Transforms of data: of a whole dataset, applied by the pipeline before any model sees the data
(`standardize`), and of a batch on its device (`augment_batch`, training's augmentation and the label-only
attacks' queries)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import Dataset

__all__ = ["augment_batch", "standardize"]


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


def augment_batch(x: Tensor, generator: torch.Generator, *, padding: int = 4) -> Tensor:
    """Random crop with zero padding and random horizontal flip of a batch `(B, C, H, W)`, on its device."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch_idx, chan_idx, rows, cols]
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)
