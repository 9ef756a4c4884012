"""Predicted vs measured peak memory of QLoRA training steps (the planner's accuracy, issue 6).

    python bench/memory.py                  # CPU grid: small llama models, float32 (~5 min, 2 cores)
    python bench/memory.py --gpu --max-seconds 500 --json memory-gpu.json
                                            # GPU grid: the 7B shape, bfloat16, one H100 (~5-7 min;
                                            # the first configuration also compiles MLX's kernels)
    python bench/memory.py --gpu --only "4x1024,2x512"   # configurations whose name contains one of these
    python bench/memory.py --moe            # CPU grid: MoE and Mamba-2 hybrids (qwen3_moe,
                                            # granitemoehybrid, nemotron_h), gemma3n (AltUp,
                                            # KV-shared layers), Gemma 4 (gemma4_text) and
                                            # Qwen3-Next (Gated DeltaNet), float32 (~27 min, 2 cores)
    python bench/memory.py --moe --only qwen3_next   # the Qwen3-Next rows (~12 min)
    python bench/memory.py --moe --only gemma3n   # the gemma3n rows (~5 min)
    python bench/memory.py --moe --only gemma4    # the Gemma 4 rows (~7 min)
    python bench/memory.py --gpu --moe      # GPU: Qwen3-30B-A3B (8 layers) and Qwen3-Next-80B
                                            # (4 layers) shapes, gemma-3n-E2B and gemma-4-E2B, bfloat16
    python bench/memory.py --replan bench/results/h*-memory-*.json
                                            # the recorded GPU rows planned again with the current
                                            # planner, offline (measured, recorded plan, plan now)

Each configuration runs in a fresh process (so one run's compiled graphs and allocator cache don't
touch the next): build an mlx-lm llama model (with --moe: the spec's model type, from its
config.json-like dict) with random weights, cast it to the compute dtype and quantize it 4-bit
g64 as steadytune.model.load_base does (experts included), then set up a
steadytune Step on it as setup.setup() does (LoRA, compute path, loss chunking, checkpointing,
AdamW) and run a few optimizer steps through it (steadytune.step.Step, what the trainer runs) on
one micro-batch of random tokens, padded by the trainer's own pad_batch.
The measured number is mx.get_peak_memory() over the steps (reset after setup, so loading is not
part of it); the predicted one is steadytune.plan.estimate(...).peak at the width the planner
expects the trainer to pad to (a model given by its config with the adapters, weights and blocks
the planner finds in its skeleton, as `steadytune plan` plans it), the part of the plan that MLX's
allocator sees (framework overhead is outside it). Random weights are fine: memory does not
depend on the values (the experts a token is routed to do not change how many it is routed to).

A configuration that fails (out of memory, a crash) is reported and the others go on; with
--max-seconds no configuration is started that the time left would probably not cover. --json
is rewritten after every configuration, so a run cut short keeps what it measured. A markdown
table (measured, predicted, error) is printed at the end.

Exit status 1 if any prediction is off by more than 15% or any configuration failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 0.15
ALL_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

# name: model shape (mlx-lm llama ModelArgs names) and run settings. CPU models are small enough
# for 2 cores yet have the proportions of real ones (GQA, MLP ~2.7x hidden, a large vocabulary).
SMALL = dict(hidden_size=256, num_hidden_layers=8, intermediate_size=704, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=8192)
MID = dict(hidden_size=512, num_hidden_layers=6, intermediate_size=1408, num_attention_heads=8,
           num_key_value_heads=4, vocab_size=32000)
SMOL = dict(hidden_size=576, num_hidden_layers=6, intermediate_size=1536, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
B7 = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
          num_key_value_heads=8, vocab_size=32000)

GRIDS = {
    "cpu": [
        dict(name="small 4x128", model=SMALL, batch=4, seq=128),
        dict(name="small 4x128 ckpt", model=SMALL, batch=4, seq=128, ckpt=True),
        dict(name="small 1x512", model=SMALL, batch=1, seq=512),
        dict(name="small 2x256 q,v r16 last4", model=SMALL, batch=2, seq=256, rank=16,
             keys=["self_attn.q_proj", "self_attn.v_proj"], lora_layers=4),
        dict(name="mid 2x256", model=MID, batch=2, seq=256),
        dict(name="mid 2x256 ckpt", model=MID, batch=2, seq=256, ckpt=True),
        dict(name="smol-like tied 2x192", model=SMOL, batch=2, seq=192),
        dict(name="smollm2 shape 4x224 dequant", model=dict(SMOL, num_hidden_layers=30), batch=4,
             seq=224, compute="dequant"),
        dict(name="smollm2 shape 4x224 deq ckpt", model=dict(SMOL, num_hidden_layers=30), batch=4,
             seq=224, compute="dequant", ckpt=True),
        dict(name="smollm2 shape, 8k vocab, ckpt", model=dict(SMOL, num_hidden_layers=30, vocab_size=8192),
             batch=4, seq=224, compute="dequant", ckpt=True),
        dict(name="small 2x128 bf16", model=dict(SMALL, num_hidden_layers=4), batch=2, seq=128,
             dtype="bfloat16"),
        dict(name="small 4x128 dequant", model=SMALL, batch=4, seq=128, compute="dequant"),
        dict(name="mid 2x256 dequant", model=MID, batch=2, seq=256, compute="dequant"),
    ],
    "gpu": [
        dict(name="7B 4x1024", model=B7, batch=4, seq=1024, rank=16),
        dict(name="7B 4x1024 ckpt", model=B7, batch=4, seq=1024, rank=16, ckpt=True),
        dict(name="7B 1x2048", model=B7, batch=1, seq=2048, rank=16),
        dict(name="7B 2x512", model=B7, batch=2, seq=512, rank=16),
        dict(name="7B 2x512 ckpt", model=B7, batch=2, seq=512, rank=16, ckpt=True),
        dict(name="7B 8x224 (width not /128)", model=B7, batch=8, seq=224, rank=16),
        dict(name="7B 4x1024 dequant", model=B7, batch=4, seq=1024, rank=16, compute="dequant"),
        dict(name="7B 1x2048 dequant ckpt", model=B7, batch=1, seq=2048, rank=16, compute="dequant",
             ckpt=True),
        # held out: not used to fit the CUDA run-ahead term (measured after the fit)
        dict(name="7B 3x768 dequant (held out)", model=B7, batch=3, seq=768, rank=16, compute="dequant"),
        dict(name="7B 6x512 dequant ckpt (held out)", model=B7, batch=6, seq=512, rank=16,
             compute="dequant", ckpt=True),
    ],
}
# Long context (issue 28): one to two examples a step from 512 to 32k positions, checkpointed or
# not, unpacked (pad_batch rows) and packed (the trainer's default layout, with its block-diagonal
# mask): `--long`. "lengths" are the examples' token counts (the spec's seq + 1 unless given).
LONG = {
    "gpu": [
        dict(name="7B long 1x512", model=B7, batch=1, seq=512, rank=16),
        dict(name="7B long 1x2048", model=B7, batch=1, seq=2048, rank=16),
        dict(name="7B long 1x8192", model=B7, batch=1, seq=8192, rank=16),
        dict(name="7B long 1x8192 ckpt", model=B7, batch=1, seq=8192, rank=16, ckpt=True),
        dict(name="7B long 2x4700 packed", model=B7, batch=2, seq=8192, rank=16, pack=True,
             lengths=[5601, 3800]),
        dict(name="7B long 2x4700 packed ckpt", model=B7, batch=2, seq=8192, rank=16, pack=True, ckpt=True,
             lengths=[5601, 3800]),
        dict(name="7B long 1x16384 ckpt", model=B7, batch=1, seq=16384, rank=16, ckpt=True),
        dict(name="7B long 1x32768 ckpt", model=B7, batch=1, seq=32768, rank=16, ckpt=True),
    ],
    "cpu": [
        dict(name="small long 1x512", model=SMALL, batch=1, seq=512),
        dict(name="small long 1x2048", model=SMALL, batch=1, seq=2048),
        dict(name="small long 1x2048 ckpt", model=SMALL, batch=1, seq=2048, ckpt=True),
        dict(name="small long 1x8192 ckpt", model=SMALL, batch=1, seq=8192, ckpt=True),
        dict(name="small long 2x1500 packed", model=SMALL, batch=2, seq=4096, pack=True, lengths=[1801, 1200]),
        dict(name="small long 2x1500 packed ckpt", model=SMALL, batch=2, seq=4096, pack=True, ckpt=True,
             lengths=[1801, 1200]),
    ],
}

# MoE and Mamba-2 hybrids, gemma3n and Gemma 4 (issue 29): `--moe`. "config" is the whole config.json (the
# model type mlx-lm builds); every linear layer adapted (lora.target_modules unset: routers excepted), the
# experts' adapters included. Scaled so a block's activations, not the logits, decide the peak.
_ATTN = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=4096,
             max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
QWEN3_MOE = dict(_ATTN, model_type="qwen3_moe", num_hidden_layers=4, intermediate_size=704, num_experts=16,
                 num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=256,
                 norm_topk_prob=True)
GRANITE_H = dict(_ATTN, model_type="granitemoehybrid", num_hidden_layers=4, intermediate_size=256,
                 attention_bias=False, embedding_multiplier=4.0, attention_multiplier=0.25, logits_scaling=4.0,
                 residual_multiplier=0.5, layer_types=["mamba", "mamba", "mamba", "attention"],
                 num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=512, mamba_n_heads=8,
                 mamba_d_head=64, mamba_proj_bias=False, mamba_d_state=64, mamba_d_conv=4, mamba_n_groups=1,
                 mamba_conv_bias=True)
NEMOTRON_H = dict(_ATTN, model_type="nemotron_h", intermediate_size=768, attention_bias=False, mamba_num_heads=8,
                  mamba_head_dim=64, mamba_proj_bias=False, ssm_state_size=64, conv_kernel=4, n_groups=1,
                  mlp_bias=False, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True,
                  hybrid_override_pattern=["M", "E", "M", "*", "-", "M", "E"], num_hidden_layers=7,
                  moe_intermediate_size=256, moe_shared_expert_intermediate_size=512, n_group=1, n_routed_experts=8,
                  n_shared_experts=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=True,
                  routed_scaling_factor=1.0)
# gemma3n (issue 29): the last num_kv_shared_layers layers read keys and values from the cache of an
# earlier layer of their kind, so --grad-checkpoint leaves those and their owners whole
# (qlora.checkpoint_blocks): here 3 and 5-7 of 8 (sliding 6 reads 5's cache, full 7 reads 3's); with 4
# shared, 2-7.
GEMMA3N = dict(model_type="gemma3n", text_config=dict(
    _ATTN, model_type="gemma3n_text", num_hidden_layers=8, intermediate_size=[704] * 8, rms_norm_eps=1e-6,
    num_kv_shared_layers=2, vocab_size_per_layer_input=4096, sliding_window=256, rope_local_base_freq=10000.0,
    final_logit_softcapping=30.0, layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2,
    activation_sparsity_pattern=[0.95] * 2 + [0.0] * 6,
    hidden_size_per_layer_input=64, altup_num_inputs=4, altup_coef_clip=120.0, altup_correct_scale=True,
    altup_active_idx=0, laurel_rank=64))
# gemma-3n-E2B's layer pattern (every 5th layer global) at 10 layers, the last 4 sharing: 4-9 linked
GEMMA3N_H512 = dict(GEMMA3N, text_config=dict(
    GEMMA3N["text_config"], hidden_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=10,
    intermediate_size=[2048] * 10, num_kv_shared_layers=4,
    layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 2,
    activation_sparsity_pattern=[0.95] * 3 + [0.0] * 7, hidden_size_per_layer_input=128))
# Gemma 4 (gemma4_text, issue 29): the last num_kv_shared_layers layers get keys and values from an
# earlier layer of their kind as a call argument, so --grad-checkpoint leaves them and their owners
# whole, as gemma3n's: here 3 and 5-7 of 8. Its MLP is GEGLU (gelu_approx(gate) * up); per-layer
# inputs (hidden_size_per_layer_input; mlx-lm's default 256) and the double-width MLP of the shared
# layers (use_double_wide_mlp; mlx-lm's default on) are off here and on in GEMMA4_E2B.
GEMMA4 = dict(_ATTN, model_type="gemma4_text", num_hidden_layers=8, intermediate_size=704, global_head_dim=128,
              rms_norm_eps=1e-6, num_kv_shared_layers=2, sliding_window=256, final_logit_softcapping=30.0,
              layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2, hidden_size_per_layer_input=0,
              vocab_size_per_layer_input=4096, use_double_wide_mlp=False, tie_word_embeddings=True)
# gemma-4-E2B's kind of block: per-layer inputs (64 a layer) and the shared layers' MLP twice as wide
GEMMA4_E2B = dict(GEMMA4, hidden_size_per_layer_input=64, use_double_wide_mlp=True)
# gemma-4-E2B's layer pattern (every 5th layer global) at 10 layers, the last 4 sharing (4-9 linked,
# 6-9 double-width), hidden 512, 8 heads
GEMMA4_H512 = dict(GEMMA4_E2B, hidden_size=512, num_attention_heads=8, num_hidden_layers=10, intermediate_size=2048,
                   num_kv_shared_layers=4, layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 2,
                   hidden_size_per_layer_input=128)
# Qwen3-Next (qwen3_next, issue 29): Gated DeltaNet layers (3 of 4 here; full attention every 4th)
# with Qwen3-Next's head size (128 x 128), experts and a shared expert. Trains unpacked. The
# recurrence runs chunkwise (recurrence.chunkwise_gated_delta_ops); plan.RECURRENCE_STATES.
QWEN3_NEXT = dict(_ATTN, model_type="qwen3_next", num_hidden_layers=4, intermediate_size=704, num_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256,
                  decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, linear_num_value_heads=4,
                  linear_num_key_heads=2, linear_key_head_dim=128, linear_value_head_dim=128,
                  linear_conv_kernel_dim=4, full_attention_interval=4, partial_rotary_factor=0.25)
# The shapes of bench/moe.py on one GPU (issue 29's speed rows, whose planner check was of a call
# the run never drew): Qwen3-30B-A3B's qwen3_moe block (128 experts of 768, 8 a token) at 8 of its
# 48 layers, packed as the trainer packs 4 alpaca-long examples; Qwen3-Next-80B-A3B's block (512
# experts of 512, 10 a token, a shared expert; Gated DeltaNet 16 key / 32 value heads of 128, full
# attention every 4th) at 4 layers, one example a row as it trains. bfloat16, the trainer's compute
# (auto: dequant on CUDA), rank 8, every linear layer but the routers.
QWEN3_30B_A3B = dict(model_type="qwen3_moe", hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                     max_position_embeddings=40960, tie_word_embeddings=False, num_hidden_layers=8,
                     intermediate_size=6144, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                     decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
QWEN3_NEXT_80B = dict(QWEN3_30B_A3B, model_type="qwen3_next", num_attention_heads=16, num_key_value_heads=2,
                      head_dim=256, num_hidden_layers=4, intermediate_size=5120, num_experts=512,
                      num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                      linear_num_value_heads=32, linear_num_key_heads=16, linear_key_head_dim=128,
                      linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
                      partial_rotary_factor=0.25)
# gemma-3n-E2B's and gemma-4-E2B's text models at full size (issue 29's GPU plans; 4-bit, bfloat16
# compute): E2B's layer pattern (4 sliding, 1 global), KV-shared last layers, AltUp and Laurel
# (gemma3n), per-layer inputs of 256 over a 262k vocabulary, Gemma 4's double-width shared MLPs
# (mlx-lm's gemma4_text defaults are E2B's).
GEMMA3N_E2B = dict(model_type="gemma3n", text_config=dict(
    model_type="gemma3n_text", hidden_size=2048, num_hidden_layers=30, intermediate_size=[8192] * 30,
    num_attention_heads=8, num_key_value_heads=2, head_dim=256, vocab_size=262400, rms_norm_eps=1e-6,
    rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True, num_kv_shared_layers=10,
    vocab_size_per_layer_input=262144, sliding_window=512, rope_local_base_freq=10000.0,
    final_logit_softcapping=30.0, layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 6,
    activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20, hidden_size_per_layer_input=256,
    altup_num_inputs=4, altup_coef_clip=120.0, altup_correct_scale=True, altup_active_idx=0,
    laurel_rank=64))
GEMMA4_E2B_FULL = dict(model_type="gemma4_text", hidden_size=1536, num_hidden_layers=35, intermediate_size=6144,
                       num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
                       rms_norm_eps=1e-6, vocab_size=262144, vocab_size_per_layer_input=262144,
                       num_kv_shared_layers=20, hidden_size_per_layer_input=256, sliding_window=512,
                       max_position_embeddings=131072, final_logit_softcapping=30.0, use_double_wide_mlp=True,
                       layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, tie_word_embeddings=True)
MOE = {
    "gpu": [
        dict(name="Qwen3-30B-A3B shape 8 layers 4 ex packed", config=QWEN3_30B_A3B, batch=4, seq=1024,
             pack=True, lengths=[575, 537, 529, 469], compute="auto"),
        dict(name="Qwen3-30B-A3B shape 8 layers 4 ex packed ckpt", config=QWEN3_30B_A3B, batch=4, seq=1024,
             pack=True, lengths=[575, 537, 529, 469], compute="auto", ckpt=True),
        dict(name="Qwen3-30B-A3B shape 8 layers 1x1024", config=QWEN3_30B_A3B, batch=1, seq=1024, compute="auto"),
        dict(name="Qwen3-Next-80B shape 4 layers 1x512", config=QWEN3_NEXT_80B, batch=1, seq=512, compute="auto"),
        dict(name="Qwen3-Next-80B shape 4 layers 1x1024", config=QWEN3_NEXT_80B, batch=1, seq=1024,
             compute="auto"),
        dict(name="Qwen3-Next-80B shape 4 layers 4x256", config=QWEN3_NEXT_80B, batch=4, seq=256, compute="auto"),
        dict(name="gemma3n E2B 1x1024", config=GEMMA3N_E2B, batch=1, seq=1024, compute="auto"),
        dict(name="gemma3n E2B 1x1024 ckpt", config=GEMMA3N_E2B, batch=1, seq=1024, compute="auto", ckpt=True),
        dict(name="gemma4 E2B 1x1024", config=GEMMA4_E2B_FULL, batch=1, seq=1024, compute="auto"),
        dict(name="gemma4 E2B 1x1024 ckpt", config=GEMMA4_E2B_FULL, batch=1, seq=1024, compute="auto", ckpt=True),
    ],
    "cpu": [
        dict(name="qwen3_moe 16e top4 2x512", config=QWEN3_MOE, batch=2, seq=512),
        dict(name="qwen3_moe 16e top4 2x512 ckpt", config=QWEN3_MOE, batch=2, seq=512, ckpt=True),
        dict(name="qwen3_moe 32e top8 1x1024", config=dict(QWEN3_MOE, num_experts=32, num_experts_per_tok=8),
             batch=1, seq=1024),
        dict(name="qwen3_moe 8e top2 h512 4x256", config=dict(QWEN3_MOE, hidden_size=512, num_experts=8,
                                                             num_experts_per_tok=2, moe_intermediate_size=512),
             batch=4, seq=256),
        dict(name="granitemoehybrid 2x512", config=GRANITE_H, batch=2, seq=512),
        dict(name="granitemoehybrid 2x512 ckpt", config=GRANITE_H, batch=2, seq=512, ckpt=True),
        dict(name="granitemoehybrid 1x1024", config=GRANITE_H, batch=1, seq=1024),
        dict(name="granitemoehybrid 16 heads 4x256", config=dict(GRANITE_H, mamba_n_heads=16, mamba_d_head=32),
             batch=4, seq=256),
        dict(name="nemotron_h 2x512", config=NEMOTRON_H, batch=2, seq=512),
        dict(name="nemotron_h 2x512 ckpt", config=NEMOTRON_H, batch=2, seq=512, ckpt=True),
        dict(name="gemma3n 8 layers 2x512", config=GEMMA3N, batch=2, seq=512),
        dict(name="gemma3n 8 layers 2x512 ckpt", config=GEMMA3N, batch=2, seq=512, ckpt=True),
        dict(name="gemma3n 8 layers, 4 shared 1x1024 ckpt", config=dict(GEMMA3N, text_config=dict(
            GEMMA3N["text_config"], num_kv_shared_layers=4)), batch=1, seq=1024, ckpt=True),
        # held out: not used to fit GELU_MLP_ARRAYS and ALTUP_ARRAYS (measured after the fit)
        dict(name="gemma3n h512 10 layers 2x256 (held out)", config=GEMMA3N_H512, batch=2, seq=256),
        dict(name="gemma3n h512 10 layers 2x256 ckpt (held out)", config=GEMMA3N_H512, batch=2, seq=256,
             ckpt=True),
        dict(name="qwen3_next 4 layers 2x704", config=QWEN3_NEXT, batch=2, seq=704),
        dict(name="qwen3_next 4 layers 2x704 ckpt", config=QWEN3_NEXT, batch=2, seq=704, ckpt=True),
        dict(name="qwen3_next 4 layers 4x704", config=QWEN3_NEXT, batch=4, seq=704),
        dict(name="qwen3_next 4 layers 4x704 ckpt", config=QWEN3_NEXT, batch=4, seq=704, ckpt=True),
        dict(name="qwen3_next 8 value heads 2x704", config=dict(QWEN3_NEXT, linear_num_value_heads=8),
             batch=2, seq=704),
        dict(name="qwen3_next 8 value heads 2x704 ckpt", config=dict(QWEN3_NEXT, linear_num_value_heads=8),
             batch=2, seq=704, ckpt=True),
        dict(name="qwen3_next 8 layers h384 3x512", config=dict(QWEN3_NEXT, num_hidden_layers=8, hidden_size=384,
                                                               linear_num_value_heads=6), batch=3, seq=512),
        dict(name="qwen3_next 8 layers h384 3x512 ckpt", config=dict(QWEN3_NEXT, num_hidden_layers=8,
                                                                    hidden_size=384, linear_num_value_heads=6),
             batch=3, seq=512, ckpt=True),
        dict(name="qwen3_next 2 layers 1x2048", config=dict(QWEN3_NEXT, num_hidden_layers=2, full_attention_interval=2),
             batch=1, seq=2048),
        dict(name="gemma4 8 layers 2x512", config=GEMMA4, batch=2, seq=512),
        dict(name="gemma4 8 layers 2x512 ckpt", config=GEMMA4, batch=2, seq=512, ckpt=True),
        dict(name="gemma4 8 layers, 4 shared 1x1024 ckpt", config=dict(GEMMA4, num_kv_shared_layers=4),
             batch=1, seq=1024, ckpt=True),
        dict(name="gemma4 e2b-like 8 layers 2x512", config=GEMMA4_E2B, batch=2, seq=512),
        dict(name="gemma4 e2b-like 8 layers 2x512 ckpt", config=GEMMA4_E2B, batch=2, seq=512, ckpt=True),
        # held out: not used to fit GEGLU_MLP_ARRAYS, GEMMA4_*_ARRAYS and PER_LAYER_ARRAYS
        dict(name="gemma4 h512 10 layers 2x256 (held out)", config=GEMMA4_H512, batch=2, seq=256),
        dict(name="gemma4 h512 10 layers 2x256 ckpt (held out)", config=GEMMA4_H512, batch=2, seq=256,
             ckpt=True),
    ],
}


def lengths_of(spec: dict) -> list[int]:
    return spec.get("lengths") or [spec["seq"] + 1] * spec["batch"]


def model_config(spec: dict) -> dict:
    """The spec's model as a config.json-style dict (what the planner reads)."""
    if "config" in spec:
        return dict(spec["config"])
    return dict({"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                 "tie_word_embeddings": False}, **spec["model"])


def settings(spec: dict, device: str) -> dict:
    return dict(batch=spec["batch"], seq=spec["seq"], ckpt=spec.get("ckpt", False),
                rank=spec.get("rank", 8), keys=spec.get("keys", [] if "config" in spec else ALL_KEYS),
                lora_layers=spec.get("lora_layers", -1), compute=spec.get("compute", "native"),
                chunked_ce=spec.get("chunked_ce", "auto"),
                dtype=spec.get("dtype", "float32" if device == "cpu" else "bfloat16"))


def predict(spec: dict, device: str):
    """The planner's estimate for the spec (planned_run) and the width it expects."""
    from steadytune import plan

    arch, run = planned_run(spec, device)
    return plan.estimate(arch, run), run.seq


def planned_run(spec: dict, device: str):
    """(Arch, Run) the planner sees for the spec: rows of seq + 1 tokens, padded as the trainer pads
    them on `device`, with the trainer's defaults (fused update, adapters in the input dtype); a
    model given by its config with the adapters, weights and blocks of its skeleton
    (plan.from_skeleton), as `steadytune plan` plans it."""
    from steadytune import plan
    from steadytune.config import LoraConfig
    from steadytune.qlora import resolve_mode

    s = settings(spec, device)
    arch = plan.arch_from_config(model_config(spec))
    lcfg = LoraConfig(target_modules=list(s["keys"]), num_layers=s["lora_layers"])
    found = plan.from_skeleton(model_config(spec), lcfg)
    # a synthetic llama keeps its llama keys; its attention pair cost and parameter count are the
    # model's either way (the Step measures both on the model it steps)
    skeleton = found if "config" in spec else {k: found[k] for k in ("pair", "params")}
    if spec.get("pack"):  # the rows the trainer lays this call's examples out in
        layout, width = plan.packed_call(lengths_of(spec), max(lengths_of(spec)), s["batch"], None, device,
                                         found["pair"], plan.min_width(device, found["params"]))
        rows = len(layout)
    else:
        rows, width = s["batch"], plan.padded_width(max(lengths_of(spec)), device)
    return arch, plan.Run(batch=rows, seq=width, packed=bool(spec.get("pack")), examples=s["batch"],
                          checkpoint=s["ckpt"], rank=s["rank"], keys=tuple(s["keys"]),
                          lora_layers=s["lora_layers"], bits=4, group_size=64, dtype=s["dtype"],
                          compute=resolve_mode(s["compute"], device), device=device,
                          # the trainer's chunk for this model (none where its head cannot be split off)
                          loss_chunk=plan._loss_chunk(arch, model_config(spec) if "config" in spec else None,
                                                      s["chunked_ce"]), **skeleton)


def build(spec: dict, s: dict):
    """The frozen base as load_base holds it: compute dtype, 4-bit g64 where the group divides
    (a model given by its config: every layer load_base quantizes, experts included)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    from steadytune.model import model_skeleton, quantized_on_load

    dtype = getattr(mx, s["dtype"])
    mx.random.seed(0)
    if "config" in spec:
        model = model_skeleton(model_config(spec))
        predicate = lambda _, m: quantized_on_load(m, 64)  # noqa: E731
    else:
        model = llama.Model(llama.ModelArgs.from_dict(model_config(spec)))
        predicate = lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0  # noqa: E731
    model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x)
    nn.quantize(model, group_size=64, bits=4, class_predicate=predicate)
    for layer in model.layers:  # one block at a time: never the whole float model at once
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    model.freeze()
    return model


def make_step(spec: dict, s: dict):
    """A steadytune Step on the spec's model, set up as setup.setup() does it (LoRA, compute path,
    loss chunking, checkpointing, AdamW), without model files or data files; bench/throughput.py's
    steadytune_trainer does the same. Set `.examples` before stepping."""
    import mlx.optimizers as optim

    from steadytune.config import Config
    from steadytune.data import Tokenized
    from steadytune.model import apply_lora
    from steadytune.setup import apply_compute_options
    from steadytune.step import Step

    cfg = Config()
    cfg.model.dtype, cfg.model.compute = s["dtype"], s["compute"]
    cfg.lora.rank, cfg.lora.target_modules, cfg.lora.num_layers = s["rank"], list(s["keys"]), s["lora_layers"]
    t = cfg.training
    t.batch_size, t.grad_checkpoint, t.chunked_ce = s["batch"], s["ckpt"], s["chunked_ce"]
    cfg.data.max_seq_length = max(cfg.data.max_seq_length, s["seq"] + 1)
    cfg.validate()
    model = build(spec, s)
    apply_lora(model, cfg.lora, t.seed)
    compute, mask_dtype, pack_target = apply_compute_options(model, cfg)
    opt = optim.AdamW(learning_rate=t.learning_rate, weight_decay=t.weight_decay)
    opt.init(model.trainable_parameters())
    return Step(model, opt, Tokenized([], []), seed=t.seed, max_grad_norm=t.max_grad_norm,
                pack_target=pack_target if spec.get("pack") else 0,
                ce_chunk=compute["ce_chunk"], mask_dtype=mask_dtype)


def measure(spec: dict, device: str, steps: int) -> dict:
    """Peak bytes over `steps` optimizer steps of steadytune's Step on one micro-batch of
    `batch` rows of `seq` + 1 tokens (padded by the trainer's own pad_batch)."""
    import mlx.core as mx
    import numpy as np

    from steadytune import plan
    from steadytune.data import Tokenized

    if device == "cpu":
        mx.set_default_device(mx.cpu)
    s = settings(spec, device)
    step = make_step(spec, s)
    rng = np.random.default_rng(0)
    vocab = plan.arch_from_config(model_config(spec)).vocab  # gemma3n's is under text_config
    ids = [rng.integers(0, vocab, n).tolist() for n in lengths_of(spec)]
    step.examples = Tokenized(ids, [[True] * len(x) for x in ids])
    rows, width = step.batches([list(range(s["batch"]))])[0][0].shape  # as the step lays it out
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    loss = float("nan")
    for i in range(steps):
        loss = step([list(range(s["batch"]))], 1e-5, i).loss
    mx.synchronize()
    return {"peak": mx.get_peak_memory(), "base": base, "seconds": time.perf_counter() - tic,
            "width": int(width), "rows": int(rows), "loss": loss}


def run_one(spec: dict, device: str, steps: int) -> dict:
    """Measure `spec` in a fresh process: {"peak", "base", "seconds", "width", "loss"}, or
    {"error": the last lines of its output} when it failed."""
    cmd = [sys.executable, __file__, "--one", json.dumps(spec), "--device", device, "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-6:]
        return {"error": f"exit status {out.returncode}: " + " | ".join(tail)[-1500:]}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    head = (f"{'configuration':<28} {'tokens':>6} {'measured GB':>11} {'predicted GB':>12} {'error':>7}  "
            f"{'weights':>7} {'lora+opt':>8} {'activ.':>7} {'logits':>7} {'in-flight':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<28} FAILED: {r['error'][:200]}")
            continue
        b = r["breakdown"]
        lines.append(f"{r['name']:<28} {r['tokens']:>6} {r['measured'] / 1e9:>11.3f} "
                     f"{r['predicted'] / 1e9:>12.3f} "
                     f"{r['error_pct']:>+6.1f}%  {b['base_weights'] / 1e9:>7.3f} "
                     f"{(b['lora_weights'] + b['optimizer']) / 1e9:>8.3f} {b['activations'] / 1e9:>7.3f} "
                     f"{b['logits'] / 1e9:>7.3f} {b['in_flight'] / 1e9:>9.3f}")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    lines = ["| configuration | tokens | measured GB | predicted GB | error |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | | failed | {r['predicted'] / 1e9:.3f} | |")
        else:
            lines.append(f"| {r['name']} | {r['tokens']} | {r['measured'] / 1e9:.3f} "
                         f"| {r['predicted'] / 1e9:.3f} | {r['error_pct']:+.1f}% |")
    return "\n".join(lines)


def recorded_rows(path: str) -> list[dict]:
    """The measured rows of a results file written by this script: {"rows": [...]} (or, from its
    first version, a bare list), each with its name and measured peak; failed rows (no
    measurement) are left out."""
    data = json.loads(Path(path).read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    return [r for r in rows if isinstance(r.get("measured"), (int, float))]


def spec_named(name: str) -> tuple[dict, str] | None:
    """The GPU configuration of that name in any grid (GRIDS, LONG, MOE) and the device it is
    planned for; None for a name no grid has any more."""
    for grids in (GRIDS, LONG, MOE):
        for spec in grids["gpu"]:
            if spec["name"] == name:
                return spec, "cuda"
    return None


def replan(paths: list[str]) -> list[dict]:
    """Every recorded row of `paths` planned again with the current planner, offline (no GPU):
    file, name, measured, the prediction the file recorded and the one planned now (None for a
    configuration no grid defines any more)."""
    out = []
    for path in paths:
        for r in recorded_rows(path):
            found = spec_named(r["name"])
            now = predict(*found)[0].peak if found else None
            out.append(dict(file=Path(path).name, name=r["name"], measured=r["measured"],
                            recorded=r.get("predicted"), now=now))
    return out


def replan_table(rows: list[dict]) -> str:
    """The replanned rows as a markdown table, and the largest error of those planned now."""
    pct = lambda p, m: f"{100 * (p / m - 1):+.1f}%" if p else ""  # noqa: E731
    lines = ["| file | configuration | measured GB | recorded plan GB | error | plan now GB | error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        now = f"{r['now'] / 1e9:.3f}" if r["now"] else "(no such configuration now)"
        lines.append(f"| {r['file']} | {r['name']} | {r['measured'] / 1e9:.3f} | {r['recorded'] / 1e9:.3f} "
                     f"| {pct(r['recorded'], r['measured'])} | {now} | {pct(r['now'], r['measured'])} |")
    planned = [r["now"] / r["measured"] - 1 for r in rows if r["now"]]
    if planned:
        lines.append(f"\n{len(planned)} rows planned now: errors {min(planned):+.1%}..{max(planned):+.1%}")
    return "\n".join(lines)


def environment() -> str:
    import platform

    import mlx.core as mx
    import mlx_lm

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = info.get("device_name") or info.get("architecture") or platform.processor() or platform.machine()
    return (f"{time.strftime('%Y-%m-%d')}, {name}, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
            f"python {platform.python_version()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="the 7B grid on the GPU (bfloat16)")
    p.add_argument("--long", action="store_true", help="the long-context grid (512 to 32k positions, "
                   "packed and not) instead of the usual one")
    p.add_argument("--moe", action="store_true", help="the MoE, Mamba-2 hybrid, gemma3n and Gemma 4 grid (CPU) "
                   "instead of the usual one")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration")
    p.add_argument("--only", help="run the configurations whose name contains one of these "
                   "comma-separated strings")
    p.add_argument("--json", help="also write the rows to this JSON file (after every configuration)")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="start no configuration the time left probably cannot cover (0 = no limit)")
    p.add_argument("--replan", nargs="+", metavar="FILE",
                   help="plan the GPU rows recorded in these results files again with the current planner "
                        "and print measured, recorded and current predictions (offline: no GPU, nothing run)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    a = p.parse_args()
    import steadytune  # noqa: F401  (fast BLAS before mlx)

    if a.replan:
        print(replan_table(replan(a.replan)))
        return 0
    if a.one:
        print(json.dumps(measure(json.loads(a.one), a.device, a.steps)))
        return 0
    start = time.perf_counter()
    device = "cuda" if a.gpu else "cpu"
    if a.gpu:
        import mlx.core as mx

        if mx.default_device() != mx.gpu:
            raise SystemExit("--gpu: MLX has no GPU here (install mlx[cuda] on an NVIDIA machine)")
        if sys.platform == "darwin":
            device = "metal"
    wanted = [w.strip() for w in (a.only or "").split(",") if w.strip()]
    grids = (MOE if a.moe else LONG if a.long else GRIDS)["gpu" if a.gpu else "cpu"]
    grid = [g for g in grids if not wanted or any(w in g["name"] for w in wanted)]
    if not grid:
        raise SystemExit(f"--only {a.only!r}: no configuration matches; names: "
                         + ", ".join(g["name"] for g in grids))
    env = environment()
    print(env, flush=True)
    # The first configuration also compiles MLX's kernels (on a fresh H100: ~2 minutes); later ones
    # reuse them, so the last one's time is the estimate for the next.
    rows, last, skipped = [], 0.0, []
    for spec in grid:
        elapsed = time.perf_counter() - start
        if a.max_seconds and rows and elapsed + 1.3 * last > a.max_seconds:
            skipped.append(spec["name"])
            continue
        tic = time.perf_counter()
        m = run_one(spec, device, a.steps)
        last = time.perf_counter() - tic
        try:
            est, width = predict(spec, device)
        except Exception as e:  # noqa: BLE001  (a planner bug shows in the table; the others go on)
            m = {"error": f"planner: {type(e).__name__}: {e}"}
            est, width = None, None
        row = {"name": spec["name"], "predicted": est.peak if est else float("nan"),
               "breakdown": est.as_dict() if est else {}, "process_seconds": round(time.perf_counter() - tic, 1)}
        if "error" in m:
            row["error"] = m["error"]
            print(f"{spec['name']}: FAILED ({m['error'][-300:]})", file=sys.stderr, flush=True)
        else:
            row.update(tokens=m.get("rows", spec["batch"]) * m["width"], measured=m["peak"], width=m["width"],
                       error_pct=round(100 * (est.peak / m["peak"] - 1), 2), step_seconds=round(m["seconds"], 2))
            note = "" if m["width"] == width else f" (trainer padded to {m['width']}, planner expected {width})"
            print(f"{spec['name']}: measured {m['peak'] / 1e9:.3f} GB, predicted {est.peak / 1e9:.3f} GB "
                  f"({row['error_pct']:+.1f}%), {row['process_seconds']} s{note}", file=sys.stderr, flush=True)
        rows.append(row)
        if a.json:
            Path(a.json).write_text(json.dumps({"env": env, "device": device, "rows": rows}, indent=1))
    print(table(rows))
    print()
    print(markdown(rows))
    done = [r for r in rows if "error" not in r]
    failed = [r["name"] for r in rows if "error" in r]
    worst = max((abs(r["error_pct"]) / 100 for r in done), default=0.0)
    print(f"\n{len(done)} configurations measured on {device} ({env}); largest error {worst:.1%} "
          f"(tolerance {TOLERANCE:.0%}); {time.perf_counter() - start:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else "")
          + (f"; not run (--max-seconds): {', '.join(skipped)}" if skipped else ""))
    return 0 if worst <= TOLERANCE and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
