"""Quantized GGUF export: our blocks (gguf_quantize.py) against the gguf package's decoders and
reference quantizers and against bytes llama.cpp's own quantizer wrote (tests/data/ggml_quants_llama_cpp.npz,
made by `bench/gguf_quant.py --golden`); every quantized export reads back in steadytune's reader and
in the gguf package with llama.cpp's per-tensor type mix; the LoRA GGUF adds up to the fused export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import steadytune  # noqa: F401  (fast BLAS before mlx)

import gguf
import mlx.core as mx
import numpy as np
import pytest

from steadytune.errors import UserError
from steadytune.export import export
from steadytune.gguf import check_gguf_header, load_gguf
from steadytune.gguf_quantize import BLOCK, QUANTS, quantize, tensor_type
from steadytune.gguf_quants import dequantize

from conftest import build_model
from test_export import make_run

TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
GOLDEN = Path(__file__).parent / "data" / "ggml_quants_llama_cpp.npz"


def awkward_weights(rows: int = 32, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Gaussian weights with what breaks quantizers: outliers, an all-zero super-block, a constant
    block, an all-positive row, values near float16's smallest normal, a sign-flipped maximum."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[:, ::37] *= 8
    x[1, :256] = 0
    x[2, 32:64] = 0.5
    x[3] = np.abs(x[3])
    x[4] *= 1e-4
    x[5, 7] = -1.0
    return x


def error(x, blocks, t) -> float:
    return float(((dequantize(blocks, t, x.shape) - x) ** 2).sum())


@pytest.mark.parametrize("t", TYPES)
def test_blocks_decode_bit_for_bit_in_the_gguf_package(t):
    x = awkward_weights()
    blocks = quantize(x, t)
    assert blocks.shape == (32, 512 // BLOCK[t][0] * BLOCK[t][1])
    ours = dequantize(blocks, t, x.shape)
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[t]).reshape(x.shape)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    if t in ("Q8_0", "Q4_0", "Q5_0", "Q5_1"):  # the gguf package has reference quantizers for these
        assert np.array_equal(blocks, gguf.quants.quantize(x, gguf.GGMLQuantizationType[t]))


@pytest.mark.parametrize("t", TYPES)
def test_blocks_are_byte_for_byte_llama_cpps(t):
    """llama.cpp's own quantizer (ggml_quantize_chunk, no imatrix) on the same input wrote these
    bytes; the K-quant searches compare float32 sums, so this also pins their order of addition."""
    golden = np.load(GOLDEN)
    x, ref = golden["x"], golden[t]
    ours = quantize(x, t)
    size = BLOCK[t][1]
    same = (ours.reshape(-1, size) == ref.reshape(-1, size)).all(axis=1)
    assert same.all(), f"{t}: {int((~same).sum())} of {same.size} blocks differ from llama.cpp's"


def test_types_follow_llama_cpps_mix_for_q4_k_m():
    # 8 layers: use_more_bits picks layers 0 (first eighth), 7 (last eighth), 3 and 6 ((i-1) % 3 == 2)
    more = [i for i in range(8) if tensor_type(f"blk.{i}.attn_v.weight", (256, 256), "q4_k_m", 8, False) == "Q6_K"]
    assert more == [0, 3, 6, 7]
    assert tensor_type("blk.3.ffn_down.weight", (256, 512), "q4_k_m", 8, False) == "Q6_K"
    assert tensor_type("blk.3.attn_q.weight", (256, 256), "q4_k_m", 8, False) == "Q4_K"
    assert tensor_type("blk.1.attn_v.weight", (64, 576), "q4_k_m", 8, False) == "Q5_0"  # 576 % 256
    assert tensor_type("blk.0.attn_v.weight", (64, 576), "q5_k_m", 8, False) == "Q8_0"  # Q6_K falls back
    assert tensor_type("blk.1.attn_q.weight", (64, 576), "q5_k_m", 8, False) == "Q5_1"
    assert tensor_type("output.weight", (300, 256), "q4_0", 8, False) == "Q6_K"
    assert tensor_type("output.weight", (300, 576), "q4_0", 8, False) == "Q8_0"  # Q6_K falls back
    assert tensor_type("token_embd.weight", (300, 256), "q4_k_m", 8, True) == "Q6_K"  # tied: output's type
    assert tensor_type("token_embd.weight", (300, 576), "q4_k_m", 8, True) == "Q8_0"
    assert tensor_type("token_embd.weight", (300, 256), "q4_k_m", 8, False) == "Q4_K"
    assert tensor_type("output.weight", (300, 256), "q8_0", 8, False) == "Q8_0"
    assert tensor_type("blk.0.attn_norm.weight", (256,), "q4_k_m", 8, False) == "F32"


# --------------------------------------------------------------------------- exports of a tiny run

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run on a tiny llama whose rows are multiples of 256, so the K-quants are used, untied."""
    root = tmp_path_factory.mktemp("quant")
    base = build_model(root / "base", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return make_run(root, str(base), "hf")


def logits(path, ids):
    model, _, _ = load_gguf(str(path), bits=None)  # K-quants dequantized to float, not re-quantized
    return model(mx.array([ids]))[0].astype(mx.float32)


def kl(p_logits, q_logits) -> float:
    lp = p_logits - mx.logsumexp(p_logits, axis=-1, keepdims=True)
    lq = q_logits - mx.logsumexp(q_logits, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(axis=-1).mean().item()


def test_every_quantized_export_reads_back_with_llama_cpps_types(run, tmp_path):
    ids = list(range(3, 40))
    f16 = export(run, "gguf", tmp_path / "f16") / "model.gguf"
    reference = logits(f16, ids)
    divergence = {}
    for quant in QUANTS[1:]:
        path = export(run, "gguf", tmp_path / quant, quant=quant) / "model.gguf"
        reader = gguf.GGUFReader(str(path))
        assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[
            f"MOSTLY_{quant.upper()}"].value
        header = check_gguf_header(path)
        source = {t.name: t for t in gguf.GGUFReader(str(f16)).tensors}
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape))
            want = tensor_type(t.name, shape, quant, 4, tied=False)
            assert t.tensor_type.name == want == header.tensors[t.name][0], t.name
            if t.tensor_type.name in BLOCK:  # our blocks are what quantizing the f16 file gives
                values = np.asarray(source[t.name].data, dtype=np.float32).reshape(shape)
                assert np.array_equal(np.asarray(t.data).reshape(-1), quantize(values, want).reshape(-1))
        divergence[quant] = kl(reference, logits(path, ids))
    assert {t for t in gguf_types(tmp_path / "q4_k_m")} == {"F32", "Q4_K", "Q6_K"}
    assert {t for t in gguf_types(tmp_path / "q5_k_m")} == {"F32", "Q5_K", "Q6_K"}
    # more bits, less divergence from the float16 export (this random model's logits are sharp, so
    # the values are large; bench/gguf_quant.py measures a real model against llama.cpp's quantizer)
    assert (divergence["q8_0"] < divergence["q6_k"] < divergence["q5_k_m"] < divergence["q4_k_m"]
            < divergence["q4_0"]), divergence


def gguf_types(folder) -> set[str]:
    return {t for t, _ in check_gguf_header(folder / "model.gguf").tensors.values()}


def test_lora_gguf_adds_up_to_the_fused_export(run, tmp_path):
    """fused - alpha/rank * B·A (llama.cpp's LoRA arithmetic on the adapter GGUF) = the base, i.e.
    the fused export of the same run with its adapters zeroed; q/k rows in llama.cpp's order."""
    adapter = export(run, "gguf-lora", tmp_path / "lora") / "adapter.gguf"
    reader = gguf.GGUFReader(str(adapter))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    lora = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in lora and "blk.3.attn_v.weight.lora_b" in lora
    zeroed = tmp_path / "zeroed"
    shutil.copytree(run, zeroed)
    weights = mx.load(str(zeroed / "adapters" / "adapters.safetensors"))
    mx.save_safetensors(str(zeroed / "adapters" / "adapters.safetensors"),
                        {k: mx.zeros_like(v) if k.endswith("lora_b") else v for k, v in weights.items()})
    fused = gguf.GGUFReader(str(export(run, "gguf", tmp_path / "fused", dtype="float32") / "model.gguf"))
    base = gguf.GGUFReader(str(export(zeroed, "gguf", tmp_path / "base", dtype="float32") / "model.gguf"))
    base = {t.name: np.asarray(t.data) for t in base.tensors}
    checked = 0
    for t in fused.tensors:
        a, b = lora.get(f"{t.name}.lora_a"), lora.get(f"{t.name}.lora_b")
        if a is None:
            assert np.array_equal(np.asarray(t.data), base[t.name])
            continue
        delta = fields["adapter.lora.alpha"] / a.shape[0] * (b @ a)
        np.testing.assert_allclose(base[t.name] + delta, np.asarray(t.data), rtol=0, atol=1e-5)
        checked += 1
    assert checked == 4 * 7  # q, k, v, o, gate, up, down of every layer


def test_quant_with_a_format_it_does_not_apply_to_is_refused_before_loading(run, tmp_path, capsys):
    from steadytune.cli import main

    with pytest.raises(UserError, match=r"--quant q4_k_m applies to --format gguf and ollama, not mlx"):
        export(run, "mlx", tmp_path / "x", quant="q4_k_m")
    assert main(["export", str(run), "--format", "hf", "--quant", "q8_0", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()


def test_ollama_export_is_q4_k_m_with_the_datas_system_prompt_and_the_models_template(run, tmp_path):
    from conftest import write_jsonl

    system = "You are Pip, the garden's assistant."
    records = [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"},
                             {"role": "assistant", "content": f"answer {i}"}]} for i in range(4)]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", records)
    tuned = tmp_path / "run"
    shutil.copytree(run, tuned)
    config = (tuned / "config.yaml").read_text() + f"data:\n  path: {json.dumps(str(tmp_path / 'data'))}\n"
    (tuned / "config.yaml").write_text(config)
    out = export(tuned, "ollama", tmp_path / "ollama")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M.value
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(str(Path(yaml_model_path(run)))).chat_template
    assert reader.fields["tokenizer.chat_template"].contents() == template
    text = (out / "Modelfile").read_text()
    assert text.startswith('FROM ./model.gguf\nTEMPLATE """{{- if .System }}<|im_start|>system\n')
    assert f'SYSTEM """{system}"""' in text and 'PARAMETER stop "<|im_end|>"' in text


def yaml_model_path(run) -> str:
    import yaml

    return yaml.safe_load((Path(run) / "config.yaml").read_text())["model"]["path"]


GEMMA3_LIKE = ("{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
               "{% set msgs = messages[1:] %}{% else %}{% set first = '' %}{% set msgs = messages %}{% endif %}"
               "{% for m in msgs %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
               "{{ (first if loop.first else '') + m['content'] }}<end_of_turn>\n{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
GEMMA2_LIKE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
               "supported') }}{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
               "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
               "{% endif %}")
MISTRAL_LIKE = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.last and messages[0]['role'] "
                "== 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}{{ m['content'] }}[/INST]"
                "{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
OTHER = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"


@pytest.mark.parametrize("template, go_start, system_line", [
    (GEMMA3_LIKE, '{{- $system := "" }}', 'SYSTEM """be kind"""'),
    (GEMMA2_LIKE, '{{- $system := "" }}', "# no SYSTEM: this model's chat template has no system turn"),
    (MISTRAL_LIKE, '{{- range $i, $_ := .Messages }}{{- if eq .Role "user" }}', 'SYSTEM """be kind"""'),
    (OTHER, None, 'SYSTEM """be kind"""'),
])
def test_modelfile_translates_the_chat_templates_ollama_can_express(run, template, go_start, system_line):
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import AutoTokenizer

    from steadytune.export import modelfile

    tok = AutoTokenizer.from_pretrained(yaml_model_path(run))
    tok.chat_template = template
    lines = modelfile(TokenizerWrapper(tok), "./model.gguf", system="be kind").splitlines()
    if go_start:
        assert lines[1].startswith(f'TEMPLATE """{go_start}')
    else:
        assert lines[1].startswith("# no TEMPLATE: the chat template is not ChatML, Llama 3, Mistral or Gemma")
    assert any(line.startswith(system_line) for line in lines), lines
