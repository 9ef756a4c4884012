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
            "--log-every", "1", "--eval-every", "3", "--save-every", "2", "--progress", "lines", *extra]


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


@pytest.mark.parametrize("crash", ["step:3", "step:7", "between-files:2", "before-marker:4"])
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
