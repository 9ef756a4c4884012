"""Fault injection for tests, in one place: environment variables that a test sets for a
subprocess it runs (or kills). Unset, they change nothing.

    STEADYTUNE_TEST_NAN_STEPS=3,5   steps 3 and 5 get a NaN loss scale: the NaN guard's path
                                    (read by setup.make_step, applied by step.Step)
    STEADYTUNE_TEST_CRASH=point:N   SIGKILL the N-th time (default first) the process passes
                                    `point` (crash below): step (after a step), between-files,
                                    before-marker, between-renames, after-swap (checkpoint.py)
"""

from __future__ import annotations

import os


def nan_steps() -> frozenset[int]:
    """The step numbers (1-based) whose loss is made NaN."""
    return frozenset(int(x) for x in os.environ.get("STEADYTUNE_TEST_NAN_STEPS", "").split(",") if x)


_hits: dict[str, int] = {}


def crash(point: str) -> None:
    """SIGKILL this process if STEADYTUNE_TEST_CRASH names `point` and this is its N-th pass: proves
    a crash there loses nothing (tests/test_resume.py). Unset in normal use: returns at once."""
    want = os.environ.get("STEADYTUNE_TEST_CRASH", "")
    name, _, nth = want.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(nth or 1):
        os.kill(os.getpid(), 9)
