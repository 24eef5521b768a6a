"""Auditing a model trained elsewhere: the target is supplied, not trained.

The user gives the target's members (indices into the dataset, or a boolean mask over it, as `.npy`) and
either its weights (`--target-checkpoint`: a state dict for the configured `--model`, loaded with
`weights_only=True`; a `.safetensors` file through safetensors when installed) or its outputs on every record of
the dataset (`--target-logits`: an `(N, C)` `.npy`). The audit pool is the members and as many non-members,
drawn by the seed from the records the target did not train on; the rest is the population. Reference models
are trained exactly as usual, with the recipe in the configuration: the attacker knows the recipe, so the
audit is only as good as the match between that recipe and the one that trained the target (the report says
so).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._checks import expected
from ..config import ExperimentConfig
from ..data import Dataset, MembershipSplit
from ..data.download import file_digest
from ..errors import ConfigError, DataError
from ..training import predict_logits

__all__ = ["load_members", "supplied_identity", "supplied_note", "supplied_split", "supplied_target_logits"]


def load_members(path: str, num_records: int) -> np.ndarray:
    """Sorted member indices from a `.npy` of indices or of a boolean mask over the dataset."""
    try:
        raw = np.load(path, allow_pickle=False)
    except Exception as err:
        raise DataError(f"Cannot read --target-members {path} as a .npy array ({type(err).__name__}).") from None
    if raw.dtype == bool:
        if raw.shape != (num_records,):
            raise DataError(expected("target_members", f"a boolean mask of shape ({num_records},)", raw.shape))
        members = np.nonzero(raw)[0]
    elif np.issubdtype(raw.dtype, np.integer) and raw.ndim == 1:
        members = np.unique(raw)
        if members.size != raw.size:
            raise DataError(f"--target-members {path} repeats indices; give each member once.")
        if members.size and (members[0] < 0 or members[-1] >= num_records):
            raise DataError(
                expected("target_members", f"indices in [0, {num_records})", f"{members[0]}..{members[-1]}")
            )
    else:
        raise DataError(
            expected("target_members", "a 1-D array of indices or a boolean mask", f"{raw.dtype} {raw.shape}")
        )
    if members.size < 2:
        raise DataError(f"--target-members {path} holds {members.size} member(s); an audit needs at least 2.")
    return members


def supplied_split(
    members: np.ndarray,
    num_records: int,
    *,
    num_references: int,
    seed: int,
    population_fraction: float,
    reserve_fraction: float = 0.0,
) -> MembershipSplit:
    """The pool: the members and as many non-members (drawn by `seed`); the population and the defender's
    reserve: shares of the rest; reference models in complementary pairs over the pool, as `membership_split`
    draws them."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A]))
    outside = np.setdiff1d(np.arange(num_records), members)
    m = members.size
    n_pop = int(round(population_fraction * num_records))
    n_res = int(round(reserve_fraction * num_records))
    if outside.size < m + n_pop + n_res:
        take = outside.size - n_pop - n_res
        if take < 2:
            raise ConfigError(
                f"The target trained on {m} of {num_records} records: too few others remain for its non-members "
                f"and a population of {n_pop} (and a reserve of {n_res}); lower --population-fraction."
            )
        members = np.sort(rng.choice(members, take, replace=False))  # audit a random subset of the members
        m = take
    order = rng.permutation(outside)
    nonmembers, population = order[:m], np.sort(order[m : m + n_pop])
    reserve = np.sort(order[m + n_pop : m + n_pop + n_res])
    pool = np.sort(np.r_[members, nonmembers])
    target_in = np.isin(pool, members)
    reference_in = np.zeros((num_references, pool.size), bool)  # complementary pairs, as membership_split
    for j in range(0, num_references, 2):
        reference_in[j, rng.permutation(pool.size)[: pool.size // 2]] = True
        if j + 1 < num_references:
            reference_in[j + 1] = ~reference_in[j]
    return MembershipSplit(pool, target_in, reference_in, population, num_records, seed, reserve)


def supplied_target_logits(config: ExperimentConfig, dataset: Dataset, query_index: np.ndarray, runtime) -> np.ndarray:
    """The supplied target's logits on `query_index`: from its checkpoint (loaded safely into `config.model`)
    or from the supplied outputs."""
    if config.target_logits:
        logits = np.load(config.target_logits, allow_pickle=False)
        if logits.ndim != 2 or logits.shape[0] != len(dataset) or logits.shape[1] != dataset.num_classes:
            raise DataError(
                expected("target_logits", f"an array of shape ({len(dataset)}, {dataset.num_classes})", logits.shape)
            )
        return logits[query_index].astype(np.float32)
    path = config.target_checkpoint
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise ConfigError("A .safetensors checkpoint needs safetensors: pip install safetensors.") from None
    except Exception as err:
        raise DataError(f"Cannot load --target-checkpoint {path} ({type(err).__name__}: {err}).") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a ccl checkpoint
    model = config.build_model(dataset, seed=0)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        raise DataError(
            f"--target-checkpoint {path} does not fit the model {config.model!r}: {str(err).splitlines()[0]}"
        ) from None
    return predict_logits(
        model, dataset.x[torch.as_tensor(query_index)], device=runtime.device, flip_queries=config.flip_queries
    )


def supplied_identity(config: ExperimentConfig) -> dict:
    """What identifies the supplied target, for the result key: the files' hashes."""
    return {
        "members": file_digest(config.target_members, "sha256"),
        "checkpoint": file_digest(config.target_checkpoint, "sha256") if config.target_checkpoint else None,
        "logits": file_digest(config.target_logits, "sha256") if config.target_logits else None,
    }


def supplied_note(config: ExperimentConfig) -> str:
    what = (
        f"its checkpoint {Path(config.target_checkpoint).name}"
        if config.target_checkpoint
        else (f"its outputs {Path(config.target_logits).name}")
    )
    return (
        f"The target was supplied ({what}, members {Path(config.target_members).name}), not trained by ccl. The "
        "reference models were trained with the recipe in this run's configuration: the audit is only as good as "
        "the match between that recipe and the one that trained the target."
    )
