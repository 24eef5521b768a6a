"""The Ray executor: the same numbers as the local executor, cached jobs never submitted, a crashed worker's task
retried, clear errors for an unreachable cluster and a missing Ray.

One local Ray instance (2 CPUs) serves the module; tests that need Ray skip without it, the missing-Ray test
runs either way."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ccl.audit
from ccl.audit import LocalExecutor, run_audit
from ccl.config import ExperimentConfig
from ccl.errors import CclError, MissingDependencyError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the tiny audit's "too few records" warnings

SETTINGS = {
    "dataset": "synthetic",
    "dataset_options": {"num_samples": 160, "num_features": 8},
    "model_options": {"hidden": [16]},
    "num_references": 4,
    "bootstrap": 5,
    "defenses": ["ce", "ccel"],
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.05},
}


def config(**changes) -> ExperimentConfig:
    return ExperimentConfig.from_dict({**SETTINGS, **changes})


def metric_files(run: Path) -> dict[str, bytes]:
    files = [run / "metrics.json", *sorted(run.glob("results/*/seed-0/metrics.json"))]
    assert len(files) == 3
    return {str(f.relative_to(run)): f.read_bytes() for f in files}


@pytest.fixture
def one_seed(quiet):
    """`one_seed(cache, **changes)`: the execution context and the jobs of the first defense of seed 0, as
    `run_audit` makes them."""
    from ccl.audit.execute import ExecutionContext, ModelCache
    from ccl.audit.plan import plan_jobs
    from ccl.audit.preflight import preflight
    from ccl.data import membership_split

    def one_seed(cache: Path, **changes):
        cfg = config(stacked="off", **changes)
        dataset = preflight(cfg, quiet)
        split = membership_split(len(dataset), num_references=cfg.num_references, seed=0)
        query = np.concatenate([split.pool, split.population])
        ctx = ExecutionContext(dataset, query, False, quiet.replace(threads=1), ModelCache(cache))
        if hasattr(ctx, "num_pool"):  # as run_audit sets it (the label-only attacks query the pool)
            ctx.num_pool = split.pool.size
        return ctx, plan_jobs(cfg, cfg.defenses[0], 0, split)

    return one_seed


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)

        def warm() -> None:  # nested, so Ray ships it by value (workers cannot import this test module)
            import torch._dynamo  # noqa: F401  (torch.optim imports it lazily, in seconds)

            import ccl.audit.execute  # noqa: F401

        [ray.remote(warm).remote() for _ in range(2)]  # workers import torch while the first test trains locally
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, quiet) -> dict[str, dict[str, bytes]]:
    """The local executor's metrics, by `stacked` setting (computed on first use)."""

    class Lazy(dict):
        def __missing__(self, stacked: str) -> dict[str, bytes]:
            out = tmp_path_factory.mktemp(f"local-{stacked}")
            run_audit(config(stacked=stacked), out / "run", runtime=quiet, executor=LocalExecutor())
            self[stacked] = metric_files(out / "run")
            return self[stacked]

    return Lazy()


@pytest.mark.parametrize("stacked", ["auto", "off"])
def test_same_numbers_as_local(ray_instance, local_runs, tmp_path, stacked, quiet):
    from ccl.audit.ray_executor import RayExecutor

    executor = RayExecutor()
    run_audit(config(stacked=stacked), tmp_path / "run", runtime=quiet, executor=executor)
    assert metric_files(tmp_path / "run") == local_runs[stacked]
    # "auto" stacks an MLP's 4 reference models into one task per defense; "off" trains each model alone
    assert executor.submitted == 2 * 5
    assert executor.submitted_tasks == (2 * 5 if stacked == "off" else 2 * 2)


def test_progress_ticks_once_per_model(ray_instance, tmp_path, one_seed):
    from ccl.audit.ray_executor import RayExecutor

    ctx, jobs = one_seed(tmp_path / "cache")
    ticks: list[int] = []
    executor = RayExecutor()
    executor.run(jobs[:2], ctx, on_done=ticks.append)
    assert ticks == [1, 1]
    ticks.clear()
    executor.run(jobs, ctx, on_done=ticks.append)  # 2 cached (ticked at once), 3 trained
    assert ticks == [1, 1, 1, 1, 1] and executor.submitted == 5


def test_cached_jobs_are_never_submitted(ray_instance, local_runs, tmp_path, quiet):
    from ccl.audit.ray_executor import RayExecutor

    first = RayExecutor()
    run_audit(config(num_references=2), tmp_path / "run", runtime=quiet, executor=first)
    assert first.submitted == 2 * 3

    more = RayExecutor()  # 2 more reference models per defense: only those are trained
    run_audit(config(num_references=4), tmp_path / "run", runtime=quiet, executor=more, resume=True)
    assert more.submitted == 2 * 2
    assert metric_files(tmp_path / "run") == local_runs["auto"]

    again = RayExecutor()  # a new run sharing the cache trains nothing
    run_audit(config(), tmp_path / "again", runtime=quiet, executor=again, cache_dir=tmp_path / "run" / "models")
    assert again.submitted == 0
    assert metric_files(tmp_path / "again") == local_runs["auto"]


def test_ctrl_c_cancels_the_rest_and_keeps_completed_jobs(ray_instance, tmp_path, one_seed):
    from ccl.audit.ray_executor import RayExecutor

    def interrupt(n: int) -> None:
        raise KeyboardInterrupt

    ctx, jobs = one_seed(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        RayExecutor().run(jobs, ctx, on_done=interrupt)  # Ctrl-C as the first task finishes
    done = [job for job in jobs if ctx.cache.outputs(job, ctx.query_index) is not None]
    assert 1 <= len(done) < len(jobs)
    assert not list(ctx.cache.root.rglob("*.tmp"))

    resumed = RayExecutor()
    resumed.run(jobs, ctx)
    assert resumed.submitted == len(jobs) - len(done)
    local, _ = one_seed(tmp_path / "local")
    LocalExecutor().run(jobs, local)
    for job in jobs:
        ours, theirs = (c.cache.outputs(job, ctx.query_index) for c in (ctx, local))
        np.testing.assert_array_equal(ours, theirs)


def test_cancelling_kills_a_running_task_and_removes_its_temporary_files(ray_instance, tmp_path, one_seed):
    from ccl.audit.ray_executor import RayExecutor

    def stubborn(folder: str) -> None:
        """A task that ignores interrupts while it holds a half-written file, as a task in the middle of an import or
        a write would be left by one."""
        import time

        from ccl._io import atomic_path

        with atomic_path(os.path.join(folder, "outputs.npz")):
            while True:
                try:
                    time.sleep(0.05)
                except KeyboardInterrupt:
                    pass

    ctx, jobs = one_seed(tmp_path / "cache")
    folder = ctx.cache.folder(jobs[0])
    folder.mkdir(parents=True)
    ref = ray_instance.remote(stubborn).remote(str(folder))  # nested, so Ray ships it by value
    deadline = time.monotonic() + 60
    while not list(folder.glob(".*.tmp")):  # the task is running and writing
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)
    RayExecutor()._cancel({ref: [jobs[0]]}, ctx)
    ready, _ = ray_instance.wait([ref], timeout=1)
    assert ready  # an interrupt alone would not have stopped it: its worker was killed
    assert not list(folder.glob(".*.tmp"))


def test_a_crashed_worker_is_retried(ray_instance, local_runs, tmp_path, monkeypatch, quiet):
    from ccl.audit.ray_executor import CRASH_ONCE_ENV, RayExecutor

    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))  # test-only: the first task kills its worker process
    executor = RayExecutor(max_retries=1)
    run_audit(config(stacked="off"), tmp_path / "run", runtime=quiet, executor=executor)
    assert marker.exists()
    assert metric_files(tmp_path / "run") == local_runs["off"]


def test_a_crashed_worker_without_retries_is_a_clear_error(ray_instance, tmp_path, monkeypatch, one_seed):
    from ccl.audit.ray_executor import CRASH_ONCE_ENV, RayExecutor, RayTaskFailedError

    monkeypatch.setenv(CRASH_ONCE_ENV, str(tmp_path / "crashed"))
    ctx, jobs = one_seed(tmp_path / "cache")
    with pytest.raises(RayTaskFailedError, match=f"{jobs[0].key}.*resume the run"):
        RayExecutor(max_retries=0).run(jobs[:1], ctx)
    assert ctx.cache.outputs(jobs[0], ctx.query_index) is None


def test_a_training_error_is_raised_as_it_was_raised(ray_instance, tmp_path, quiet):
    from ccl.audit.ray_executor import RayExecutor
    from ccl.errors import TrainingError

    with pytest.raises(TrainingError, match="epoch") as err:
        run_audit(
            config(train={"epochs": 2, "batch_size": 16, "lr": 1e30}),
            tmp_path / "run",
            runtime=quiet,
            executor=RayExecutor(),
        )
    assert type(err.value) is TrainingError  # not Ray's wrapper: the command line prints it as one line


def test_resources_and_device_checks(tmp_path, one_seed):
    pytest.importorskip("ray")
    from ccl.audit.ray_executor import RayExecutor, _task_resources

    assert _task_resources(1, 0, 16) == (1, 0)
    assert _task_resources(2, 0.25, 1) == (2, 0.25)
    assert _task_resources(1, 0.25, 16) == (1, 1.0)  # a stacked group shares one GPU
    assert _task_resources(1, 2, 16) == (1, 2)
    with pytest.raises(CclError, match="cpus_per_model"):
        RayExecutor(cpus_per_model=0)
    with pytest.raises(CclError, match="max_retries"):
        RayExecutor(max_retries=-1)
    ctx, _ = one_seed(tmp_path / "cache")
    ctx.runtime = ctx.runtime.replace(device="cuda")
    with pytest.warns(RuntimeWarning, match="gpus_per_model"):
        RayExecutor()._check_device(ctx)


@pytest.mark.parametrize("address", ["ray://127.0.0.1:1", "127.0.0.1:1", "[::1]:1"])
def test_an_unreachable_address_is_a_clear_error(address):
    pytest.importorskip("ray")
    from ccl.audit.ray_executor import RayConnectionError, RayExecutor

    start = time.monotonic()
    with pytest.raises(RayConnectionError, match=re.escape(f"Cannot reach a Ray cluster at '{address}'")) as err:
        RayExecutor(address=address, connect_timeout_s=5).connect()
    assert isinstance(err.value, CclError)
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("address", ["ray://", "host:port"])
def test_a_malformed_address_is_a_clear_error(address):
    pytest.importorskip("ray")
    from ccl.audit.ray_executor import RayConnectionError, RayExecutor

    with pytest.raises(RayConnectionError, match=f"The Ray address '{address}'"):
        RayExecutor(address=address).connect()


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "ccl.audit.ray_executor", raising=False)
    monkeypatch.delattr(ccl.audit, "ray_executor", raising=False)
    from ccl.audit.ray_executor import RayExecutor  # the module imports without Ray

    with pytest.raises(MissingDependencyError, match=r"pip install 'ccl\[ray\]'"):
        RayExecutor()


@pytest.mark.slow
def test_the_cli_runs_an_audit_on_ray_with_the_local_numbers(tmp_path, ray_instance):
    """`ccl compare --executor ray` gives byte-identical metrics to the local executor."""
    from ccl import cli

    argv = [
        "compare",
        "--dataset",
        "synthetic",
        "--data-option",
        "num_samples=160",
        "--data-option",
        "num_features=8",
        "--model-option",
        "hidden=[16]",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--num-references",
        "4",
        "--bootstrap",
        "5",
        "--quiet",
    ]
    assert cli.main([*argv, "--out", str(tmp_path / "local")]) == 0
    assert cli.main([*argv, "--executor", "ray", "--cpus-per-model", "1", "--out", str(tmp_path / "ray")]) == 0
    for name in ("metrics.json", "results/ce/seed-0/metrics.json"):
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()
    assert cli.main([*argv, "--ray-address", "127.0.0.1:1", "--out", str(tmp_path / "x")]) == 2  # needs --executor ray
    assert not (tmp_path / "x").exists()
