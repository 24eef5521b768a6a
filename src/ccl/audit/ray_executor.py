"""An executor that trains an audit's models as Ray tasks: on the cores of one machine, or on a cluster.

    executor = RayExecutor(address=None)            # a local Ray instance on this machine's cores
    executor = RayExecutor(address="auto")          # the cluster this machine is part of (`ray start`)
    executor = RayExecutor(address="ray://head:10001", gpus_per_model=0.25)   # Ray Client (`ray[client]`)
    executor.connect()                              # optional: fail now (e.g. before a run directory exists)
    run_audit(config, "runs/x", executor=executor)

It implements `ccl.audit.execute.Executor`: jobs whose outputs are in the cache are skipped (and counted as
done), the others are grouped as the local executor groups them (`group_jobs`) and each group is one Ray task
that calls `train_group` in a worker. The worker writes each job's outputs atomically into the same cache
folder, so the cache must be on a filesystem every node sees at the same path (one machine, or NFS and the
like); the driver checks that each task's outputs are visible to it and names the worker's host if not.

- Resources: each task asks for `cpus_per_model` CPUs and, for a stacked group of n models (one process),
  `min(1, gpus_per_model * n)` GPUs (`gpus_per_model` when it is 1 or more). torch in the task runs with
  `runtime.threads` threads, or `max(1, floor(cpus_per_model))` when the runtime leaves it open.
- The dataset travels once per execution context through Ray's object store (and is unpickled once per worker).
- Progress: `on_done(n)` is called as each task finishes (`ray.wait`), so one bar follows the whole cluster;
  per-epoch bars of the workers are switched off.
- Faults: a task whose worker dies is retried up to `max_retries` times; an error raised by training (e.g.
  `TrainingError`) is not retried and is re-raised as it was raised. On an error or Ctrl-C, the tasks still
  queued or running are cancelled; completed jobs stay in the cache (a resumed run does not train them again).
  A running task is cancelled by killing its worker process (Ray starts a fresh one): an interrupt raised
  inside the task could land in the middle of a lazy import (torch imports sympy on first use) and leave a
  half-imported module that breaks every later task on that worker. Its locks die with it (`flock`), and the
  temporary files it was writing are removed.
- Determinism: every job carries its own seeds, so which worker trains what never changes a number.

Ray is imported only when an executor is built; without it, `MissingDependencyError` names the extra.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .._checks import check_in_range, check_positive_int, expected
from .._io import remove_stale_temporaries
from ..errors import CclError, ConfigError, InvalidArgumentTypeError, MissingDependencyError, RunDirectoryError
from .execute import ExecutionContext, group_jobs, train_group
from .plan import ModelJob

__all__ = ["RayConnectionError", "RayExecutor", "RayTaskFailedError"]

#: Test-only: the path of a marker file. The first task to find it absent creates it and kills its own worker
#: process, so that tests can check that a crashed worker's task is retried. Read by the driver when it submits.
CRASH_ONCE_ENV = "CCL_RAY_TEST_CRASH_ONCE"

#: How long an interrupted run waits for its cancelled tasks to stop.
CANCEL_WAIT_S = 10.0

#: How long the driver waits for a worker's stored outputs to show on a network filesystem.
SHARED_FS_WAIT_S = 60.0

#: Default ports: Ray Client (`ray://host`) and the head node's GCS (`host`).
_CLIENT_PORT = 10001
_GCS_PORT = 6379


class RayConnectionError(CclError, ConnectionError):
    """The Ray cluster at the given address cannot be reached."""


class RayTaskFailedError(CclError, RuntimeError):
    """A training task failed for a reason outside training (its worker died more often than retried, the
    node ran out of memory, ...)."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            "The Ray executor needs Ray, which is not installed: pip install 'ccl[ray]'."
        ) from None
    return ray


def _endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that `address` must answer on, or None when Ray finds the cluster itself ("auto")."""
    if address in ("auto", "local"):
        return None
    client = address.startswith("ray://")
    rest = address[len("ray://") :] if client else address
    rest = rest.split("/", 1)[0]
    default = _CLIENT_PORT if client else _GCS_PORT
    if rest.startswith("["):  # [ipv6]:port
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host:
        raise RayConnectionError(f"The Ray address {address!r} names no host; use 'auto', 'HOST:PORT' or 'ray://HOST'.")
    if port and not port.isdigit():
        raise RayConnectionError(f"The Ray address {address!r} has a bad port {port!r}; use 'HOST:PORT'.")
    return host, int(port) if port else default


def _probe(address: str, timeout: float) -> None:
    """Fails fast when nothing listens at `address` (Ray itself retries an unreachable head for minutes)."""
    endpoint = _endpoint(address)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout).close()
    except OSError as err:
        reason = f"no answer within {timeout:g} s" if isinstance(err, TimeoutError) else err.strerror or err
        raise RayConnectionError(
            f"Cannot reach a Ray cluster at {address!r} ({reason}). Start one there (`ray start --head`), or "
            "give another address ('auto': the cluster this machine belongs to; none: a local instance)."
        ) from None


def _driver_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _task_resources(cpus_per_model: float, gpus_per_model: float, size: int) -> tuple[float, float]:
    """(num_cpus, num_gpus) of a task training `size` models in one process."""
    gpus = gpus_per_model if gpus_per_model >= 1 else min(1.0, gpus_per_model * size)
    return cpus_per_model, gpus


_REMOTE: list = []  # `_train_task` as a Ray remote function, made once per process (exported to workers once)


def _remote_task(ray: Any) -> Any:
    if not _REMOTE:
        _REMOTE.append(ray.remote(_train_task))
    return _REMOTE[0]


def _task_name(group: list[ModelJob]) -> str:
    more = f" +{len(group) - 1}" if len(group) > 1 else ""
    return f"ccl-train {group[0].defense.label} {group[0].role}{more}"


# ---------------------------------------------------------------------------------------------------- worker
#: The context last used by this worker process, by object id: tasks of one audit on one worker unpickle the
#: dataset once.
_WORKER_CONTEXT: dict[str, ExecutionContext] = {}


def _worker_context(boxed_ref: list) -> ExecutionContext:
    import ray

    (ref,) = boxed_ref
    key = ref.hex()
    if key not in _WORKER_CONTEXT:
        _WORKER_CONTEXT.clear()
        ctx = ray.get(ref)  # numpy arrays come read-only from the object store; torch warns about those
        _WORKER_CONTEXT[key] = dataclasses.replace(ctx, query_index=np.array(ctx.query_index))
    return _WORKER_CONTEXT[key]


def _writable(job: ModelJob) -> ModelJob:
    """The job with writable index arrays (Ray hands them over read-only, which torch warns about)."""
    changes = {}
    if not job.members.flags.writeable:
        changes["members"] = np.array(job.members)
    if job.reserve is not None and not job.reserve.flags.writeable:
        changes["reserve"] = np.array(job.reserve)
    return dataclasses.replace(job, **changes) if changes else job


def _crash_once(marker: str | None) -> None:
    """Test-only (`CCL_RAY_TEST_CRASH_ONCE`): kills this worker process unless the marker file exists."""
    if marker is None:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


def _train_task(group: list[ModelJob], boxed_ref: list, crash_marker: str | None = None) -> str:
    """The body of one Ray task: `train_group` in the worker, which stores the outputs in the cache. Returns the
    worker's host name (the driver names it if it cannot see the files)."""
    from ..training import torch_threads

    _crash_once(crash_marker)
    ctx = _worker_context(boxed_ref)
    with torch_threads(ctx.runtime.threads):
        train_group([_writable(job) for job in group], ctx)
    return socket.gethostname()


# ---------------------------------------------------------------------------------------------------- driver
class RayExecutor:
    """Trains jobs as Ray tasks (`ccl.audit.execute.Executor`). See the module's docstring.

    `address`: None starts a local Ray instance on this machine (or joins `$RAY_ADDRESS` when set), "auto"
    joins the cluster this machine belongs to, "HOST:PORT" a head node, "ray://HOST[:PORT]" goes through Ray
    Client. If Ray is already initialised in this process, that connection is used as it is.
    `cpus_per_model`, `gpus_per_model`: the resources of one task (a stacked group is one task).
    `max_retries`: how often a task whose worker died is run again.
    `connect_timeout_s`: how long to wait for the address to answer.

    `submitted` counts the jobs (models) submitted as tasks, `submitted_tasks` the tasks."""

    def __init__(
        self,
        *,
        address: str | None = None,
        cpus_per_model: float = 1,
        gpus_per_model: float = 0,
        max_retries: int = 2,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self._ray = _import_ray()
        if address is not None and not isinstance(address, str):
            raise InvalidArgumentTypeError(expected("address", "None, 'auto', 'HOST:PORT' or 'ray://HOST'", address))
        self.address = address or None
        self.cpus_per_model = check_in_range("cpus_per_model", cpus_per_model, low=0.0, low_inclusive=False)
        self.gpus_per_model = check_in_range("gpus_per_model", gpus_per_model, low=0.0)
        self.max_retries = check_positive_int("max_retries", max_retries, minimum=0)
        self.connect_timeout_s = check_in_range("connect_timeout_s", connect_timeout_s, low=0.0, low_inclusive=False)
        self.submitted = 0
        self.submitted_tasks = 0
        self._connected = False
        self._started = False  # whether this executor started Ray (and `close` shuts it down)
        self._warned_device = False
        self._context: tuple[ExecutionContext, ExecutionContext, Any] | None = None  # (given, shipped, ref)

    # -------------------------------------------------------------------------------------------- connection
    def connect(self) -> None:
        """Initialises Ray unless it already is: starts a local instance or joins `address`. Raises
        `RayConnectionError` naming the address when it cannot be reached."""
        ray = self._ray
        if self._connected and ray.is_initialized():
            return
        if self.address is not None:
            _probe(self.address, self.connect_timeout_s)
        self._connected = ray.is_initialized()
        if self._connected:
            self.check_resources()
            return
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "log_to_driver": True,  # workers' warnings and errors; their progress bars are off
            # workers import what the driver can: a user's `--model my_module:build` from the working directory
            "runtime_env": {
                "env_vars": {
                    "PYTHONPATH": os.pathsep.join(
                        p for p in [os.getcwd(), *sys.path, os.environ.get("PYTHONPATH", "")] if p
                    )
                }
            },
        }
        try:
            ray.init(address=self.address, **options)
        except ValueError as err:
            if "ray[client]" in str(err):
                raise MissingDependencyError(
                    f"Connecting to {self.address!r} goes through Ray Client, which needs pip install 'ray[client]'."
                ) from None
            raise RayConnectionError(f"Cannot connect to the Ray cluster at {self.address!r}: {err}") from None
        except (ConnectionError, TimeoutError, SystemExit) as err:  # Ray exits after retrying a silent head
            where = "a local Ray instance" if self.address is None else f"the Ray cluster at {self.address!r}"
            raise RayConnectionError(f"Cannot connect to {where}: {err or type(err).__name__}") from None
        self._started = self._connected = True
        self.check_resources()

    def check_resources(self) -> None:
        """A task that asks for more CPUs or GPUs than the whole cluster has would wait forever: refuse it now,
        naming what it asks for and what the cluster has (`ray.cluster_resources()`, at connection time)."""
        have = self._ray.cluster_resources()
        for key, flag, asked in (
            ("CPU", "--cpus-per-model", self.cpus_per_model),
            ("GPU", "--gpus-per-model", self.gpus_per_model),
        ):
            need = _task_resources(self.cpus_per_model, self.gpus_per_model, 1)[key == "GPU"]
            if need > have.get(key, 0.0):
                self.close()
                raise ConfigError(
                    f"{flag} {asked:g}: each Ray task asks for {need:g} {key}(s), but the Ray cluster has "
                    f"{have.get(key, 0.0):g} {key}(s) in all, so it would wait forever; lower {flag} or add "
                    f"{key} nodes."
                )

    def close(self) -> None:
        """Shuts Ray down if this executor started it (else leaves the connection to its owner)."""
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = self._connected = False
        self._context = None

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------- run
    def _context_ref(self, ctx: ExecutionContext) -> tuple[ExecutionContext, Any]:
        """The context as workers get it (no per-epoch bars, threads set, absolute cache path), in the object
        store once per context."""
        if self._context is not None and self._context[0] is ctx:
            return self._context[1], self._context[2]
        runtime = ctx.runtime.replace(progress=False)
        if runtime.threads is None:
            runtime = runtime.replace(threads=self.task_threads)
        cache = copy.copy(ctx.cache)
        cache.root = ctx.cache.root.absolute()
        shipped = dataclasses.replace(ctx, runtime=runtime, cache=cache)
        ref = self._ray.put(shipped)
        self._context = (ctx, shipped, ref)
        return shipped, ref

    @property
    def task_threads(self) -> int:
        """The CPU threads each task trains with when the runtime leaves them open: floor(cpus_per_model)."""
        return max(1, math.floor(self.cpus_per_model))

    def run(self, jobs: list[ModelJob], ctx: ExecutionContext, *, on_done: Callable[[int], None] | None = None) -> None:
        todo = []
        for job in jobs:
            if not ctx.is_done(job):
                todo.append(job)
            elif on_done:
                on_done(1)
        if not todo:
            return
        self.connect()
        self._check_device(ctx)
        ray = self._ray
        remote = _remote_task(ray)
        _, ref = self._context_ref(ctx)
        crash_marker = os.environ.get(CRASH_ONCE_ENV) or None  # test-only
        pending: dict[Any, list[ModelJob]] = {}
        try:
            for group in group_jobs(todo):
                num_cpus, num_gpus = _task_resources(self.cpus_per_model, self.gpus_per_model, len(group))
                task = remote.options(
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    max_retries=self.max_retries,
                    retry_exceptions=False,
                    name=_task_name(group),
                )
                pending[task.remote(group, [ref], crash_marker)] = group
                self.submitted += len(group)
                self.submitted_tasks += 1
            while pending:
                (done,), _ = ray.wait(list(pending), num_returns=1)
                group = pending.pop(done)
                host = self._result(done, group)
                self._await_outputs(group, ctx, host)
                if on_done:
                    on_done(len(group))
        except BaseException:  # an error, or Ctrl-C: stop the rest; completed jobs stay in the cache
            self._cancel(pending, ctx)
            raise

    def _check_device(self, ctx: ExecutionContext) -> None:
        """Ray hides the GPUs from a task that asks for none: say so when the run means to train on one."""
        if self.gpus_per_model > 0 or self._warned_device:
            return
        device = ctx.runtime.device
        if device.startswith("cuda") or (device == "auto" and _driver_has_cuda()):
            self._warned_device = True
            warnings.warn(
                f"The runtime's device is {device!r}, but the Ray tasks ask for no GPU (gpus_per_model=0), and "
                "Ray hides the GPUs from such tasks: they train on CPUs or fail. Give gpus_per_model (e.g. 1, or "
                "0.25 to share a GPU among 4 models).",
                RuntimeWarning,
                stacklevel=3,
            )

    def _cancel(self, pending: dict[Any, list[ModelJob]], ctx: ExecutionContext) -> None:
        """Cancels queued tasks and kills the workers of running ones, waits a little for them to stop (their
        cache locks die with them), then removes the temporary files they left in their models' folders."""
        refs = list(pending)
        for ref in refs:
            with contextlib.suppress(Exception):
                self._ray.cancel(ref, force=True)
        deadline = time.monotonic() + CANCEL_WAIT_S
        if refs:
            with contextlib.suppress(Exception):
                self._ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)
        # a task counts as cancelled before its killed worker has exited: until then its temporary files belong to
        # a live process and are kept, so they are removed again until none is left (or the wait is over)
        folders = [ctx.cache.folder(job) for group in pending.values() for job in group]
        while True:
            for folder in folders:
                with contextlib.suppress(OSError):
                    remove_stale_temporaries(folder, recursive=True)
            if time.monotonic() > deadline or not any(f.is_dir() and any(f.rglob(".*.tmp")) for f in folders):
                return
            time.sleep(0.05)

    def _result(self, ref: Any, group: list[ModelJob]) -> str:
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except exceptions.RayTaskError as err:  # raised by training: re-raise it as it was raised
            cause = getattr(err, "cause", None)
            if isinstance(cause, Exception):
                raise cause from err
            raise
        except exceptions.RayError as err:
            keys = ", ".join(job.key for job in group)
            raise RayTaskFailedError(
                f"Training the models {keys} ({group[0].defense.label} {group[0].role}"
                f"{f' and {len(group) - 1} more' if len(group) > 1 else ''}) failed after {self.max_retries} "
                f"retries: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Completed models "
                "are kept in the cache; resume the run to train the rest."
            ) from err

    def _await_outputs(self, group: list[ModelJob], ctx: ExecutionContext, host: str) -> None:
        """Waits (up to `SHARED_FS_WAIT_S`) until the outputs a worker stored are visible here: a network
        filesystem may show another machine's new file a little later. Raises when they never appear."""
        paths = [ctx.cache.folder(job) / "outputs.npz" for job in group]
        deadline = time.monotonic() + SHARED_FS_WAIT_S
        while not all(p.exists() for p in paths):
            if time.monotonic() > deadline:
                missing = next(p for p in paths if not p.exists())
                raise RunDirectoryError(
                    f"A Ray worker on {host} stored {missing}, but this machine ({socket.gethostname()}) does not "
                    f"see it: the model cache must be on a filesystem every node mounts at the same path; give "
                    "such a --cache-dir."
                )
            time.sleep(0.5)
