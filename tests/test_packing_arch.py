"""Packing on every model family (tests/arch_models.py): a row holding three examples gives each
example the logits it gets alone through the plain mlx-lm model, or the model is reported not
packable with a reason that names the layer kind (and its packed forward pass raises rather than
computing a wrong answer). Which families are which is pinned, so a regression shows."""

import mlx.core as mx
import numpy as np
import pytest

import arch_models
from steadytune.errors import UserError
from steadytune.packing import (NotPackable, PackedCache, additive, block_causal, model_inputs, prepare, shares_kv_through_cache,
                                why_not_packable)

# model type -> words the reason must hold (the layer kind that keeps it from packing)
NOT_PACKABLE = {
    "qwen3_next": "GatedDeltaNet layer carries a state",
    "qwen3_5": "GatedDeltaNet layer carries a state",
    "qwen3_5_moe": "GatedDeltaNet layer carries a state",
    "granitemoehybrid": "Mamba2Mixer layer carries a state",
    "nemotron_h": "Mamba2Mixer layer carries a state",
    "falcon_h1": "FalconH1Mixer layer carries a state",
    "lfm2": "ShortConv layer carries a state",
    "lfm2_moe": "ShortConv layer carries a state",
    "llama4": "chunked attention",
}

LENGTHS = [11, 4, 6]  # the first longer than the sliding windows (8) of the models that have one
WIDTH = 24            # three examples and 3 padding tokens (a segment of their own)


def _row(rng):
    examples = [rng.integers(3, arch_models.V, size=n) for n in LENGTHS]
    pad = WIDTH - sum(LENGTHS)
    row = np.concatenate(examples + [np.zeros(pad, np.int64)])
    segments = np.concatenate([np.full(n, i) for i, n in enumerate(LENGTHS)] + [np.full(pad, len(LENGTHS))])
    return examples, mx.array(row[None]), mx.array(segments[None])


@pytest.mark.parametrize("name", arch_models.ARCHS)
def test_packed_row_gives_each_example_its_own_logits_or_is_refused(name):
    model, _ = arch_models.make(name)  # 4-bit, computing in float32
    examples, row, segments = _row(np.random.default_rng(0))
    why = why_not_packable(model)
    if name in NOT_PACKABLE:
        assert why and NOT_PACKABLE[name] in why, why
        with pytest.raises(UserError, match="--pack: model type"):
            prepare(model)
        with pytest.raises(NotPackable):  # never a silently wrong forward pass
            model(row, **model_inputs(model, segments))
        return
    assert why is None
    packed = model(row, **model_inputs(model, segments, prepare(model)))
    alone = [model(mx.array(e[None]), **_as_it_answers(model))[0] for e in examples]
    # Packed and alone differ only by rounding: the RoPE angle of position p (up to WIDTH) rounds
    # to relative u, as do the sums over up to WIDTH keys; through the residual stream of L layers
    # these add, each scaled by the logits' size; 8 covers the few roundings a layer makes (norms,
    # projections, softmax). Seeing one token of another example, or the future, costs ~1.
    u = float(mx.finfo(mx.float32).eps) / 2
    scale = max(float(mx.abs(a).max()) for a in alone)
    tol = 8 * u * WIDTH * len(model.layers) * scale
    start = 0
    for e, a in zip(examples, alone):
        err = float(mx.abs(packed[0, start:start + len(e)] - a).max())
        assert err <= tol, (name, err, tol)
        start += len(e)


def _as_it_answers(model) -> dict:
    """gemma3n's KV-shared layers read an earlier layer's keys only through a cache: the example
    alone goes through mlx-lm's own cache, as generation runs it (without one, those layers compute
    keys of their own, which neither mlx-lm's generation nor llama.cpp ever does)."""
    from mlx_lm.models.cache import make_prompt_cache

    return {"cache": make_prompt_cache(model)} if shares_kv_through_cache(model) else {}


def test_gemma3ns_kv_shared_layers_train_on_the_keys_they_answer_with():
    """Unpacked rows too: the loss of a padded batch is the loss of mlx-lm's cached forward pass,
    and the KV-shared layers' own k/v projections get no gradient (they are never used), with and
    without gradient checkpointing."""
    import mlx.nn as nn

    from steadytune.loss import masked_ce_sum
    from steadytune.qlora import checkpoint_blocks

    from mlx_lm.utils import _get_classes

    # six layers (the tiny model's four are all linked): 0-1 checkpointed, 2-3 own the keys 4-5 read
    config = arch_models.tiny_config("gemma3n")
    t = config["text_config"]
    t.update(num_hidden_layers=6, intermediate_size=[128, 128, 128, 128, 96, 96],
             layer_types=["sliding_attention", "full_attention"] * 3, activation_sparsity_pattern=[0.95] + [0.0] * 5)
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    assert shares_kv_through_cache(model)
    rng = np.random.default_rng(2)
    x = mx.array(rng.integers(3, arch_models.V, size=(2, 9)))
    inputs, targets, mask = x[:, :-1], x[:, 1:], mx.ones((2, 8))
    from mlx_lm.models.cache import make_prompt_cache

    want = sum(float(nn.losses.cross_entropy(model(inputs[i:i + 1], cache=make_prompt_cache(model)),
                                             targets[i:i + 1]).sum()) for i in range(2))
    wrong = float(nn.losses.cross_entropy(model(inputs), targets).sum())  # keys of their own
    assert abs(float(masked_ce_sum(model, inputs, targets, mask)) - want) <= 1e-4 * want < abs(wrong - want)

    def grads(m):
        return nn.value_and_grad(m, lambda m: masked_ce_sum(m, inputs, targets, mask))(m)

    model.train()
    loss, g = grads(model)
    shared = [i for i, l in enumerate(model.layers) if l.self_attn.is_kv_shared_layer]
    layers = g["model"]["language_model"]["layers"] if "language_model" in g.get("model", {}) else None
    assert shared and layers is not None
    for i in shared:
        assert float(mx.abs(layers[i]["self_attn"]["k_proj"]["weight"]).max()) == 0.0
    owner = shared[0] - 1
    assert float(mx.abs(layers[owner]["self_attn"]["k_proj"]["weight"]).max()) > 0
    assert shared == [4, 5] and checkpoint_blocks(model) == [2, 3, 4, 5]  # the shared and their two owners
    loss_ck, g_ck = grads(model)
    assert float(loss_ck) == float(loss)
    from mlx.utils import tree_flatten

    for (k, a), (_, b) in zip(tree_flatten(g), tree_flatten(g_ck)):
        assert float(mx.abs(a - b).max()) <= 1e-5 * max(1.0, float(mx.abs(a).max())), k


def test_attention_scaled_by_position_packs_only_below_its_threshold():
    model, _ = arch_models.make("ministral3", quantize=False)
    assert why_not_packable(model, width=16384) is None
    assert "scales attention by position beyond 16384" in why_not_packable(model, width=16392)


def test_each_attention_gets_the_mask_in_the_form_it_reads():
    """Models that ask for an array mask (MLA folds it in with mx.where) get it boolean, the form
    of mlx-lm's own masks; the rest pass it to scaled_dot_product_attention, additive in the
    compute dtype. MLA handed the additive one would show every token the future and the other
    examples."""
    keep = block_causal(mx.array([[0, 0, 1, 1, 1]]))
    rows = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert keep.shape == (1, 1, 5, 5) and keep.dtype == mx.bool_ and keep[0, 0].tolist() == rows
    cache = PackedCache(keep, mx.bfloat16)
    bias = cache.make_mask(5)
    assert bias.dtype == mx.bfloat16 and (bias[0, 0] == 0).tolist() == keep[0, 0].tolist()
    assert cache.make_mask(5, return_array=True) is keep
    windowed = cache.make_mask(5, return_array=True, window_size=1)  # sliding window: itself only
    assert windowed[0, 0].tolist() == np.eye(5, dtype=bool).tolist()

    model, _ = arch_models.make("deepseek_v3", quantize=False)
    examples, row, segments = _row(np.random.default_rng(1))
    first = model(mx.array(examples[0][None]))[0]
    n = len(examples[0])
    right = model(row, **model_inputs(model, segments))[0, :n]
    additive_only = PackedCache(additive(block_causal(segments), mx.float32), mx.float32)
    wrong = model(row, cache=[additive_only] * len(model.layers))[0, :n]
    assert float(mx.abs(right - first).max()) < 1e-4 < 0.1 < float(mx.abs(wrong - first).max())
