"""The training loss: summed masked cross-entropy, token-weighted by the caller's scale.

    loss_fn(model, inputs, targets, mask, segments, scale) = masked_ce_sum(...) * scale

`scale` is 1 / (target tokens of the whole accumulation group), so micro-batches add up to the
loss of one big batch (step.py). Large vocabularies run the output layer in chunks
(`chunked_cross_entropy`; whether is `ce_chunk`'s rule, which the memory planner calls too);
packed rows (segments not None) attend inside each example (packing.py). The options are
arguments: nothing is stored on the model.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# Chunked cross-entropy is used from this vocabulary size on (setting "auto"): there the float32
# logits dominate activation memory.
CHUNKED_LOSS_VOCAB = 65536

# mlx-lm model modules whose Model.__call__ is `head(self.model(inputs))`: the loss can run the
# output layer chunk by chunk (see chunked_cross_entropy).
# gemma3_text too: its head is the tied embedding's as_linear (or lm_head), with no soft-capping.
PLAIN_HEAD_MODULES = {"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3",
                      "mlx_lm.models.gemma3_text"}


def token_cross_entropy(logits, targets):
    """Per-token cross-entropy in float32. On GPUs a fused kernel reads half-precision logits
    and accumulates in float32, so no float32 copy of the logits (or of their gradient) is made;
    the CPU's fallback reduces in the logits' dtype, so it gets float32 logits."""
    if logits.dtype != mx.float32 and mx.default_device() == mx.cpu:
        logits = logits.astype(mx.float32)
    return mx.fast.cross_entropy(logits, targets)


def split_head(model: nn.Module):
    """(backbone, head layer, head) for models computing `head(model.model(inputs))`, else None.

    The head is the output layer (lm_head) or the tied embedding's as_linear; the head layer the
    module holding its weight. Only for model types known to have no extra step between the two
    (no logit soft-capping or scaling)."""
    if type(model).__module__ not in PLAIN_HEAD_MODULES:
        return None
    # each of these modules applies lm_head where it has one, else the tied embedding (gemma3_text
    # decides when its weights load, not from its args)
    if "lm_head" in model:
        head, head_module = model.lm_head, model.lm_head
    else:
        head, head_module = model.model.embed_tokens.as_linear, model.model.embed_tokens
    from mlx.utils import tree_flatten

    if tree_flatten(head_module.trainable_parameters()):
        return None  # a trained head must see its parameters as inputs, not captured constants
    return model.model, head_module, head


def ce_chunk_tokens(vocab_size: int, budget_elements: int = 1 << 25) -> int:
    """Tokens per chunk so one chunk's float32 logits stay under `budget_elements` (128 MB)."""
    return max(128, budget_elements // max(1, vocab_size) // 128 * 128)


def chunked_cross_entropy(hidden, head, targets, mask, chunk: int):
    """Summed masked cross-entropy of the output layer on `hidden` without all the float32 logits
    at once. `head`: the output layer's weight (vocabulary x hidden) as one full-precision matrix
    (qlora.dense_weight), or a callable computing the logits (the native quantized path).

    A custom function: the forward keeps only each chunk's loss; the backward recomputes one
    chunk's logits at a time. Each chunk waits for the previous one (mx.depends): MLX's scheduler
    would otherwise run independent chunks side by side, all their logits alive at once (for a
    150k vocabulary and 8k tokens: 4.9 GB of float32 logits, where a chunk has 0.5 GB). Every
    chunk, forward and backward, multiplies by the same weight matrix: a quantized head is
    dequantized once per call, not once per chunk and again in each chunk's backward (with a
    262k x 640 head that was 0.67 GB of float32 per copy, several of them alive: MLX allocates
    ahead of the chain). Keeping the one copy from the forward to the backward costs little: the
    loss ends the forward pass and its backward starts the backward pass (a block's weights,
    used again only at the far end of the step, are dequantized anew: qlora.py). The head must
    have no trainable parameters: they would be captured as constants."""
    d = hidden.shape[-1]
    h, t, m = hidden.reshape(-1, d), targets.reshape(-1), mask.reshape(-1)
    spans = [(i, min(i + chunk, h.shape[0])) for i in range(0, h.shape[0], chunk)]
    logits = (lambda x: x @ head.T) if isinstance(head, mx.array) else head

    def piece(x, a, b):
        return (token_cross_entropy(logits(x), t[a:b]) * m[a:b]).sum()

    @mx.custom_function
    def f(x):
        total = mx.array(0.0, dtype=mx.float32)
        for a, b in spans:  # chained, or MLX may run every chunk's head matmul before any loss
            total = total + piece(mx.depends(x[a:b], total), a, b)
        return total

    @f.vjp
    def f_vjp(x_all, cotangent, output):  # one input, one output: plain arrays, not tuples
        grads, after = [], cotangent
        for a, b in spans:
            x = mx.depends(x_all[a:b], after)
            _, (g,) = mx.vjp(lambda x, a=a, b=b: piece(x, a, b), [x], [cotangent])
            grads.append(g)
            after = g
        return mx.concatenate(grads, axis=0)

    return f(h)


def ce_chunk(vocab_size: int, setting: str = "auto", splittable: bool = True) -> int:
    """Tokens per chunk of the cross-entropy (0 = all logits at once): on, off, or auto = on from
    a CHUNKED_LOSS_VOCAB vocabulary; only for models whose output layer can be split off
    (`split_head`). The trainer and the memory planner both decide by this function."""
    on = setting == "on" or (setting == "auto" and vocab_size >= CHUNKED_LOSS_VOCAB)
    return ce_chunk_tokens(vocab_size) if (on and splittable) else 0


def loss_chunk(model: nn.Module, setting: str = "auto") -> int:
    """`ce_chunk` for this model; pass the result to `masked_ce_sum` / `loss_fn`."""
    vocab = getattr(getattr(model, "args", None), "vocab_size", 0) or 0
    return ce_chunk(vocab, setting, split_head(model) is not None)


def masked_ce_sum(model: nn.Module, inputs, targets, mask, segments=None, chunk: int = 0,
                  mask_dtype=mx.float32):
    """Summed masked cross-entropy of the model on (inputs, targets, mask), in float32; with
    `segments`, the rows are packed and attention stays inside each example (packing.py, whose
    mask is built in `mask_dtype`); `chunk` > 0: the output layer in chunks of that many tokens."""
    from .packing import model_inputs
    from .qlora import dense_weight

    parts = split_head(model) if chunk else None
    extra = model_inputs(model, segments, mask_dtype, inputs)
    if parts is None:
        return (token_cross_entropy(model(inputs, **extra), targets) * mask).sum()
    backbone, layer, head = parts
    hidden = backbone(inputs, **extra)
    weight = dense_weight(layer, hidden)  # once per call, shared by every chunk and the backward
    return chunked_cross_entropy(hidden, head if weight is None else weight, targets, mask, chunk)


def loss_fn(model, inputs, targets, mask, segments, scale, chunk: int = 0, mask_dtype=mx.float32):
    """(summed masked cross-entropy times `scale`, the unscaled sum): the first is what is
    differentiated, the second what is reported."""
    total = masked_ce_sum(model, inputs, targets, mask, segments, chunk, mask_dtype)
    return total * scale, total
