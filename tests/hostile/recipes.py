"""Recipes for the corpus cases that are binary, big, or need a valid model to break: each builds its
input in a temporary folder (committing megabyte lines or model weights would bloat the repository).

A recipe is `fn(dest: Path, ctx) -> Path`; `ctx` has `tiny` (the tiny HF model folder of
conftest.build_model), `data` (a valid chat data folder) and `gguf` (a valid tiny GGUF file, see
write_gguf). cases.yaml names the recipe of a case in its `recipe` key.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

GOOD = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "Paris."}]}
GOOD_LINE = json.dumps(GOOD) + "\n"
# The chat template attack of the issue: reach Python's object graph from inside the template.
MALICIOUS_TEMPLATE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
# Written by code that must never run (an import of a model folder's .py, a pickle, a YAML tag).
MARKER = "hostile-code-ran"

RECIPES = {}


def recipe(fn):
    RECIPES[fn.__name__.replace("_", "-")] = fn
    return fn


# --------------------------------------------------------------------------- data files

@recipe
def utf16_with_bom(dest, ctx):
    p = dest / "utf16-with-bom.jsonl"
    p.write_bytes((GOOD_LINE * 2).encode("utf-16"))
    return p


@recipe
def utf16_no_bom(dest, ctx):
    p = dest / "utf16-no-bom.jsonl"
    p.write_bytes((GOOD_LINE * 2).encode("utf-16-le"))
    return p


@recipe
def latin1(dest, ctx):
    p = dest / "latin1.jsonl"
    p.write_bytes((GOOD_LINE + '{"text": "café crème"}\n').encode("latin-1"))
    return p


@recipe
def binary_file(dest, ctx):
    p = dest / "image.jsonl"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    return p


@recipe
def huge_line_unterminated(dest, ctx):
    """An 8 MB line whose string never closes: the error must not echo it."""
    p = dest / "huge-line.jsonl"
    p.write_bytes(GOOD_LINE.encode() + b'{"text": "' + b"x" * (8 << 20) + b"\n")
    return p


@recipe
def huge_nesting(dest, ctx):
    """200k nested arrays: deeper than Python's recursion limit."""
    p = dest / "huge-nesting.jsonl"
    p.write_bytes(b'{"text": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n")
    return p


@recipe
def huge_integer(dest, ctx):
    """A 5000-digit number: json.loads raises ValueError (Python's int-string limit), not a JSON error."""
    p = dest / "huge-integer.jsonl"
    p.write_bytes(b'{"text": "a", "n": ' + b"7" * 5000 + b"}\n")
    return p


@recipe
def huge_key_count(dest, ctx):
    """An unknown-format record with 20k keys of 100 bytes: the error lists a few, not all."""
    p = dest / "huge-keys.jsonl"
    p.write_text(json.dumps({f"k{i}" + "x" * 100: i for i in range(20_000)}) + "\n")
    return p


@recipe
def config_huge_int(dest, ctx):
    p = dest / "config-huge-int.yaml"
    p.write_text("training:\n  seed: " + "9" * 5000 + "\n")
    return p


@recipe
def config_latin1(dest, ctx):
    p = dest / "config-latin1.yaml"
    p.write_bytes("model:\n  path: modèle\n".encode("latin-1"))
    return p


@recipe
def config_deep_nesting(dest, ctx):
    p = dest / "config-deep.yaml"
    p.write_text("training: " + "[" * 5000 + "]" * 5000 + "\n")
    return p


@recipe
def config_yaml_alias_bomb(dest, ctx):
    """A ~400-byte YAML whose value is 9^8 strings through aliases: its full repr is 300 MB
    (a 740-byte one printed 2.1 GB); the message must show a bounded excerpt."""
    rows = ['    - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    p = dest / "config-alias-bomb.yaml"
    p.write_text("training:\n  seed:\n" + "\n".join(rows) + "\n")
    return p


@recipe
def data_folder_named_train_jsonl(dest, ctx):
    folder = dest / "data-with-folder"
    (folder / "train.jsonl").mkdir(parents=True)
    (folder / "train.jsonl" / "part-1.jsonl").write_text(GOOD_LINE * 2)
    return folder


# --------------------------------------------------------------------------- model folders

def _copy_tiny(dest, ctx, name) -> Path:
    folder = dest / name
    shutil.copytree(ctx.tiny, folder)
    return folder


def _edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def _edit_weights(folder: Path, fn) -> None:
    import mlx.core as mx

    st = folder / "model.safetensors"
    weights = fn(mx.load(str(st)))
    mx.save_safetensors(str(st), weights)


def _model_case(name, mutate):
    def build(dest, ctx):
        folder = _copy_tiny(dest, ctx, name)
        mutate(folder)
        return folder

    RECIPES[name] = build


def _safetensors_header_len(folder) -> int:
    return struct.unpack("<Q", (folder / "model.safetensors").read_bytes()[:8])[0]


def _cut(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:n])


_model_case("model-no-config", lambda f: (f / "config.json").unlink())
_model_case("model-config-not-json", lambda f: (f / "config.json").write_text('{"model_type": "llama",'))
_model_case("model-config-utf16", lambda f: (f / "config.json").write_bytes(
    (f / "config.json").read_text().encode("utf-16")))
_model_case("model-config-no-model-type", lambda f: _edit_json(f / "config.json", model_type=None))
_model_case("model-config-list", lambda f: (f / "config.json").write_text("[1, 2]"))
_model_case("model-unknown-architecture", lambda f: _edit_json(f / "config.json", model_type="nosuchmodel"))
_model_case("model-no-weights", lambda f: (f / "model.safetensors").unlink())
_model_case("model-weights-misnamed", lambda f: (f / "model.safetensors").rename(f / "weights.safetensors"))
_model_case("model-wrong-shape", lambda f: _edit_json(f / "config.json", intermediate_size=96))
_model_case("model-extra-layer-in-config", lambda f: _edit_json(f / "config.json", num_hidden_layers=3))
_model_case("model-missing-tensor", lambda f: _edit_weights(
    f, lambda w: {k: v for k, v in w.items() if k != "model.layers.1.mlp.up_proj.weight"}))
_model_case("model-int-weights", lambda f: _edit_weights(
    f, lambda w: {k: v.astype(__import__("mlx.core").core.int32) for k, v in w.items()}))
_model_case("model-safetensors-truncated", lambda f: _cut(f / "model.safetensors",
                                                          (f / "model.safetensors").stat().st_size // 2))
_model_case("model-safetensors-header-cut", lambda f: _cut(f / "model.safetensors", 100))
_model_case("model-safetensors-empty", lambda f: _cut(f / "model.safetensors", 0))
_model_case("model-safetensors-huge-header-length", lambda f: (f / "model.safetensors").write_bytes(
    struct.pack("<Q", 1 << 40) + (f / "model.safetensors").read_bytes()[8:]))
_model_case("model-safetensors-header-garbage", lambda f: (f / "model.safetensors").write_bytes(
    (f / "model.safetensors").read_bytes()[:8] + b"x" * _safetensors_header_len(f)
    + (f / "model.safetensors").read_bytes()[8 + _safetensors_header_len(f):]))
_model_case("model-no-tokenizer", lambda f: (f / "tokenizer.json").unlink())
_model_case("model-tokenizer-json-garbage", lambda f: (f / "tokenizer.json").write_text("{not json"))
_model_case("model-tokenizer-config-garbage", lambda f: (f / "tokenizer_config.json").write_text("{not json"))
_model_case("model-no-chat-template", lambda f: _edit_json(f / "tokenizer_config.json", chat_template=None))
_model_case("model-malicious-template", lambda f: _edit_json(f / "tokenizer_config.json",
                                                             chat_template=MALICIOUS_TEMPLATE))
_model_case("model-template-syntax-error", lambda f: _edit_json(
    f / "tokenizer_config.json", chat_template="{% for m in messages %}{{ m['content'] }"))
_model_case("model-template-rejects-roles", lambda f: _edit_json(
    f / "tokenizer_config.json", chat_template="{{ raise_exception('Conversation roles must alternate "
                                               "user/assistant/user/assistant/...') }}"))


@recipe
def model_pickle_only(dest, ctx):
    """pytorch_model.bin that would write MARKER if unpickled."""
    folder = _copy_tiny(dest, ctx, "model-pickle-only")
    (folder / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (open, (MARKER, "w"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    return folder


_EVIL_PY = f"open({MARKER!r}, 'w').write('ran')\n"


@recipe
def model_custom_tokenizer_code(dest, ctx):
    """auto_map to a tokenizer class in a .py of the folder (transformers would import it)."""
    folder = _copy_tiny(dest, ctx, "model-custom-tokenizer-code")
    (folder / "tokenization_evil.py").write_text(
        _EVIL_PY + "from transformers import PreTrainedTokenizerFast\n"
                   "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    auto = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    _edit_json(folder / "tokenizer_config.json", auto_map=auto, tokenizer_class="EvilTokenizer")
    _edit_json(folder / "config.json", auto_map=auto)
    return folder


@recipe
def model_custom_model_file(dest, ctx):
    """mlx-lm's own remote-code hook: config.json's model_file names a .py to import."""
    folder = _copy_tiny(dest, ctx, "model-custom-model-file")
    (folder / "evil_model.py").write_text(_EVIL_PY)
    _edit_json(folder / "config.json", model_file="evil_model.py")
    return folder


@recipe
def model_path_is_file(dest, ctx):
    p = dest / "model.txt"
    p.write_text("not a model\n")
    return p


# --------------------------------------------------------------------------- GGUF files

HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    base = hf.rsplit(".", 1)[0]
    if base.startswith("model.layers."):
        _, _, n, rest = base.split(".", 3)
        return f"blk.{n}.{HF_TO_GGUF[rest]}.weight"
    return f"{HF_TO_GGUF[base]}.weight"


def write_gguf(path: Path, model: Path, arch: str = "llama", tokenizer: bool = True,
               extra_merges: tuple = ()) -> Path:
    """The tiny HF model as a small F32 GGUF, written with the `gguf` package (q/k rows are not
    permuted as llama.cpp would: the file is valid and loads; its logits are not the HF model's)."""
    import gguf
    import mlx.core as mx
    import numpy as np

    cfg = json.loads((model / "config.json").read_text())
    from gguf_util import add_shape, finish, tokenizer_lists  # tests/ (pytest puts it on the path)

    vocab, tokens, merges = tokenizer_lists(model)
    w = gguf.GGUFWriter(str(path), arch)
    add_shape(w, cfg, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
        w.add_token_merges(merges + list(extra_merges))
        w.add_eos_token_id(vocab["<|im_end|>"])
        w.add_chat_template(json.loads((model / "tokenizer_config.json").read_text())["chat_template"])
    for name, value in sorted(mx.load(str(model / "model.safetensors")).items()):
        w.add_tensor(gguf_name(name), np.array(value.astype(mx.float32)))
    finish(w)
    return path


def _gguf_case(name, mutate):
    def build(dest, ctx):
        p = dest / f"{name}.gguf"
        p.write_bytes(mutate(ctx.gguf.read_bytes()))
        return p

    RECIPES[name] = build


_gguf_case("gguf-empty", lambda b: b"")
_gguf_case("gguf-truncated", lambda b: b[: len(b) // 2])
_gguf_case("gguf-header-only", lambda b: b[:24])
_gguf_case("gguf-last-byte-missing", lambda b: b[:-1])
_gguf_case("gguf-bad-magic", lambda b: b"GGUX" + b[4:])
_gguf_case("gguf-bad-version", lambda b: b[:4] + struct.pack("<I", 7) + b[8:])
_gguf_case("gguf-huge-kv-count", lambda b: b[:16] + struct.pack("<Q", 1 << 40) + b[24:])
_gguf_case("gguf-huge-key-length", lambda b: b[:24] + struct.pack("<Q", 1 << 60) + b[32:])
_gguf_case("gguf-text-file", lambda b: b"this is not a GGUF file, just text named .gguf\n" * 4)


@recipe
def gguf_unsupported_arch(dest, ctx):
    return write_gguf(dest / "gguf-unsupported-arch.gguf", ctx.tiny, arch="gpt2")


@recipe
def gguf_merges_out_of_vocabulary(dest, ctx):
    """A well-formed header whose tokenizer metadata is inconsistent (a merge of unknown tokens)."""
    return write_gguf(dest / "gguf-bad-merges.gguf", ctx.tiny, extra_merges=("qqq zzz",))


@recipe
def gguf_no_tokenizer(dest, ctx):
    return write_gguf(dest / "gguf-no-tokenizer.gguf", ctx.tiny, tokenizer=False)


# --------------------------------------------------------------------------- adapters and runs

@recipe
def adapters_missing(dest, ctx):
    folder = dest / "run-without-adapters"
    (folder / "adapters").mkdir(parents=True)
    return folder


@recipe
def adapters_config_garbage(dest, ctx):
    folder = dest / "run-garbage-adapter-config" / "adapters"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{not json")
    (folder / "adapters.safetensors").write_bytes(b"")
    return folder.parent


@recipe
def adapters_config_incomplete(dest, ctx):
    """Valid JSON without num_layers / lora_parameters."""
    import mlx.core as mx

    folder = dest / "run-incomplete-adapter-config" / "adapters"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')
    mx.save_safetensors(str(folder / "adapters.safetensors"), {"a": mx.zeros((2,))})
    return folder.parent


@recipe
def adapters_wrong_shape(dest, ctx):
    """Rank-8 adapter_config, but rank-4 LoRA matrices."""
    import mlx.core as mx

    folder = dest / "run-wrong-adapters" / "adapters"
    folder.mkdir(parents=True)
    keys = ["self_attn.q_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2,
         "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": keys}}))
    mx.save_safetensors(str(folder / "adapters.safetensors"),
                        {f"model.layers.{i}.self_attn.q_proj.lora_a": mx.zeros((64, 4)) for i in range(2)})
    return folder.parent


@recipe
def run_incomplete_checkpoint(dest, ctx):
    """A run killed while writing its only checkpoint: the folder has no COMPLETE marker."""
    run = dest / "run-incomplete-checkpoint"
    ck = run / "checkpoints" / "step-0000002"
    ck.mkdir(parents=True)
    (ck / "adapters.safetensors").write_bytes(b"\x00" * 16)
    (ck / "state.json").write_text('{"step": 2')
    return run


@recipe
def run_corrupt_checkpoint(dest, ctx):
    """A checkpoint marked COMPLETE whose files were damaged afterwards (disk error, manual edit)."""
    run = dest / "run-corrupt-checkpoint"
    ck = run / "checkpoints" / "step-0000002"
    ck.mkdir(parents=True)
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        (ck / name).write_bytes(b"\xff" * 64)
    (ck / "state.json").write_text('{"step": 2, "epo')
    (ck / "COMPLETE").write_text("ok\n")
    return run


@recipe
def run_finished(dest, ctx):
    """A finished run (adapters written): a new `train --out` on it must refuse, not overwrite."""
    run = dest / "run-finished"
    (run / "adapters").mkdir(parents=True)
    (run / "adapters" / "adapter_config.json").write_text("{}")
    return run
