"""Export: a tiny base (HF folder or GGUF) + random nonzero adapters, fused and written as mlx, hf
and gguf, reloads with mlx-lm / steadytune and answers like base + adapters. A SentencePiece-style
tokenizer.json (byte fallback) exports as a "llama" GGUF tokenizer that gives the HF token ids."""

from __future__ import annotations

import json

import steadytune  # noqa: F401  (fast BLAS before mlx)

import gguf
import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from steadytune.config import LoraConfig, ModelConfig
from steadytune.errors import UserError
from steadytune.export import export
from steadytune.generation import load_tuned
from steadytune.gguf import check_gguf_header, load_gguf
from steadytune.model import apply_lora, load_base
from test_gguf import TINY, tiny_weights, write_tiny_gguf, write_tiny_hf

PROMPTS = ["The capital of France", "hello tiny model 42", "<|im_start|>user\nWhat?<|im_end|>\n"]


def make_run(root, base: str, kind: str):
    """A run folder as steadytune train leaves it: config.yaml (model section) and adapters/."""
    run = root / f"run-{kind}"
    (run / "adapters").mkdir(parents=True)
    model = {"path": base, "quantize": "4", "group_size": 32}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    loaded = load_base(ModelConfig(**model, dtype="float32"))
    adapter_config = apply_lora(loaded.model, LoraConfig(rank=4, alpha=8.0), seed=0)
    key = mx.random.key(1)
    for name, value in tree_flatten(loaded.model.trainable_parameters()):
        if name.endswith("lora_b"):  # trained adapters are nonzero; fresh ones would change nothing
            key, sub = mx.random.split(key)
            loaded.model.update(tree_unflatten([(name, 0.5 * mx.random.normal(value.shape, key=sub))]))
    mx.save_safetensors(str(run / "adapters" / "adapters.safetensors"),
                        dict(tree_flatten(loaded.model.trainable_parameters())))
    (run / "adapters" / "adapter_config.json").write_text(json.dumps(adapter_config))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    weights = write_tiny_hf(root / "hf-base", tied=False)
    write_tiny_gguf(root / "base.gguf", root / "hf-base", weights)
    return {"hf": make_run(root, str(root / "hf-base"), "hf"),
            "gguf": make_run(root, str(root / "base.gguf"), "gguf")}


def greedy(model, ids: list[int], n: int = 6) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(model(mx.array([ids + out]))[0, -1].argmax().item()))
    return out


def reload(out, fmt: str):
    if fmt == "gguf":
        model, tok, _ = load_gguf(str(out / "model.gguf"))
        return model, tok
    from mlx_lm.utils import load

    return load(str(out))


@pytest.mark.parametrize("base", ["hf", "gguf"])
@pytest.mark.parametrize("fmt", ["mlx", "hf", "gguf"])
def test_export_answers_like_base_plus_adapters(runs, tmp_path, base, fmt):
    run = runs[base]
    tuned = load_tuned(run)
    plain = load_base(ModelConfig(**yaml.safe_load((run / "config.yaml").read_text())["model"]))
    out = export(run, fmt, tmp_path / fmt, dtype="float32")
    model, tok = reload(out, fmt)
    assert sorted(tok.eos_token_ids) == sorted(tuned.tokenizer.eos_token_ids)
    changed = 0
    for text in PROMPTS:
        ids = tuned.tokenizer.encode(text)
        assert tok.encode(text) == ids
        want = tuned.model(mx.array([ids]))
        got = model(mx.array([ids]))
        diff = mx.abs(got - want).max().item()
        assert diff < 1e-4, f"{base}->{fmt} {text!r}: max |logit diff| {diff}"
        assert greedy(model, ids) == greedy(tuned.model, ids)
        changed += mx.abs(plain.model(mx.array([ids])) - want).max().item() > 0.5
    assert changed == len(PROMPTS), "the adapters should change the logits, or this test shows nothing"


def test_float16_gguf_export_keeps_the_greedy_answers(runs, tmp_path):
    run = runs["gguf"]
    tuned = load_tuned(run)
    out = export(run, "gguf", tmp_path / "f16")
    assert {t for t, _ in check_gguf_header(out / "model.gguf").tensors.values()} == {"F16", "F32"}
    model, _ = reload(out, "gguf")
    for text in PROMPTS:
        ids = tuned.tokenizer.encode(text)
        assert greedy(model, ids) == greedy(tuned.model, ids)
        diff = mx.abs(model(mx.array([ids])) - tuned.model(mx.array([ids]))).max().item()
        assert diff < 0.05, diff


def test_gguf_export_writes_an_ollama_modelfile_for_chatml(runs, tmp_path):
    out = export(runs["hf"], "gguf", tmp_path / "ollama")
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"{{- if .System }}<|im_start|>system\n")
    assert '{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]


def test_export_refuses_to_overwrite_a_folder_that_is_not_empty(runs, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=r"taken: already exists and is not empty"):
        export(runs["hf"], "mlx", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_export_writes_into_an_empty_out_folder(runs, tmp_path, capsys):
    from steadytune.cli import main

    out = tmp_path / "empty"
    out.mkdir()
    assert main(["export", str(runs["hf"]), "--format", "hf", "--out", str(out)]) == 0
    assert "wrote hf model to" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float16"
    assert "quantization" not in config and config["eos_token_id"] == 2
    assert not list(tmp_path.glob(".*partial"))
    assert main(["export", str(runs["hf"]), "--format", "hf", "--out", str(out)]) == 2


# --------------------------------------------------------------------------- SentencePiece-style tokenizers

SPM_SPECIALS = ["<unk>", "<s>", "</s>"]
SPM_WORDS = ["the capital of France is Paris", "hello world", "tiny llamas answer questions",
             "Grüße aus München", "café crème brûlée", "naïve façade", "日本語のテキスト", "привет мир",
             "numbers 12345 and 67890", "a quick brown fox jumps over the lazy dog", "over and over again"]
# newlines and tabs (not in the corpus: byte tokens), emoji and letters the vocabulary lacks (byte
# tokens), the special tokens inside text, repeated spaces, an empty string; and words whose pieces
# depend on the order of the merges (all scores equal or reversed give other ids for them)
SPM_STRINGS = ["hello world", "line\nbreak\n\n", "tab\there", "emoji 🦙 and ✨", "Grüße aus München",
               "日本語", "unseen: ßŁ€", "</s>", "<s>hello</s>world", "a</s>b c", "x  y   z", "end ", "",
               "the capital of France is Paris.", "over and overover again12345", "tiny llamas answer",
               "overall, there are answers"]
# Text that starts with a space (also right after a special token). A Metaspace pre-tokenizer adds no
# "▁" there; SentencePiece, llama.cpp and steadytune's GGUF reader do, so only the normalizer layout
# (Llama 2's, which is SentencePiece's own behaviour) gives the same ids for these.
SPM_LEADING_SPACE = [" hello", "  two spaces", "<s> hello</s> world", "a</s> b"]


def spm_tokenizer(layout: str):
    """A SentencePiece-style BPE trained here, laid out as Llama 2's tokenizer.json: <unk> <s> </s>, the
    256 byte tokens <0x00>..<0xFF>, then the pieces; byte fallback; BOS added. "normalizer": spaces
    become "▁" and a "▁" is prepended by the normalizer (Llama 2, TinyLlama); "metaspace": by a
    Metaspace pre-tokenizer (as the trainer uses)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{SPM_WORDS[i % 11]} {SPM_WORDS[(i * 7 + 3) % 11]} {i}" for i in range(300)]
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPM_SPECIALS,
                                                            show_progress=False))
    model = json.loads(trained.to_str())["model"]
    pieces = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in SPM_SPECIALS]
    vocab = {t: i for i, t in enumerate(SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    tok = Tokenizer(models.BPE(vocab, [tuple(m) for m in model["merges"]], byte_fallback=True,
                               unk_token="<unk>"))
    if layout == "normalizer":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(SPM_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_spm_hf(folder, layout: str) -> None:
    """The tiny llama as an HF folder with a SentencePiece-style tokenizer (embedding rows to match)."""
    hf = spm_tokenizer(layout)
    n = len(hf.get_vocab())
    rng = np.random.default_rng(0)
    weights = tiny_weights(tied=False)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = (0.02 * rng.standard_normal((n, TINY["hidden_size"]))).astype(np.float32)
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()},
                        metadata={"format": "pt"})
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": n,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, **TINY}
    (folder / "config.json").write_text(json.dumps(config))
    hf.save_pretrained(folder)


@pytest.fixture(scope="module")
def spm_exports(tmp_path_factory):
    """layout -> (the HF tokenizer as transformers loads it from the folder, the exported GGUF)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("spm")
    out = {}
    for layout in ("normalizer", "metaspace"):
        write_spm_hf(root / layout, layout)
        run = make_run(root, str(root / layout), layout)
        out[layout] = (AutoTokenizer.from_pretrained(str(root / layout)),
                       export(run, "gguf", root / f"{layout}-gguf") / "model.gguf")
    return out


@pytest.mark.parametrize("layout", ["normalizer", "metaspace"])
def test_sentencepiece_style_tokenizer_exports_as_llama_gguf_with_the_same_ids(spm_exports, layout):
    hf, path = spm_exports[layout]
    spec = json.loads(hf.backend_tokenizer.to_str())
    assert (spec["normalizer"] or spec["pre_tokenizer"])["type"] == ("Sequence" if layout == "normalizer"
                                                                     else "Metaspace")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    T = gguf.TokenType
    assert [types[tokens.index(t)] for t in ("<unk>", "<s>", "</s>", "<0x0A>", "▁the")] == [
        T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE, T.NORMAL]
    _, tok, _ = load_gguf(str(path))
    strings = SPM_STRINGS + (SPM_LEADING_SPACE if layout == "normalizer" else [])
    assert {text: tok.encode(text) for text in strings} == {text: hf.encode(text) for text in strings}
    pieces = hf.convert_ids_to_tokens(hf.encode("emoji 🦙\n"))
    assert pieces[0] == "<s>" and "<0xF0>" in pieces and pieces[-1] == "<0x0A>"  # BOS and byte fallback used
    assert tok.decode(tok.encode("Grüße 🦙\nend"), skip_special_tokens=True) == "Grüße 🦙\nend"


@pytest.mark.parametrize("what, tokenizer", [
    ("WordPiece, normalizer none, pre-tokenizer BertPreTokenizer", "wordpiece"),
    ("Unigram, normalizer none, pre-tokenizer Metaspace", "unigram"),
    ("BPE with byte fallback, normalizer NFKC, pre-tokenizer Metaspace", "bpe-nfkc")])
def test_gguf_export_refuses_other_tokenizers_in_one_line_naming_them(what, tokenizer):
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from steadytune.export import _tokenizer_fields

    if tokenizer == "wordpiece":
        tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    elif tokenizer == "unigram":
        tok = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
    else:
        tok = Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], byte_fallback=True, unk_token="<unk>"))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    loaded = SimpleNamespace(kind="folder", source="/models/m", tokenizer=hf)
    with pytest.raises(UserError) as e:
        list(_tokenizer_fields(loaded, {"vocab_size": 2, "model_type": "llama"}))
    assert str(e.value) == (f"--format gguf: /models/m/tokenizer.json: this tokenizer ({what}) is not one "
                            "steadytune writes to GGUF (byte-level BPE and SentencePiece-style BPE are); use "
                            "--format hf and llama.cpp's convert_hf_to_gguf.py, or --format mlx")
