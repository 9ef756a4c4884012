"""Data-parallel scaling on one multi-GPU host (bench, not a test).

The speed benchmark's 7B-architecture QLoRA configuration (bench/throughput.py: random init,
4-bit g64 base, LoRA rank 16 on q,k,v,o,gate,up,down of all 32 layers, AdamW), trained with the
Trainer's own step: every process takes its share of each global micro-batch and the adapter
gradients are summed in one all-reduce. Each GPU always computes 4 x 1024 tokens per micro-batch:

    python bench/scaling.py --out one.json                                  # 1 GPU, accumulation 2
    NCCL_NVLS_ENABLE=0 mlx.launch -n 2 --backend nccl -- python bench/scaling.py --out two.json
    python bench/scaling.py --compare one.json two.json                     # the table

With N processes the global batch is 8 x 1024 per optimizer step: one GPU does it as 2
micro-batches of 4 (token-weighted accumulation), two GPUs as one micro-batch of 8 split 4 + 4.
Both see the same examples in the same updates, so their losses must match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import LR, SIZES, build_base, environment, steadytune_trainer  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

PER_GPU, GLOBAL = 4, 8


def run(steps: int, ckpt: bool, size: str = "7b", seq: int = 1024) -> dict:
    group = mx.distributed.init()
    world, rank = group.size(), group.rank()
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    weights = build_base(size, dtype)
    tr = steadytune_trainer(size, weights, PER_GPU * world, ckpt)
    from steadytune.data import Tokenized

    ids = np.random.default_rng(0).integers(0, SIZES[size]["vocab_size"], (GLOBAL, seq + 1)).tolist()
    tr.train_set = Tokenized(ids, [[True] * (seq + 1)] * GLOBAL)
    step_plan = [list(range(i, i + PER_GPU * world)) for i in range(0, GLOBAL, PER_GPU * world)]
    mx.synchronize()
    mx.reset_peak_memory()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss, _, _ = tr.train_step(step_plan, LR)
        tr.state["step"] += 1
        times.append(time.perf_counter() - t)
        losses.append(loss)
    med = float(np.median(times[2:]))
    row = {"gpus": world, "micro_batches_per_step": len(step_plan), "ckpt": ckpt, "median_s": round(med, 4),
           "tok_s": round(GLOBAL * seq / med, 1), "tok_s_per_gpu": round(GLOBAL * seq / med / world, 1),
           "peak_gb": round(mx.get_peak_memory() / 1e9, 2), "losses": losses, "env": environment()}
    return row if rank == 0 else {}


def compare(paths: list[str]) -> None:
    rows = [json.loads(Path(p).read_text()) for p in paths]
    base = next(r for r in rows if r["gpus"] == 1)
    print("| GPUs | tokens/s | tokens/s per GPU | scaling efficiency | peak GB per GPU | max rel. loss diff vs 1 GPU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        eff = r["tok_s_per_gpu"] / base["tok_s_per_gpu"]
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
        print(f"| {r['gpus']} | {r['tok_s']:,.0f} | {r['tok_s_per_gpu']:,.0f} | {eff:.1%} | {r['peak_gb']} | {diff:.1e} |")
    print(f"\n{base['env']}")
    for r in rows:
        print(f"losses ({r['gpus']} GPU): {[round(x, 5) for x in r['losses']]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--size", default="7b", choices=sorted(SIZES), help="tiny: a CPU smoke test")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--out", default=None)
    p.add_argument("--compare", nargs="+", default=None)
    a = p.parse_args()
    if a.compare:
        return compare(a.compare)
    row = run(a.steps, a.ckpt, a.size, a.seq)
    if row:
        print(json.dumps(row), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(row))


if __name__ == "__main__":
    main()
