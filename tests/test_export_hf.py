"""`--format hf` for the families whose mlx-lm names or layouts are not HF's (export.HF_EXPORTS): the
tiny random 4-bit model of each (tests/arch_models.py) with nonzero adapters, exported as an HF folder.

torch is not installed here, so transformers cannot build the model. What is checked instead:
- the names and shapes in model.safetensors are exactly the parameters of transformers' model class, as
  read from its modeling file (HF_PARAMS below) after transformers' own load-time conversion of the
  per-expert checkpoint layout (conversion_mapping.py: experts merged into gate_up_proj / down_proj);
- config.json loads with transformers' AutoConfig, naming the class, with mlx-lm's settings;
- the folder, read back by mlx-lm (whose sanitize maps HF's names and layouts to its own), answers
  like base + adapters: the written weights are the fused ones, and the reverse mapping is exact.
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


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-hf")
    out = {}
    for name in FAMILIES:
        base = arch_models.build(root / f"base-{name}", name, quantize=False)
        run = make_run(root, str(base), name)
        out[name] = (run, export(run, "hf", root / f"hf-{name}", dtype="float32"))
    return out


def test_every_hf_family_has_one_table():
    assert set(HF_NAMED) == set(HF_EXPORTS)


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


@pytest.mark.parametrize("name", FAMILIES)
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
