"""Packed rows: several examples in one row, attention kept inside each example.

A packed micro-batch is (inputs, targets, loss mask, segments): `segments[r, t]` numbers the
example token t of row r belongs to (the padding at a row's end is one more segment of its own).
The attention mask is block-diagonal causal: a token sees the earlier tokens of its own example
only. It reaches mlx-lm's models through their cache argument (`PackedCache`): every mlx-lm
attention layer asks its cache for the mask (`make_mask`), for the RoPE offset (`offset`) and
passes keys and values through `update_and_fetch`; no model code is copied or patched.

Positions: RoPE makes attention depend only on the distance between two tokens, and a token
only sees tokens of its own example, so an example at row offset p gives the same attention as
the example alone at position 0 (up to the rounding of the rotation angles): positions restart
in effect without a per-token position input. Models with absolute position embeddings would
not; `check_packable` refuses them.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def attention_bias(segments: mx.array, dtype) -> mx.array:
    """Additive mask (B, 1, T, T): 0 where query t may see key s (same segment, s <= t), the
    dtype's lowest value elsewhere (finite, so a tile of only masked keys never makes NaN).
    One array shared by every layer (and broadcast over heads), so it costs B*T*T values once."""
    T = segments.shape[1]
    pos = mx.arange(T)
    keep = (segments[:, :, None] == segments[:, None, :]) & (pos[:, None] >= pos[None, :])
    return mx.where(keep, mx.array(0, dtype), mx.array(mx.finfo(dtype).min, dtype))[:, None]


class PackedCache:
    """Stands in for a KV cache during a packed forward pass: no state, offset 0, and the
    packed mask for every attention layer."""

    offset = 0

    def __init__(self, bias: mx.array):
        self.bias = bias

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        if window_size is None or window_size >= N:
            return self.bias
        pos = mx.arange(N)  # sliding-window layers: also hide keys window_size or more behind
        near = (pos[:, None] - pos[None, :]) < window_size
        return mx.where(near, self.bias, mx.array(mx.finfo(self.bias.dtype).min, self.bias.dtype))

    def update_and_fetch(self, keys, values):
        return keys, values

    def empty(self):  # some mlx-lm models ask before using a cache
        return True


def model_inputs(model: nn.Module, segments: mx.array | None, mask_dtype=mx.float32) -> dict:
    """Keyword arguments that make an mlx-lm model (or its backbone) attend inside each packed
    example: one PackedCache per layer sharing one mask in `mask_dtype` (what `prepare` returns),
    {} for an ordinary padded batch."""
    if segments is None:
        return {}
    bias = attention_bias(segments, mask_dtype)
    return {"cache": [PackedCache(bias)] * len(model.layers)}


def prepare(model: nn.Module):
    """Check that `model` can train on packed rows (UserError if not); returns the dtype its
    attention computes in, for the mask (SDPA wants both alike)."""
    from mlx.utils import tree_flatten

    from .errors import UserError

    why = check_packable(model)
    if why:
        raise UserError(f"--pack: {why}; train without --pack (--batch-tokens groups examples of "
                        "similar length instead)")
    norms = [v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")]
    return norms[0] if norms else mx.float32


_ABSOLUTE = ("wpe", "embed_positions", "position_embeddings", "pos_embed")


def check_packable(model: nn.Module) -> str | None:
    """None if packing keeps each example's result, else the reason it would not."""
    mt = getattr(getattr(model, "args", None), "model_type", type(model).__module__.rsplit(".", 1)[-1])
    names = {k.split(".")[-1] for k, _ in model.named_modules()}
    if any(a in names for a in _ABSOLUTE):
        return f"model type {mt} has absolute position embeddings (packing needs RoPE)"
    layers = getattr(model, "layers", None)
    if not layers:
        return f"model type {mt}: no transformer layers found"
    attn = next((m for _, m in layers[0].named_modules() if hasattr(m, "rope")), None)
    if attn is None:
        return f"model type {mt}: its attention has no RoPE (packing needs relative positions)"
    return None
