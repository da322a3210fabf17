"""Running many independent jobs (retrainings, further-training runs) resumably.

A :class:`Job` is a keyed call of a module-level function that returns a dict of arrays; an
:class:`Executor` runs jobs and writes each result to a :class:`ResultStore` *as it finishes*,
skipping keys already there, so a killed evaluation restarted with the same jobs resumes where it
stopped and ends with identical numbers. Backends: ``serial``, ``local`` (process pool sized to the
cores, one torch thread per worker) and ``ray`` (optional extra).
"""

from ggda.execution.executor import (
    BACKENDS,
    Executor,
    Job,
    LocalExecutor,
    SerialExecutor,
    job_key,
    make_executor,
)
from ggda.execution.store import ResultStore

__all__ = [
    "BACKENDS",
    "Executor",
    "Job",
    "LocalExecutor",
    "ResultStore",
    "SerialExecutor",
    "job_key",
    "make_executor",
]
