"""Issue 30, files, runs and inputs: nothing a user made is deleted, one process per run folder
from the first check on, the objective of a run cannot change on resume, and files we read
(metrics, GGUF, pairs) are bounded and validated with one-line errors.

In-process on the tiny model; one short training run (a step) and one helper subprocess.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest

from conftest import cli_env, make_chat_data
from steadytune.errors import UserError


def _cfg(model, data, out, **training):
    from steadytune.config import from_dict

    return from_dict({"model": {"path": str(model), "quantize": "none"}, "data": {"path": str(data)},
                      "training": {"max_steps": 1, "batch_size": 2, "pack": False, "eval_every": 0,
                                   **training},
                      "output": {"dir": str(out), "progress": "none"}})


def _users_folders(d, checkpoints=False):
    """Folders named like steadytune's temporary copies, made by the user (no marker)."""
    made = [d / ".photos.old-2024", d / ".adapters.tmp-7", d / f".adapters.tmp-{os.getpid()}"]
    if checkpoints:
        made += [d / "checkpoints" / ".step-0000001.tmp-9", d / "checkpoints" / "step-mine",
                 d / "checkpoints" / ".best.old-3"]
    for f in made:
        f.mkdir(parents=True)
        (f / "f").write_text("x")
    return made


def _locked_elsewhere(run) -> bool:
    """Whether the lock file is locked (flock is per open file: this probe conflicts even with
    a lock this very process holds)."""
    try:
        fd = os.open(run / ".steadytune.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_training_into_a_folder_never_deletes_the_users_folders_named_like_leftovers(tiny_model, tmp_path,
                                                                                      capsys):
    from steadytune import checkpoint as ckpt
    from steadytune import runlock
    from steadytune.setup import run_folder
    from steadytune.trainer import Trainer

    d = tmp_path / "d"
    made = _users_folders(d)
    data = make_chat_data(tmp_path / "data", 4)
    Trainer(_cfg(tiny_model, data, d)).fit()
    runlock.release(d)
    assert all((f / "f").read_text() == "x" for f in made)
    assert "interrupted" not in capsys.readouterr().out
    assert ckpt.ours(d / "adapters") and not ckpt.ours(made[0])
    # a failed --resume repairs only what steadytune marked: ours removed, the user's kept
    e = tmp_path / "e"
    made = _users_folders(e, checkpoints=True)
    ckpt.atomic_folder(e / "checkpoints" / "step-0000002", lambda f: (f / "a").write_text("a"))
    ckpt.atomic_folder(e / "checkpoints" / "step-0000002", lambda f: (f / "a").write_text("b"))
    ours = e / "checkpoints" / f".step-0000003.tmp-{os.getpid()}"
    os.rename(e / "checkpoints" / "step-0000002", ours)
    (ours / "COMPLETE").unlink()  # a write that never finished
    with pytest.raises(UserError, match="no complete checkpoint to resume from"):
        run_folder(_cfg(tiny_model, data, e, resume=True))
    assert all((f / "f").read_text() == "x" for f in made) and not ours.exists()
    assert not (e / ".steadytune.lock").exists()  # released on the failure, the folder left as it was


_SETTING_UP = """
import sys
from steadytune.config import from_dict
from steadytune.setup import run_folder
run_folder(from_dict({"data": {"path": "x"}, "output": {"dir": sys.argv[1]}}))
print("setting up", flush=True)
sys.stdin.read()
"""


def test_lock_is_taken_before_the_new_run_checks_and_released_when_setup_fails(tiny_model, tmp_path,
                                                                               monkeypatch):
    from steadytune import objectives, runlock
    from steadytune.setup import run_folder, setup

    data = make_chat_data(tmp_path / "data", 4)
    run = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-c", _SETTING_UP, str(run)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=cli_env(), text=True)
    try:
        assert p.stdout.readline() == "setting up\n"  # still setting up, nothing written yet
        with pytest.raises(UserError, match=rf"another steadytune process \(pid {p.pid}\) is using"):
            run_folder(_cfg(tiny_model, data, run))
    finally:
        p.kill()
        p.wait()
    # a start that fails after the lock was taken releases it, and removes the folder it created
    def fail(*a, **k):
        raise UserError("tokenizing failed")

    monkeypatch.setattr(objectives.Objective, "tokenize", fail)
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError, match="tokenizing failed"):
        setup(_cfg(tiny_model, data, fresh))
    assert not fresh.exists()
    run_folder(_cfg(tiny_model, data, fresh))
    assert _locked_elsewhere(fresh)  # held from the first check on
    runlock.release(fresh)


@pytest.mark.parametrize("change,message", [
    ({"method": "orpo"}, "training.method: 'dpo' in the checkpoint, 'orpo' now"),
    ({"beta": 0.5}, "training.beta: 0.1 in the checkpoint, 0.5 now")])
def test_resume_refuses_a_changed_objective_naming_the_setting(tmp_path, change, message):
    from steadytune.config import from_dict
    from steadytune.runinfo import compare_for_resume

    def cfg(**training):
        return from_dict({"data": {"path": "pairs.jsonl"}, "training": {"method": "dpo", **training}})

    fingerprints, adapter_config = {"model": {"legacy": "m"}, "data": "d"}, {"lora_parameters": {"keys": ["q"]}}
    saved = {"config": cfg().to_dict(), "fingerprints": fingerprints, "adapter_config": adapter_config}
    compare_for_resume(saved, cfg(), fingerprints, adapter_config, where="ckpt")  # the same objective
    with pytest.raises(UserError) as e:
        compare_for_resume(saved, cfg(**change), fingerprints, adapter_config, where="ckpt")
    assert str(e.value) == (f"ckpt: cannot resume: {message} (the objective would change); restore it, or "
                            "start a new run with another --out")


def test_a_float_setting_finite_in_float64_but_inf_in_float32_is_refused_up_front():
    from steadytune.config import from_dict

    with pytest.raises(UserError) as e:
        from_dict({"data": {"path": "pairs.jsonl"}, "training": {"method": "dpo", "beta": 1e308}})
    assert "training.beta must be finite in float32, the precision training computes in: at most 3.403e+38 " \
           "(got 1e+308)" in str(e.value)
    from_dict({"data": {"path": "pairs.jsonl"}, "training": {"method": "dpo", "beta": 3e38}})  # finite: accepted


def test_metrics_log_that_is_a_folder_or_cannot_be_replaced_on_resume_is_a_one_line_error(tmp_path, monkeypatch):
    from steadytune.progress import Metrics, truncate_metrics

    folder = tmp_path / "a" / "metrics.jsonl"
    folder.mkdir(parents=True)
    for attempt in (lambda: truncate_metrics(folder, 3), lambda: Metrics(folder)):
        with pytest.raises(UserError) as e:
            attempt()
        assert str(e.value) == (f"{folder}: the run's metrics log is a folder, not a file; make it a writable "
                                "file (or move it away to start a new log), then run again")
    immutable = tmp_path / "b" / "metrics.jsonl"
    immutable.parent.mkdir()
    immutable.write_text('{"event": "train", "step": 1}\n{"event": "train", "step": 5}\n')

    def refuse(*a):
        raise PermissionError(1, "Operation not permitted", str(immutable))

    monkeypatch.setattr(os, "replace", refuse)  # what chattr +i does to a rename onto the file
    with pytest.raises(UserError, match=r"metrics log cannot be read and rewritten \(Operation not permitted\)"):
        truncate_metrics(immutable, 3)
    assert immutable.read_text().count("\n") == 2 and [p.name for p in immutable.parent.iterdir()] == ["metrics.jsonl"]


@pytest.fixture(scope="module")
def export_run(tmp_path_factory):
    from test_export import make_run
    from test_gguf import write_tiny_hf

    root = tmp_path_factory.mktemp("export")
    write_tiny_hf(root / "hf-base", tied=False)
    return make_run(root, str(root / "hf-base"), "hf")


def _edit_adapters(run, dest, weights=None, scale=None):
    import json
    import shutil

    import mlx.core as mx

    shutil.copytree(run, dest)
    f = dest / "adapters" / "adapters.safetensors"
    if weights:
        mx.save_safetensors(str(f), {k: weights(k, v) for k, v in mx.load(str(f)).items()})
    if scale is not None:
        c = json.loads((dest / "adapters" / "adapter_config.json").read_text())
        c["lora_parameters"]["scale"] = scale
        (dest / "adapters" / "adapter_config.json").write_text(json.dumps(c))
    return dest


def test_export_refuses_nonfinite_adapters_and_a_float16_overflow_naming_the_dtype_that_works(export_run,
                                                                                             tmp_path):
    from steadytune.export import export

    nan = _edit_adapters(export_run, tmp_path / "nan", lambda k, v: v * float("nan") if k.startswith(
        "model.layers.0.self_attn.q_proj.lora_b") else v)
    with pytest.raises(UserError, match=r"adapters with its base: model\.layers\.0\.self_attn\.q_proj\.lora_b "
                                        r"holds NaN or inf in float32 \(1 tensors in all\); nothing was written"):
        export(nan, "gguf", tmp_path / "o1")
    inf = _edit_adapters(export_run, tmp_path / "inf", scale=float("inf"))
    with pytest.raises(UserError, match="base \\+ adapters answers NaN or inf in float32"):
        export(inf, "hf", tmp_path / "o2")
    # finite weights whose layer-1 MLP output passes float16's 65504: inf, then NaN logits
    big = _edit_adapters(export_run, tmp_path / "big", lambda k, v: v * 3000 if k.startswith(
        "model.layers.1.mlp.down_proj.lora_b") else v)
    with pytest.raises(UserError) as e:
        export(big, "mlx", tmp_path / "o3")
    assert str(e.value) == ("--dtype float16: the fused model does not answer like base + adapters in float16 "
                            "(its logits overflow to NaN or inf); nothing was written; export with --dtype "
                            "bfloat16 (checked: it answers like base + adapters)")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())
    export(big, "mlx", tmp_path / "o4", dtype="bfloat16")  # the advice holds


# --------------------------------------------------------------------------- GGUF files

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_gguf import write_tiny_gguf, write_tiny_hf

    root = tmp_path_factory.mktemp("gguf")
    weights = write_tiny_hf(root / "hf", tied=True)
    write_tiny_gguf(root / "tiny.gguf", root / "hf", weights)
    return root / "tiny.gguf"


@pytest.mark.parametrize("key,value,rule", [
    ("attention.head_count_kv", 0, "it must be a whole number from 1 to 4096"),
    ("attention.head_count_kv", 3, "it must divide attention.head_count (4)"),
    ("feed_forward_length", 2 ** 32 - 1, "it must be a whole number from 1 to 1048576"),
    ("feed_forward_length", 96, "blk.0.ffn_down.weight has shape [64, 128], which does not fit it"),
    ("attention.layer_norm_rms_epsilon", float("nan"), "it must be a positive finite number"),
    ("rope.freq_base", -10000.0, "it must be a positive finite number"),
    ("block_count", 100000, "it must be a whole number from 1 to 4096"),
    ("block_count", 3, "the file holds tensors for 2 blocks (numbered 0 to 1)")])
def test_gguf_hyperparameters_are_validated_naming_the_key(tiny_gguf, key, value, rule):
    from steadytune.gguf import GGUFHeader, check_gguf_header, gguf_config

    h = check_gguf_header(tiny_gguf)
    bad = GGUFHeader(h.version, {**h.metadata, f"llama.{key}": value}, h.tensors, h.data)
    with pytest.raises(UserError) as e:
        gguf_config(bad, tiny_gguf)
    assert str(e.value) == (f"{tiny_gguf}: metadata key llama.{key} is {value!r}; {rule}. The file is damaged "
                            "or was converted wrongly: re-download it or re-convert it with a current llama.cpp")


def _gguf_bytes(kv: bytes, n_kv: int, tensors: bytes = b"", n_tensors: int = 0, data: bytes = b"") -> bytes:
    import struct

    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors
    return head + b"\0" * (-len(head) % 32) + data


def _gguf_string(s: str) -> bytes:
    import struct

    return struct.pack("<Q", len(s)) + s.encode()


def test_gguf_misaligned_tensor_and_huge_metadata_arrays_are_refused_before_allocating(tmp_path):
    import struct

    from steadytune.gguf import check_gguf_header

    arch = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")
    shifted = _gguf_string("t") + struct.pack("<IQIQ", 1, 8, 0, 4)  # 8 float32 at offset 4 of 32
    (tmp_path / "shifted.gguf").write_bytes(_gguf_bytes(arch, 1, shifted, 1, bytes(64)))
    with pytest.raises(UserError, match=r"shifted\.gguf: truncated or corrupted GGUF \(tensor t's offset 4 is not "
                                        r"a multiple of general\.alignment \(32\)\)"):
        check_gguf_header(tmp_path / "shifted.gguf")
    n = 3_000_000  # 3 MB of uint8: a 60 MB Python list; and as many empty nested arrays
    for name, element in [("flat", struct.pack("<IQ", 0, n) + bytes(n)),
                          ("nested", struct.pack("<IQ", 9, n) + struct.pack("<IQ", 0, 0) * n)]:
        kv = arch + _gguf_string("tokenizer.ggml.scores") + struct.pack("<I", 9) + element
        (tmp_path / f"{name}.gguf").write_bytes(_gguf_bytes(kv, 2))
        with pytest.raises(UserError, match=r"\(metadata array tokenizer\.ggml\.scores claims 3000000 elements \(at "
                                            r"most 2097152 an array and 8388608 in all are read\)\)"):
            check_gguf_header(tmp_path / f"{name}.gguf")


def test_a_tokenizer_larger_than_the_embedding_table_is_refused_at_load(tiny_model, tmp_path):
    import shutil

    from tokenizers import AddedToken, Tokenizer

    from steadytune.config import ModelConfig
    from steadytune.model import load_base

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    rows = tok.get_vocab_size()
    tok.add_tokens([AddedToken(f"<extra_{i}>") for i in range(300)])
    tok.save(str(folder / "tokenizer.json"))
    with pytest.raises(UserError) as e:
        load_base(ModelConfig(path=str(folder), quantize="none"))
    assert str(e.value) == (f"{folder}: the tokenizer has token ids up to {rows + 299}, but the embedding table "
                            f"(model.embed_tokens) has only {rows} rows; use the tokenizer files that came with "
                            "these weights")


def test_gemma3ns_smaller_per_layer_table_is_not_the_vocabulary():
    """gemma3n reads its per-layer embedding only for ids below vocab_size_per_layer_input (262144
    of a 262400 vocabulary in the released models): the check reads the token embedding."""
    import mlx.nn as nn

    from steadytune.model import check_vocabulary

    class Tok:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def get_vocab(self):
            return {f"t{i}": i for i in range(self.n)}

    model = nn.Module()
    model.embed_tokens, model.embed_tokens_per_layer = nn.Embedding(120, 8), nn.Embedding(100, 8)
    check_vocabulary(model, Tok(120), "m")
    with pytest.raises(UserError, match=r"token ids up to 120, but the embedding table \(embed_tokens\) has only 120"):
        check_vocabulary(model, Tok(121), "m")


# --------------------------------------------------------------------------- pairs, the cache folder

def test_a_pair_identical_after_truncation_is_refused_naming_its_line(tiny_model):
    from steadytune.model import load_tokenizer
    from steadytune.pairs import Pair, tokenize_pairs

    tok = load_tokenizer(str(tiny_model))
    shared = "the capital of France is Paris " * 8
    pair = Pair("p.jsonl:3", [{"role": "user", "content": "where?"}],
                [{"role": "assistant", "content": shared + "yes"}], [{"role": "assistant", "content": shared + "no"}])
    assert len(tokenize_pairs([pair], tok, 512)) == 1  # uncut, the answers differ
    with pytest.raises(UserError) as e:
        tokenize_pairs([pair], tok, 24)
    assert str(e.value) == ("p.jsonl:3: chosen and rejected are identical once cut to max_seq_length 24; raise "
                            "--max-seq-length, or remove the pair")


def test_sharegpt_pair_with_a_non_string_system_is_refused_and_check_data_reports_pair_problems(
        tiny_model, tmp_path, capsys):
    import json

    from steadytune.cli import main

    good = {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "hello"},
            "rejected": {"from": "gpt", "value": "go away"}}
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in [good, dict(good, system=5)]))
    assert main(["check-data", str(f), "--model", str(tiny_model)]) == 2
    err = capsys.readouterr().err
    assert f"{f}:2: 'system' must be a string, got int" in err and "messages" not in err
    f.write_text(json.dumps(good) + "\n")
    assert main(["check-data", str(f), "--model", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert "  pairs: 1  format: preference pairs" in out and out.endswith("ok\n")


def test_one_cache_folder_variable_and_the_old_name_still_read_with_a_note(monkeypatch, tmp_path, capsys):
    from steadytune.runinfo import cache_dir

    monkeypatch.delenv("STEADYTUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("STEADYTUNE_CACHE", str(tmp_path / "old"))
    assert cache_dir() == tmp_path / "old"
    assert "STEADYTUNE_CACHE is deprecated; name the cache folder with STEADYTUNE_CACHE_DIR" in capsys.readouterr().err
    monkeypatch.setenv("STEADYTUNE_CACHE_DIR", str(tmp_path / "new"))
    assert cache_dir() == tmp_path / "new"


def test_export_never_removes_a_users_folder_named_like_its_partial_one(export_run, tmp_path):
    from steadytune.export import export

    users = tmp_path / ".out.partial"
    users.mkdir()
    (users / "f").write_text("x")
    with pytest.raises(UserError, match=r"\.out\.partial: exists and was not written by steadytune"):
        export(export_run, "mlx", tmp_path / "out", dtype="float32")
    assert (users / "f").read_text() == "x"
