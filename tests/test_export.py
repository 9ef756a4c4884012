"""Export: a tiny base (HF folder or GGUF) + random nonzero adapters, fused and written as mlx, hf
and gguf, reloads with mlx-lm / steadytune and answers like base + adapters."""

from __future__ import annotations

import json

import steadytune  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import pytest
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from steadytune.config import LoraConfig, ModelConfig
from steadytune.errors import UserError
from steadytune.export import export
from steadytune.generation import load_tuned
from steadytune.gguf import check_gguf_header, load_gguf
from steadytune.model import apply_lora, load_base
from test_gguf import write_tiny_gguf, write_tiny_hf

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
