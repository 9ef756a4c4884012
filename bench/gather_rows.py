"""MoE expert matmuls at many routed rows: which op fails on CUDA, and whether slices run.

    python bench/gather_rows.py                   # GPU: 81,920 and 40,960 routed rows
    python bench/gather_rows.py --rows 400 --experts 16   # a CPU check of the bench itself

A routed row is one token sent to one expert: 4 rows of 2,048 tokens at Qwen3-Next's 10 experts a
token are 81,920. mlx-lm's SwitchGLU sorts them by expert and calls gather_qmm on the packed
4-bit experts (here 512 experts of 512 x 2,048, g64, bfloat16 compute), and steadytune's adapters
call gather_mm. Each test runs in its own process (a failed CUDA launch can spoil the process)
and prints ok or the error's last line:
- argsort, gqmm_fwd/gqmm_vjp (gather_qmm, output and input gradient), gmm_fwd/gmm_vjp (the
  adapters' two gather_mm, rank 8), recurrence (recurrence.chunkwise_gated_delta_ops, 32 value
  heads, its gradients), switch_fwd/switch_vjp (mlx-lm's SwitchGLU with mlx-lm's per-expert LoRA
  on its three projections);
- gqmm_vjp_split, gmm_vjp_split: the same ops over slices of 40,960 rows, concatenated;
- steadytune_vjp: the SwitchGLU after qlora.apply_compute, as the trainer runs it (its experts'
  calls in slices of qlora.GATHER_ROWS).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["argsort", "gqmm_fwd", "gqmm_vjp", "gmm_fwd", "gmm_vjp", "recurrence", "switch_fwd", "switch_vjp",
         "gqmm_vjp_split", "gmm_vjp_split", "steadytune_vjp"]
SLICE = 40960
K = 10          # experts a token
H, I = 2048, 512


def one(name: str, rows: int, experts: int) -> None:
    sys.path.insert(0, str(ROOT))
    import steadytune  # noqa: F401  (fast BLAS on the CPU)
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(0)
    dt = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32  # the CPU's gather_mm: float32 only
    if name == "recurrence":
        from steadytune.recurrence import chunkwise_gated_delta_ops

        T = rows // (4 * K)
        q, k = (mx.random.normal((4, T, 16, 128)).astype(dt) * 0.1 for _ in range(2))
        v = mx.random.normal((4, T, 32, 128)).astype(dt)
        g = mx.random.uniform(0.9, 1.0, (4, T, 32)).astype(dt)
        beta = mx.random.uniform(0, 1, (4, T, 32)).astype(dt)
        f = lambda q, k, v: chunkwise_gated_delta_ops(q, k, v, g, beta)[0].astype(mx.float32).sum()  # noqa: E731
        mx.eval(mx.grad(f, argnums=(0, 1, 2))(q, k, v))
        return
    if name == "argsort":
        mx.eval(mx.argsort(mx.random.randint(0, experts, (rows,))))
        return
    idx = mx.sort(mx.random.randint(0, experts, (rows,)).astype(mx.uint32))
    x = (mx.random.normal((rows, 1, H)) * 0.1).astype(dt)
    split = name.endswith("_split")
    name = name.removesuffix("_split")
    gqmm, gmm = mx.gather_qmm, mx.gather_mm
    if split:
        def sliced(op):
            def f(x, *w, rhs_indices, **kw):
                return mx.concatenate([op(x[i:i + SLICE], *w, rhs_indices=rhs_indices[i:i + SLICE], **kw)
                                       for i in range(0, x.shape[0], SLICE)])
            return f
        gqmm, gmm = sliced(gqmm), sliced(gmm)
    if name in ("gqmm_fwd", "gqmm_vjp"):
        wq, s, b = mx.quantize(mx.random.normal((experts, I, H)).astype(dt) * 0.02, group_size=64, bits=4)
        f = lambda x: gqmm(x, wq, s, b, rhs_indices=idx, transpose=True,  # noqa: E731
                           sorted_indices=True).astype(mx.float32).sum()
        mx.eval(f(x) if name == "gqmm_fwd" else mx.grad(f)(x))
    elif name in ("gmm_fwd", "gmm_vjp"):
        a = (mx.random.normal((experts, H, 8)) * 0.01).astype(dt)
        b = (mx.random.normal((experts, 8, I)) * 0.01).astype(dt)
        f = lambda x, a, b: gmm(gmm(x, a, rhs_indices=idx, sorted_indices=True), b, rhs_indices=idx,  # noqa: E731
                                sorted_indices=True).astype(mx.float32).sum()
        mx.eval(f(x, a, b) if name == "gmm_fwd" else mx.grad(f, argnums=(0, 1, 2))(x, a, b))
    else:  # switch_fwd, switch_vjp, steadytune_vjp
        from mlx_lm.models.switch_layers import SwitchGLU
        from mlx_lm.tuner.lora import LoRASwitchLinear

        from steadytune import qlora

        m = SwitchGLU(H, I, experts)
        nn.quantize(m, group_size=64, bits=4)
        m.apply(lambda p: p.astype(dt) if mx.issubdtype(p.dtype, mx.floating) else p)
        m.freeze()
        for n in ("gate_proj", "up_proj", "down_proj"):
            setattr(m, n, LoRASwitchLinear.from_base(getattr(m, n), r=8))
        if name == "steadytune_vjp":
            qlora.apply_compute(m, "native")
        xt = x[: rows // K].reshape(4, rows // K // 4, H)
        inds = mx.random.randint(0, experts, (4, rows // K // 4, K)).astype(mx.uint32)
        if name == "switch_fwd":
            mx.eval(m(xt, inds))
        else:
            mx.eval(nn.value_and_grad(m, lambda xt: m(xt, inds).astype(mx.float32).sum())(xt))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="81920,40960", help="routed rows (tokens x 10), comma-separated")
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--only", default=",".join(TESTS))
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # a single test, in this process
    a = p.parse_args(argv)
    if a.one:
        one(a.one[0], int(a.one[1]), int(a.one[2]))
        return 0
    for rows in map(int, a.rows.split(",")):
        for name in a.only.split(","):
            tic = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, "--one", name, str(rows), str(a.experts)],
                               capture_output=True, text=True, timeout=300)
            last = (r.stderr.strip().splitlines() or [""])[-1][:160]
            print(f"{name:15s} rows {rows:6d} experts {a.experts}: {'ok' if r.returncode == 0 else 'FAIL ' + last} "
                  f"({time.perf_counter() - tic:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
