"""Module-level job functions for the executor tests (must be importable by spawned workers)."""

import os
import time

import numpy as np


def square(x: int) -> dict:
    return {"y": np.array([x * x]), "pid": np.array([os.getpid()])}


def flaky(path: str) -> dict:
    """Fails the first time it is called (marker file), succeeds afterwards."""
    if not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("transient failure")
    return {"ok": np.array([1])}


def suicide_once(path: str, x: int) -> dict:
    """Kills its own worker process the first time: simulates a lost worker."""
    if not os.path.exists(path):
        open(path, "w").close()
        os._exit(1)
    return {"y": np.array([x])}


def slow_square(x: int) -> dict:
    time.sleep(0.05)
    return {"y": np.array([x * x])}


def sleepy(x: int, seconds: float) -> dict:
    """Sleeps, then returns: a job that is still running when a test signals its executor."""
    time.sleep(seconds)
    return {"y": np.array([x]), "pid": np.array([os.getpid()])}


def timed(x: int, seconds: float) -> dict:
    """Sleeps and reports when it ran (wall clock), to check how many jobs ran at once."""
    start = time.time()
    time.sleep(seconds)
    return {"y": np.array([x]), "span": np.array([start, time.time()])}
