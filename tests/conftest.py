"""Shared fixtures: a tiny llama-architecture chat model with a tokenizer built offline, and small
data files. Everything is created in temporary folders; nothing touches the network."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import steadytune  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # the workspace's data sets; a user's clone has none
TEST_DATA = ROOT / "tests" / "data"  # small samples vendored with the tests (licenses in its README)
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (the workspace's "
                                  "data sets, not part of the repository)")


def metal_only(test):
    """A test of what only Metal does (the device choice, compute auto, long GPU steps, Metal's memory
    reading): it runs on the GPU of a Mac and is skipped elsewhere. Every other test computes on the
    CPU (the `cpu_by_default` fixture; STEADYTUNE_DEVICE=cpu for the CLI in a subprocess), so a Mac
    checks the same numbers as any other machine."""
    skip = pytest.mark.skipif(not mx.metal.is_available(), reason="only meaningful on Apple Silicon (Metal)")
    return pytest.mark.metal(skip(test))


def pytest_configure(config):
    config.addinivalue_line("markers", "metal: runs on Metal's GPU (see conftest.metal_only)")


@pytest.fixture(autouse=True)
def cpu_by_default(request):
    if request.node.get_closest_marker("metal") or not mx.metal.is_available():
        yield
        return
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(before)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, max_position_embeddings=512)


def _corpus() -> list[str]:
    lines = []
    # the vendored sample, so that every clone trains the same tokenizer (and golden numbers hold)
    for line in (TEST_DATA / "wikisql" / "train.jsonl").read_text().splitlines()[:200]:
        lines.append(json.loads(line)["text"])
    lines += ["user assistant system hello world the capital of France is Paris"] * 3
    return lines


def build_tokenizer(folder: Path, vocab_size: int = 384, chat_template: str | None = CHATML) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    tok.save(str(folder / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
          "bos_token": None, "pad_token": "<|endoftext|>", "unk_token": None,
          "model_max_length": 4096, "add_bos_token": False}
    if chat_template:
        tc["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))


def build_model(folder: Path, seed: int = 0, vocab_size: int = 384, **overrides) -> Path:
    """A random tiny llama in HF format (config.json, model.safetensors, tokenizer)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, vocab_size)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    cfg = dict(TINY, vocab_size=vocab, **overrides)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    # larger-than-default init so a tiny random model has a non-trivial output distribution
    weights = {k: (v * 4 if v.ndim == 2 else v) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=2)))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny") / "model")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """Conversations of varied lengths (so batches need padding)."""
    import random

    rng = random.Random(seed)
    words = "select the name from table where count is greater than city year team".split()
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 10)))
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "be brief"}] + msgs + [
                {"role": "user", "content": "and " + q}, {"role": "assistant", "content": a + " again"}]
        out.append({"messages": msgs})
    return out


@pytest.fixture
def chat_data(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", chat_records(24))
    write_jsonl(d / "valid.jsonl", chat_records(6, seed=1))
    return d


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("STEADYTUNE_DEVICE", "cpu")  # as cpu_by_default does in this process
    return env


def run_cli(*args, cwd=None, env=None, timeout=300):
    import subprocess

    return subprocess.run([sys.executable, "-m", "steadytune.cli", *map(str, args)], cwd=cwd,
                          env=env or cli_env(), capture_output=True, text=True, timeout=timeout)


def make_chat_data(folder: Path, n_train: int, n_valid: int = 2) -> Path:
    """A data folder with train.jsonl and valid.jsonl of varied-length conversations."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", chat_records(n_train))
    write_jsonl(folder / "valid.jsonl", chat_records(n_valid, seed=1))
    return folder


def read_adapters(run: Path) -> dict:
    """A run's final adapters as numpy arrays."""
    import mlx.core as mx
    import numpy as np

    return {k: np.array(v) for k, v in mx.load(str(run / "adapters" / "adapters.safetensors")).items()}


# Mistral-7B-Instruct-v0.2's chat template (without its BOS, which the tiny tokenizer lacks): no
# system role; any role out of user/assistant alternation raises.
MISTRAL_V02 = ("{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
               "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
               "{% endfor %}")


def set_chat_template(folder: Path, template: str) -> Path:
    """Replace the chat template of a model folder built by build_model/build_tokenizer."""
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return folder


@pytest.fixture(scope="session")
def mistral_like(tmp_path_factory) -> Path:
    """A tiny model folder whose tokenizer has Mistral v0.2's chat template."""
    return set_chat_template(build_model(tmp_path_factory.mktemp("mistral") / "model"), MISTRAL_V02)
