"""GGUF loading: a tiny llama written as GGUF gives the logits of the same weights from safetensors;
the default model answers; broken or unsupported files are one-line UserErrors; our dequantization
of every K-quant and IQ4 type equals the gguf package's bit for bit; each supported family (llama,
mistral, qwen2, qwen3, gemma2, gemma3, phi3), written as llama.cpp's converter writes it, gives the
logits of mlx-lm's model of the same weights, and exports back to a GGUF of its architecture; RoPE
scaling that converters write as tensors (Llama 3's rope_freqs, Phi-3's longrope factors) and Gemma 3
per-layer sliding-window flags load as the mlx-lm config they came from.

The tiny model's quantized tensors hold values on each type's exact grid (a power-of-two scale and
integer codes that fill the range), so Q4_0/Q4_1/Q8_0 store them without rounding and the GGUF and
safetensors copies hold the very same numbers; what is left is float summation order.
"""

from __future__ import annotations

import json

import steadytune  # noqa: F401  (fast BLAS before mlx)

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from gguf_util import add_shape, finish, tokenizer_lists
from steadytune.errors import UserError
from steadytune.gguf import build_tokenizer, check_gguf_header, load_gguf, spm_merges
from steadytune.gguf_arch import llama3_factors

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256)
CORPUS = ["The capital of France is Paris.", "What is the capital of Italy? Rome, in 2024.",
          "hello world, hello model; tiny llamas answer 12345 questions.",
          "A quick brown fox jumps over the lazy dog while the cat sleeps."] * 4
PROMPTS = ["The capital of France", "hello tiny model 42", "<|im_start|>user\nWhat?<|im_end|>"]
# GGUF type of each tensor of the tiny model (everything else F32): all three quant types, and F16.
QUANT = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0,
         "attn_output": Q.Q4_1, "ffn_gate": Q.Q4_0, "ffn_up": Q.Q8_0, "ffn_down": Q.F16, "output": Q.Q4_1}
HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


# --------------------------------------------------------------------------- tiny model builders

def tiny_tokenizer():
    """A byte-level BPE (~300 tokens) trained here, split like SmolLM2's: digits one by one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def grid_values(rng, shape, qtype):
    """Random float32 values that `qtype` stores exactly (every 32-block spans the full code range)."""
    rows, cols = shape
    if qtype == Q.Q8_0:      # x = d*q, q in [-127, 127], max |q| = 127 -> d = 2^-7
        q = rng.integers(-127, 128, shape)
        q[:, ::32] = 127
        return (q / 128.0).astype(np.float32)
    if qtype == Q.Q4_0:      # x = d*(q-8), q in [0, 15], the block's largest |x| is -8d -> d = 2^-4
        q = rng.integers(0, 16, shape)
        q[:, ::32] = 0
        return ((q - 8) / 16.0).astype(np.float32)
    if qtype == Q.Q4_1:      # x = m + d*q, each block holds q = 0 and q = 15 -> m = -0.5, d = 2^-4
        q = rng.integers(0, 16, shape)
        q[:, ::32], q[:, 1::32] = 0, 15
        return (-0.5 + q / 16.0).astype(np.float32)
    return (rng.integers(-127, 128, shape) / 128.0).astype(np.float32)  # F16 holds these exactly


def tiny_weights(tied: bool, seed: int = 0) -> dict:
    """HF-named float32 weights of the tiny llama, on the grids of QUANT."""
    rng = np.random.default_rng(seed)
    h, f, v = TINY["hidden_size"], TINY["intermediate_size"], 300
    kv = h // TINY["num_attention_heads"] * TINY["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
              "mlp.down_proj": (h, f)}
    w = {"model.embed_tokens.weight": grid_values(rng, (v, h), QUANT["token_embd"]),
         "model.norm.weight": (1 + rng.standard_normal(h) * 0.1).astype(np.float32)}
    if not tied:
        w["lm_head.weight"] = grid_values(rng, (v, h), QUANT["output"])
    for i in range(TINY["num_hidden_layers"]):
        for name, shape in shapes.items():
            w[f"model.layers.{i}.{name}.weight"] = grid_values(rng, shape, QUANT[HF_TO_GGUF[name]])
        for name in ("input_layernorm", "post_attention_layernorm"):
            w[f"model.layers.{i}.{name}.weight"] = (1 + rng.standard_normal(h) * 0.1).astype(np.float32)
    return w


def write_tiny_hf(folder, tied: bool = True, seed: int = 0) -> dict:
    """An HF-format model folder (config.json, model.safetensors, tokenizer files); returns its weights."""
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    weights = tiny_weights(tied, seed)
    mx.save_safetensors(str(folder / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()},
                        metadata={"format": "pt"})
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 300,
              "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2, **TINY}
    (folder / "config.json").write_text(json.dumps(config))
    hf = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(), bos_token="<|im_start|>",
                                 eos_token="<|im_end|>", pad_token="<|im_end|>",
                                 unk_token="<|endoftext|>", chat_template=CHATML)
    hf.save_pretrained(folder)
    return weights


def llama_cpp_permute(w, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tokenizer(w, tokens: list, merges: list) -> None:
    """The tiny tokenizer as llama.cpp writes a byte-level BPE ("gpt2", SmolLM's pre-tokenizer)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)


def write_tiny_gguf(path, folder, weights: dict, quant: dict = QUANT, raw: dict | None = None) -> None:
    """The same model as llama.cpp's converter writes it: GGUF names, permuted q/k, quantized.

    `raw` adds tensors given as (bytes array, GGML type), e.g. a K-quant the gguf package cannot make.
    """
    vocab, tokens, merges = tokenizer_lists(folder)
    heads, kv = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    add_shape(w, TINY, heads, kv)
    w.add_rope_dimension_count(TINY["hidden_size"] // heads)
    w.add_vocab_size(len(tokens))
    add_tokenizer(w, tokens, merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])  # like many files: eos is not the end-of-turn token
    w.add_pad_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for name, value in weights.items():
        parts = name.rsplit(".", 1)[0].split(".")
        if parts[0] == "model" and parts[1] == "layers":
            short = HF_TO_GGUF[".".join(parts[3:])]
            gname = f"blk.{parts[2]}.{short}.weight"
        else:
            short = HF_TO_GGUF[".".join(parts)]
            gname = f"{short}.weight"
        if short == "attn_q":
            value = llama_cpp_permute(value, heads, heads)
        elif short == "attn_k":
            value = llama_cpp_permute(value, heads, kv)
        qtype = quant.get(short, Q.F32) if value.ndim == 2 else Q.F32
        if qtype == Q.F32:
            w.add_tensor(gname, value)
        elif qtype == Q.F16:
            w.add_tensor(gname, value.astype(np.float16))
        else:
            w.add_tensor(gname, quantize(value, qtype), raw_dtype=qtype)
    for gname, (data, qtype) in (raw or {}).items():
        w.add_tensor(gname, data, raw_dtype=qtype)
    finish(w)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{tied: (hf folder, gguf path)} for a tied and an untied tiny llama."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for tied in (True, False):
        folder = root / f"hf-tied{tied}"
        weights = write_tiny_hf(folder, tied=tied)
        write_tiny_gguf(root / f"tiny-tied{tied}.gguf", folder, weights)
        out[tied] = (folder, root / f"tiny-tied{tied}.gguf")
    return out


# --------------------------------------------------------------------------- (a) same model

@pytest.mark.parametrize("tied", [True, False])
def test_gguf_gives_the_logits_of_the_same_weights_from_safetensors(tiny, tied):
    from mlx_lm.utils import load

    folder, path = tiny[tied]
    ref_model, ref_tok = load(str(folder))
    model, tok, config = load_gguf(str(path))
    assert config["tie_word_embeddings"] is tied and config["num_key_value_heads"] == 2
    assert type(model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert model.layers[0].self_attn.q_proj.bits == 4 and model.layers[0].mlp.up_proj.bits == 8
    assert type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    for text in PROMPTS:
        ids = ref_tok.encode(text)
        assert tok.encode(text) == ids
        want = ref_model(mx.array([ids]))
        got = model(mx.array([ids])).astype(mx.float32)
        diff = mx.abs(got - want).max().item()
        assert diff < 1e-4, f"{text!r}: max |logit diff| {diff}"
        assert (got.argmax(-1) == want.argmax(-1)).all().item()


def test_q_k_rows_are_back_in_hf_order(tiny):
    """Dequantized q/k weights equal the HF ones: llama.cpp's row permutation was undone exactly."""
    folder, path = tiny[True]
    hf = mx.load(str(folder / "model.safetensors"))
    model, _, _ = load_gguf(str(path))
    for proj in ("q_proj", "k_proj"):
        layer = getattr(model.layers[1].self_attn, proj)
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
        assert mx.array_equal(w, hf[f"model.layers.1.self_attn.{proj}.weight"]).item()


def test_tokenizer_from_gguf_stops_at_end_of_turn_and_renders_the_chat_template(tiny):
    _, path = tiny[True]
    _, tok, config = load_gguf(str(path))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tok.eos_token_ids and 0 in tok.eos_token_ids  # end of turn + the file's eos
    assert config["eos_token_id"] == sorted(tok.eos_token_ids)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode("<|im_start|>user 2024")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == "<|im_start|>user 2024"
    assert [tok.decode([i]) for i in ids[-4:]] == ["2", "0", "2", "4"]  # digits split one by one


def test_sentencepiece_vocabulary_merges_by_score_and_falls_back_to_bytes():
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁he", "▁hell", "▁hello", "or", "▁w",
              "▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + bytes_ + pieces
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    tok = build_tokenizer(meta)
    ids = tok.encode("hello world é")
    assert ids[0] == 1  # SentencePiece vocabularies add BOS unless the file says not to
    assert [tokens[i] for i in ids[1:]] == ["▁hello", "▁world", "▁", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world é"
    assert spm_merges(["a", "b", "ab", "c", "abc"], [0, 0, -1, 0, -2]) == [("a", "b"), ("ab", "c")]


# --------------------------------------------------------------------------- (b) default model

def test_default_model_answers_the_capital_of_france():
    from steadytune.config import ModelConfig
    from steadytune.generation import generate
    from steadytune.model import load_base

    loaded = load_base(ModelConfig())
    assert loaded.kind == "gguf" and loaded.config["num_hidden_layers"] == 30
    assert isinstance(loaded.model.layers[0].mlp.up_proj, __import__("mlx.nn").nn.QuantizedLinear)
    answer = generate(loaded, "What is the capital of France?", max_tokens=24)
    assert "Paris" in answer, answer


# --------------------------------------------------------------------------- (c) errors

def _corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "magic":
        return b"GGUX" + data[4:]
    if how == "version":
        return data[:4] + (7).to_bytes(4, "little") + data[8:]
    if how == "key-length":  # the first key's length says 2^60 bytes
        return data[:24] + (1 << 60).to_bytes(8, "little") + data[32:]
    if how == "kv-count":
        return data[:16] + (1 << 40).to_bytes(8, "little") + data[24:]
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "magic", "version", "key-length", "kv-count"])
def test_corrupted_gguf_is_a_user_error_naming_the_file(tiny, tmp_path, how):
    _, good = tiny[True]
    path = tmp_path / f"{how}.gguf"
    path.write_bytes(_corrupt(good.read_bytes(), how))
    with pytest.raises(UserError) as e:
        load_gguf(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: truncated or corrupted GGUF (") and "re-download" in msg


def test_header_check_reads_the_good_file_and_catches_a_tensor_past_the_end(tiny, tmp_path):
    _, good = tiny[False]
    header = check_gguf_header(good)
    assert header.version == 3 and header.metadata["general.architecture"] == "llama"
    assert header.tensors["blk.0.attn_q.weight"] == ("Q4_0", (64, 64))
    assert header.tensors["output.weight"] == ("Q4_1", (300, 64))
    data = good.read_bytes()
    cut = tmp_path / "short.gguf"
    cut.write_bytes(data[:-1])  # only the last tensor's final byte is missing
    with pytest.raises(UserError, match=r"short\.gguf: truncated or corrupted GGUF \(tensor .* ends past"):
        check_gguf_header(cut)


def test_random_header_damage_never_reaches_mlx_unchecked(tiny, tmp_path):
    """Flip bytes all over the header: every result is a clean load or a UserError, never a crash."""
    _, good = tiny[True]
    data = bytearray(good.read_bytes())
    header_end = 24 + 4096
    rng = np.random.default_rng(1)
    outcomes = {"ok": 0, "error": 0}
    for i in range(40):
        bad = bytearray(data)
        for pos in rng.integers(8, header_end, 3):
            bad[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"fuzz{i}.gguf"
        path.write_bytes(bytes(bad))
        try:
            load_gguf(str(path))
            outcomes["ok"] += 1
        except UserError as e:
            assert str(e).startswith(f"{path}: ")
            outcomes["error"] += 1
    assert outcomes["error"] > 0


def test_ggml_type_table_matches_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES

    from steadytune.gguf import GGML_TYPES

    known = {q.value: (q.name, *size) for q, size in GGML_QUANT_SIZES.items()}
    assert {k: known.get(k) for k in GGML_TYPES} == GGML_TYPES and len(GGML_TYPES) >= 34


# --------------------------------------------------------------------------- (d) every tensor type

# Byte ranges of the float16 scales in one block of each type (ggml-common.h); the rest of a block
# is codes and 4/6/8-bit sub-scales, for which every bit pattern is valid.
F16_FIELDS = {"Q5_0": [(0, 2)], "Q5_1": [(0, 2), (2, 4)], "Q2_K": [(80, 82), (82, 84)],
              "Q3_K": [(108, 110)], "Q4_K": [(0, 2), (2, 4)], "Q5_K": [(0, 2), (2, 4)],
              "Q6_K": [(208, 210)], "IQ4_NL": [(0, 2)], "IQ4_XS": [(0, 2)], "Q8_0": [(0, 2)],
              "Q4_0": [(0, 2)], "Q4_1": [(0, 2), (2, 4)]}


def random_blocks(rng, qtype: str, n_blocks: int, std: float | None = None) -> np.ndarray:
    """Random valid blocks: random codes and sub-scales, finite float16 super-block scales
    (normal(0, 1) values; given `std`, |normal| scaled so the weights have about that deviation)."""
    from gguf.constants import GGML_QUANT_SIZES

    _, size = GGML_QUANT_SIZES[Q[qtype]]
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    scales = [rng.standard_normal(n_blocks) for _ in F16_FIELDS[qtype]]
    if std is not None:  # the values are linear in the float16 scales: rescale them all at once
        scales = [np.abs(d) for d in scales]
        for (a, b), d in zip(F16_FIELDS[qtype], scales):
            blocks[:, a:b] = d.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        scales = [d * std / gguf.quants.dequantize(blocks, Q[qtype]).std() for d in scales]
    for (a, b), d in zip(F16_FIELDS[qtype], scales):
        blocks[:, a:b] = d.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS"])
def test_our_dequantization_equals_the_gguf_package_bit_for_bit(qtype):
    from steadytune.gguf_quants import OURS

    blocks = random_blocks(np.random.default_rng(7), qtype, 2048)
    want = gguf.quants.dequantize(blocks, Q[qtype])
    got = OURS[qtype](blocks)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.array_equal(got.reshape(want.shape), want)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K"])
def test_q4_0_q4_1_q8_0_and_q4_k_repack_into_mlx_groups_of_32_without_rounding(qtype):
    from steadytune.gguf_quants import affine_codes, pack

    bits = 8 if qtype == "Q8_0" else 4
    blocks = random_blocks(np.random.default_rng(3), qtype, 16 * 256 // (256 if qtype == "Q4_K" else 32))
    codes, scales, biases = affine_codes(blocks, qtype, (16, 256))
    w = mx.dequantize(mx.array(pack(codes, bits)), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
    assert np.array_equal(np.array(w), gguf.quants.dequantize(blocks, Q[qtype]).reshape(16, 256))


def test_tensor_type_gguf_cannot_read_is_refused_naming_it(tiny, tmp_path):
    folder, _ = tiny[True]
    weights = {k: v for k, v in tiny_weights(True).items() if k != "model.layers.0.mlp.down_proj.weight"}
    path = tmp_path / "q8k.gguf"
    # Q8_K is llama.cpp's internal dot-product type: no converter writes it and nothing dequantizes
    # it. The type is refused before any block is read, so zeros (one block per row) will do.
    write_tiny_gguf(path, folder, weights, raw={"blk.0.ffn_down.weight": (np.zeros((64, 292), np.uint8), Q.Q8_K)})
    with pytest.raises(UserError) as e:
        load_gguf(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: tensor type not supported (Q8_K in blk.0.ffn_down.weight)")
    assert "\n" not in msg


def test_unsupported_architecture_is_one_line_naming_it(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    finish(w)
    with pytest.raises(UserError, match=r"falcon\.gguf: architecture 'falcon' is not supported from GGUF "
                                         r"\(steadytune reads llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3\)"):
        load_gguf(str(path))


# --------------------------------------------------------------------------- (e) architectures

# Each family's tiny model, as mlx-lm configures it; values a GGUF can express (llama.cpp derives
# gemma's query scale from head_dim and fixes Gemma 3's local RoPE base at 10000).
H, KV, HEADS = 64, 2, 4
ARCH_CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "mistral": dict(model_type="llama", tie_word_embeddings=False, rope_theta=1e6),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1e6),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False, head_dim=32, rope_theta=1e6),
    "gemma2": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0),
    "gemma3": dict(model_type="gemma3_text", num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=4, sliding_window_pattern=6, rope_local_base_freq=10000.0, rope_theta=1e6,
                   rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False, partial_rotary_factor=0.5),
}
# HF names -> the names llama.cpp's converter writes (gguf-py tensor_mapping.py), where they differ by family
GEMMA_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
EXTRA_NAMES = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def arch_config(arch: str, hidden: int = H) -> dict:
    return {"hidden_size": hidden, "num_hidden_layers": 2, "intermediate_size": 256, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "head_dim": hidden // HEADS, "rms_norm_eps": 1e-6, "vocab_size": 300,
            "rope_theta": 10000.0, "max_position_embeddings": 256, **ARCH_CONFIGS[arch]}


def gguf_name(arch: str, hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    parts = stem.split(".")
    if parts[:2] != ["model", "layers"]:
        return f"{HF_TO_GGUF[stem]}.{suffix}"
    rest = ".".join(parts[3:])
    short = (GEMMA_NAMES.get(rest) if arch.startswith("gemma") else None) or EXTRA_NAMES.get(rest) or HF_TO_GGUF[rest]
    return f"blk.{parts[2]}.{short}.{suffix}"


def reference_model(arch: str, seed: int = 0, hidden: int = H, overrides: dict | None = None):
    """mlx-lm's model of the family with random weights (norms too, so their +1 offsets matter)."""
    import importlib

    from mlx.utils import tree_flatten

    config = {**arch_config(arch, hidden), **(overrides or {})}
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if name.startswith("lm_head") and arch in ("qwen2", "gemma2", "gemma3"):
            continue  # tied: the embedding is the output layer
        w = rng.standard_normal(value.shape).astype(np.float32) * (0.1 if value.ndim == 1 else 0.5 / value.shape[-1] ** 0.5)
        if value.ndim == 1 and "norm" in name and not arch.startswith("gemma"):
            w += 1  # gemma's RMSNorm multiplies by 1 + w, the others by w
        weights[name] = w
    return config, module, weights


def load_reference(config, module, weights):
    model = module.Model(module.ModelArgs.from_dict(config))
    w = {k: mx.array(v) for k, v in weights.items()}
    w = model.sanitize(w) if hasattr(model, "sanitize") else w
    model.load_weights(list(w.items()), strict=True)
    return model


def to_file(arch: str, gname: str, value: np.ndarray) -> np.ndarray:
    """What llama.cpp's converter does to a tensor: q/k rows permuted for the llama family (its
    RoPE rotates adjacent pairs), 1 added to gemma's norms (llama.cpp multiplies by w, not 1 + w)."""
    if arch in ("llama", "mistral") and ".attn_q." in gname:
        return llama_cpp_permute(value, HEADS, HEADS)
    if arch in ("llama", "mistral") and ".attn_k." in gname:
        return llama_cpp_permute(value, HEADS, KV)
    if arch.startswith("gemma") and gname.endswith("norm.weight"):
        return value + 1
    return value


def from_file(arch: str, gname: str, value: np.ndarray) -> np.ndarray:
    """The inverse of to_file, for the values a quantized tensor of the file holds."""
    part = gname.split(".")[-2]
    if arch in ("llama", "mistral") and part in ("attn_q", "attn_k"):
        n_head = HEADS if part == "attn_q" else KV
        return value.reshape(n_head, -1, 2, value.shape[1]).swapaxes(1, 2).reshape(value.shape)
    return value


def write_arch_gguf(path, folder, arch: str, config: dict, tensors: dict, extra=None) -> None:
    """A GGUF of the family's layout; tensors: GGUF name -> (array as stored, raw GGML type or None);
    extra(writer, config) adds more (RoPE factor tensors, a sliding window pattern)."""
    vocab, tokens, merges = tokenizer_lists(folder)
    w = gguf.GGUFWriter(str(path), arch)
    add_shape(w, config, HEADS, KV)
    w.add_rope_dimension_count(int(config["head_dim"] * config.get("partial_rotary_factor", 1)))
    if arch in ("qwen3", "gemma2", "gemma3"):  # the converters of families with their own head_dim
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
    if arch == "gemma3":
        w.add_sliding_window(config["sliding_window"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config["rope_scaling"]["factor"])
    add_tokenizer(w, tokens, merges)
    w.add_eos_token_id(vocab["<|im_end|>"])
    if extra:
        extra(w, config)
    for gname, (array, raw_dtype) in tensors.items():
        w.add_tensor(gname, array, raw_dtype=raw_dtype)
    finish(w)


# Per variant: GGUF name part -> type. "kquant" writes random valid K/IQ blocks (which the gguf
# package cannot produce from floats) for the matrices whose rows are whole 256-value super-blocks.
VARIANTS = {
    "f16": {p: Q.F16 for p in ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv",
                               "ffn_gate", "ffn_up", "ffn_down")},
    "q8_0-q4_0": {"token_embd": Q.Q8_0, "output": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q8_0,
                  "attn_output": Q.Q4_0, "attn_qkv": Q.Q4_0, "ffn_gate": Q.Q4_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_0},
    "kquant": {"ffn_down": Q.Q4_K, "attn_q": Q.Q5_K, "attn_k": Q.Q6_K, "attn_v": Q.Q3_K, "attn_output": Q.IQ4_XS,
               "attn_qkv": Q.Q2_K, "ffn_gate": Q.Q5_0, "ffn_up": Q.IQ4_NL, "token_embd": Q.Q6_K, "output": Q.Q5_1},
    # the tensor types of llama.cpp's Q4_K_M recipe (on a model wide enough for K-quant embeddings)
    "q4_k_m": {"token_embd": Q.Q4_K, "output": Q.Q6_K, "attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K,
               "attn_output": Q.Q4_K, "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K},
}


def arch_variant(tmp_path, folder, arch: str, variant: str, seed: int = 0, hidden: int = H,
                 overrides: dict | None = None, extra=None):
    """(gguf path, mlx-lm reference model holding the very values the file stores, its config);
    `overrides` change the reference's config, `extra` goes to write_arch_gguf."""
    from gguf.constants import GGML_QUANT_SIZES

    config, module, weights = reference_model(arch, seed, hidden, overrides)
    rng = np.random.default_rng(seed + 1)
    tensors = {}
    for name, value in weights.items():
        gname = gguf_name(arch, name)
        stored = to_file(arch, gname, value)
        qtype = VARIANTS[variant].get(gname.split(".")[-2]) if value.ndim == 2 else None
        block = GGML_QUANT_SIZES[qtype][0] if qtype is not None else 1
        if qtype is None or value.shape[1] % block:
            tensors[gname] = (stored, None)
        elif qtype == Q.F16:
            tensors[gname] = (stored.astype(np.float16), None)
            weights[name] = from_file(arch, gname, stored.astype(np.float16).astype(np.float32))
        else:
            if qtype.name not in ("F16", "Q8_0", "Q4_0", "Q4_1"):
                raw = random_blocks(rng, qtype.name, value.size // block, std=0.5 / value.shape[1] ** 0.5)
                raw = raw.reshape(value.shape[0], -1)
            else:
                raw = quantize(stored, qtype)
            tensors[gname] = (raw, qtype)
            weights[name] = from_file(arch, gname, gguf.quants.dequantize(raw, qtype).reshape(value.shape))
    path = tmp_path / f"{arch}-{variant}.gguf"
    write_arch_gguf(path, folder, arch, config, tensors, extra)
    return path, load_reference(config, module, weights), config


@pytest.fixture(scope="module")
def arch_folder(tiny):
    """The folder of the tiny tokenizer, which every family's file uses."""
    return tiny[True][0]


ARCH_PROMPTS = ["The capital of France is Paris, and", "hello tiny model 42 <|im_end|>"]


@pytest.mark.parametrize("variant", ["f16", "q8_0-q4_0", "kquant"])
@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_each_family_gives_the_logits_of_mlx_lm_with_the_same_weights(arch_folder, tmp_path, arch, variant):
    path, ref, config = arch_variant(tmp_path, arch_folder, arch, variant)
    # K-quant tensors load as their exact float values here (bits=None), so every variant holds the
    # reference's numbers (gemma's (1 + w) - 1 even gives back the same 1 + w) and only float
    # summation order may differ: on the CPU the logits are bit-identical (max diff 0.0 in all 21
    # cases); a kernel that sums in another order (float32, <= 256 terms of size ~1) moves a logit
    # by ~1e-6. 1e-4 leaves room for that and still catches any wrong transform (a wrong norm
    # offset, rope layout or attention scale moves logits by 1e-2 or more).
    model, tok, got_config = load_gguf(str(path), bits=None if variant == "kquant" else 4)
    # In float32, as load_base runs it on a CPU: MLX's own reader keeps F16 tensors and the scales
    # of Q4_0/Q8_0 groups in float16, and would round every product to float16 (2^-11) otherwise.
    model.apply(lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x)
    for key in ("model_type", "head_dim", "num_key_value_heads", "tie_word_embeddings", "rope_theta",
                "query_pre_attn_scalar", "sliding_window", "partial_rotary_factor", "rope_scaling",
                "attn_logit_softcapping", "final_logit_softcapping"):
        if key in config:
            assert got_config[key] == config[key], key
    for text in ARCH_PROMPTS:
        ids = mx.array([tok.encode(text)])
        want, got = ref(ids), model(ids).astype(mx.float32)
        diff = mx.abs(got - want).max().item()
        assert diff < 1e-4, f"{arch}/{variant} {text!r}: max |logit diff| {diff}"


def kl_divergence(p_logits, q_logits) -> float:
    """Mean over positions of KL(p || q) of the next-token distributions, in nats."""
    lp = p_logits - mx.logsumexp(p_logits, axis=-1, keepdims=True)
    lq = q_logits - mx.logsumexp(q_logits, axis=-1, keepdims=True)
    return (mx.exp(lp) * (lp - lq)).sum(-1).mean().item()


def requantization_kl(path, tok, exact, bits, group) -> float:
    """Mean KL of next-token distributions, `exact` (the dequantized floats) || loaded with
    bits/group; and the planner's view of the layers (gguf_model_config) is what loading built."""
    from steadytune.gguf import gguf_model_config

    model, _, config = load_gguf(str(path), bits=bits, group_size=group)
    assert config["quantization"] == gguf_model_config(str(path), bits, group)["quantization"]
    prompts = [mx.array([tok.encode(t)]) for t in ARCH_PROMPTS]
    return sum(kl_divergence(exact(ids), model(ids)) for ids in prompts) / len(prompts)


def test_q4_k_m_loads_q4_k_exactly_and_keeps_q6_k_at_8_bits(arch_folder, tmp_path, capsys):
    path, _, _ = arch_variant(tmp_path, arch_folder, "llama", "q4_k_m", hidden=256)
    model, tok, _ = load_gguf(str(path), bits=4, group_size=64)
    layer = model.layers[0]
    assert (layer.self_attn.q_proj.bits, layer.self_attn.q_proj.group_size) == (4, 32)
    assert (layer.self_attn.v_proj.bits, model.lm_head.bits, model.model.embed_tokens.bits) == (8, 8, 4)
    err = capsys.readouterr().err
    assert f"{path.name}: Q4_K: 11 tensors -> MLX 4-bit affine, group 32 (exact)" in err
    assert f"{path.name}: Q6_K: 5 tensors -> MLX 8-bit affine, group 64 (dequantized and re-quantized)" in err
    assert f"{path.name}: F32: 5 tensors -> float, as stored" in err
    exact = load_gguf(str(path), bits=None)[0]
    kl4, kl8 = requantization_kl(path, tok, exact, 4, 64), requantization_kl(path, tok, exact, 8, 64)
    print(f"Q4_K_M-like tiny llama, KL(float || loaded): 4-bit {kl4:.1e}, 8-bit {kl8:.1e} nats")
    # Only Q6_K -> 8-bit rounds at 4 bits (measured KL 5.9e-5), Q4_K -> 8-bit rounds too at 8 bits
    # (6.1e-5). Q4_K re-quantized to 4-bit group 64 instead measured 3.9e-3, Q6_K cut to 4 bits
    # 1.4e-2: a bound of 1e-3 tells them apart with room for other platforms' rounding.
    assert kl4 < 1e-3 and kl8 < 1e-3


def test_other_k_and_iq_types_are_requantized_to_the_users_bits_with_a_small_error(arch_folder, tmp_path):
    path, _, _ = arch_variant(tmp_path, arch_folder, "llama", "kquant", hidden=256)
    exact, tok, _ = load_gguf(str(path), bits=None)
    kl4, kl8 = requantization_kl(path, tok, exact, 4, 64), requantization_kl(path, tok, exact, 8, 64)
    model, _, _ = load_gguf(str(path), bits=4, group_size=64)
    layer = dict(model.layers[0].named_modules())
    # Q4_K exact; Q3_K and IQ4_XS re-quantized to 4 bits; Q6_K and Q5_K at 8 bits
    assert [(layer[p].bits, layer[p].group_size) for p in
            ("mlp.down_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.k_proj", "self_attn.q_proj")] == \
        [(4, 32), (4, 64), (4, 64), (8, 64), (8, 64)]
    print(f"Q2_K..IQ4_XS tiny llama, KL(float || loaded): 4-bit {kl4:.1e}, 8-bit {kl8:.1e} nats")
    # Measured 7.2e-3 (4 bits) and 8.4e-5 (8 bits) nats; the bounds leave 4x and 10x. Random codes
    # fill each block's range evenly, the worst case for re-quantization.
    assert kl4 < 3e-2 and kl8 < 1e-3


def test_the_planner_sees_the_layers_loading_builds_at_the_users_bits(arch_folder, tmp_path):
    """`steadytune plan --quantize 8 --quant-group-size 32` on a K-quant file plans the layers as
    load_gguf builds them with those settings (model.gguf_requant), not at 4-bit g64."""
    from steadytune.config import ModelConfig
    from steadytune.model import gguf_requant
    from steadytune.plan import read_model_config

    path, _, _ = arch_variant(tmp_path, arch_folder, "llama", "kquant", hidden=256)
    for quantize, group in (("4", 64), ("8", 32)):
        requant = gguf_requant(ModelConfig(path=str(path), quantize=quantize, group_size=group))
        planned = read_model_config(str(path), requant=requant)["quantization"]
        model, _, _ = load_gguf(str(path), *requant)
        for name, m in model.named_modules():
            if hasattr(m, "bits"):
                want = {"bits": m.bits, "group_size": m.group_size}
                assert planned.get(name, {k: planned[k] for k in want}) == want, (quantize, name)
        assert planned.get("model.layers.0.self_attn.v_proj", planned)["bits"] == int(quantize)  # Q3_K


# --------------------------------------------------------------------------- (f) export round trip

@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_tuned_family_exports_to_gguf_of_its_architecture_and_answers_the_same(arch_folder, tmp_path, arch):
    """Base GGUF of the family -> adapters (random, nonzero, as after training; see test_export) ->
    export --format gguf -> the gguf package reads the family's architecture and tensor names back,
    and the reloaded file gives the tuned model's logits and greedy answers."""
    from test_export import greedy, make_run

    from steadytune.export import export
    from steadytune.generation import load_tuned

    base, _, _ = arch_variant(tmp_path, arch_folder, arch, "q8_0-q4_0")
    run = make_run(tmp_path, str(base), arch)
    tuned = load_tuned(run)
    out = export(run, "gguf", tmp_path / "export", dtype="float32")
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    written = {t.name for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == ("llama" if arch == "mistral" else arch)
    assert written == set(check_gguf_header(base).tensors)  # the converter's names, nothing else
    assert (out / "Modelfile").read_text().startswith("FROM ./model.gguf\n")
    model, tok, _ = load_gguf(str(out / "model.gguf"))
    for text in ARCH_PROMPTS:
        ids = tok.encode(text)
        want, got = tuned.model(mx.array([ids])), model(mx.array([ids]))
        # float32 export of dequantized base + LoRA delta: only summation order differs (~1e-6)
        assert mx.abs(got - want).max().item() < 1e-4, arch
        assert greedy(model, ids) == greedy(tuned.model, ids)


# --------------------------------------------------------------------------- (g) RoPE scaling, SWA patterns

# Tiny llama (head_dim 16, base 10000: wavelengths 6.3, 20, 63, 199, ... 19869 positions) with llama3
# scaling whose boundaries (original / high, original / low) fall among them: 16 and 64 leave one
# frequency unscaled, blend two and divide five by `factor`. The second (32 and 128: one blended)
# uses other low/high factors; a file fixes only the two boundary wavelengths, so it comes back as
# the equivalent dict with Llama 3's low 1 and high 4 (original 128), solved from its blended factor.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
LLAMA3_OTHER = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                "original_max_position_embeddings": 256}
# Phi-3 longrope on the tiny phi3 (4 rotary frequencies): original context 64, context 256.
LONGROPE_SCALING = {"type": "longrope", "long_factor": [1.0, 3.0, 9.0, 27.0], "short_factor": [1.0, 1.25, 1.5, 2.0]}
LONGROPE_CONFIG = {"rope_scaling": LONGROPE_SCALING, "original_max_position_embeddings": 64,
                   "max_position_embeddings": 256}


def converter_rope_freqs(config: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors in numpy float32, as torch computes
    it (the converter reads the original context from the top level, default 8192; these configs
    have it in rope_scaling, where mlx-lm's Llama3RoPE reads it)."""
    s, f32 = config["rope_scaling"], np.float32
    dim, old = config["head_dim"], s["original_max_position_embeddings"]
    freqs = f32(1.0) / (f32(config["rope_theta"]) ** (np.arange(0, dim, 2, dtype=f32) / f32(dim)))
    wavelen = f32(2 * np.pi) / freqs
    smooth = (f32(old) / wavelen - f32(s["low_freq_factor"])) / f32(s["high_freq_factor"] - s["low_freq_factor"])
    blend = f32(1) / ((f32(1) - smooth) / f32(s["factor"]) + smooth)
    out = np.where(wavelen < old / s["high_freq_factor"], f32(1),
                   np.where(wavelen > old / s["low_freq_factor"], f32(s["factor"]), blend))
    return out.astype(f32)


def converter_llama3(w, config):
    w.add_tensor("rope_freqs.weight", converter_rope_freqs(config))


def converter_longrope(w, config):
    """Phi3MiniModel: the original context, the attention factor and both factor lists."""
    import math

    original = config["original_max_position_embeddings"]
    scale = config["max_position_embeddings"] / original
    w.add_rope_scaling_orig_ctx_len(original)
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    w.add_tensor("rope_factors_long.weight", np.array(config["rope_scaling"]["long_factor"], np.float32))
    w.add_tensor("rope_factors_short.weight", np.array(config["rope_scaling"]["short_factor"], np.float32))


def steadytune_writer(w, config):
    """What export --format gguf is to write (gguf_arch.add_rope_scaling): loads back the same."""
    from steadytune.gguf_arch import add_rope_scaling

    add_rope_scaling(w, config)


def long_ids(n: int = 200) -> mx.array:
    """Random token ids: up to position 200 a period 8 times longer (or not) turns the rotation by
    radians, so ignored factors move logits by far more than the tolerance."""
    return mx.array(np.random.default_rng(5).integers(0, 300, (1, n)))


def max_logit_diff(a, b, ids) -> float:
    return mx.abs(a(ids).astype(mx.float32) - b(ids).astype(mx.float32)).max().item()


def as_float32(model):
    model.apply(lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x)
    return model


def with_config(ref, config: dict, **changes):
    """The reference's weights in a model whose config differs by `changes` (None removes a key)."""
    import importlib

    from mlx.utils import tree_flatten

    config = {k: v for k, v in {**config, **changes}.items() if v is not None}
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(ref.parameters()))
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    model.load_weights(list(weights.items()), strict=True)
    return model


@pytest.mark.parametrize("writer", [converter_llama3, steadytune_writer])
@pytest.mark.parametrize("scaling, loaded", [
    (LLAMA3, LLAMA3),
    (LLAMA3_OTHER, {**LLAMA3_OTHER, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 128}),
])
def test_llama3_rope_freqs_give_the_logits_of_mlx_lm_with_the_same_rope_scaling(arch_folder, tmp_path, scaling,
                                                                                  loaded, writer):
    path, ref, config = arch_variant(tmp_path, arch_folder, "llama", "f16", overrides={"rope_scaling": scaling},
                                     extra=writer)
    header = check_gguf_header(path)
    assert header.tensors["rope_freqs.weight"] == ("F32", (8,))
    model, _, got = load_gguf(str(path), bits=None)
    assert got["rope_scaling"] == loaded
    assert np.array_equal(llama3_factors(loaded, 10000.0, 16), llama3_factors(scaling, 10000.0, 16))
    ids = long_ids()
    # Same weights (F16 values in float32 on both sides) and the same frequencies (mlx-lm computes
    # them from equivalent dicts), so only float summation order could differ: measured 0.0 on the
    # CPU in all four cases; a kernel summing in another order moves logits of size ~1 by ~1e-6.
    # 1e-4 leaves room for that; ignoring the factors moves them by 0.2 (asserted > 1e-2 below).
    diff = max_logit_diff(as_float32(model), ref, ids)
    assert diff < 1e-4, f"{scaling}: max |logit diff| {diff}"
    assert max_logit_diff(with_config(ref, config, rope_scaling=None), ref, ids) > 1e-2


def test_llama3_scaling_of_llama_3_1_and_3_2_files_is_recovered_exactly():
    from steadytune.gguf_arch import llama3_scaling

    for factor, head_dim in ((8.0, 128), (32.0, 64)):  # Llama 3.1/3.3 8B-405B, Llama 3.2 1B
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
        freqs = converter_rope_freqs({"rope_scaling": scaling, "rope_theta": 500000.0, "head_dim": head_dim})
        assert 1 < (freqs > 1).sum() < head_dim // 2  # some frequencies scaled, some not
        assert llama3_scaling(freqs, 500000.0, head_dim) == scaling


@pytest.mark.parametrize("arch, tensors, error", [
    # factors that fall and rise again: no pair of boundaries gives them
    ("llama", {"rope_freqs.weight": [1, 2, 1, 8, 8, 8, 8, 8]},
     "rope_freqs.weight does not follow Llama 3's RoPE scaling rule"),
    ("qwen2", {"rope_freqs.weight": [1] * 8}, "RoPE scaling by rope_freqs.weight is not supported in a qwen2 GGUF"),
    ("phi3", {"rope_factors_long.weight": [1] * 4},  # the short factors missing
     "RoPE scaling by rope_factors_long.weight is not supported in a phi3 GGUF"),
])
def test_rope_factors_steadytune_cannot_express_are_refused_in_one_line(arch_folder, tmp_path, arch, tensors,
                                                                         error):
    def add(w, config):
        for name, values in tensors.items():
            w.add_tensor(name, np.array(values, np.float32))

    path, _, _ = arch_variant(tmp_path, arch_folder, arch, "f16", extra=add)
    with pytest.raises(UserError) as e:
        load_gguf(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: {error}") and "\n" not in msg


@pytest.mark.parametrize("writer", [converter_longrope, steadytune_writer])
def test_phi3_longrope_factors_give_the_logits_of_mlx_lm_with_the_same_rope_scaling(arch_folder, tmp_path, writer):
    path, ref, config = arch_variant(tmp_path, arch_folder, "phi3", "f16", overrides=LONGROPE_CONFIG, extra=writer)
    model, tok, got = load_gguf(str(path), bits=None)
    assert got["rope_scaling"] == LONGROPE_SCALING and got["original_max_position_embeddings"] == 64
    assert got["max_position_embeddings"] == 256
    as_float32(model)
    # mlx-lm's SuScaledRoPE applies the long factors (and the attention factor sqrt(1 + ln 4 / ln 64)
    # from the two context lengths) at every length; HF and llama.cpp switch to the short factors up
    # to the original context. So a short prompt and 200 positions (past the original 64) both run
    # on the long factors here, and the short ones are checked as config values above. Tolerance as
    # for llama3 (the same float32 factors and weights; measured 0.0); using the short factors as
    # the long ones, or none, moves logits by 0.2 (asserted > 1e-2 below).
    for ids in (mx.array([tok.encode(ARCH_PROMPTS[0])]), long_ids()):
        diff = max_logit_diff(model, ref, ids)
        assert diff < 1e-4, f"{ids.shape[1]} tokens: max |logit diff| {diff}"
    ids = long_ids()
    swapped = {**LONGROPE_SCALING, "long_factor": LONGROPE_SCALING["short_factor"]}
    assert max_logit_diff(with_config(ref, config, rope_scaling=swapped), ref, ids) > 1e-2
    assert max_logit_diff(with_config(ref, config, rope_scaling=None), ref, ids) > 1e-2


@pytest.mark.parametrize("period", [3, 6])
def test_gemma3_per_layer_sliding_window_flags_become_the_period(arch_folder, tmp_path, period):
    flags = [(i + 1) % period != 0 for i in range(6)]  # llama.cpp: true = sliding window layer

    def pattern(w, config):
        w.add_sliding_window_pattern(flags)

    path, ref, config = arch_variant(tmp_path, arch_folder, "gemma3", "f16",
                                     overrides={"sliding_window_pattern": period}, extra=pattern)
    model, tok, got = load_gguf(str(path), bits=None)
    assert got["sliding_window_pattern"] == period
    # Same weights and layout, only summation order differs (see the family test; measured 0.0):
    # 1e-4. The prompt is longer than the window of 4, so another period (global layers elsewhere)
    # moves logits (by 1.3-1.4 measured; asserted > 1e-2).
    ids = mx.array([tok.encode(ARCH_PROMPTS[0])])
    assert max_logit_diff(as_float32(model), ref, ids) < 1e-4
    other = with_config(ref, config, sliding_window_pattern=2)
    assert max_logit_diff(other, ref, ids) > 1e-2


def test_gemma3_irregular_sliding_window_flags_are_refused_in_one_line(arch_folder, tmp_path):
    def pattern(w, config):
        w.add_sliding_window_pattern([True, False, True, True, True, False])

    path, _, _ = arch_variant(tmp_path, arch_folder, "gemma3", "f16", extra=pattern)
    with pytest.raises(UserError) as e:
        load_gguf(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: gemma3 sliding window pattern SGSSSG (S sliding, G global") and "\n" not in msg


@pytest.mark.parametrize("arch, overrides, extra", [("llama", {"rope_scaling": LLAMA3}, converter_llama3),
                                                    ("phi3", LONGROPE_CONFIG, converter_longrope)])
def test_scaled_rope_base_exports_to_gguf_with_its_factors_and_answers_the_same(arch_folder, tmp_path, arch,
                                                                                overrides, extra):
    """The export round trip of test_tuned_family_exports... on a base with llama3 / longrope scaling:
    the written file carries the factor tensors and loads back as the tuned model."""
    from test_export import make_run

    from steadytune.export import export
    from steadytune.generation import load_tuned

    base, _, _ = arch_variant(tmp_path, arch_folder, arch, "q8_0-q4_0", overrides=overrides, extra=extra)
    run = make_run(tmp_path, str(base), arch)
    tuned = load_tuned(run)
    out = export(run, "gguf", tmp_path / "export", dtype="float32")
    assert set(check_gguf_header(out / "model.gguf").tensors) == set(check_gguf_header(base).tensors)
    model, _, config = load_gguf(str(out / "model.gguf"))
    assert config["rope_scaling"] == tuned.config["rope_scaling"]
    ids = long_ids()
    assert max_logit_diff(model, tuned.model, ids) < 1e-4  # float32 export: summation order only


def test_per_layer_metadata_that_does_not_vary_reads_as_one_value():
    from steadytune.gguf import GGUFHeader, gguf_config

    meta = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
            "llama.feed_forward_length": 128, "llama.attention.head_count": 4}
    tensors = {"token_embd.weight": ("F32", (10, 64)), **{f"blk.{i}.attn_norm.weight": ("F32", (64,)) for i in (0, 1)}}
    same = GGUFHeader(3, {**meta, "llama.attention.head_count_kv": [2, 2]}, tensors)
    assert gguf_config(same, "same.gguf")["num_key_value_heads"] == 2
    with pytest.raises(UserError, match=r"^varies\.gguf: metadata key llama\.attention\.head_count_kv varies per "
                                        r"layer"):
        gguf_config(GGUFHeader(3, {**meta, "llama.attention.head_count_kv": [2, 4]}, tensors), "varies.gguf")
