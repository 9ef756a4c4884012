"""Where a step's wall goes on the host: `steadytune train ...` with each step waited for, printing
per step the compiled call (tracing a new shape, replaying the graph), `mx.async_eval` (encoding
and launching the kernels, allocation) and the wait for the result, with the call's shape.

    python bench/step_host_time.py train --model M --data D --batch-size 4 --max-steps 60 --out R 2>&1 | grep PROBE
    MLX_USE_CUDA_GRAPHS=1 python bench/step_host_time.py ...   # with MLX's CUDA graphs

A step whose wait is ~0 while async_eval takes the step's time is host-bound: the GPU finishes
before the host has queued the next step (bench/RESULTS.md, "Where a step's time goes on the host").
"""

import sys
import time

import steadytune.step as s  # before mlx: steadytune sets MLX's environment first

import mlx.core as mx

T = {"async": 0.0, "n": 0}
_async_eval, _batches, _dispatch = mx.async_eval, s.Step.batches, s.Step.dispatch


def async_eval(*a):
    t = time.perf_counter()
    out = _async_eval(*a)
    T["async"] += time.perf_counter() - t
    return out


def batches(self, micro_batches):
    out = _batches(self, micro_batches)
    T["shape"] = tuple(out[-1].inputs.shape)
    return out


def dispatch(self, *a, **k):
    T["async"] = 0.0
    t = time.perf_counter()
    pending = _dispatch(self, *a, **k)
    queued = time.perf_counter() - t
    t = time.perf_counter()
    result = pending.result()
    wait = time.perf_counter() - t
    T["n"] += 1
    print(f"PROBE {T['n']} {T.get('shape')} call {1000 * (queued - T['async']):.0f} ms "
          f"async_eval {1000 * T['async']:.0f} ms wait {1000 * wait:.0f} ms", file=sys.stderr, flush=True)
    return s.Done(result)


mx.async_eval, s.Step.batches, s.Step.dispatch = async_eval, batches, dispatch

if __name__ == "__main__":
    from steadytune.cli import main

    sys.exit(main())
