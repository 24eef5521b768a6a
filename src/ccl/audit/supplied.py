"""Auditing a model trained elsewhere: the target is supplied, not trained.

The user gives the target's members (indices into the dataset, or a boolean mask over it, as `.npy`) and
either its weights (`--target-checkpoint`: a state dict for the configured `--model`, loaded with
`weights_only=True`; a `.safetensors` file through safetensors when installed) or its outputs on every record of
the dataset (`--target-logits`: an `(N, C)` `.npy`). The audit pool is the members and as many non-members,
drawn by the seed from the records the target did not train on; the rest is the population. Reference models
are trained exactly as usual, with the recipe in the configuration: the attacker knows the recipe, so the
audit is only as good as the match between that recipe and the one that trained the target (the report says
so).

ccl cannot see how the target's training records were preprocessed, only the symptoms of a mismatch, and it warns
on either of two (`target_fit_note`): the target does not classify its members clearly better than records it did
not train on (wrong member indices; a mismatch that breaks its predictions), or it fits its own members worse than
the reference models fit records they never saw (a mismatch that keeps its predictions but flattens its
outputs: a ReLU network trained on scikit-learn's raw digits 0-16, queried on ccl's digits in [0, 1], still gets
its members right, with a mean loss of 1.5 instead of 0.003).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .. import signals
from .._checks import expected
from ..config import ExperimentConfig
from ..data import Dataset, MembershipSplit
from ..data.download import file_digest
from ..errors import ConfigError, DataError
from ..training import predict_logits, resolve_device
from .statistics import ModelAccess, model_statistics

__all__ = [
    "MEMBER_ACCURACY_Z",
    "check_supplied_target",
    "load_members",
    "load_supplied_model",
    "member_accuracy_z",
    "supplied_identity",
    "supplied_note",
    "supplied_notes",
    "supplied_split",
    "supplied_target_logits",
    "supplied_target_statistics",
    "target_fit_note",
]

#: A supplied target's members count as classified "clearly" better than its non-members when the one-sided
#: two-proportion z statistic exceeds this, the 1% level: a target that learnt its members is far above it (z of
#: 4.7 with 150 members of digits), and equal accuracies, the sign of wrong member indices, stay below it 99 times
#: in 100.
MEMBER_ACCURACY_Z = 2.326


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


def check_supplied_target(config: ExperimentConfig, dataset: Dataset) -> None:
    """Loads the supplied target's outputs or weights once, before the run directory exists: a file that cannot be
    read or does not fit the data fails now, not after every reference model has trained."""
    if config.target_logits:
        _load_logits(config.target_logits, dataset)
    elif config.target_checkpoint:
        load_supplied_model(config, dataset)


def _load_logits(path: str, dataset: Dataset) -> np.ndarray:
    """The supplied `(N, C)` outputs, checked: a real-valued, finite array of one row per record."""
    try:
        logits = np.load(path, allow_pickle=False)
    except Exception as err:  # random bytes, a pickled object array, a missing file: numpy raises many types
        why = str(err).strip().split(". ")[0] if str(err).strip() else type(err).__name__
        raise DataError(f"Cannot read --target-logits {path} as a .npy array of numbers: {why}.") from None
    if not isinstance(logits, np.ndarray) or not np.issubdtype(logits.dtype, np.number):
        what = f"{logits.dtype} {logits.shape}" if isinstance(logits, np.ndarray) else type(logits).__name__
        raise DataError(expected("target_logits", "a .npy array of real numbers", what))
    if logits.ndim != 2 or logits.shape[0] != len(dataset) or logits.shape[1] != dataset.num_classes:
        raise DataError(
            expected("target_logits", f"an array of shape ({len(dataset)}, {dataset.num_classes})", logits.shape)
        )
    if np.iscomplexobj(logits) or not np.isfinite(logits).all():
        raise DataError(expected("target_logits", "finite real numbers", f"{path} with NaN, inf or complex values"))
    return logits


def load_supplied_model(config: ExperimentConfig, dataset: Dataset) -> torch.nn.Module:
    """`config.model` with the supplied checkpoint's weights (loaded safely)."""
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
        first = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
        raise DataError(f"Cannot load --target-checkpoint {path} ({type(err).__name__}: {first}).") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a ccl checkpoint
    if not isinstance(state, dict):
        raise DataError(
            expected("target_checkpoint", "a state dict (a mapping of names to tensors)", type(state).__name__)
        )
    model = config.build_model(dataset, seed=0)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as err:
        raise DataError(
            f"--target-checkpoint {path} does not fit the model {config.model!r}: {str(err).strip().splitlines()[0]}"
        ) from None
    return model


def supplied_target_logits(config: ExperimentConfig, dataset: Dataset, query_index: np.ndarray, runtime) -> np.ndarray:
    """The supplied target's logits on `query_index`: from its checkpoint (loaded safely into `config.model`)
    or from the supplied outputs."""
    if config.target_logits:
        return _load_logits(config.target_logits, dataset)[query_index].astype(np.float32)
    model = load_supplied_model(config, dataset)
    return predict_logits(
        model, dataset.x[torch.as_tensor(query_index)], device=runtime.device, flip_queries=config.flip_queries
    )


def supplied_target_statistics(
    config: ExperimentConfig, dataset: Dataset, pool_index: np.ndarray, runtime, needs: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """The statistics `needs` (`ccl.audit.statistics`) of a supplied checkpoint on the pool records; none for
    supplied logits (the attacks that read them are then skipped with a note)."""
    if not needs or not config.target_checkpoint:
        return {}
    access = ModelAccess(load_supplied_model(config, dataset), resolve_device(runtime.device))
    index = torch.as_tensor(pool_index)
    stats = model_statistics(
        needs,
        num_models=1,
        predict_each=torch.no_grad()(access.predict_each),
        functional=access.functional,
        x=dataset.x[index],
        y=dataset.y[index],
    )
    return {k: v[0] for k, v in stats.items()}


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


def member_accuracy_z(member_correct: np.ndarray, nonmember_correct: np.ndarray) -> float:
    """The one-sided two-proportion z statistic of "members are classified correctly more often than non-members",
    with the pooled rate: `(a_m - a_n) / sqrt(a (1 - a) (1/n_m + 1/n_n))`. With every record right (or every one
    wrong) the accuracies are equal and there is no evidence of a difference: 0.

    Args:
        member_correct: `(n_m,)` bool, whether the target classifies each member correctly.
        nonmember_correct: `(n_n,)` bool, the same on records it did not train on.
    """
    n_m, n_n = member_correct.size, nonmember_correct.size
    a_m, a_n = member_correct.mean(), nonmember_correct.mean()
    pooled = (member_correct.sum() + nonmember_correct.sum()) / (n_m + n_n)
    if pooled in (0.0, 1.0):
        return 0.0
    return float((a_m - a_n) / np.sqrt(pooled * (1 - pooled) * (1 / n_m + 1 / n_n)))


def target_fit_note(
    logits: np.ndarray, labels: np.ndarray, split: MembershipSplit, *, preprocessing: str
) -> str | None:
    """A warning when the supplied target does not look trained on these records, else None.

    It warns when either (1) the target does not classify its members clearly better than the records it did not
    train on (`member_accuracy_z` at or below `MEMBER_ACCURACY_Z`), or (2) its mean loss on its members is above the
    reference models' mean loss on the pool records they did not train on: a model fits its own training records
    better than models of its recipe fit unseen ones, unless it is queried on records unlike those it trained on,
    was given the wrong members, or was trained with a recipe far from the references'.

    Args:
        logits: `(1 + K, Q, [A,] C)`, the target first; queries: the pool, then the population. Only the first
            (unperturbed) query of each record is used.
        labels: `(Q,)` the records' labels.
        split: the supplied target's split (`supplied_split`).
        preprocessing: what was done to the records the target was queried on, in words (the note ends with it).
    """
    if logits.ndim == 4:
        logits = logits[:, :, 0]  # (1 + K, Q, C): the unperturbed query
    p = split.pool.size
    is_member = np.r_[split.target_in, np.zeros(split.population.size, bool)]  # (Q,)
    correct = logits[0].argmax(-1) == labels
    z = member_accuracy_z(correct[is_member], correct[~is_member])
    member_loss = float(signals.loss(logits[0], labels)[is_member].mean())
    reference_out_loss = None
    if logits.shape[0] > 1:
        reference_loss = signals.loss(logits[1:, :p], labels[:p])  # (K, P)
        reference_out_loss = float(reference_loss[~split.reference_in].mean())
    fits_members_worse = reference_out_loss is not None and member_loss > reference_out_loss
    if z > MEMBER_ACCURACY_Z and not fits_members_worse:
        return None
    symptoms = []
    if z <= MEMBER_ACCURACY_Z:
        symptoms.append(
            f"It does not classify its members clearly better (one-sided two-proportion test: z = {z:.2f}, at or "
            f"below {MEMBER_ACCURACY_Z}, the 1% level)."
        )
    if fits_members_worse:
        symptoms.append(
            f"It fits its own members worse (mean loss {member_loss:.3g}) than the reference models fit records they "
            f"did not train on ({reference_out_loss:.3g})."
        )
    return (
        f"The supplied target does not look trained on the records it was queried on. Its accuracy: "
        f"{100 * correct[is_member].mean():.1f}% on its {int(is_member.sum())} members, "
        f"{100 * correct[~is_member].mean():.1f}% on {int((~is_member).sum())} records it did not train on. "
        f"{' '.join(symptoms)} Likely causes: it was trained on records preprocessed otherwise than these, "
        "--target-members does not list the records it trained on, or it was trained with a recipe far from this "
        f"run's. Until that is fixed, attack results on this target say nothing about its leakage. {preprocessing}"
    )


def supplied_notes(
    config: ExperimentConfig, dataset: Dataset, logits: np.ndarray, labels: np.ndarray, split: MembershipSplit
) -> list[str]:
    """The notes of an audit of a supplied target: what was supplied (`supplied_note`), then, when the target does
    not look trained on these records, a warning (`target_fit_note`; also issued as a `UserWarning`, which the
    command line prints)."""
    standardized = config.standardizes and dataset.x.ndim == 2  # `standardize` leaves images as they are
    preprocessing = (
        f"The records of {dataset.name}, as ccl loads them: {dataset.preprocessing or '(not described).'} This audit "
        + ("standardised them per seed (--standardize on)." if standardized else "did not standardise them.")
    )
    note = target_fit_note(logits, labels, split, preprocessing=preprocessing)
    if note is None:
        return [supplied_note(config)]
    warnings.warn(note, UserWarning, stacklevel=2)
    return [supplied_note(config), note]
