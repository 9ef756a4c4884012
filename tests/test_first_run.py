"""A first user's first hour (issue 19), end to end on tiny models: a Mistral-style template with
system turns, a 6-example trial trained on everything, progress every log_every steps, parameter
counts of quantized bases, an offline Hub id, and the notebook's import check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, chat_records, write_jsonl
from steadytune.errors import UserError


def cli(capsys, *args) -> tuple[int, str, str]:
    from steadytune.cli import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_trial_run_on_mistral_folds_system_trains_on_everything_and_records_it(tmp_path, mistral_like, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(30))  # every third has a system turn
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", "--model", mistral_like, "--data", data, "--out", run,
                       "--max-examples", 6, "--valid-fraction", 0, "--max-steps", 4, "--batch-size", 2,
                       "--log-every", 2, "--progress", "lines", "--max-seq-length", 128)
    assert rc == 0, out + err
    said = out + err
    chosen = [e for e in said.splitlines() if "has no system role" in e]
    assert len(chosen) == 1 and re.search(r"the system turn of [1-6] examples is folded into the first user turn", chosen[0])
    assert "all 30 training examples are trained on and validation is skipped" in said
    assert "max_examples 6: training on 6 of 30 training examples" in said
    assert "train: 6 examples" in said
    assert [line.split()[1] for line in said.splitlines() if line.startswith("step ")] == ["2/4", "4/4"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["data"]["system_fold"], cfg["data"]["max_examples"], cfg["data"]["valid_fraction"]) == ("fold", 6, 0.0)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r.get("event") == "val"]
    assert [r["step"] for r in records if r.get("event") == "train"] == [2, 4]


def _tiny_llama():
    import mlx.core as mx
    from mlx_lm.models import llama

    from conftest import TINY

    mx.random.seed(0)
    return llama.Model(llama.ModelArgs.from_dict(dict(TINY, vocab_size=384, tie_word_embeddings=True)))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_counts_logical_parameters(bits):
    import mlx.nn as nn

    from steadytune.model import count_parameters, parameter_bytes

    model = _tiny_llama()
    full = count_parameters(model)[1]
    full_bytes = parameter_bytes(model)
    nn.quantize(model, group_size=64, bits=bits)  # the embedding too: a packed uint32 word holds 32/bits
    assert {type(m).__name__ for _, m in model.named_modules()} >= {"QuantizedLinear", "QuantizedEmbedding"}
    assert count_parameters(model)[1] == full  # exactly: packing changes the storage, not the parameters
    # bytes on the device: bits/8 a weight plus a float32 scale and bias per group of 64
    quantized = sum(m.weight.size * 32 // bits for _, m in model.named_modules() if hasattr(m, "bits"))
    rest = full - quantized
    assert parameter_bytes(model) == rest * 4 + quantized * bits // 8 + quantized // 64 * 2 * 4
    assert parameter_bytes(model) < full_bytes


def test_offline_hub_id_not_cached_is_one_line_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(4))
    expected = (f"error: org/model: not in the Hugging Face cache ({tmp_path / 'hub'}) and the Hub cannot be "
                "reached (offline); download it where there is a network with `hf download org/model`")
    for args in (["train", "--model", "org/model", "--data", data, "--out", tmp_path / "run"],
                 ["check-data", data, "--model", "org/model"]):
        rc, out, err = cli(capsys, *args)
        assert rc == 2 and err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()
    rc, out, err = cli(capsys, "plan", "--model", "org/model")
    assert rc == 2 and "run `hf download org/model` first" in err and "huggingface-cli" not in err


def test_readme_macos_line_installs_the_notebook_extra():
    readme = (ROOT / "README.md").read_text()
    mac = next(line for line in readme.splitlines() if "On macOS use" in line or "macOS" in line)
    following = readme[readme.index(mac):][:200]
    assert 'pip install -e ".[notebook]"' in following


def _first_cell():
    from IPython.core.inputtransformer2 import TransformerManager

    nb = json.loads((ROOT / "notebooks" / "finetune_chatbot.ipynb").read_text())
    src = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    return TransformerManager().transform_cell(src)  # %magics as get_ipython() calls


def test_notebook_first_cell_prints_the_install_line_when_an_import_is_missing(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    magics = []

    class Shell:
        def run_line_magic(self, *a):
            magics.append(a)

    monkeypatch.chdir(ROOT / "notebooks")
    with pytest.raises(ModuleNotFoundError, match="missing matplotlib; run: cd .* && pip install -e '.\\[notebook\\]'"):
        exec(_first_cell(), {"get_ipython": Shell, "__name__": "__main__"})
    assert "missing: matplotlib. Install them into this kernel's Python with:" in capsys.readouterr().out
    assert magics == []  # stopped before %matplotlib inline, which would raise ModuleNotFoundError itself
