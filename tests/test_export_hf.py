"""`--format hf` for the families whose mlx-lm names or layouts are not HF's (export.HF_EXPORTS): the
tiny random 4-bit model of each (tests/arch_models.py) with nonzero adapters, exported as an HF folder.

torch is not installed here, so transformers cannot build the model. What is checked instead:
- the names and shapes in model.safetensors are exactly the parameters of transformers' model class, as
  read from its modeling file (HF_PARAMS below) after transformers' own load-time conversion of the
  per-expert checkpoint layout (conversion_mapping.py: experts merged into gate_up_proj / down_proj);
- config.json loads with transformers' AutoConfig, naming the class, with mlx-lm's settings;
- the folder, read back by mlx-lm (whose sanitize maps HF's names and layouts to its own), answers
  like base + adapters: the written weights are the fused ones, and the reverse mapping is exact.
For the other families (LAYOUT below) the read-back by mlx-lm is the check of the names and layouts
(its sanitize is what is reversed), with the tensors that pin each layout by name and shape; gpt-oss,
whose HF layout mlx-lm's sanitize does not read (it reads the MXFP4 release only), is checked against
the fused model instead.
bench/hf_export.py runs the same folders in a real transformers (a Python with torch)."""

from __future__ import annotations

import json

import steadytune  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest

from steadytune.export import HF_EXPORTS, HF_NAMED, export
from steadytune.generation import load_tuned

import arch_models
from test_export import make_run

FAMILIES = ["gemma3_text", "gemma2", "phi3", "qwen3_moe", "mixtral", "olmo2", "smollm3"]
H, V, I, E = arch_models.H, arch_models.V, 128, 4  # hidden, vocabulary, MLP width, experts
Q, KV, MOE_I = 64, 32, 32  # 4 heads x 16, 2 KV heads x 16; experts' width

# Per block, (name, shape) of every parameter of transformers' model class (its modeling_<type>.py).
_ATTN = [("self_attn.q_proj.weight", (Q, H)), ("self_attn.k_proj.weight", (KV, H)),
         ("self_attn.v_proj.weight", (KV, H)), ("self_attn.o_proj.weight", (H, Q))]
_MLP = [("mlp.gate_proj.weight", (I, H)), ("mlp.up_proj.weight", (I, H)), ("mlp.down_proj.weight", (H, I))]
_NORMS = [("input_layernorm.weight", (H,)), ("post_attention_layernorm.weight", (H,))]
_QK_NORM = [("self_attn.q_norm.weight", (16,)), ("self_attn.k_norm.weight", (16,))]
_GEMMA_NORMS = _NORMS + [("pre_feedforward_layernorm.weight", (H,)), ("post_feedforward_layernorm.weight", (H,))]
_EXPERTS = [("mlp.gate.weight", (E, H)), ("mlp.experts.gate_up_proj", (E, 2 * MOE_I, H)),
            ("mlp.experts.down_proj", (E, H, MOE_I))]
HF_PARAMS = {  # model type -> (per-block params of each block, lm_head written)
    "gemma3_text": ([_ATTN + _QK_NORM + _MLP + _GEMMA_NORMS] * 3, True),
    "gemma2": ([_ATTN + _MLP + _GEMMA_NORMS] * 2, False),  # mlx-lm's gemma2 ties its embedding
    "phi3": ([[("self_attn.qkv_proj.weight", (Q + 2 * KV, H)), ("self_attn.o_proj.weight", (H, Q)),
               ("mlp.gate_up_proj.weight", (2 * I, H)), ("mlp.down_proj.weight", (H, I))] + _NORMS] * 2, True),
    "qwen3_moe": ([_ATTN + _QK_NORM + _NORMS + _MLP, _ATTN + _QK_NORM + _NORMS + _EXPERTS], True),
    "mixtral": ([_ATTN + _NORMS + _EXPERTS] * 2, True),
    "olmo2": ([_ATTN + [("self_attn.q_norm.weight", (Q,)), ("self_attn.k_norm.weight", (KV,)),
                        ("post_attention_layernorm.weight", (H,)), ("post_feedforward_layernorm.weight", (H,))]
               + _MLP] * 2, True),
    "smollm3": ([_ATTN + _MLP + _NORMS] * 4, True),
}


def hf_params(model_type: str) -> dict:
    blocks, lm_head = HF_PARAMS[model_type]
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if lm_head:
        out["lm_head.weight"] = (V, H)
    for i, block in enumerate(blocks):
        out.update({f"model.layers.{i}.{name}": shape for name, shape in block})
    return out


def transformers_load_view(model_type: str, weights: dict) -> dict:
    """name -> shape after transformers' load-time conversion (conversion_mapping.py) of the checkpoint
    layout: mixtral's block_sparse_moe renamed mlp; experts.N.{gate,up}  (w1, w3) stacked and
    concatenated into experts.gate_up_proj, experts.N.down (w2) stacked into experts.down_proj."""
    import re

    gate, up, down = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out, experts = {}, {}
    for name, array in weights.items():
        name = name.replace(".block_sparse_moe.", ".mlp.")
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
        if m:
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = array.shape
        else:
            out[name] = tuple(array.shape)
    for (prefix, proj), shapes in list(experts.items()):
        if proj == gate:
            assert sorted(shapes) == list(range(E)) and shapes == experts[(prefix, up)]
            o, i = shapes[0]
            out[f"{prefix}.gate_up_proj"] = (E, 2 * o, i)
        elif proj == down:
            assert sorted(shapes) == list(range(E))
            out[f"{prefix}.down_proj"] = (E, *shapes[0])
        else:
            assert proj == up, proj
    return out


# Per family, tensors whose name and shape pin the layout HF reads (tiny models: 4 heads x 16, 2 KV
# heads, experts 4 x 32 wide; MLA: kv_lora_rank 32, nope 16 + rope 8, v 16; Mamba-2: 96 conv channels).
LAYOUT = {
    "gpt_oss": {"model.layers.0.mlp.experts.gate_up_proj": (E, H, 2 * MOE_I),  # gate and up interleaved
                "model.layers.0.mlp.experts.gate_up_proj_bias": (E, 2 * MOE_I),
                "model.layers.0.mlp.experts.down_proj": (E, MOE_I, H),
                "model.layers.0.mlp.experts.down_proj_bias": (E, H),
                "model.layers.0.mlp.router.weight": (E, H), "model.layers.0.self_attn.sinks": (4,)},
    "deepseek_v3": {"model.layers.0.self_attn.kv_b_proj.weight": (4 * (16 + 16), 32),
                    "model.layers.1.mlp.experts.3.gate_proj.weight": (MOE_I, H),
                    "model.layers.1.mlp.gate.e_score_correction_bias": (E,)},
    "glm4_moe_lite": {"model.layers.0.self_attn.kv_b_proj.weight": (4 * (16 + 16), 32),
                      "model.layers.1.mlp.experts.3.down_proj.weight": (H, MOE_I)},
    "glm4_moe": {"model.layers.1.mlp.experts.3.down_proj.weight": (H, MOE_I),
                 "model.layers.1.mlp.shared_experts.up_proj.weight": (MOE_I, H)},
    "olmo3": {"model.layers.0.self_attn.q_norm.weight": (Q,), "model.layers.1.self_attn.k_norm.weight": (KV,)},
    "granite": {"model.layers.1.mlp.up_proj.weight": (I, H)},
    "phimoe": {"model.layers.0.block_sparse_moe.experts.3.w2.weight": (H, MOE_I), "lm_head.bias": (V,),
               "model.layers.0.self_attn.q_proj.bias": (Q,)},
    "ministral3": {"model.layers.1.mlp.up_proj.weight": (I, H)},
    "lfm2": {"model.layers.0.conv.conv.weight": (H, 1, 3), "model.layers.1.feed_forward.w2.weight": (H, I)},
    "lfm2_moe": {"model.layers.0.conv.conv.weight": (H, 1, 3), "model.layers.0.feed_forward.w1.weight": (I, H),
                 "model.layers.1.feed_forward.experts.3.w3.weight": (MOE_I, H),
                 "model.layers.1.feed_forward.expert_bias": (E,)},
    "qwen3_next": {"model.layers.0.linear_attn.conv1d.weight": (128, 1, 4),
                   "model.layers.0.mlp.experts.3.up_proj.weight": (MOE_I, H)},
    "granitemoehybrid": {"model.layers.0.block_sparse_moe.input_linear.weight": (E, 2 * I, H),
                         "model.layers.0.block_sparse_moe.output_linear.weight": (E, H, I),
                         "model.layers.0.block_sparse_moe.router.layer.weight": (E, H),
                         "model.layers.0.mamba.conv1d.weight": (96, 1, 4)},
    "nemotron_h": {"backbone.layers.4.mixer.experts.3.up_proj.weight": (MOE_I, H),
                   "backbone.layers.0.mixer.conv1d.weight": (96, 1, 4)},
    "falcon_h1": {"model.layers.0.mamba.conv1d.weight": (96, 1, 4)},
    "qwen3_5": {"model.language_model.layers.0.linear_attn.conv1d.weight": (128, 1, 4), "lm_head.weight": (V, H)},
    "qwen3_5_moe": {"model.language_model.layers.0.mlp.experts.gate_up_proj": (E, 2 * MOE_I, H),
                    "model.language_model.layers.0.mlp.experts.down_proj": (E, H, MOE_I)},
    "gemma4_text": {"model.layers.1.self_attn.q_norm.weight": (32,), "model.embed_tokens_per_layer.weight": (V, H)},
    # the text models of multimodal types, named as transformers' text-only classes read them
    "gemma3n": {"model.altup_projections.2.weight": (H, H), "model.layers.0.laurel.linear_left.weight": (8, H),
                "model.embed_tokens_per_layer.weight": (V, 4 * 16)},
    "llama4": {"model.layers.1.feed_forward.experts.gate_up_proj": (E, H, 2 * MOE_I),  # gate then up
               "model.layers.1.feed_forward.experts.down_proj": (E, MOE_I, H),
               "model.layers.1.feed_forward.router.weight": (E, H), "lm_head.weight": (V, H)},
    "mistral3": {"model.layers.1.mlp.up_proj.weight": (I, H), "lm_head.weight": (V, H)},
    "mistral4": {"model.layers.0.self_attn.kv_b_proj.weight": (4 * (16 + 16), 32),
                 "model.layers.1.mlp.experts.gate_up_proj": (E, 2 * MOE_I, H),
                 "model.layers.1.mlp.experts.down_proj": (E, H, MOE_I)},
}
# the model type written where it is not mlx-lm's: a multimodal type's text model
WRITTEN_AS = {"gemma3n": "gemma3n_text", "llama4": "llama4_text", "mistral3": "ministral3"}
# mlx-lm's own names that no HF model class has
MLX_ONLY = ("switch_mlp", "switch_glu", "embed_q", "unembed_out", ".scales", ".biases", "language_model.model.")
# mlx-lm's gpt_oss sanitize reads the MXFP4 release only; mlx-lm has no gemma3n_text (its gemma3n reads the
# multimodal folder only) and its llama4_text is dense (no experts): those text folders are checked in
# transformers only (bench/hf_export.py)
READ_BACK = [n for n in HF_NAMED if n not in ("gpt_oss", "gemma3n", "llama4")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """name -> (run, export folder), built on first use (each family's test builds only its own)."""
    root = tmp_path_factory.mktemp("export-hf")

    class Built(dict):
        def __missing__(self, name):
            base = arch_models.build(root / f"base-{name}", name, quantize=False)
            run = make_run(root, str(base), name)
            self[name] = (run, export(run, "hf", root / f"hf-{name}", dtype="float32"))
            return self[name]
    return Built()


def test_every_hf_family_has_one_table():
    assert set(HF_NAMED) == set(HF_EXPORTS)
    assert set(HF_NAMED) == set(HF_PARAMS) | set(LAYOUT) | {"llama", "mistral", "qwen2", "qwen3"}


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_export_has_transformers_names_and_config(exports, name):
    from transformers import AutoConfig

    _, out = exports[name]
    weights = mx.load(str(out / "model.safetensors"))
    assert transformers_load_view(name, weights) == hf_params(name)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [HF_EXPORTS[name].architecture]
    hf = AutoConfig.from_pretrained(str(out))
    assert hf.model_type == name and hf.architectures == [HF_EXPORTS[name].architecture]
    assert hf.tie_word_embeddings == (name == "gemma2")
    args = dict(arch_models.tiny_config(name))
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads) == (
        args["hidden_size"], args["num_hidden_layers"], args["num_attention_heads"], args["num_key_value_heads"])
    if name == "gemma3_text":
        # mlx-lm: layer i slides unless (i + 1) % sliding_window_pattern == 0 (pattern 2 here)
        assert hf.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
        assert hf.sliding_window == 8 and hf.query_pre_attn_scalar == 16
        assert hf.rope_parameters == {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        assert hf.final_logit_softcapping is None and hf.attn_logit_softcapping is None
    if name == "gemma2":
        assert (hf.query_pre_attn_scalar, hf.attn_logit_softcapping, hf.final_logit_softcapping) == (16, 50.0, 30.0)
    if name == "smollm3":
        assert hf.no_rope_layers == [1, 1, 1, 0]  # mlx-lm's: RoPE off on every 4th layer
    if name == "qwen3_moe":
        assert (hf.mlp_only_layers, hf.decoder_sparse_step, hf.norm_topk_prob, hf.num_experts) == ([0], 1, True, E)
    if name == "mixtral":
        assert (hf.num_local_experts, hf.num_experts_per_tok) == (E, 2)


@pytest.mark.parametrize("name", READ_BACK)
def test_hf_export_read_back_by_mlx_lm_answers_like_base_plus_adapters(exports, name):
    from mlx_lm.utils import load

    run, out = exports[name]
    tuned = load_tuned(run)
    model, _ = load(str(out))  # HF names -> mlx-lm's through its sanitize (experts stacked again)
    ids = mx.array([[1, 17, 42, 99, 5, 230, 64, 7]])
    want, got = tuned.model(ids), model(ids)
    # float32 both: W + s B A fused vs W x + s (x A) B differ by reassociation only (a few float32 ulps
    # per product, summed over the hidden width and the blocks), as tests/test_architectures.py bounds it
    bound = 64 * np.finfo(np.float32).eps * len(tuned.model.layers) * H * float(mx.abs(want).max())
    diff = float(mx.abs(got - want).max())
    print(f"{name}: max |logit diff| {diff:.3g} (bound {bound:.3g})")
    assert diff <= bound
    from steadytune.config import ModelConfig
    from steadytune.model import load_base

    plain = load_base(ModelConfig(path=str(out.parent / f"base-{name}"), quantize="4", group_size=32))
    assert float(mx.abs(plain.model(ids) - want).max()) > 0.1, "the adapters should change the logits"


@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_hf_export_has_the_layout_and_config_transformers_reads(exports, name):
    from transformers import AutoConfig

    _, out = exports[name]
    weights = mx.load(str(out / "model.safetensors"))
    assert not [k for k in weights if any(part in k for part in MLX_ONLY)]
    assert {k: tuple(weights[k].shape) for k in LAYOUT[name] if k in weights} == LAYOUT[name]
    hf = AutoConfig.from_pretrained(str(out))
    assert hf.model_type == WRITTEN_AS.get(name, name) and hf.architectures == [HF_EXPORTS[name].architecture]
    text = hf.get_text_config()
    # the tiny models have an lm_head, but lfm2's and gemma3n's mlx-lm models always tie (they have none)
    assert text.tie_word_embeddings == hf.tie_word_embeddings == ("lm_head.weight" not in weights)
    assert text.tie_word_embeddings == (name.startswith("lfm2") or name == "gemma3n")
    if name == "gpt_oss":  # HF's default is YaRN x32; mlx-lm runs plain RoPE without rope_scaling
        assert text.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
        assert (text.swiglu_alpha, text.swiglu_limit, text.layer_types) == (
            1.702, 7.0, ["sliding_attention", "full_attention"])
    if name in ("deepseek_v3", "glm4_moe_lite"):  # every MLA head has its own keys; head_dim is not read
        assert (text.num_key_value_heads, text.qk_rope_head_dim, text.rope_interleave) == (4, 8, True)
    if name == "glm4_moe":  # transformers 5 reads the partial rotation from rope_parameters
        assert text.rope_parameters["partial_rotary_factor"] == 0.5
    if name == "olmo3":  # plain RoPE on the sliding layers, rope_scaling on the full ones
        assert set(text.rope_parameters) == {"full_attention", "sliding_attention"}
    if name == "phimoe":
        assert text.attention_bias and text.lm_head_bias
    if name == "gemma3n":  # mlx-lm's RoPE bases per layer type; its gemma3n ignores rope_scaling
        assert text.rope_parameters == {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    if name == "llama4":  # mlx-lm: no RoPE, full attention on every 4th layer; chunked on the others
        assert text.no_rope_layers == [1, 1, 1, 0] and text.moe_layers == [1, 3]
        assert text.layer_types == ["chunked_attention"] * 3 + ["full_attention"]
    if name == "mistral4":  # plain RoPE on qk_rope_head_dim of 24, as YaRN at factor 1 (see export.py)
        assert (text.rope_parameters["rope_type"], text.rope_parameters["factor"]) == ("yarn", 1.0)
        assert text.rope_parameters["partial_rotary_factor"] == 8 / 24 and text.num_key_value_heads == 4
    if name == "falcon_h1":  # folded into the weights by mlx-lm
        assert (text.embedding_multiplier, text.key_multiplier, text.mlp_multipliers, text.lm_head_multiplier) == (
            1.0, 1.0, [1.0, 1.0], 1.0)


def test_gpt_oss_experts_are_interleaved_as_hf_splits_them(exports):
    """HF's GptOssExperts splits gate_up_proj's last axis as [..., ::2] (gate) and [..., 1::2] (up)."""
    from mlx.utils import tree_flatten

    from steadytune.export import fuse

    run, out = exports["gpt_oss"]
    tuned = load_tuned(run, dtype="float32")
    fuse(tuned.model, mx.float32)
    fused = dict(tree_flatten(tuned.model.parameters()))
    weights = mx.load(str(out / "model.safetensors"))
    prefix = "model.layers.1.mlp.experts"
    gate_up, bias = weights[f"{prefix}.gate_up_proj"], weights[f"{prefix}.gate_up_proj_bias"]
    assert mx.array_equal(gate_up[..., ::2], fused[f"{prefix}.gate_proj.weight"].swapaxes(1, 2))
    assert mx.array_equal(gate_up[..., 1::2], fused[f"{prefix}.up_proj.weight"].swapaxes(1, 2))
    assert mx.array_equal(bias[..., 1::2], fused[f"{prefix}.up_proj.bias"])
    assert mx.array_equal(weights[f"{prefix}.down_proj"], fused[f"{prefix}.down_proj.weight"].swapaxes(1, 2))
