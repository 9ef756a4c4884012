"""GGUF export of the model families beyond the dense llama-style ones (gguf_arch.EXPORTS), checked
without llama.cpp: the tiny random 4-bit model of each family (tests/arch_models.py) with nonzero
adapters, exported as float16 and as q4_k_m, read back by the gguf package and by steadytune's own
header reader, holds exactly the tensors (names, shapes, types) and the metadata llama.cpp's loader
asks of that architecture. The tensor lists (tests/data/gguf_export_tensors.txt) were written by
bench/gguf_families.py --golden from files a real llama.cpp loaded and answered with like the MLX
model (max |logit difference| under 0.05, bench/RESULTS.md), and their q4_k_m types are the ones
llama.cpp's own quantizer gave. Families and settings still not written are refused in one line."""

from __future__ import annotations

from pathlib import Path

import steadytune  # noqa: F401  (fast BLAS before mlx)

import gguf
import numpy as np
import pytest

import arch_models
from steadytune.errors import UserError
from steadytune.export import EXPORTS, export, instead, refuse_gguf
from steadytune.gguf import check_gguf_header
from steadytune.gguf_quantize import BLOCK, quantize
from test_export import make_run

GOLDEN = Path(__file__).parent / "data" / "gguf_export_tensors.txt"
FAMILIES = ("qwen3_moe", "olmo2", "smollm3", "ministral3", "mistral3", "gpt_oss", "deepseek_v3", "glm4_moe", "lfm2",
            "glm4_moe_lite", "mixtral", "lfm2_moe", "granitemoehybrid", "nemotron_h", "gemma3n", "olmo3", "granite")
# gemma3n as llama.cpp's code fixes it (22 layers, the last 2 sharing KV, every 5th global, sparsity in
# the first 10), 1024 wide as bench/gguf_families.py builds it for llama.cpp's sparsity cutoff
_GEMMA3N = {**arch_models.tiny_config("gemma3n")["text_config"],
            "num_hidden_layers": 22, "num_kv_shared_layers": 2, "laurel_rank": 64, "hidden_size_per_layer_input": 256,
            "layer_types": ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(22)],
            "activation_sparsity_pattern": [0.95] * 10 + [0.0] * 12, "intermediate_size": [1024] * 22}
# The released models' settings where the tiny model's are refused (as bench/gguf_families.py builds them)
RELEASED = {"qwen3_moe": {"mlp_only_layers": []}, "deepseek_v3": {"rms_norm_eps": 1e-6},
            "granitemoehybrid": {"mamba_n_heads": 8, "mamba_expand": 2},
            "nemotron_h": {"hybrid_override_pattern": ["M", "*", "E", "M", "E"]},
            "gemma3n": {"text_config": _GEMMA3N}}
# What llama.cpp's loader reads for each architecture beyond the shapes (a few keys each)
METADATA = {
    "qwen3_moe": {"qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 2,
                  "qwen3moe.expert_feed_forward_length": 32, "qwen3moe.attention.head_count_kv": 2},
    "olmo2": {"olmo2.block_count": 2, "olmo2.attention.head_count_kv": 2, "olmo2.rope.dimension_count": 16},
    "smollm3": {"smollm3.block_count": 4, "smollm3.rope.dimension_count": 16},
    "ministral3": {"mistral3.attention.temperature_scale": 0.1, "mistral3.rope.scaling.original_context_length": 16384},
    "mistral3": {"mistral3.attention.temperature_scale": 0.1, "mistral3.rope.scaling.original_context_length": 16384},
    "gpt_oss": {"gpt-oss.attention.sliding_window": 8, "gpt-oss.expert_count": 4, "gpt-oss.expert_used_count": 2,
                "gpt-oss.expert_feed_forward_length": 32},
    "deepseek_v3": {"deepseek2.attention.head_count_kv": 1, "deepseek2.attention.key_length": 40,
                    "deepseek2.attention.value_length": 32, "deepseek2.attention.key_length_mla": 24,
                    "deepseek2.attention.value_length_mla": 16, "deepseek2.attention.q_lora_rank": 32,
                    "deepseek2.attention.kv_lora_rank": 32, "deepseek2.rope.dimension_count": 8,
                    "deepseek2.leading_dense_block_count": 1, "deepseek2.expert_shared_count": 1,
                    "deepseek2.expert_gating_func": 2, "deepseek2.expert_weights_norm": True},
    "glm4_moe": {"glm4moe.rope.dimension_count": 8, "glm4moe.expert_count": 4, "glm4moe.expert_shared_count": 1,
                 "glm4moe.leading_dense_block_count": 1, "glm4moe.expert_gating_func": 2},
    "lfm2": {"lfm2.attention.head_count_kv": [0, 2, 0], "lfm2.shortconv.l_cache": 3, "lfm2.feed_forward_length": 128,
             "lfm2.attention.layer_norm_rms_epsilon": 1e-5},
    "glm4_moe_lite": {"deepseek2.attention.head_count_kv": 1, "deepseek2.expert_weights_scale": 1.8,
                      "deepseek2.rope.freq_base": 10000.0, "deepseek2.attention.layer_norm_rms_epsilon": 1e-5},
    "mixtral": {"llama.expert_count": 4, "llama.expert_used_count": 2, "llama.feed_forward_length": 32},
    "lfm2_moe": {"lfm2moe.attention.head_count_kv": [0, 2, 0], "lfm2moe.leading_dense_block_count": 1,
                 "lfm2moe.expert_feed_forward_length": 32, "lfm2moe.expert_gating_func": 2,
                 "lfm2moe.feed_forward_length": 128},
    "granitemoehybrid": {"granitehybrid.attention.head_count_kv": [0, 2, 0], "granitehybrid.ssm.conv_kernel": 4,
                         "granitehybrid.ssm.state_size": 16, "granitehybrid.ssm.group_count": 1,
                         "granitehybrid.ssm.inner_size": 128, "granitehybrid.ssm.time_step_rank": 8,
                         "granitehybrid.attention.scale": 0.25, "granitehybrid.embedding_scale": 4.0,
                         "granitehybrid.residual_scale": 0.5, "granitehybrid.logit_scale": 4.0,
                         "granitehybrid.expert_count": 4, "granitehybrid.expert_used_count": 2,
                         "granitehybrid.feed_forward_length": 128,
                         "granitehybrid.expert_shared_feed_forward_length": 64,
                         "granitehybrid.rope.scaling.finetuned": True},
    "nemotron_h": {"nemotron_h_moe.attention.head_count_kv": [0, 2, 0, 0, 0],
                   "nemotron_h_moe.feed_forward_length": [0, 0, 32, 0, 32], "nemotron_h_moe.attention.key_length": 16,
                   "nemotron_h_moe.attention.layer_norm_epsilon": 1e-5, "nemotron_h_moe.ssm.conv_kernel": 4,
                   "nemotron_h_moe.ssm.state_size": 16, "nemotron_h_moe.ssm.group_count": 1,
                   "nemotron_h_moe.ssm.inner_size": 64, "nemotron_h_moe.ssm.time_step_rank": 4,
                   "nemotron_h_moe.expert_count": 4, "nemotron_h_moe.expert_used_count": 2,
                   "nemotron_h_moe.expert_feed_forward_length": 32,
                   "nemotron_h_moe.expert_shared_feed_forward_length": 64, "nemotron_h_moe.expert_shared_count": 1,
                   "nemotron_h_moe.expert_weights_norm": True, "nemotron_h_moe.expert_weights_scale": 1.0},
    "gemma3n": {"gemma3n.block_count": 22, "gemma3n.feed_forward_length": [1024] * 22,
                "gemma3n.altup.active_idx": 0, "gemma3n.altup.num_inputs": 4,
                "gemma3n.embedding_length_per_layer_input": 256, "gemma3n.attention.shared_kv_layers": 2,
                "gemma3n.attention.sliding_window_pattern": [(i + 1) % 5 != 0 for i in range(22)],
                "gemma3n.attention.sliding_window": 8, "gemma3n.rope.freq_base": 1e6, "gemma3n.rope.freq_base_swa": 1e4,
                "gemma3n.final_logit_softcapping": 30.0, "gemma3n.attention.key_length": 16,
                "gemma3n.activation_sparsity_scale": [1.6448536] * 10 + [-np.inf] * 12},
    "olmo3": {"olmo2.block_count": 2, "olmo2.attention.sliding_window": 8,
              "olmo2.attention.sliding_window_pattern": [True, False], "olmo2.rope.dimension_count": 16},
    "granite": {"granite.attention.scale": 0.25, "granite.embedding_scale": 4.0, "granite.residual_scale": 0.5,
                "granite.logit_scale": 4.0, "granite.rope.dimension_count": 16},
}


def golden() -> dict[str, tuple[str, list[tuple[str, tuple, str, str]]]]:
    """family -> (GGUF architecture, [(name, ne, type in f16, type in q4_k_m)])."""
    out, family = {}, None
    for line in GOLDEN.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("["):
            family, arch = line.strip("[]").split()
            out[family] = (arch, [])
            continue
        name, ne, f16, q4 = line.split()
        out[family][1].append((name, tuple(int(n) for n in ne.split(",")), f16, q4))
    return out


def tiny_run(root: Path, family: str, **overrides) -> Path:
    """A run of the tiny 4-bit `family` model (with `overrides` to its config) and random adapters."""
    saved = arch_models._CONFIGS[family]
    arch_models._CONFIGS[family] = {**saved, **overrides}
    try:
        folder = arch_models.build(root / f"{family}-base", family)
    finally:
        arch_models._CONFIGS[family] = saved
    return make_run(root, str(folder), family)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (float16 model.gguf, q4_k_m model.gguf), made once per family."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            run = tiny_run(root, family, **RELEASED.get(family, {}))
            made[family] = (export(run, "gguf", root / f"{family}-f16") / "model.gguf",
                            export(run, "gguf", root / f"{family}-q4", quant="q4_k_m") / "model.gguf")
        return made[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_holds_the_tensors_and_metadata_llama_cpp_reads(exported, family):
    arch, want = golden()[family]
    f16, q4 = exported(family)
    values = {}
    for path, column in ((f16, 2), (q4, 3)):
        reader = gguf.GGUFReader(str(path))
        assert reader.fields["general.architecture"].contents() == arch == EXPORTS[family].arch
        got = [(t.name, tuple(int(n) for n in t.shape), t.tensor_type.name) for t in reader.tensors]
        assert got == [(name, ne, (f16_type, q4_type)[column == 3]) for name, ne, f16_type, q4_type in want]
        for key, value in METADATA[family].items():
            field = reader.fields[key].contents()
            close = isinstance(value, float) or (isinstance(value, list) and isinstance(value[0], float))
            assert (np.allclose(field, value) if close else field == value), key
        header = check_gguf_header(path)  # steadytune's own reader: the same tensors, shapes and types
        assert header.metadata["general.architecture"] == arch
        assert {name: (gtype, tuple(reversed(shape))) for name, (gtype, shape) in header.tensors.items()} == \
            {name: (gtype, ne) for name, ne, gtype in got}
        if column == 2:
            values = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
        else:  # each quantized tensor (experts too) is our quantizer's blocks of the float16 file's values
            for t in reader.tensors:
                if t.tensor_type.name in BLOCK:
                    shape = tuple(int(n) for n in reversed(t.shape))
                    blocks = quantize(values[t.name].reshape(shape), t.tensor_type.name)
                    assert np.array_equal(np.asarray(t.data).reshape(-1), blocks.reshape(-1)), t.name


@pytest.mark.parametrize("family, overrides, why", [
    ("qwen3_moe", {}, r"blocks \[0\] have a dense MLP \(mlp_only_layers / decoder_sparse_step\), where "
                      r"llama\.cpp's qwen3moe has experts in every block"),
    ("qwen3_moe", {"mlp_only_layers": [], "norm_topk_prob": False}, "norm_topk_prob is false"),
    ("smollm3", {"no_rope_layer_interval": 2}, r"its layers without RoPE are \[1, 3\], where llama\.cpp's "
                                               r"smollm3 leaves RoPE out of every 4th layer"),
    ("gpt_oss", {"layer_types": ["full_attention", "sliding_attention"]},
     r"its layer_types \['full_attention', 'sliding_attention'\] are not sliding and full attention alternating "
     r"from a sliding first layer"),
    ("deepseek_v3", {}, r"rms_norm_eps is 1e-05, where mlx-lm's deepseek_v3 normalizes the compressed q and kv "
                        r"with 1e-6"),
    ("lfm2", {"conv_bias": True}, r"its short convolutions have biases \(conv_bias\)"),
    ("lfm2_moe", {"use_expert_bias": False}, r"its routing \(use_expert_bias False, norm_topk_prob True, "
                                             r"routed_scaling_factor 1\.0\) is not llama\.cpp's lfm2moe routing"),
    ("glm4_moe_lite", {"moe_layer_freq": 2}, r"its experts are only in the layers moe_layer_freq \(2\) divides"),
    ("granitemoehybrid", {}, r"its Mamba-2 inner size \(mamba_n_heads x mamba_d_head = 64\) is not twice "
                             r"hidden_size \(64\), the only size llama\.cpp's granitehybrid loads"),
    ("granitemoehybrid", {"mamba_n_heads": 8, "mamba_n_groups": 2},
     r"its Mamba-2 layers have 2 groups \(mamba_n_groups\): mlx-lm normalizes the gated output over all channels"),
    ("nemotron_h", {}, r"its layers \[2\] are dense MLPs among expert layers, where llama\.cpp's nemotron_h_moe "
                       r"has experts in every MLP layer"),
    ("nemotron_h", {"hybrid_override_pattern": ["M", "*", "-"]}, r"it has no expert layers \(Nemotron-H\)"),
    ("nemotron_h", {"hybrid_override_pattern": ["M", "*", "E"], "time_step_limit": [0.001, 100.0]},
     r"mlx-lm clips its Mamba-2 time step to \[0\.001, 100\.0\] \(time_step_limit\), llama\.cpp does not"),
    ("gpt_oss", {"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "mscale_all_dim": 1.0}},
     r"its YaRN settings \(mscale 1\.0, mscale_all_dim 1\.0, beta_fast 32, beta_slow 1\) scale attention "
     r"otherwise than llama\.cpp's gpt-oss"),
    ("qwen3_moe", {"mlp_only_layers": [], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     r"its RoPE scaling 'yarn' is not written for llama\.cpp's qwen3moe"),
    ("olmo3", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     r"it has rope_scaling, which mlx-lm's olmo3 applies to its full-attention layers only"),
    ("granite", {"mlp_bias": True}, r"its attention or MLP projections have biases \(attention_bias, mlp_bias\)"),
    ("gemma3n", {}, r"its laurel_rank is 8, where llama\.cpp's gemma3n has 64 fixed \(the released models' value\)"),
    ("gemma3n", {"text_config": {**_GEMMA3N, "hidden_size_per_layer_input": 128}},
     r"its hidden_size_per_layer_input is 128, where llama\.cpp's gemma3n has 256 fixed"),
    ("gemma3n", {"text_config": {**_GEMMA3N, "intermediate_size": [1024] * 21 + [512]}},
     r"its intermediate_size varies per layer \(.*\), where llama\.cpp's gemma3n gives every layer the first "
     r"layer's width"),
    ("gemma3n", {"text_config": {**_GEMMA3N, "layer_types": ["sliding_attention", "full_attention"] * 11}},
     r"its layer_types are not full attention in every 5th layer \(4, 9, \.\.\.\) and sliding elsewhere"),
    ("gemma3n", {"text_config": {**_GEMMA3N, "num_kv_shared_layers": 4}},
     r"its last 4 of 22 layers reuse keys and values \(num_kv_shared_layers\), where llama\.cpp's gemma3n reuses "
     r"them in the layers from 20 on"),
    ("gemma3n", {"text_config": {**_GEMMA3N, "activation_sparsity_pattern": [0.95] * 22}},
     r"its activation_sparsity_pattern \[.*\] is not 0\.95 in the first 10 layers and 0 after"),
    ("gemma3n", {"text_config": {**_GEMMA3N, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}},
     r"it has rope_scaling, which mlx-lm's gemma3n ignores and llama\.cpp would apply"),
])
def test_settings_llama_cpp_computes_otherwise_are_refused_with_the_reason(family, overrides, why):
    config = {**arch_models.tiny_config(family), **overrides}
    with pytest.raises(UserError, match=f"^--format gguf: this {family} model is not written as llama.cpp's "
                                        f"{EXPORTS[family].arch}: {why}.*; use --format "
                                        r"(hf and llama\.cpp's convert_hf_to_gguf\.py, or --format )?mlx"):
        refuse_gguf("gguf", config)


@pytest.mark.parametrize("family", sorted(set(arch_models.ARCHS) - set(EXPORTS)))
def test_families_still_not_written_are_refused_naming_llama_cpps_architecture(family):
    with pytest.raises(UserError) as e:
        refuse_gguf("ollama", arch_models.tiny_config(family))
    message = str(e.value)
    assert message.startswith(f"--format ollama: model type {family!r} is not written to GGUF: llama.cpp reads it as ")
    assert message.endswith(f"; {instead(family, 'ollama')}")  # --format hf where steadytune writes one
    assert "\n" not in message


def test_cli_refuses_an_unwritten_family_in_one_line_with_exit_2(tmp_path, capsys):
    from steadytune.cli import main

    run = tiny_run(tmp_path, "qwen3_next")
    assert main(["export", str(run), "--format", "gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --format gguf: model type 'qwen3_next' is not written to GGUF: llama.cpp reads it as "
                   "qwen3next, but steadytune does not write its Gated DeltaNet layers in that layout yet; "
                   f"{instead('qwen3_next', 'gguf')}")
    assert not (run / "export-gguf").exists()


def test_lora_gguf_of_a_family_with_experts_names_the_fused_export():
    with pytest.raises(UserError, match=r"^--format gguf-lora: model type 'qwen3_moe' is not written as a LoRA "
                                        r"GGUF \(steadytune writes them for llama, .*\); use --format gguf \(the "
                                        r"adapters fused into the model\)$"):
        refuse_gguf("gguf-lora", arch_models.tiny_config("qwen3_moe"))


def test_quantized_types_count_attn_v_among_attention_layers_and_give_8_experts_q8_0():
    from steadytune.gguf_quantize import tensor_types

    # a hybrid of 16 blocks with attention in blocks 1, 3, 5: llama.cpp's use_more_bits runs over
    # those 3 (the last of them gets more bits), not over the block index (which would pick block 1)
    names = [(f"blk.{i}.attn_v.weight", (256, 256)) for i in (1, 3, 5)]
    types = tensor_types(names, "q4_k_m", 16)
    assert [types[name] for name, _ in names] == ["Q4_K", "Q4_K", "Q6_K"]
    # Mixtral's 8 experts: attn_v and attn_k Q8_0, attn_output Q5_K in q4_k_m
    dense = [("blk.0.attn_k.weight", (256, 256)), ("blk.0.attn_output.weight", (256, 256))]
    assert tensor_types(dense, "q4_k_m", 8, n_expert=8) == {"blk.0.attn_k.weight": "Q8_0",
                                                            "blk.0.attn_output.weight": "Q5_K"}
    assert tensor_types(dense, "q4_k_m", 8, n_expert=4) == {"blk.0.attn_k.weight": "Q4_K",
                                                            "blk.0.attn_output.weight": "Q4_K"}


def test_granite_attention_without_rope_switches_llama_cpps_rope_off():
    """Granite 4.0-H (position_embedding_type "nope"): llama.cpp's granitehybrid applies RoPE only with
    rope.scaling.finetuned true; the converter then writes a context of 2**20, as here."""
    from steadytune.gguf_arch import gguf_hparams

    config = {**arch_models.tiny_config("granitemoehybrid"), **RELEASED["granitemoehybrid"],
              "position_embedding_type": "nope"}
    hparams = gguf_hparams(config, {})
    assert hparams["rope_scaling_finetuned"] is False and hparams["context_length"] == 2 ** 20


def test_gemma3n_tensors_are_written_as_mlx_lm_computes_with_them():
    """What llama.cpp's gemma3n computes otherwise, written so it computes as mlx-lm: tokens past the
    per-layer embedding read token 0's row (mlx-lm maps them to 0, llama.cpp looks each one up), AltUp
    coefficients clipped to altup_coef_clip (mlx-lm clips before each use), correct_output_scale as
    ones when altup_correct_scale is off (llama.cpp always applies it), AltUp projections stacked in
    list order."""
    import mlx.core as mx

    from steadytune.gguf_arch import TRANSFORMS, stacked

    c = {"vocab_size": 5, "altup_coef_clip": 1.0, "altup_correct_scale": False}
    rows = mx.arange(6).reshape(3, 2)
    assert TRANSFORMS["per_layer_token_embd"](rows, c).tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]]
    assert TRANSFORMS["altup_predict_coef"](mx.array([[-3.0, 0.5]]), c).tolist() == [[-1.0, 0.5]]
    assert TRANSFORMS["altup_correct_scale"](mx.array([0.0, 2.0]), c).tolist() == [1.0, 1.0]
    spec = EXPORTS["gemma3n"]
    lists = [(f"model.language_model.altup_projections.{i}.weight", mx.full((2, 2), i)) for i in (0, 2, 1)]
    (name, value), = stacked(spec, lists)
    assert name == "model.language_model.altup_projections.weight"
    assert value[:, 0, 0].tolist() == [0, 1, 2]
