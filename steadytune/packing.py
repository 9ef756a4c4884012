"""Packed rows: several examples in one row, attention kept inside each example.

A packed micro-batch is (inputs, targets, loss mask, segments): `segments[r, t]` numbers the
example token t of row r belongs to (the padding at a row's end is one more segment of its own).
The attention mask is block-diagonal causal: a token sees the earlier tokens of its own example
only. It reaches mlx-lm's models through their cache argument (`PackedCache`): every mlx-lm
attention layer asks its cache for the mask (`make_mask`), for the RoPE offset (`offset`) and
passes keys and values through `update_and_fetch`; no model code is copied or patched.

The mask takes the form each attention reads. A model that asks for an array mask
(`return_array=True`: multi-head latent attention in deepseek_v3 and glm4_moe_lite, gemma2's
soft-capped scores) works on it itself, as on mlx-lm's own masks, which are boolean: MLA folds it
in with `mx.where`, which would read an additive mask's zeros as "hidden" and its large negatives
as "visible". Every other model passes the mask straight to `scaled_dot_product_attention`, and
gets it additive in the compute dtype, the bias cuDNN's fused attention takes as is (a boolean
mask would be converted there in every layer).

Positions: RoPE makes attention depend only on the distance between two tokens, and a token
only sees tokens of its own example, so an example at row offset p gives the same attention as
the example alone at position 0 (up to the rounding of the rotation angles): positions restart
in effect without a per-token position input. Attention without position encoding (NoPE layers)
is the same at any offset. Models with absolute position embeddings would not be; nor would
layers that carry a state along the sequence (linear attention, SSM, short convolutions: the
next example would start from the previous one's state) or build their own mask from row
positions (llama4's chunked attention). `why_not_packable` finds these in every layer, from the
caches the model itself asks for (`make_cache`), and the run trains unpacked instead.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def block_causal(segments: mx.array) -> mx.array:
    """Boolean mask (B, 1, T, T) of a packed batch: True where query t may see key s (the same
    segment, s <= t). Broadcast over heads."""
    T = segments.shape[1]
    pos = mx.arange(T)
    return ((segments[:, :, None] == segments[:, None, :]) & (pos[:, None] >= pos[None, :]))[:, None]


def additive(keep: mx.array, dtype) -> mx.array:
    """A boolean mask as an additive one: 0 where True, the dtype's lowest value elsewhere (finite,
    so a tile of only masked keys never makes NaN)."""
    return mx.where(keep, mx.array(0, dtype), mx.array(mx.finfo(dtype).min, dtype))


def attention_bias(segments: mx.array, dtype) -> mx.array:
    """The packed batch's additive mask (B, 1, T, T) in `dtype`."""
    return additive(block_causal(segments), dtype)


class NotPackable(Exception):
    """A model asked the packed stand-in cache for something it cannot stand in for."""


class PackedCache:
    """Stands in for an attention layer's KV cache during a packed forward pass: no state,
    offset 0, and the packed mask (boolean for a model that asks for an array, additive in
    `dtype` otherwise; each form built once and shared by every layer). What else a model asks
    of its cache (another layer's keys, a recurrent state, a sliding chunk) raises NotPackable
    with the reason."""

    offset = 0

    def __init__(self, keep: mx.array, dtype=mx.float32, masks: dict | None = None):
        self.keep, self.dtype = keep, dtype
        self.masks: dict = {} if masks is None else masks  # shared by the caches of one forward pass
        self.kv = None

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        window = window_size if window_size is not None and window_size < N else None
        key = (return_array, window)
        if key not in self.masks:
            keep = self.keep
            if window is not None:  # sliding-window layers: also hide keys `window` or more behind
                pos = mx.arange(N)
                keep = keep & ((pos[:, None] - pos[None, :]) < window)
            self.masks[key] = keep if return_array else additive(keep, self.dtype)
        return self.masks[key]

    def update_and_fetch(self, keys, values):
        self.kv = (keys, values)  # what a KV-shared layer reads back (keys_and_values)
        return keys, values

    def empty(self):  # some mlx-lm models ask before using a cache
        return True

    def keys_and_values(self):  # gemma3n's KV-shared layers: the keys of the layer that owns this cache
        if self.kv is None:
            raise NotPackable("a KV-shared layer reads another layer's keys before that layer has run")
        return self.kv

    def __getitem__(self, index):  # recurrent layers' conv and SSM states; falcon_h1's cache pairs
        raise NotPackable("a layer reads a recurrent state from its cache")

    def maybe_trim_front(self):  # llama4's chunked attention
        raise NotPackable("its chunked attention builds its own mask from row positions")


def model_inputs(model: nn.Module, segments: mx.array | None, mask_dtype=mx.float32, inputs=None) -> dict:
    """Keyword arguments that make an mlx-lm model (or its backbone) attend inside each packed
    example: a PackedCache for every layer (one mask, built once, shared by all), its additive mask
    in `mask_dtype` (what `prepare` returns). An ordinary padded batch (`segments` None) gets {},
    except in a model whose layers share keys through the cache (gemma3n's last layers read those
    of an earlier layer, as its generation does): there `inputs` give one segment a row, the
    causal mask, so training computes what the model computes when it answers."""
    if segments is None:
        if inputs is None or not shares_kv_through_cache(model):
            return {}
        segments = mx.zeros(inputs.shape, mx.int32)
    keep, masks = block_causal(segments), {}
    return {"cache": [PackedCache(keep, mask_dtype, masks) for _ in model.layers]}


def shares_kv_through_cache(model: nn.Module) -> bool:
    """Whether some attention layer reads its keys and values from another layer's cache
    (gemma3n's `is_kv_shared_layer`; gemma4_text passes them between layers itself)."""
    return any(getattr(getattr(layer, "self_attn", None), "is_kv_shared_layer", False)
               for layer in getattr(model, "layers", []))


def prepare(model: nn.Module):
    """Check that `model` can train on packed rows (UserError if not); returns the dtype its
    attention computes in, for the additive mask (SDPA wants both alike)."""
    from .errors import UserError

    why = why_not_packable(model)
    if why:
        raise UserError(f"--pack: {why}; train without --pack (--batch-tokens groups examples of "
                        "similar length instead)")
    return compute_dtype(model)


def compute_dtype(model: nn.Module):
    """The dtype the model's attention computes in (its norms'), for the additive mask: SDPA
    refuses a mask that does not promote to its output's dtype."""
    from mlx.utils import tree_flatten

    norms = [v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")]
    return norms[0] if norms else mx.float32


_ABSOLUTE = ("wpe", "embed_positions", "position_embeddings", "pos_embed")


def why_not_packable(model: nn.Module, width: int | None = None) -> str | None:
    """None if packing keeps each example's result, else the reason it would not, naming the
    layer. Every layer is judged by the cache mlx-lm makes for it (`make_cache`: a KV cache for
    attention, a state for linear attention, SSM and convolution layers), then one forward pass
    is built (not computed) on a packed probe, so a model that asks its cache for more than a
    mask and an offset is refused here rather than in the first step. `width`: the packed row
    width, for models that scale attention by position beyond a threshold."""
    mt = getattr(getattr(model, "args", None), "model_type", type(model).__module__.rsplit(".", 1)[-1])
    names = {k.split(".")[-1] for k, _ in model.named_modules()}
    if any(a in names for a in _ABSOLUTE):
        return f"model type {mt} has absolute position embeddings (packing needs RoPE or no positions)"
    layers = getattr(model, "layers", None)
    if not layers:
        return f"model type {mt}: no transformer layers found"
    for i, cache in enumerate(_layer_caches(model)):
        why = _cache_kind_problem(cache, layers[min(i, len(layers) - 1)])
        if why:
            return f"model type {mt}, layer {i}: {why}"
    limit = _position_scaling_limit(model)
    if limit is not None and width is not None and width > limit:
        return (f"model type {mt} scales attention by position beyond {limit} tokens and packed rows "
                f"are {width} wide")
    try:  # built lazily: nothing is computed
        model(mx.zeros((1, 2), mx.int32), **model_inputs(model, mx.array([[0, 1]]), compute_dtype(model)))
    except NotPackable as e:
        return f"model type {mt}: {e}"
    return None


check_packable = why_not_packable  # the name setup used before packing could fall back


def _layer_caches(model: nn.Module) -> list:
    """The cache mlx-lm makes for each layer (a KV cache each where the model makes none)."""
    from mlx_lm.models.cache import KVCache

    if hasattr(model, "make_cache"):
        return list(model.make_cache())
    return [KVCache() for _ in model.layers]


def _cache_kind_problem(cache, layer: nn.Module) -> str | None:
    from mlx_lm.models.cache import CacheList, ChunkedKVCache, KVCache, RotatingKVCache

    if isinstance(cache, CacheList):
        return next(filter(None, (_cache_kind_problem(c, layer) for c in cache.caches)), None)
    if isinstance(cache, ChunkedKVCache):
        return "its chunked attention builds its own mask from row positions"
    if isinstance(cache, (KVCache, RotatingKVCache)):
        return None
    mixer = next((type(m).__name__ for _, m in layer.named_modules()
                  if any(isinstance(c, nn.Conv1d) for c in m.children().values())), None)
    kind = f"{mixer} " if mixer else ""
    return (f"its {kind}layer carries a state along the sequence (linear attention, SSM or "
            f"convolution; {type(cache).__name__}), so a packed example would start from the previous "
            "one's state")


def _position_scaling_limit(model: nn.Module) -> int | None:
    """Row positions up to which attention's scale stays 1 in models that raise it with the
    position (Llama 4's attention scaling as Ministral 3 and Mistral 4 use it): packing is exact
    while rows are no wider."""
    args = getattr(model, "args", None)
    args = getattr(args, "text_config", None) or args
    if isinstance(args, dict):
        rope = args.get("rope_parameters")
    else:
        rope = getattr(args, "rope_parameters", None)
    if isinstance(rope, dict) and "llama_4_scaling_beta" in rope:
        return int(rope.get("original_max_position_embeddings") or 0)
    return None
