"""Auditing training recipes: the pipeline behind `ccl audit`, `ccl compare` and `ccl demo`.

Modules, in the order the data flows:
    preflight   every check that can fail, before the run directory exists
    plan        the model jobs of one (defense, seed), content-keyed by what determines their weights
    execute     executors that train jobs into the model cache (local; the interface a distributed one implements)
    ray_executor  the same jobs as Ray tasks, on a laptop, a multi-GPU machine or a cluster
    score       attacks, utility and loss statistics from the models' outputs
    pipeline    `run_audit` and `run_train`, which drive the steps and write typed results (`ccl.results`)
"""

from .execute import ExecutionContext, Executor, LocalExecutor, ModelCache, train_group
from .pipeline import run_audit, run_train
from .plan import ModelJob, plan_jobs, result_key, stacking
from .ray_executor import RayExecutor

__all__ = [
    "ExecutionContext",
    "Executor",
    "LocalExecutor",
    "ModelCache",
    "ModelJob",
    "RayExecutor",
    "plan_jobs",
    "result_key",
    "run_audit",
    "run_train",
    "stacking",
    "train_group",
]
