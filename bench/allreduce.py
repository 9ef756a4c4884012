"""All-reduce cost of adapter gradients with MLX's distributed layer (bench, not a test).

    mlx.launch -n 2 --backend ring -- python bench/allreduce.py          # CPU ring on loopback
    mlx.launch -n 2 --backend nccl -- python bench/allreduce.py          # NVIDIA GPUs

Prints, on rank 0, the median time of mx.distributed.all_sum over float32 gradient trees the size
of the LoRA adapters of a few models, and the bus bandwidth it implies (ring: 2(N-1)/N x bytes).
"""

import json
import time

import mlx.core as mx

SIZES = {  # trainable LoRA parameters (all 7 projections of every block)
    "tiny test model (rank 8)": 16_384,
    "SmolLM2-135M rank 8": 2_442_240,
    "Mistral-7B rank 16": 41_943_040,
}


def main():
    g = mx.distributed.init()
    n = g.size()
    rows = []
    for name, count in SIZES.items():
        x = mx.ones((count,), dtype=mx.float32)
        mx.eval(mx.distributed.all_sum(x))
        times = []
        for _ in range(7):
            t = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x))
            times.append(time.perf_counter() - t)
        med = sorted(times)[len(times) // 2]
        bus = 2 * (n - 1) / n * count * 4 / med / 1e9
        rows.append({"gradients": name, "MB": round(count * 4 / 1e6, 1), "ms": round(med * 1e3, 2),
                     "bus_GB_s": round(bus, 2)})
    if g.rank() == 0:
        print(f"ranks={n} device={mx.default_device()}")
        print(f"| {'gradients':28s} | {'MB':>7s} | {'ms':>9s} | {'bus GB/s':>8s} |")
        for r in rows:
            print(f"| {r['gradients']:28s} | {r['MB']:7.1f} | {r['ms']:9.2f} | {r['bus_GB_s']:8.2f} |")
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
