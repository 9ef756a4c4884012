"""What a new attention shape costs on a GPU: the first, second and third forward+backward of
`mx.fast.scaled_dot_product_attention` (cuDNN's fused attention on CUDA) at several row counts
and widths, 7B-shaped heads (32 query, 8 key-value, head 128), bfloat16, the additive mask a
packed step passes; `manual` computes it unfused (matmul, softmax, matmul) instead.

    python bench/attention_shapes.py fused
    python bench/attention_shapes.py manual
    MLX_CUDA_USE_CUDNN_SDPA=0 python bench/attention_shapes.py fused   # MLX's own kernel
"""

import sys
import time

import mlx.core as mx

H, KV, D = 32, 8, 128
SHAPES = [(1, 512), (1, 768), (1, 1024), (2, 1024), (1, 640), (1, 512), (4, 384), (1, 2048)]


def times(rows: int, width: int, manual: bool) -> list[float]:
    q = mx.random.normal((rows, H, width, D)).astype(mx.bfloat16)
    k = mx.random.normal((rows, KV, width, D)).astype(mx.bfloat16)
    v = mx.random.normal((rows, KV, width, D)).astype(mx.bfloat16)
    mask = mx.where(mx.tril(mx.ones((width, width), mx.bool_)), 0.0, -1e30).astype(mx.bfloat16)[None, None]

    def f(q, k, v):
        if manual:
            kk, vv = mx.repeat(k, H // KV, 1), mx.repeat(v, H // KV, 1)
            scores = (q * D ** -0.5) @ kk.swapaxes(-1, -2) + mask
            out = mx.softmax(scores.astype(mx.float32), -1).astype(q.dtype) @ vv
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask)
        return out.astype(mx.float32).sum()

    g = mx.value_and_grad(f, argnums=(0, 1, 2))
    out = []
    for _ in range(3):
        mx.synchronize()
        t = time.perf_counter()
        mx.eval(g(q, k, v))
        mx.synchronize()
        out.append(time.perf_counter() - t)
    return out


if __name__ == "__main__":
    manual = len(sys.argv) > 1 and sys.argv[1] == "manual"
    for rows, width in SHAPES:
        mx.reset_peak_memory()
        t = times(rows, width, manual)
        print(f"R={rows} W={width}: first {t[0] * 1000:.0f} ms, then {t[1] * 1000:.1f} / {t[2] * 1000:.1f} ms, "
              f"peak {mx.get_peak_memory() / 1e9:.2f} GB", flush=True)
