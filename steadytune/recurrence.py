"""The Gated DeltaNet recurrence (Qwen3-Next, Qwen3.5) in training: chunkwise, not a token at a time.

When a model trains, mlx-lm runs the gated delta rule as a loop of one step a token
(`gated_delta.gated_delta_ops`; its Metal kernel has no gradient). That costs twice:
- memory: the loop's backward pass keeps several state-sized float32 arrays (value heads x 128 x
  128: 2 MB for Qwen3-Next's 32 heads) for every token. On an 80 GB H100 a Qwen3-Next-shaped
  model of 4 layers ran out of memory at 4 examples a step, in mlx_lm.lora and here;
- time: about 24 operations a token and layer, a graph traced again at every new width and run as
  that many small kernels. On the CPU a new width of a tiny 4-layer model took 4-8 s to trace; on
  an H100 a Qwen3-Next-shaped model logged no step in 200 s (bench/RESULTS.md).

`install()` puts chunkwise_gated_delta_ops in place of mlx-lm's loop for every model that calls
`gated_delta_update` (inference on Metal keeps its kernel: mlx-lm runs the loop only when training
or off Metal): the chunkwise-parallel form of the delta rule, matrix products inside chunks of
CHUNKWISE tokens and a short loop over the chunks. The loss and gradients equal mlx-lm's loop's
within float32 rounding (tests/test_recurrence.py); plan.RECURRENCE_STATES counts what it keeps.
Gates per key dimension (g of 4 dimensions) and single tokens run mlx-lm's own step instead, in
checkpointed chunks (chunked_gated_delta_ops: bitwise mlx-lm's loss and gradients, about half its
memory).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx

# Tokens per recomputed chunk of mlx-lm's loop (chunked_gated_delta_ops, for per-key gates): the
# forward pass keeps T / CHUNK states a layer, the backward pass works on one chunk at a time. The
# memory measured is nearly the same from 16 to a whole row (MLX keeps the chain of state
# gradients, about one state a token, whatever the chunks), and 16 costs the least time.
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


# Tokens per chunk of the chunkwise form: the work inside a chunk is matrix products of
# CHUNKWISE x CHUNKWISE per head, the chunks' state updates a loop of a few operations each.
CHUNKWISE = 64
# A step's decay below exp(LOG_DECAY_FLOOR) counts as that: the chunkwise form works with the
# differences of cumulative log decays, and a decay that underflowed to 0 (log -inf) would make
# them -inf - -inf. The state it multiplies is then 1e-26 of what it was, 0 in effect.
LOG_DECAY_FLOOR = -60.0


def chunkwise_gated_delta_ops(q, k, v, g, beta, state=None, mask=None):
    """mlx-lm's `gated_delta_ops` (same arguments and results, within float32 rounding) in the
    chunkwise-parallel form of the delta rule (Yang et al., "Gated Delta Networks", 2024).

    Why: mlx-lm's loop is a few operations per token, so a row of T tokens is a graph of about
    10 T operations a layer, traced again at every new width and run as that many small kernels:
    on a GPU a 4-layer Qwen3-Next-shaped model logged no step in 200 s (bench/RESULTS.md). Here
    the work inside a chunk of C tokens is matrix products over all chunks at once, and only the
    state carried from chunk to chunk is a loop: about 30 + 6 T / C operations.

    Within a chunk, with S its starting state (value x key), G_t the decay from the chunk's start
    through token t, and A[t, j] = beta_t (G_t / G_j) k_t.k_j for j < t (strictly lower
    triangular), the delta rule's corrections u_t (state += u_t k_t^T after the decay) solve
    (I + A) U = beta (V - G (K S^T)), and then
        y_t = G_t S q_t + sum_{j <= t} (G_t / G_j) (q_t.k_j) u_j,
        S' = G_C S + sum_j (G_C / G_j) u_j k_j^T.
    (I + A)^-1 is (I - A)(I + A^2)(I + A^4)... (A is nilpotent: log2 C products), applied to
    beta V and beta G K at once, so U = U_v - U_k S^T leaves one product per chunk to the loop.
    A masked token (padding) keeps the state (decay 1, no update), as in mlx-lm; its output is
    not read. Gates per key dimension (g of 4 dimensions) run mlx-lm's loop in checkpointed chunks
    (chunked_gated_delta_ops)."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if g.ndim != 3 or T == 1:
        return chunked_gated_delta_ops(q, k, v, g, beta, state, mask)
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    if (repeat := Hv // Hk) > 1:
        q = mx.repeat(q, repeat, -2)
        k = mx.repeat(k, repeat, -2)
    f32 = mx.float32
    lg = mx.maximum(mx.log(g.astype(f32)), LOG_DECAY_FLOOR)
    beta = beta.astype(f32)
    if mask is not None:
        lg = mx.where(mask[..., None], lg, 0.0)
        beta = mx.where(mask[..., None], beta, 0.0)
    C = min(CHUNKWISE, T)
    n = -(-T // C)
    pad = n * C - T  # padded tokens: decay 1, no update, zero query

    def chunks(x):  # (B, T, H, ...) -> (B, H, n, C, ...)
        x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
        x = x.reshape(B, n, C, *x.shape[2:])
        return mx.moveaxis(x, 3, 1)

    qc, kc, vc = chunks(q.astype(f32)), chunks(k.astype(f32)), chunks(v.astype(f32))
    lg = mx.cumsum(chunks(lg), axis=-1)                      # (B, H, n, C): log G_t
    bc = chunks(beta)
    upper = mx.triu(mx.ones((C, C), dtype=mx.bool_), 1)
    diff = mx.where(upper, -mx.inf, lg[..., :, None] - lg[..., None, :])
    decay = mx.exp(diff)                                     # G_t / G_j for j <= t, else 0
    strict = mx.tril(mx.ones((C, C), dtype=f32), -1)
    a = (bc[..., None] * decay * strict) * (kc @ kc.swapaxes(-1, -2))
    gk = mx.exp(lg)[..., None]
    rhs = mx.concatenate([bc[..., None] * vc, bc[..., None] * gk * kc], axis=-1)
    u, power, m = rhs - a @ rhs, a @ a, 2
    while m < C:
        u = u + power @ u
        power, m = power @ power, m * 2
    u_v, u_k = u[..., :Dv], u[..., Dv:]                      # U = u_v - u_k S^T
    attn = decay * (qc @ kc.swapaxes(-1, -2))                # (B, H, n, C, C)
    tail = mx.exp(lg[..., -1:] - lg)[..., None]              # G_C / G_j
    last = mx.exp(lg[..., -1])[..., None, None]              # G_C
    ys = []
    for c in range(n):
        s_t = state.swapaxes(-1, -2)                         # (B, H, Dk, Dv)
        u_c = u_v[:, :, c] - u_k[:, :, c] @ s_t
        ys.append(gk[:, :, c] * (qc[:, :, c] @ s_t) + attn[:, :, c] @ u_c)
        state = last[:, :, c] * state + (tail[:, :, c] * u_c).swapaxes(-1, -2) @ kc[:, :, c]
    y = mx.stack(ys, axis=2).reshape(B, Hv, n * C, Dv)[:, :, :T]
    return y.swapaxes(1, 2).astype(q.dtype), state


_mlx_lm_ops = None  # mlx-lm's loop, kept when install() replaces it


def mlx_lm_ops():
    """mlx-lm's own `gated_delta_ops` (the reference the tests compare against)."""
    from mlx_lm.models import gated_delta

    return _mlx_lm_ops or gated_delta.gated_delta_ops


def install() -> None:
    """Use the chunked recurrence wherever mlx-lm's models run the gated delta loop."""
    global _mlx_lm_ops
    from mlx_lm.models import gated_delta

    if gated_delta.gated_delta_ops is not chunkwise_gated_delta_ops:
        _mlx_lm_ops = gated_delta.gated_delta_ops
        gated_delta.gated_delta_ops = chunkwise_gated_delta_ops
