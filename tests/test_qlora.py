"""QLoRA compute paths (steadytune/qlora.py): dequantize-then-matmul must train exactly like MLX's
native quantized_matmul, without keeping dequantized weights alive, on tiny models built here."""

from __future__ import annotations

import math
from functools import partial

import pytest

import steadytune  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.models import gemma4_text, llama
from mlx_lm.tuner.utils import linear_to_lora_layers

from steadytune import loss, qlora
from steadytune.loss import loss_fn
from steadytune.qlora import checkpoint_blocks

# Tolerances are derived, not guessed. u = eps / 2, the unit roundoff: float32 6.0e-8, bfloat16 3.9e-3.
# - Two float32 computations that differ only in summation order (another kernel, chunking): a dot
#   product of n terms moves by at most n*u times the sum of its |terms| (Higham, Accuracy and
#   Stability of Numerical Algorithms, eq. 3.5) and the errors of `ops` such operations in a row
#   add up: reordered(n, ops) = ops * n * u, a worst case. Compared over the whole tensor
#   (norm-wise), since an entry that cancels to ~0 has no relative precision of its own.
# - Two half-precision computations that round in different places: each rounding adds an
#   independent relative error uniform in [-u, u] (std u / sqrt(3)), and along a chain of k
#   roundings these add like a random walk: a tensor differs by about sqrt(k) * u / sqrt(3)
#   (measured: within 3% of that for the worst tensor of the two tests below that use it);
#   rounded(k) is twice that, for the worst of the tensors compared, another summation order
#   (threads, BLAS) and test order. A real bug (a lost scale, a missing gradient path) is O(1).
# A llama block rounds ~15 times on the way to the loss (2 RMSNorms, q/k/v, RoPE, scores, softmax,
# probs @ v, o_proj, residual add; gate, up, silu * up, down, residual add) and as often back.
ROUNDINGS_PER_BLOCK = 30
U32, U16 = mx.finfo(mx.float32).eps / 2, mx.finfo(mx.bfloat16).eps / 2


def reordered(n: int, ops: int) -> float:
    return ops * n * U32


def rounded(k: int, u: float = U16) -> float:
    return 2 * math.sqrt(k) * u / math.sqrt(3)


def rel_err(a, b) -> float:
    """|a - b| / |b| over the whole tensor (2-norms)."""
    a, b = a.astype(mx.float32).flatten(), b.astype(mx.float32).flatten()
    return float(mx.linalg.norm(a - b) / mx.linalg.norm(b))


def tiny(hidden=64, layers=2, vocab=256, tie=False, group=32, seed=0):
    """A random quantized llama with LoRA on every projection, in float32."""
    args = llama.ModelArgs(model_type="llama", hidden_size=hidden, num_hidden_layers=layers,
                           intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-5, vocab_size=vocab, tie_word_embeddings=tie)
    mx.random.seed(seed)
    model = llama.Model(args)
    nn.quantize(model, group_size=group, bits=4)
    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                          "keys": ["self_attn.q_proj", "self_attn.k_proj",
                                                   "self_attn.v_proj", "self_attn.o_proj",
                                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]})
    # lora_b starts at zero; give it values so the adapters take part in the output
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.05,
                                   model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


def batch(vocab=256, b=2, t=24, seed=1):
    key = mx.random.key(seed)
    ids = mx.random.randint(0, vocab, (b, t + 1), key=key)
    mask = mx.ones((b, t))
    mask[1, t // 2:] = 0  # a padded row
    return ids[:, :-1], ids[:, 1:], mask


def loss_and_grads(model, data, chunk=0):
    inputs, targets, mask = data
    (_, total), grads = nn.value_and_grad(model, loss_fn)(model, inputs, targets, mask, None, mx.array(1.0), chunk)
    mx.eval(total, grads)
    return total.item(), dict(tree_flatten(grads))


def test_dequant_gives_the_native_loss_and_lora_gradients():
    model = tiny()
    data = batch()
    assert qlora.apply_compute(model, "native")["mode"] == "native"
    loss_native, g_native = loss_and_grads(model, data)
    for kernel in ("mlx", "elementwise"):
        info = qlora.apply_compute(model, "dequant", kernel)
        assert info == {"mode": "dequant", "kernel": kernel, "layers": 2 * 7 + 2}  # + lm_head, embedding
        loss_deq, g_deq = loss_and_grads(model, data)
        # float32, another summation order only: reductions of at most 256 terms (the vocabulary's
        # logsumexp; hidden 64, MLP 128, 48 tokens), 2 blocks: 2 * 15 operations to the loss and
        # as many back. Measured: 1e-7 (loss), 9e-7 (gradients) against 4.6e-4 and 9.2e-4.
        assert loss_deq == pytest.approx(loss_native, rel=reordered(256, ROUNDINGS_PER_BLOCK))
        assert sorted(g_deq) == sorted(g_native) and len(g_native) == 2 * 7 * 2
        for name, g in g_native.items():
            assert rel_err(g_deq[name], g) <= reordered(256, 2 * ROUNDINGS_PER_BLOCK), name


def test_custom_vjp_input_gradient_matches_plain_dequantize_matmul():
    mx.random.seed(3)
    w = mx.random.normal((48, 128)) * 0.1
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x, r = mx.random.normal((3, 5, 128)), mx.random.normal((3, 5, 48))

    def plain(x):
        return (x @ mx.dequantize(wq, scales, biases, group_size=64, bits=4).T * r).sum()

    expected = mx.grad(plain)(x)
    for kernel in ("mlx", "elementwise"):
        def ours(x):
            return (qlora.dequant_matmul(x, wq, scales, biases, 64, 4, kernel=kernel) * r).sum()

        # float32: the input gradient is one matmul over 48 outputs, the value one over 128 inputs
        # then a sum of 3 * 5 * 48 = 720 terms
        assert rel_err(mx.grad(ours)(x), expected) <= reordered(48, 1)
        assert rel_err(mx.compile(mx.grad(ours))(x), expected) <= reordered(48, 1)
        assert ours(x).item() == pytest.approx(plain(x).item(), rel=reordered(128, 1) + reordered(720, 1))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("bits,group", [(2, 32), (4, 64), (4, 128), (8, 32)])
def test_elementwise_dequantize_is_bit_exact(dtype, bits, group):
    w = (mx.random.normal((64, 256), key=mx.random.key(bits * group)) * 0.1).astype(dtype)
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    ref = mx.dequantize(wq, scales, biases, group_size=group, bits=bits)
    for f in (qlora.dequantize_elementwise, mx.compile(qlora.dequantize_elementwise, shapeless=False)):
        out = f(wq, scales, biases, group, bits)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert mx.array_equal(out, ref).item()


def test_parameter_names_and_adapter_keys_do_not_change():
    model = tiny(tie=True)
    names = [k for k, _ in tree_flatten(model.parameters())]
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    qlora.apply_compute(model, "dequant")
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == trainable
    q = model.layers[0].self_attn.q_proj.linear
    assert type(q) is qlora.DequantLinear and isinstance(q, nn.QuantizedLinear)
    assert type(model.model.embed_tokens) is qlora.DequantEmbedding
    qlora.apply_compute(model, "native")
    assert type(q) is nn.QuantizedLinear and type(model.model.embed_tokens) is nn.QuantizedEmbedding


def test_tied_quantized_embedding_output_layer_uses_dequant():
    model = tiny(tie=True)
    inputs, _, _ = batch()
    qlora.apply_compute(model, "native")
    native = model(inputs)
    qlora.apply_compute(model, "dequant")
    seen = []
    orig = qlora.dequant_matmul

    def spy(x, w, *a, **k):
        seen.append(tuple(w.shape))
        return orig(x, w, *a, **k)

    qlora.dequant_matmul = spy
    try:
        out = model(inputs)
    finally:
        qlora.dequant_matmul = orig
    assert (256, 64 * 4 // 32) in seen  # the (vocab, hidden) packed embedding went through it
    # float32 logits, another summation order only: 2 blocks forward (2 * 15 operations), reductions
    # of at most 128 terms; measured 4e-7 against 2.3e-4
    assert rel_err(out, native) <= reordered(128, ROUNDINGS_PER_BLOCK)


def test_token_cross_entropy_equals_mlx_nn_cross_entropy_in_float32():
    logits = mx.random.normal((2, 7, 50), key=mx.random.key(5))
    targets = mx.random.randint(0, 50, (2, 7), key=mx.random.key(6))
    for dtype in (mx.float32, mx.bfloat16):
        ours = loss.token_cross_entropy(logits.astype(dtype), targets)
        ref = nn.losses.cross_entropy(logits.astype(dtype).astype(mx.float32), targets, reduction="none")
        # the same float32 arithmetic up to the order of the logsumexp's 50 terms; each loss is a
        # sum of positive terms (no cancellation), so elementwise: 50 * u = 3e-6
        assert ours.dtype == mx.float32 and mx.allclose(ours, ref, rtol=reordered(50, 1), atol=0).item()


def test_auto_mode_picks_dequant_off_metal():
    assert qlora.resolve_mode("auto") == "dequant"  # tests run on CPU (and CUDA)
    assert qlora.resolve_mode("native") == "native"


def _peak_of_compiled_step(model, data):
    """Peak memory above the resting state of one compiled training step."""
    opt = optim.AdamW(learning_rate=1e-4)
    lvg = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs, targets, mask):
        (_, total), g = lvg(model, inputs, targets, mask, None, mx.array(1.0))
        opt.update(model, g)
        return total

    mx.eval(step(*data), state)  # compile and first step
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(step(*data), state)
    return mx.get_peak_memory() - base


def _prototype_call(self, x):
    """The anchor's prototype: custom vjp re-dequantizes, but nothing ties it to the gradient."""

    @mx.custom_function
    def f(x, w, s, b):
        return x @ mx.dequantize(w, s, b, group_size=self.group_size, bits=self.bits).T

    @f.vjp
    def f_vjp(primals, cot, out):
        x, w, s, b = primals
        return (cot @ mx.dequantize(w, s, b, group_size=self.group_size, bits=self.bits),
                mx.zeros_like(w), mx.zeros_like(s), mx.zeros_like(b))

    return f(x, self["weight"], self["scales"], self["biases"])


def test_dequantized_weights_do_not_outlive_their_use_in_a_compiled_step(monkeypatch):
    """Compile merges the prototype's backward dequantize with the forward one, so every layer's
    full-precision weight lives until the backward pass; ours must stay near the native peak."""
    hidden, layers = 256, 6
    data = batch(vocab=64, b=1, t=16)
    full = 0
    peaks = {}
    for variant in ("native", "dequant", "prototype"):
        model = tiny(hidden=hidden, layers=layers, vocab=64, group=64)
        full = sum(m.weight.size * 8 * 4 for _, m in model.named_modules()
                   if isinstance(m, nn.QuantizedLinear))  # float32 bytes of all dequantized weights
        qlora.apply_compute(model, "native" if variant == "native" else "dequant", "mlx")
        if variant == "prototype":
            monkeypatch.setattr(qlora.DequantLinear, "__call__", _prototype_call)
        peaks[variant] = _peak_of_compiled_step(model, data)
        monkeypatch.undo()
    one_layer = full / layers
    assert peaks["prototype"] - peaks["native"] > 0.8 * full      # the bug this guards against
    assert peaks["dequant"] - peaks["native"] < 1.5 * one_layer, peaks


def test_chunked_cross_entropy_matches_the_full_loss_and_gradients():
    model = tiny(vocab=256)
    data = batch(t=40)  # 80 tokens: chunks of 32, 32 and 16
    qlora.apply_compute(model, "dequant")
    assert loss.loss_chunk(model, "off") == 0
    full_loss, full_grads = loss_and_grads(model, data)
    assert loss.loss_chunk(model, "on") == loss.ce_chunk_tokens(256) > 80
    chunked, grads = loss_and_grads(model, data, chunk=32)  # smaller than the batch: really in chunks
    # float32 in chunks: the loss's sum over 80 tokens in another order; the gradients pass the
    # chunked output layer, then 2 blocks back (2 * 15 operations, reductions of at most 128
    # terms) on inputs that differ by that reordering. Measured 5e-7 against 4.8e-6 and 2.3e-4.
    assert chunked == pytest.approx(full_loss, rel=reordered(80, 1))
    for name, g in full_grads.items():
        assert rel_err(grads[name], g) <= reordered(128, ROUNDINGS_PER_BLOCK), name


@pytest.mark.parametrize("tie", [False, True])
def test_the_chunked_loss_dequantizes_the_head_once_with_the_same_bits(tie):
    """Every chunk multiplies by one dequantized copy of the output layer (qlora.dense_weight)
    instead of dequantizing it per chunk, forward and backward (the layer's own as_linear / call):
    the same matmuls on the same values, so loss and gradients are bitwise those of the per-chunk
    path, compiled as the step is or not."""
    model = tiny(vocab=256, tie=tie)
    qlora.apply_compute(model, "dequant")
    inputs, targets, mask = batch(t=40)  # 80 tokens: chunks of 32, 32 and 16
    backbone, layer, head = loss.split_head(model)
    assert type(layer) is (qlora.DequantEmbedding if tie else qlora.DequantLinear)

    def per_chunk(x, dense: bool):
        hidden = backbone(x)
        w = qlora.dense_weight(layer, hidden) if dense else head
        return loss.chunked_cross_entropy(hidden, w, targets, mask, 32)

    for compiled in (False, True):
        out = {}
        for dense in (False, True):
            f = nn.value_and_grad(model, partial(per_chunk, dense=dense))
            if compiled:
                f = mx.compile(f, inputs=model.state, outputs=model.state)
            value, grads = f(inputs)
            mx.eval(value, grads)
            out[dense] = value.item(), dict(tree_flatten(grads))
        assert out[True][0] == out[False][0]
        assert all(mx.array_equal(g, out[False][1][k]).item() for k, g in out[True][1].items())


def test_loss_chunking_is_auto_on_for_large_vocabularies_only():
    assert loss.loss_chunk(tiny(vocab=256), "auto") == 0
    big = tiny(vocab=65536, hidden=64, layers=1)
    assert loss.loss_chunk(big, "auto") == loss.ce_chunk_tokens(65536) == 512


def test_gradient_checkpointing_keeps_gradients_and_saves_memory():
    data = batch(vocab=64, b=2, t=64)

    def model(ckpt):
        m = tiny(hidden=128, layers=4, vocab=64)
        qlora.apply_compute(m, "dequant")
        if ckpt:
            checkpoint_blocks(m)
        return m

    plain_loss, plain_grads = loss_and_grads(model(False), data)
    ckpt_loss, ckpt_grads = loss_and_grads(model(True), data)
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, g in plain_grads.items():
        # recomputation repeats the same float32 operations (measured: bitwise equal); allowed: a
        # reordering of every sum (at most 128 terms) in the 4 blocks' backward, 4 * 15 operations
        assert rel_err(ckpt_grads[name], g) <= reordered(128, 2 * ROUNDINGS_PER_BLOCK), name
    plain_peak, ckpt_peak = _peak_of_compiled_step(model(False), data), _peak_of_compiled_step(model(True), data)
    assert ckpt_peak < 0.8 * plain_peak, (ckpt_peak, plain_peak)


def _gemma4_text(layer_types: list[str], shared: int):
    """A random float32 gemma4_text (tests/arch_models.py's, with these layers) whose last `shared`
    layers attend to an earlier layer's keys, LoRA on every linear layer of every block (as the
    trainer adapts by default), lora_b random so every adapter takes part."""
    import arch_models
    from mlx_lm.utils import _get_classes

    from steadytune.config import LoraConfig
    from steadytune.model import apply_lora

    config = arch_models.tiny_config("gemma4_text")
    config.update(num_hidden_layers=len(layer_types), layer_types=layer_types, num_kv_shared_layers=shared)
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    model.freeze()
    apply_lora(model, LoraConfig(rank=4), seed=0)
    mx.random.seed(1)
    model.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


_S, _F = "sliding_attention", "full_attention"


def test_gradient_checkpointing_keeps_gemma4s_shared_key_gradients():
    """gemma4_text hands its KV-shared layers (6, 7) their keys and values as a call argument from
    layers 5 and 3 (mlx-lm's previous_kvs). Checkpointing those blocks would treat the keys as
    constants and cut every gradient that flows back through them: the owners' k/v adapters and
    every adapter of the blocks below (before the fix, issue 29, every block was checkpointed: 94
    of the 136 gradients, all of layers 0-4's and layer 5's k/v, were 0.23-0.70 off, relative).
    checkpoint_blocks leaves 3, 5, 6, 7 whole and checkpoints 0, 1, 2, 4."""
    data = batch(vocab=384, b=2, t=24)
    types = [_S, _S, _S, _F] * 2
    plain_loss, plain_grads = loss_and_grads(_gemma4_text(types, 2), data)
    model = _gemma4_text(types, 2)
    assert checkpoint_blocks(model) == [3, 5, 6, 7]
    checkpointed = [i for i, l in enumerate(model.layers) if type(l) is not gemma4_text.DecoderLayer]
    assert checkpointed == [0, 1, 2, 4]
    ckpt_loss, ckpt_grads = loss_and_grads(model, data)
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert sorted(ckpt_grads) == sorted(plain_grads) and len(plain_grads) == 136  # 8 blocks' adapters
    for name, g in plain_grads.items():
        # recomputation repeats the same float32 operations (measured: bitwise equal); allowed: a
        # reordering of every sum (at most 128 terms: the MLP) in the 8 blocks' backward, 8 * 15
        # operations (9.2e-4)
        assert rel_err(ckpt_grads[name], g) <= reordered(128, 4 * ROUNDINGS_PER_BLOCK), name


def test_grad_checkpoint_names_every_block_it_leaves_whole(capsys):
    from steadytune.config import Config
    from steadytune.setup import apply_compute_options

    cfg = Config()
    cfg.training.grad_checkpoint, cfg.training.pack = True, False
    model = _gemma4_text([_S, _S, _S, _F] * 2, 2)
    apply_compute_options(model, cfg)
    assert "leaves 4 of 8 blocks whole (layers 3, 5, 6, 7: they share keys and values" in capsys.readouterr().out


def _half_base(model):
    """The base in bfloat16, adapters float32: how the trainer holds a model for GPU compute."""
    model.apply(lambda x: x.astype(mx.bfloat16) if mx.issubdtype(x.dtype, mx.floating) else x)
    model.update(nn.utils.tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters()))
    return model


def _promote_adapters(model):
    """Back to mlx-lm's own LoRALinear (x @ float32 lora_a promotes x to float32)."""
    from mlx_lm.tuner.lora import LoRALinear

    for _, m in model.named_modules():
        if type(m) is qlora.MixedLoRALinear:
            m.__class__ = LoRALinear


def test_mixed_lora_is_mlx_lm_lora_in_float32():
    data = batch()
    ref = tiny()
    qlora.apply_compute(ref, "dequant")
    _promote_adapters(ref)
    ours = tiny()
    qlora.apply_compute(ours, "dequant")
    assert sum(type(m) is qlora.MixedLoRALinear for _, m in ours.named_modules()) == 14
    (l1, g1), (l2, g2) = loss_and_grads(ref, data), loss_and_grads(ours, data)
    assert l1 == l2 and all(mx.array_equal(g1[k], g2[k]).item() for k in g1)


def test_mixed_lora_keeps_the_saved_inputs_in_half_precision():
    """bfloat16 base, float32 adapters: the adapter matmuls run in bfloat16, so the backward pass
    keeps bfloat16 inputs instead of float32 copies (lower peak); gradients stay float32 and agree
    with mlx-lm's promoted float32 path to bfloat16 precision."""
    data = batch(b=4, t=256)
    peaks, grads = {}, {}
    for variant in ("promote", "mixed"):
        model = _half_base(tiny(hidden=256, layers=4, group=64))
        qlora.apply_compute(model, "dequant", "mlx")
        if variant == "promote":
            _promote_adapters(model)
        grads[variant] = loss_and_grads(model, data)[1]
        peaks[variant] = _peak_of_compiled_step(model, data)
    assert peaks["mixed"] < 0.9 * peaks["promote"], peaks
    for k, g in grads["mixed"].items():
        assert g.dtype == mx.float32
        ref = grads["promote"][k]
        # bfloat16 rounding in other places through 4 blocks (rounded(120) = 4.9e-2); measured
        # worst tensor 2.4e-2 run alone, above 3e-2 in a full suite run
        assert rel_err(g, ref) <= rounded(4 * ROUNDINGS_PER_BLOCK), k


def test_fused_lora_dequant_layer_has_the_exact_gradients_in_float32():
    """The half-precision layer that adds the adapter inside the matmuls (addmm), checked in float32
    where both are exact: the output and the gradients of x, lora_a and lora_b match the plain
    dequantize + LoRA expression (x @ a computed outside, kept for the backward pass)."""
    mx.random.seed(0)
    K, N, r = 128, 192, 8
    wq, s, b = mx.quantize(mx.random.normal((N, K)) * 0.05, group_size=64, bits=4)
    x, a, bb = mx.random.normal((2, 5, K)), mx.random.normal((K, r)) * 0.1, mx.random.normal((r, N)) * 0.1
    cot = mx.random.normal((2, 5, N))
    f = qlora._lora_dequant_fn(64, 4, "affine", True, "mlx", 2.0)
    fused = lambda x, a, bb, *q: f(x, mx.stop_gradient(x @ a), a, bb, *q)  # noqa: E731

    def plain(x, a, bb):
        return x @ mx.dequantize(wq, s, b, group_size=64, bits=4).T + 2.0 * ((x @ a) @ bb)

    (o1,), g1 = mx.vjp(plain, [x, a, bb], [cot])
    (o2,), g2 = mx.vjp(lambda x, a, bb: fused(x, a, bb, wq, s, b), [x, a, bb], [cot])
    # float32, another summation order: reductions of at most 192 terms (the gradient of x over
    # the outputs), the output's matmul and the adapter's added in 2 operations; measured 3e-8
    assert rel_err(o2, o1) <= reordered(192, 2)
    for p, q in zip(g1, g2):
        assert rel_err(q, p) <= reordered(192, 2)


def test_fused_lora_is_used_in_half_precision_and_agrees_with_the_unfused_layer(monkeypatch):
    data = batch(b=4, t=64)
    calls = []
    real = qlora._lora_dequant_fn

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(qlora, "_lora_dequant_fn", counting)
    grads = {}
    for fused in (False, True):
        model = _half_base(tiny(hidden=128, layers=2, group=64))
        qlora.apply_compute(model, "dequant", "mlx", fused_lora=fused)
        grads[fused] = loss_and_grads(model, data)[1]
    assert len(calls) == 14  # every adapted layer, and only with the switch on
    for k, g in grads[True].items():
        ref = grads[False][k]
        assert g.dtype == mx.float32
        # bfloat16 rounding in other places through 2 blocks (rounded(60) = 3.5e-2); measured 1.8e-2
        assert rel_err(g, ref) <= rounded(2 * ROUNDINGS_PER_BLOCK), k


def test_swiglu_backward_recomputes_and_matches_autodiff():
    """qlora.swiglu: mlx-lm's forward, bit for bit; gradients as autodiff of silu(gate) * x
    (float32 exact to rounding; bfloat16 within its precision); the MLP of llama-family models
    gets it (same parameters), other classes are left alone."""
    from mlx_lm.models import activations, llama

    mx.random.seed(1)
    g, x, c = (mx.random.normal((2, 9, 48)) * 3 for _ in range(3))
    assert mx.array_equal(qlora.swiglu(g, x), activations.swiglu(g, x)).item()
    (_, ref) = mx.vjp(lambda g, x: nn.silu(g) * x, [g, x], [c])
    (_, got) = mx.vjp(qlora.swiglu, [g, x], [c])
    for a, b in zip(ref, got):
        # float32, no reductions: sigmoid, its derivative's formula and the products round about
        # 8 times in another order (4.8e-7; measured 5e-8)
        assert rel_err(b, a) <= reordered(1, 8)
    gb, xb, cb = (t.astype(mx.bfloat16) for t in (g, x, c))
    (_, got16) = mx.vjp(qlora.swiglu, [gb, xb], [cb])
    (_, ref32) = mx.vjp(lambda g, x: nn.silu(g) * x, [gb.astype(mx.float32), xb.astype(mx.float32)],
                        [cb.astype(mx.float32)])
    for a, b in zip(got16, ref32):
        assert a.dtype == mx.bfloat16
        # bfloat16 inputs (exact in both), the result rounded to bfloat16 once, and about twice
        # more where a backend computes bfloat16 natively: rounded(3) = 7.8e-3; measured 1.7e-3
        assert rel_err(a, b) <= rounded(3)
    model = tiny(hidden=64, layers=2, group=32)
    keys = [k for k, _ in tree_flatten(model.parameters())]
    qlora.apply_compute(model, "dequant", "mlx")
    mlps = [m for _, m in model.named_modules() if type(m).__name__ == "MLP"]
    assert len(mlps) == 2 and all(isinstance(m, llama.MLP) and type(m) is not llama.MLP for m in mlps)
    assert [k for k, _ in tree_flatten(model.parameters())] == keys
    assert qlora._recomputing_mlp_class(nn.Linear) is None


def test_expert_calls_past_the_gather_row_limit_run_in_slices_with_the_same_bits(monkeypatch):
    """CUDA's gather_qmm fails past 65,535 routed rows (qlora.GATHER_ROWS): such calls run in
    slices. Slicing rows changes no row's arithmetic, so the output and every gradient (the input's
    and the adapters', through the sliced backward) are bitwise those of one call, adapted experts
    and frozen ones alike."""
    from mlx_lm.models.switch_layers import SwitchGLU
    from mlx_lm.tuner.lora import LoRASwitchLinear

    def model():
        mx.random.seed(3)
        m = SwitchGLU(64, 64, 4)
        nn.quantize(m, group_size=64, bits=4)
        m.up_proj = LoRASwitchLinear.from_base(m.up_proj, r=4)  # gate and down stay frozen experts
        m.up_proj.lora_b = mx.random.normal(m.up_proj.lora_b.shape) * 0.1
        qlora.apply_compute(m, "native")
        return m

    x = mx.random.normal((2, 40, 64), key=mx.random.key(1))
    idx = mx.random.randint(0, 4, (2, 40, 2), key=mx.random.key(2))  # 160 routed rows, sorted

    def run(rows):
        monkeypatch.setattr(qlora, "GATHER_ROWS", rows)
        m = model()
        loss = lambda x: (m(x, idx) ** 2).sum()  # noqa: E731
        return m, nn.value_and_grad(m, loss)(x), mx.grad(loss)(x)

    m, (l1, g1), dx1 = run(10**9)
    assert [type(m[n]).__name__ for n in ("gate_proj", "down_proj")] == ["SlicedQuantizedSwitchLinear"] * 2
    assert type(m.up_proj.linear) is qlora.SlicedQuantizedSwitchLinear
    _, (l2, g2), dx2 = run(48)  # slices of 48, 48, 48 and 16 rows
    g1, g2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert sorted(g1) == ["up_proj.lora_a", "up_proj.lora_b"]
    assert l1.item() == l2.item() and mx.array_equal(dx1, dx2).item()
    assert all(mx.array_equal(g1[k], g2[k]).item() for k in g1)


def test_every_loaded_moe_model_has_its_expert_calls_sliced(tmp_path):
    """load_base gives every path (training, generation, serving) the sliced expert layer, with
    the same parameter names, so mlx-lm's adapters load onto it unchanged."""
    import arch_models
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from steadytune.config import ModelConfig
    from steadytune.model import load_base

    folder = arch_models.build(tmp_path / "m", "qwen3_moe")
    model = load_base(ModelConfig(path=str(folder), dtype="float32")).model
    kinds = {type(m) for _, m in model.named_modules() if isinstance(m, QuantizedSwitchLinear)}
    assert kinds == {qlora.SlicedQuantizedSwitchLinear}
    expected = {k for k, _ in tree_flatten(arch_models.make("qwen3_moe")[0].parameters())}
    assert {k for k, _ in tree_flatten(model.parameters())} == expected
