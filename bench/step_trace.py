"""What a new row width costs a Gated DeltaNet hybrid's training step: the host's trace of the
compiled step against the device's first run of it.

    python bench/step_trace.py                 # CPU: trace seconds only, steadytune's recurrence and mlx-lm's loop
    python bench/step_trace.py --run           # also run each width twice (first run - second = set-up)
    python bench/step_trace.py --run --experts 512 --device gpu   # the GPU question of bench/RESULTS.md

Why: on an H100 each new width cost a Qwen3-Next-shaped model 12-25 s (bench/RESULTS.md, the
hybrid rows) where the dense 7B pays about 2 s. The model is bench/memory.py's "Qwen3-Next-80B shape 4
layers" (random 4-bit g64 weights, bfloat16 compute on the GPU, float32 on the CPU, every linear layer but the routers adapted
at rank 8), stepped by steadytune's Step (its compiled gradient-and-update call, one example a row,
4 rows) at each width given. Per width it prints the seconds the host spends tracing and compiling
the call (nothing is evaluated), and with --run the seconds of its first evaluation and of the same
call again (the difference is the device's set-up of that width). Then the same with mlx-lm's
recurrence (a token at a time, what mlx_lm.lora trains with) in place of steadytune's chunkwise one
(recurrence.py), unless --no-loop.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--experts", type=int, default=16, help="routed experts a layer (Qwen3-Next: 512; the "
                   "trace does not depend on it, the build time does)")
    p.add_argument("--widths", default="256,512,1024", help="row widths, in order (a width given twice is "
                   "traced once)")
    p.add_argument("--run", action="store_true", help="evaluate each call, twice")
    p.add_argument("--no-loop", action="store_true", help="skip mlx-lm's token-at-a-time recurrence")
    p.add_argument("--loop-widths", default=None, help="widths for mlx-lm's loop (default: --widths; its first "
                   "run at a width can take minutes on a GPU)")
    p.add_argument("--no-chunkwise", action="store_true", help="skip steadytune's recurrence (the loop alone)")
    a = p.parse_args(argv)

    import steadytune  # noqa: F401  (first: it loads OpenBLAS before mlx, backend.use_fast_blas)
    import mlx.core as mx
    import numpy as np

    import memory
    from steadytune import recurrence
    from steadytune.data import Tokenized
    from steadytune.loss import loss_chunk, loss_fn
    from steadytune.step import compile_step

    mx.set_default_device(mx.cpu if a.device == "cpu" else mx.gpu)
    spec = next(s for s in memory.MOE["gpu"] if s["name"] == "Qwen3-Next-80B shape 4 layers 1x512")
    spec = dict(spec, config=dict(spec["config"], num_experts=a.experts))
    # the trainer's compute dtype on each device (bfloat16 on the CPU is about 8x slower than float32)
    settings = dict(memory.settings(spec, "cuda"), dtype="float32" if a.device == "cpu" else "bfloat16")
    tic = time.perf_counter()
    step = memory.make_step(spec, settings)  # installs the chunkwise recurrence
    print(f"model built in {time.perf_counter() - tic:.1f} s ({a.experts} experts, {a.device})", flush=True)
    rng = np.random.default_rng(0)
    rows = []

    def probe(label: str, widths: str) -> None:
        for w in map(int, widths.split(",")):
            ids = [rng.integers(0, 1000, w + 1).tolist() for _ in range(4)]
            step.examples = Tokenized(ids, [[True] * len(x) for x in ids])
            runs = []
            for _ in range(2 if a.run else 1):
                scale, _ = step.begin_group([[0, 1, 2, 3]], 0)
                b = step.batches([[0, 1, 2, 3]])[-1]
                tic = time.perf_counter()
                out = step.grad_apply(b.inputs, b.targets, b.mask, b.segments, scale, None, mx.array(0.0),
                                      mx.array(1e-5, dtype=mx.float32), step.max_norm)
                traced = time.perf_counter() - tic
                if a.run:
                    mx.eval(step.state, *out)
                runs.append((traced, time.perf_counter() - tic - traced))
            row = dict(recurrence=label, width=int(b.inputs.shape[1]), trace_s=round(runs[0][0], 3))
            if a.run:
                row.update(first_run_s=round(runs[0][1], 3), again_s=round(runs[1][1], 3),
                           setup_s=round(runs[0][1] - runs[1][1], 3))
            rows.append(row)
            print(row, flush=True)

    if not a.no_chunkwise:
        probe("steadytune chunkwise", a.widths)
    if not a.no_loop:
        from mlx_lm.models import gated_delta

        gated_delta.gated_delta_ops = recurrence.mlx_lm_ops()
        step.grad, step.grad_apply, step.update, step.eval_loss = compile_step(
            step.model, step.optimizer, step.state,
            partial(loss_fn, chunk=loss_chunk(step.model, settings["chunked_ce"]), mask_dtype=mx.float32))
        probe("mlx-lm loop", a.loop_widths or a.widths)
    cols = list(rows[0]) if rows else []
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
