"""The timing loop that both sides of benchmarks/compare.py use, so that theirs and ours are timed
the same way. Standard library only: the reference drivers import it from a throwaway virtual
environment that has none of this project's packages.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from typing import Any, Callable


def time_calls(step: Callable[[Any], Any], state: Any, wait: Callable[[Any], Any], min_seconds: float,
               min_calls: int = 1, warmup_calls: int = 1) -> tuple[Any, int, float]:
    """Time sequential calls `state = step(state)` after `warmup_calls` untimed ones.

    Each call consumes the previous call's output, as a training loop does, so the calls cannot
    overlap. They are dispatched back to back and `wait(state)` (block until the device is done,
    returning the state) is called once at the end of each timed block, so host waits stay out of
    the loop. Blocks are added until at least `min_calls` calls and `min_seconds` seconds have
    been timed; the block size comes from the time per call seen so far.

    Returns the final state, the number of timed calls and their seconds.
    """
    estimate = 0.0
    for _ in range(warmup_calls):
        start = time.perf_counter()
        state = wait(step(state))
        estimate = time.perf_counter() - start
    calls, seconds = 0, 0.0
    while calls < min_calls or seconds < min_seconds:
        per_call = seconds / calls if calls else estimate
        wanted = math.ceil((min_seconds - seconds) / per_call) if per_call > 0 else 1
        block = max(min_calls - calls, wanted, 1)
        start = time.perf_counter()
        for _ in range(block):
            state = step(state)
        state = wait(state)
        seconds += time.perf_counter() - start
        calls += block
    return state, calls, seconds


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of `names` ("absent" for one that is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
