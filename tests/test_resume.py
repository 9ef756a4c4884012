"""Exact resume: a run killed with SIGKILL anywhere and resumed gives bitwise the same per-step
losses and final adapters as an uninterrupted run. Plus Ctrl-C, NaN, and refused resumes."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import chat_records, cli_env, make_chat_data, read_adapters as _adapters, run_cli, write_jsonl


def _args(model, data, out, *extra):
    return ["train", "--model", model, "--data", data, "--out", out, "--epochs", "2", "--batch-size", "3",
            "--grad-accumulation", "2", "--lora-dropout", "0.1", "--learning-rate", "5e-3",
            "--log-every", "1", "--eval-every", "3", "--save-every", "2", "--progress", "lines",
            "--pack", "false", *extra]  # by example count: 5 steps an epoch


def _train_losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["event"] == "train"], \
        [(r["step"], r["val_loss"]) for r in recs if r["event"] == "val"]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_chat_data(root / "data", 26, 5)
    ref = root / "ref"
    r = run_cli(*_args(tiny_model, data, ref))
    assert r.returncode == 0, r.stderr
    return tiny_model, data, root, ref


# between-renames:1 is the first replacement of a folder: checkpoints/best/ at the second
# improvement (its old copy renamed away, the new one not yet in place); folder-made:3 leaves an
# empty temporary folder (killed before marking it). Checkpoints are written on a thread of their
# own, so a kill at a step can also land anywhere inside a checkpoint's write.
@pytest.mark.parametrize("crash", ["step:3", "step:7", "between-files:2", "before-marker:4", "between-renames:1",
                                   "folder-made:3"])
def test_resume_after_sigkill_matches_uninterrupted_run(setup, crash):
    model, data, root, ref = setup
    out = root / crash.replace(":", "-")
    env = dict(cli_env(), STEADYTUNE_TEST_CRASH=crash)
    r = run_cli(*_args(model, data, out), env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (out / "adapters").exists()
    r = run_cli(*_args(model, data, out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert _train_losses(out) == _train_losses(ref)  # bitwise: JSON keeps every float digit
    a, b = _adapters(out), _adapters(ref)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    steps = [s for s, _ in _train_losses(out)[0]]
    assert steps == list(range(1, len(steps) + 1))  # no duplicated or missing steps
    best, ref_best = out / "checkpoints" / "best", ref / "checkpoints" / "best"
    assert (best / "COMPLETE").is_file() and not list((out / "checkpoints").glob(".*"))
    assert (best / "adapters.safetensors").read_bytes() == (ref_best / "adapters.safetensors").read_bytes()


def test_incomplete_checkpoint_is_reported_and_skipped(setup):
    model, data, root, ref = setup
    out = root / "torn"
    env = dict(cli_env(), STEADYTUNE_TEST_CRASH="before-marker:3")
    assert run_cli(*_args(model, data, out), env=env).returncode == -signal.SIGKILL
    torn = list((out / "checkpoints").glob(".*.tmp-*"))
    assert torn and not (torn[0] / "COMPLETE").exists()
    r = run_cli(*_args(model, data, out, "--resume"))
    assert r.returncode == 0
    assert "incomplete" in r.stdout and "skipped" in r.stdout
    assert not torn[0].exists()  # stale temporary folders are cleaned at start


def test_resume_refuses_changed_data_and_lora_shape(setup):
    model, data, root, ref = setup
    other = root / "data2"
    other.mkdir()
    write_jsonl(other / "train.jsonl", chat_records(26, seed=7))
    write_jsonl(other / "valid.jsonl", chat_records(5, seed=1))
    r = run_cli(*_args(model, other, ref, "--resume", "--lora-rank", "4"))
    assert r.returncode == 2
    assert "cannot resume" in r.stderr and "data files changed" in r.stderr and "lora.rank: 8" in r.stderr
    assert "Traceback" not in r.stderr


def test_resume_without_checkpoint_is_a_clear_error(setup, tmp_path):
    model, data, _, _ = setup
    r = run_cli(*_args(model, data, tmp_path / "empty", "--resume"))
    assert r.returncode == 2 and "no complete checkpoint" in r.stderr


def test_new_run_never_overwrites_an_existing_one(setup):
    model, data, _, ref = setup
    before = (ref / "adapters" / "adapters.safetensors").read_bytes()
    r = run_cli(*_args(model, data, ref))
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (ref / "adapters" / "adapters.safetensors").read_bytes() == before


def test_ctrl_c_saves_a_checkpoint_and_exits_130(setup, tmp_path):
    model, data, _, _ = setup
    out = tmp_path / "int"
    p = subprocess.Popen([sys.executable, "-m", "steadytune.cli",
                          *map(str, _args(model, data, out, "--epochs", "200", "--save-every", "1000"))],
                         env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.time() < deadline and len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    ckpts = [c for c in (out / "checkpoints").glob("step-*") if (c / "COMPLETE").exists()]
    assert ckpts and "--resume" in stdout


def test_nonfinite_loss_skips_then_stops_and_keeps_last_checkpoint(setup, tmp_path):
    model, data, _, _ = setup
    out = tmp_path / "nan"
    env = dict(cli_env(), STEADYTUNE_TEST_NAN_STEPS="3,5,6,7")
    r = run_cli(*_args(model, data, out, "--save-every", "2"), env=env)
    assert r.returncode == 2
    assert "step 3: non-finite" in r.stdout and "update skipped" in r.stdout
    assert "step 7: 3 non-finite losses/gradients in a row" in r.stderr
    good = sorted(c.name for c in (out / "checkpoints").glob("step-*"))
    assert good[-1] == "step-0000006"
    state = json.loads((out / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["nonfinite"] == 2


def test_resume_with_a_token_budget_matches_uninterrupted_run(setup):
    """Micro-batches by --batch-tokens: the plan is a pure function of lengths, budget, seed and
    epoch, so a killed and resumed run continues the same steps."""
    model, data, root, _ = setup
    budget = ["--batch-tokens", "160", "--max-seq-length", "160"]
    ref = root / "budget-ref"
    assert run_cli(*_args(model, data, ref, *budget)).returncode == 0
    out = root / "budget-crash"
    r = run_cli(*_args(model, data, out, *budget), env=dict(cli_env(), STEADYTUNE_TEST_CRASH="step:3"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = run_cli(*_args(model, data, out, *budget, "--resume"))
    assert r.returncode == 0, r.stderr
    assert _train_losses(out) == _train_losses(ref)
    a, b = _adapters(out), _adapters(ref)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    r = run_cli(*_args(model, data, out, "--resume"))  # the budget is part of the run: refused without it
    assert r.returncode == 2 and "batch_tokens" in r.stderr


# --------------------------------------------------------------------------- issue 23, in-process
# A 4-step run (8 examples, batch 2, one epoch) of a copy of the tiny model, a checkpoint after
# every step; each test copies what it damages. Without dropout, so resumed runs are comparable.

def _cfg(model, data, out, **training):
    from steadytune.config import from_dict

    return from_dict({"model": {"path": str(model), "quantize": "none"}, "data": {"path": str(data)},
                      "lora": {"dropout": 0.0},
                      "training": {"epochs": 1, "batch_size": 2, "pack": False, "save_every": 1,
                                   "eval_every": 0, "learning_rate": 5e-3, **training},
                      "output": {"dir": str(out), "progress": "none", "keep_last": 5}})


@pytest.fixture(scope="module")
def small(tiny_model, tmp_path_factory):
    import shutil
    from types import SimpleNamespace

    from steadytune.trainer import Trainer

    root = tmp_path_factory.mktemp("faults")
    model = root / "model"
    shutil.copytree(tiny_model, model)
    data = make_chat_data(root / "data", 8)
    trainer = Trainer(_cfg(model, data, root / "ref"))
    trainer.fit()
    return SimpleNamespace(root=root, model=model, data=data, ref=root / "ref", trainer=trainer)


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEADYTUNE_CACHE_DIR", str(tmp_path / "cache"))  # never the user's ~/.cache


def _copy_run(small, dest):
    import shutil

    shutil.copytree(small.ref, dest)
    return dest


def _rehash(ckpt):
    """Rewrite COMPLETE with the files' current hashes: a deliberate edit, not a disk error."""
    from steadytune.checkpoint import MARKER, sha256_file

    files = {p.name: sha256_file(p) for p in sorted(ckpt.iterdir()) if p.is_file() and p.name != MARKER}
    (ckpt / MARKER).write_text(json.dumps({"sha256": files}))


def _flip_byte(path, where=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0x40
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoint_falls_back_to_the_one_before_and_matches_uninterrupted_run(
        small, tmp_path, capsys):
    from steadytune.trainer import Trainer

    out = _copy_run(small, tmp_path / "run")
    _flip_byte(out / "checkpoints" / "step-0000004" / "adapters.safetensors", 0.9)
    capsys.readouterr()
    Trainer(_cfg(small.model, small.data, out, resume=True)).fit()
    said = capsys.readouterr().out
    assert f"note: {out / 'checkpoints' / 'step-0000004'} is damaged (adapters.safetensors does not match " \
           f"the hash written with the checkpoint: changed or corrupted since); resuming from " \
           f"{out / 'checkpoints' / 'step-0000003'}" in said
    a, b = _adapters(out), _adapters(small.ref)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # step 4 redone exactly


def _damage_adapters(fn):
    def damage(ck):
        import mlx.core as mx

        w = mx.load(str(ck / "adapters.safetensors"))
        mx.save_safetensors(str(ck / "adapters.safetensors"), fn(w))
        _rehash(ck)
    return damage


def _damage_state(fn):
    def damage(ck):
        state = json.loads((ck / "state.json").read_text())
        (ck / "state.json").write_text(json.dumps(fn(state)))
        _rehash(ck)
    return damage


def _first(w):
    return sorted(w)[0]


DAMAGES = {
    "flipped-bit": (lambda ck: _flip_byte(ck / "optimizer.safetensors", 0.7),
                    "optimizer.safetensors does not match the hash written with the checkpoint"),
    "renamed-tensor": (_damage_adapters(lambda w: {("x" + k if k == _first(w) else k): v for k, v in w.items()}),
                       "adapters.safetensors: tensors do not match the model: 1 missing (model.layers.0."),
    "missing-tensor": (_damage_adapters(lambda w: {k: v for k, v in w.items() if k != _first(w)}),
                       "adapters.safetensors: tensors do not match the model: 1 missing"),
    "wrong-shape": (_damage_adapters(lambda w: {k: (v[:1] if k == _first(w) else v) for k, v in w.items()}),
                    ", the model needs mlx.core.float32 ("),
    "nan-values": (_damage_adapters(lambda w: {k: (v * float("nan") if k == _first(w) else v) for k, v in w.items()}),
                   "holds NaN or inf"),
    "state-without-pos": (_damage_state(lambda s: {k: v for k, v in s.items() if k != "pos"}),
                          "state.json has no 'pos'"),
    "state-wrong-type": (_damage_state(lambda s: dict(s, epoch="0")),
                         "state.json: 'epoch' must be a whole number of 0 or more, got '0'"),
    "state-other-step": (_damage_state(lambda s: dict(s, step=3)),
                         "state.json says step 3, the folder's name step 4"),
    "optimizer-garbage": (lambda ck: ((ck / "optimizer.safetensors").write_bytes(b"\xff" * 64), _rehash(ck)),
                          "optimizer.safetensors: "),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_tampered_or_corrupted_checkpoint_is_refused_naming_the_damage(small, tmp_path, damage):
    """Each damage of the issue (flipped bits, renamed/missing/wrong-shape/NaN tensors, a
    state.json without `pos` or of wrong types, a garbage optimizer file) is caught before anything
    is loaded; with no sound checkpoint before it, a one-line error."""
    from steadytune import checkpoint as ckpt
    from steadytune.errors import UserError

    run, (fn, want) = small.trainer.run, DAMAGES[damage]
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    import shutil

    ck = shutil.copytree(small.ref / "checkpoints" / "step-0000004", out / "checkpoints" / "step-0000004")
    ckpt.verify(ck, run.model, run.optimizer)  # sound before
    fn(ck)
    with pytest.raises(ckpt.Damaged) as e:
        ckpt.verify(ck, run.model, run.optimizer)
    assert want in str(e.value), str(e.value)
    with pytest.raises(UserError) as e:
        ckpt.load_good(ck, run.model, run.optimizer)
    assert str(e.value).startswith(f"{ck}: checkpoint is unreadable ({want}") or want in str(e.value)
    assert "\n" not in e.value.render()


def test_nonfinite_update_is_rolled_back_counted_stopped_and_never_saved(small, tmp_path):
    """A learning rate that overflows float32 (validation bypassed) gives finite loss and norm
    but non-finite weights: each update is rolled back and counted, the run stops at the limit,
    and every checkpoint holds the untouched initial adapters."""
    from steadytune.checkpoint import MARKER
    from steadytune.errors import UserError
    from steadytune.trainer import Trainer

    cfg = _cfg(small.model, small.data, tmp_path / "run", max_nonfinite=2)
    cfg.training.learning_rate = 1e300
    with pytest.raises(UserError, match=r"^step 2: 2 non-finite losses/gradients in a row"):
        Trainer(cfg).fit()
    cks = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in cks] == ["step-0000001"] and (cks[0] / MARKER).is_file()
    import mlx.core as mx

    saved = mx.load(str(cks[0] / "adapters.safetensors"))
    assert all(bool(mx.all(mx.isfinite(v))) for v in saved.values())
    assert all(float(mx.abs(v).max()) == 0 for k, v in saved.items() if k.endswith("lora_b"))  # the init
    assert json.loads((cks[0] / "state.json").read_text())["nonfinite"] == 1
    assert not (tmp_path / "run" / "adapters").exists()


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _swap_tokens(folder):
    """Two tokens trade ids: the vocabulary changes, its size does not (a token past the embedding
    table is refused at load, before any resume check)."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(tok))


MODEL_CHANGES = {
    "chat template": lambda f: _edit_json(f / "tokenizer_config.json",
                                          chat_template=json.loads((f / "tokenizer_config.json").read_text())
                                          ["chat_template"].replace("<|im_start|>", "<|im_start|> ")),
    "special tokens": lambda f: _edit_json(f / "tokenizer_config.json", eos_token="<|endoftext|>"),
    "tokenizer vocabulary": _swap_tokens,
    "weights": lambda f: _flip_byte(f / "model.safetensors", 0.6),
    "generation config": lambda f: (f / "generation_config.json").write_text('{"eos_token_id": 0}'),
}


@pytest.mark.parametrize("part", sorted(MODEL_CHANGES))
def test_resume_refuses_a_changed_template_tokens_vocabulary_or_weights(small, tmp_path, part):
    """The run's identity is every byte of the weights and what makes a token: one line names the part
    (a model at another path with the same bytes would be accepted: the path is not the identity)."""
    import shutil

    from steadytune.errors import UserError
    from steadytune.trainer import Trainer

    model = shutil.copytree(small.model, tmp_path / "model")
    MODEL_CHANGES[part](model)
    out = _copy_run(small, tmp_path / "run")
    with pytest.raises(UserError) as e:
        Trainer(_cfg(model, small.data, out, resume=True)).prepare()
    assert e.value.render() == (f"{out / 'checkpoints' / 'step-0000004'}: cannot resume: the model's {part} "
                                "changed since the checkpoint; restore it, or start a new run with another --out")


def test_weight_hashes_are_cached_by_path_size_and_mtime(small, tmp_path, monkeypatch):
    """A big weight file is read once: the second fingerprint reads no weight bytes."""
    import shutil

    from steadytune import checkpoint as ckpt, runinfo

    model = shutil.copytree(small.model, tmp_path / "model")
    (model / "big.safetensors").write_bytes(b"\0" * (3 << 20))  # above the 1 MiB cache threshold
    first = runinfo.model_fingerprint(str(model), "hf")
    read = []
    real = ckpt.sha256_file
    monkeypatch.setattr(ckpt, "sha256_file", lambda p: read.append(p.name) or real(p))
    assert runinfo.model_fingerprint(str(model), "hf") == first
    assert "big.safetensors" not in read
    assert (tmp_path / "cache" / "file-hashes.json").is_file()


@pytest.mark.parametrize("pack", [False, True])
def test_a_million_epochs_are_planned_without_delay(small, pack):
    """By example count every epoch has the same steps: one plan times the epochs. Packed rows
    differ a little per epoch: 10 epochs are counted and the rest estimated from them."""
    t = small.trainer.cfg.training
    before = t.epochs, t.pack
    try:
        t.epochs, t.pack = 1_000_000, pack
        tic = time.perf_counter()
        total = small.trainer.total_steps()
        assert time.perf_counter() - tic < 0.5  # at most 10 plans of 8 examples: ~10 ms
        first = [len(small.trainer.epoch_plan(e)) for e in range(10)]
        assert total == (first[0] * 1_000_000 if not pack else sum(first) * 100_000)
    finally:
        t.epochs, t.pack = before


_SWAP = """
import sys
from pathlib import Path
from steadytune import checkpoint as ckpt
final = Path(sys.argv[1])
for version in (b"v1", b"v2"):
    ckpt.atomic_folder(final, lambda d: ((d / "a.bin").write_bytes(version), ckpt._crash_hook("between-files"),
                                         (d / "b.bin").write_bytes(version)))
"""


# (crash point, its pass that is in the second write, the version a restart must find)
@pytest.mark.parametrize("point,nth,version", [("between-files", 2, b"v1"), ("before-marker", 2, b"v1"),
                                               ("between-renames", 1, b"v2"), ("after-swap", 2, b"v2")])
@pytest.mark.parametrize("name", ["best", "adapters"])
def test_a_kill_at_any_instant_of_replacing_best_or_adapters_leaves_a_complete_copy(tmp_path, point, nth,
                                                                                    version, name):
    from steadytune import checkpoint as ckpt

    final = tmp_path / "run" / ("checkpoints" if name == "best" else "") / name
    env = dict(cli_env(), STEADYTUNE_TEST_CRASH=f"{point}:{nth}")
    r = subprocess.run([sys.executable, "-c", _SWAP, str(final)], env=env, capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    ckpt.recover(tmp_path / "run")
    assert ckpt.is_complete(final)
    ckpt.check_hashes(final)  # raises if a file is not what was written
    assert (final / "a.bin").read_bytes() == (final / "b.bin").read_bytes() == version
    assert sorted(p.name for p in final.parent.iterdir() if p.name.startswith(".")) == []


def test_nan_checkpoint_is_never_written_and_pruning_keeps_the_newest_sound_one(small, tmp_path):
    """The issue's sequence: NaN weights would have been checkpointed and the good checkpoint
    pruned. Now the NaN save is refused, and with the newer checkpoints damaged on disk, pruning
    to one keeps the newest sound one too."""
    from types import SimpleNamespace

    import mlx.core as mx
    from mlx.utils import tree_map

    from steadytune import checkpoint as ckpt
    from steadytune.errors import UserError

    run = small.trainer.run
    out = _copy_run(small, tmp_path / "run")
    poisoned = SimpleNamespace(trainable_parameters=lambda: tree_map(
        lambda v: v * float("nan"), run.model.trainable_parameters()))
    with pytest.raises(UserError, match=r"step-0000005 \(step 5\): model\.layers\..* holds NaN or inf .*not saved"):
        ckpt.save(out, 5, poisoned, run.optimizer, run.adapter_config, {"epoch": 1, "pos": 0})
    assert not list((out / "checkpoints").glob("*0000005*")) and not list((out / "checkpoints").glob(".*"))
    for name in ("step-0000003", "step-0000004"):
        _flip_byte(out / "checkpoints" / name / "adapters.safetensors", 0.8)
    ckpt.prune(out, keep_last=1)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert ckpt.sound(out / "checkpoints" / "step-0000002") and not ckpt.sound(out / "checkpoints" / "step-0000004")
    assert mx.load(str(out / "checkpoints" / "step-0000002" / "adapters.safetensors"))


def test_best_is_the_steps_checkpoint_linked_not_written_again(small, tmp_path):
    """checkpoint.save_as: best/ holds the step's files (hard links: nothing serialized or hashed
    again), is complete and sound, loads, and outlives the step's folder when pruning removes it."""
    import shutil

    import mlx.core as mx

    from steadytune import checkpoint as ckpt

    run = small.trainer.run
    out = tmp_path / "run"
    from steadytune.resume import snapshot

    step = ckpt.save(out, 7, run.model, run.optimizer, run.adapter_config, snapshot(run))
    best = ckpt.save_as(step, "best")
    names = sorted(p.name for p in step.iterdir())
    assert names == sorted(p.name for p in best.iterdir())
    for name in names:
        if name not in (ckpt.MARKER, ckpt.OURS):
            assert (best / name).stat().st_ino == (step / name).stat().st_ino
    assert (best / ckpt.MARKER).read_text() == (step / ckpt.MARKER).read_text()
    shutil.rmtree(step)
    ckpt._sound.clear()
    ckpt.check_hashes(best)  # raises if a file is not what the step wrote
    assert ckpt.sound(best) and json.loads((best / "state.json").read_text())["step"] == 7
    from mlx.utils import tree_flatten

    want = dict(tree_flatten(run.model.trainable_parameters()))
    got = mx.load(str(best / "adapters.safetensors"))
    assert sorted(got) == sorted(want) and all(mx.array_equal(got[k], want[k]).item() for k in want)
