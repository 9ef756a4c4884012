"""Tiny random models for the model types people fine-tune now, one per mlx-lm model type.

`build(folder, name)` writes what `mlx_lm.load` reads: config.json, model.safetensors (4-bit through
mlx-lm's own `quantize_model` unless `quantize=False`) and the conftest tokenizer; `make(name)` gives
the same model in memory. Every model has hidden size 64 and 2-5 layers: enough that a hybrid model
has each of its layer kinds (attention and linear attention / SSM / convolution), a MoE model has
dense and expert layers where the family mixes them, and a model with sliding-window layers has
both kinds. Experts: 4, two per token (llama4: one, as released).

What some types need (mlx-lm 0.32):
- qwen3_5, qwen3_5_moe, gemma3n, mistral3, llama4 keep the text model's settings under
  `text_config` (mistral3's text model is ministral3 here).
- gemma3n and gemma4_text share keys/values between their last layers (`num_kv_shared_layers`);
  gemma3n's per-layer `intermediate_size` is a list, as in the released models.
- Layer kinds are chosen by config: `layer_types` (gpt_oss, olmo3, lfm2, lfm2_moe,
  granitemoehybrid, gemma3n, gemma4_text), `hybrid_override_pattern` (nemotron_h: Mamba-2,
  attention, MLP and MoE layers), `full_attention_interval` (qwen3_next, qwen3_5),
  `interleave_moe_layer_step` (llama4); falcon_h1 runs attention and an SSM side by side in every
  layer.
- ministral3 and mistral4 read `rope_parameters` for Llama 4's attention scaling
  (`llama_4_scaling_beta`, `original_max_position_embeddings`); lfm2 takes `intermediate_size` (or
  `block_ff_dim`).
- Quantizing with group size 32 (64 would skip the experts' 32-wide inputs); layers whose input
  width the group does not divide stay in float, as mlx-lm leaves them.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

H = 64  # hidden size of every model
V = 384  # the conftest tokenizer's vocabulary
GROUP = 32

_ATTN = dict(hidden_size=H, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=V,
             max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
_LLAMA = dict(_ATTN, num_hidden_layers=2, intermediate_size=128)
_MOE4 = dict(num_experts=4, num_experts_per_tok=2)
# Ministral 3 / Mistral 4 scale queries by position past original_max_position_embeddings (Llama 4's
# attention scaling); the released models' 16384 keeps the tiny rows below it, as real rows are.
_ROPE_L4 = dict(rope_type="default", rope_theta=10000.0, llama_4_scaling_beta=0.1,
                original_max_position_embeddings=16384)

_GEMMA3N_TEXT = dict(
    model_type="gemma3n_text", hidden_size=H, num_hidden_layers=4, intermediate_size=[128, 128, 96, 96],
    num_attention_heads=4, head_dim=16, rms_norm_eps=1e-6, vocab_size=V, num_key_value_heads=2,
    num_kv_shared_layers=2, vocab_size_per_layer_input=V, sliding_window=8, max_position_embeddings=512,
    rope_local_base_freq=10000.0, rope_theta=1000000.0, final_logit_softcapping=30.0,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], hidden_size_per_layer_input=16, altup_num_inputs=4,
    altup_coef_clip=120.0, altup_correct_scale=True, altup_active_idx=0, laurel_rank=8)

_QWEN3_5_TEXT = dict(
    model_type="qwen3_5_text", hidden_size=H, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, vocab_size=V,
    max_position_embeddings=512, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=2, tie_word_embeddings=False,
    rope_parameters={"type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                     "partial_rotary_factor": 0.5})

_CONFIGS: dict[str, dict] = {
    "llama": dict(_LLAMA),
    "mistral": dict(_LLAMA, sliding_window=None),
    "qwen2": dict(_LLAMA),
    "qwen3": dict(_LLAMA),
    "qwen3_moe": dict(_LLAMA, **_MOE4, decoder_sparse_step=1, mlp_only_layers=[0], moe_intermediate_size=32,
                      norm_topk_prob=True),
    "qwen3_next": dict(_ATTN, num_hidden_layers=4, intermediate_size=128, linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                       linear_conv_kernel_dim=4, **_MOE4, decoder_sparse_step=1,
                       shared_expert_intermediate_size=64, mlp_only_layers=[], moe_intermediate_size=32,
                       partial_rotary_factor=0.5, full_attention_interval=2, norm_topk_prob=True),
    "qwen3_5": dict(text_config=_QWEN3_5_TEXT),
    "qwen3_5_moe": dict(text_config=dict(_QWEN3_5_TEXT, model_type="qwen3_5_moe_text", **_MOE4,
                                         decoder_sparse_step=1, shared_expert_intermediate_size=64,
                                         moe_intermediate_size=32)),
    "gemma2": dict(_LLAMA, query_pre_attn_scalar=16),
    "gemma3_text": dict(_LLAMA, num_hidden_layers=3, sliding_window=8, sliding_window_pattern=2,
                        query_pre_attn_scalar=16, rope_local_base_freq=10000.0),
    "gemma3n": dict(text_config=_GEMMA3N_TEXT),
    "gemma4_text": dict(_LLAMA, num_hidden_layers=4, global_head_dim=32, num_kv_shared_layers=2,
                        hidden_size_per_layer_input=16, vocab_size_per_layer_input=V, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"] * 2, use_double_wide_mlp=False),
    "phi3": dict(_LLAMA),
    "phimoe": dict(_LLAMA, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(_LLAMA, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "mixtral": dict(_LLAMA, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(_LLAMA, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=4,
                        num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
                        v_head_dim=16, qk_nope_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1),
    "glm4_moe": dict(_LLAMA, moe_intermediate_size=32, norm_topk_prob=True, n_group=1, topk_group=1,
                     n_shared_experts=1, n_routed_experts=4, routed_scaling_factor=1.0, num_experts_per_tok=2,
                     first_k_dense_replace=1, rope_scaling=None, use_qk_norm=True, attention_bias=False,
                     partial_rotary_factor=0.5),
    "glm4_moe_lite": dict(_LLAMA, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=4,
                          num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
                          v_head_dim=16, qk_nope_head_dim=16, first_k_dense_replace=1),
    "mistral4": dict(_LLAMA, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=4,
                     routed_scaling_factor=1.0, kv_lora_rank=32, q_lora_rank=32, norm_topk_prob=True,
                     topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
                     qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, rope_parameters=_ROPE_L4),
    "olmo2": dict(_LLAMA),
    "olmo3": dict(_LLAMA, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "granite": dict(_LLAMA, logits_scaling=4.0, attention_multiplier=0.25, embedding_multiplier=4.0,
                    residual_multiplier=0.5, attention_bias=False, mlp_bias=False),
    "granitemoehybrid": dict(_LLAMA, num_hidden_layers=3, attention_bias=False, embedding_multiplier=4.0,
                             attention_multiplier=0.25, logits_scaling=4.0, residual_multiplier=0.5,
                             layer_types=["mamba", "attention", "mamba"], num_local_experts=4,
                             num_experts_per_tok=2, shared_intermediate_size=64, mamba_n_heads=4,
                             mamba_d_head=16, mamba_expand=1, mamba_proj_bias=False, mamba_d_state=16, mamba_d_conv=4,
                             mamba_n_groups=1, mamba_conv_bias=True),
    "lfm2": dict(_ATTN, num_hidden_layers=3, norm_eps=1e-5, conv_bias=False, conv_L_cache=3, block_dim=H,
                 intermediate_size=128, block_multiple_of=32, block_ffn_dim_multiplier=1.0,
                 block_auto_adjust_ff_dim=False, layer_types=["conv", "full_attention", "conv"]),
    "lfm2_moe": dict(_ATTN, num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
                     **_MOE4, norm_topk_prob=True, use_expert_bias=True, num_dense_layers=1, norm_eps=1e-5,
                     conv_bias=False, conv_L_cache=3, layer_types=["conv", "full_attention", "conv"]),
    "smollm3": dict(_LLAMA, num_hidden_layers=4, no_rope_layer_interval=4),
    "ministral3": dict(_LLAMA, rope_parameters=_ROPE_L4),
    "mistral3": dict(text_config=dict(_LLAMA, model_type="ministral3", rope_parameters=_ROPE_L4)),
    "llama4": dict(text_config=dict(
        _ATTN, model_type="llama4_text", num_hidden_layers=4, attention_bias=False, attention_chunk_size=8,
        interleave_moe_layer_step=2, intermediate_size=32, intermediate_size_mlp=128, num_local_experts=4,
        num_experts_per_tok=1, rope_scaling=None, use_qk_norm=True)),
    "nemotron_h": dict(_ATTN, intermediate_size=128, attention_bias=False, mamba_num_heads=4,
                       mamba_head_dim=16, mamba_proj_bias=False, ssm_state_size=16, conv_kernel=4, n_groups=1,
                       mlp_bias=False, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True,
                       hybrid_override_pattern=["M", "*", "-", "M", "E"], num_hidden_layers=5,
                       moe_intermediate_size=32, moe_shared_expert_intermediate_size=64, n_group=1,
                       n_routed_experts=4, n_shared_experts=1, topk_group=1, num_experts_per_tok=2,
                       norm_topk_prob=True, routed_scaling_factor=1.0),
    "falcon_h1": dict(_ATTN, num_hidden_layers=2, intermediate_size=128, mamba_d_ssm=64, mamba_n_heads=4,
                      mamba_d_head=16, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=16),
}

ARCHS = list(_CONFIGS)


def tiny_config(name: str) -> dict:
    """config.json of the tiny `name` model (a fresh copy)."""
    return json.loads(json.dumps(dict(_CONFIGS[name], model_type=name)))


def make(name: str, quantize: bool = True, seed: int = 0):
    """(model, config) of the tiny random `name` model in memory, as `build` writes it."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes, quantize_model

    config = tiny_config(name)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    if quantize:
        with contextlib.redirect_stdout(io.StringIO()):  # its "[INFO] Quantized model with ..." line
            model, config = quantize_model(model, config, group_size=GROUP, bits=4)
    mx.eval(model.parameters())
    return model, config


def build(folder: Path, name: str, quantize: bool = True, seed: int = 0) -> Path:
    """Write a tiny random `name` model (config.json, weights, the conftest tokenizer) into
    `folder` and return it; 4-bit through mlx-lm's quantize_model unless `quantize` is False."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from conftest import build_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model, config = make(name, quantize, seed)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(dict(config, eos_token_id=2)))
    build_tokenizer(folder, V)
    return folder
