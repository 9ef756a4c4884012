"""GGUF loading: a tiny llama written as GGUF gives the logits of the same weights from safetensors;
the default model answers; broken or unsupported files are one-line UserErrors.

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

from steadytune.errors import UserError
from steadytune.gguf import build_tokenizer, check_gguf_header, load_gguf, spm_merges

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


def write_tiny_gguf(path, folder, weights: dict, quant: dict = QUANT, raw: dict | None = None) -> None:
    """The same model as llama.cpp's converter writes it: GGUF names, permuted q/k, quantized.

    `raw` adds tensors given as (bytes array, GGML type), e.g. a K-quant the gguf package cannot make.
    """
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    heads, kv = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(TINY["hidden_size"] // heads)
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    w.add_rope_freq_base(TINY["rope_theta"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
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
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


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

def test_k_quant_tensor_is_refused_with_its_type_and_the_fix(tiny, tmp_path):
    folder, _ = tiny[True]
    weights = {k: v for k, v in tiny_weights(True).items() if k != "model.layers.0.mlp.down_proj.weight"}
    path = tmp_path / "kquant.gguf"
    # One Q6_K block row (256 values in 210 bytes) per output row; the loader refuses the type
    # before any block is read, so zeros will do (the gguf package cannot quantize to Q6_K).
    write_tiny_gguf(path, folder, weights, raw={"blk.0.ffn_down.weight": (np.zeros((64, 210), np.uint8), Q.Q6_K)})
    with pytest.raises(UserError) as e:
        load_gguf(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "Q6_K" in msg and "blk.0.ffn_down.weight" in msg
    assert "Q8_0" in msg and "llama-quantize" in msg


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
