"""The Gated DeltaNet recurrence (Qwen3-Next, Qwen3.5) in training, in chunks recomputed backward.

When a model trains, mlx-lm runs the gated delta rule as a loop of one step a token
(`gated_delta.gated_delta_ops`; its Metal kernel has no gradient), and the backward pass of that
loop keeps several state-sized arrays (value heads x 128 x 128 float32 per token: 2 MB for
Qwen3-Next's 32 heads) for every token. On an 80 GB H100 a Qwen3-Next-shaped model of 4 layers ran
out of memory at 4 examples a step, in mlx_lm.lora and here, and the planner, which did not count
it, had said 12.5 GB (bench/RESULTS.md).

Here the same steps run in chunks of CHUNK tokens, each chunk under `mx.checkpoint`: the forward
pass keeps each chunk's inputs and its starting state, and the backward pass recomputes a chunk's
steps from them. The operations, and their order, are mlx-lm's own step (`_gated_delta_step_ops`),
so the loss and the gradients are bitwise the same (tests/test_recurrence.py). On the CPU, a
4-layer qwen3_next (3 Gated DeltaNet layers of 4 value heads, 4 rows of 704 tokens) peaked at 15.6
GB with mlx-lm's loop and 2.9 GB in chunks; plan.RECURRENCE_STATES counts what is left.
`install()` puts it in place of mlx-lm's loop for every model that calls `gated_delta_update`;
inference on Metal keeps its kernel (mlx-lm runs the loop only when training or off Metal).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

# Tokens per recomputed chunk: the forward pass keeps T / CHUNK states a layer, the backward pass
# works on one chunk at a time. The memory measured is nearly the same from 16 to a whole row
# (MLX keeps the chain of state gradients, about one state a token, whatever the chunks), and 16
# costs the least time (tests/test_recurrence.py; plan.RECURRENCE_STATES).
CHUNK = 16


@lru_cache(maxsize=None)
def _chunk_fn(steps: int, masked: bool):
    from mlx_lm.models.gated_delta import _gated_delta_step_ops

    def run(q, k, v, g, beta, state, *mask):
        ys = []
        for t in range(steps):
            y, state = _gated_delta_step_ops(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state,
                                             mask[0][:, t] if masked else None)
            ys.append(y)
        return mx.stack(ys, axis=1), state

    return mx.checkpoint(run)


def chunked_gated_delta_ops(q, k, v, g, beta, state=None, mask=None):
    """mlx-lm's `gated_delta_ops` (same arguments, same results), in checkpointed chunks."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    if (repeat := Hv // Hk) > 1:
        q = mx.repeat(q, repeat, -2)
        k = mx.repeat(k, repeat, -2)
    ys = []
    for s in range(0, T, CHUNK):
        e = min(s + CHUNK, T)
        extra = () if mask is None else (mask[:, s:e],)
        y, state = _chunk_fn(e - s, mask is not None)(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e],
                                                       beta[:, s:e], state, *extra)
        ys.append(y)
    return mx.concatenate(ys, axis=1), state


_mlx_lm_ops = None  # mlx-lm's loop, kept when install() replaces it


def mlx_lm_ops():
    """mlx-lm's own `gated_delta_ops` (the reference the tests compare against)."""
    from mlx_lm.models import gated_delta

    return _mlx_lm_ops or gated_delta.gated_delta_ops


def install() -> None:
    """Use the chunked recurrence wherever mlx-lm's models run the gated delta loop."""
    global _mlx_lm_ops
    from mlx_lm.models import gated_delta

    if gated_delta.gated_delta_ops is not chunked_gated_delta_ops:
        _mlx_lm_ops = gated_delta.gated_delta_ops
        gated_delta.gated_delta_ops = chunked_gated_delta_ops
