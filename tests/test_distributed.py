"""Data-parallel training with MLX's ring backend on loopback: 2 processes match 1 process with the
same global batch, and a distributed run resumes exactly after SIGKILL of the whole job."""

import json

import numpy as np
import pytest

from conftest import cli_env, make_chat_data, read_adapters as _adapters, run_cli


def _args(model, data, out, *extra):
    # one example a row (--pack false): 27 examples make 4 steps of 4 x 2 examples, enough to kill at
    # step 3; the packed default (a whole epoch in one step here) is test_packed_rows_split_*'s
    return ["train", "--model", model, "--data", data, "--out", out, "--epochs", "1", "--batch-size", "4",
            "--grad-accumulation", "2", "--learning-rate", "1e-3", "--log-every", "1", "--eval-every", "3",
            "--save-every", "2", "--progress", "lines", "--pack", "false", *extra]


def _losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["event"], r["step"], r.get("loss", r.get("val_loss"))) for r in recs
            if r["event"] in ("train", "val")]  # not the startup record's timings


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = make_chat_data(root / "data", 27, 5)  # 27 = not a multiple of the global batch
    single, double = root / "single", root / "double"
    r1 = run_cli(*_args(tiny_model, data, single))
    r2 = run_cli(*_args(tiny_model, data, double, "--nproc", "2"))
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr + r2.stdout
    return tiny_model, data, root, single, double


def test_two_processes_match_one_with_the_same_global_batch(runs):
    _, _, _, single, double = runs
    a, b = _losses(single), _losses(double)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for (_, _, x), (_, _, y) in zip(a, b):
        assert abs(x - y) / abs(x) < 1e-5
    # The adapters as one vector. (Per tensor, a LoRA B that starts at zero can differ by ~2e-5:
    # AdamW divides each gradient element by its own magnitude, so elements whose gradient is
    # near zero, where summing in another order changes the last bits, move by a full step.)
    wa, wb = _adapters(single), _adapters(double)
    assert wa.keys() == wb.keys()
    diff = np.sqrt(sum(np.sum((wa[k] - wb[k]) ** 2) for k in wa))
    assert diff / np.sqrt(sum(np.sum(wa[k] ** 2) for k in wa)) < 1e-5
    assert any(not np.array_equal(wa[k], wb[k]) for k in wa)  # really two different computations


def test_distributed_run_resumes_exactly_after_sigkill(runs):
    model, data, root, _, double = runs
    out = root / "killed"
    env = dict(cli_env(), STEADYTUNE_TEST_CRASH="step:3")
    r = run_cli(*_args(model, data, out, "--nproc", "2"), env=env)
    assert not (out / "adapters").exists(), r.stdout + r.stderr
    r = run_cli(*_args(model, data, out, "--nproc", "2", "--resume"))
    assert r.returncode == 0, r.stderr + r.stdout
    assert _losses(out) == _losses(double)
    wa, wb = _adapters(out), _adapters(double)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_packed_rows_split_between_two_processes_match_one(runs):
    """--pack: each process takes its share of a micro-batch's examples (batching.shard) and packs
    them; the losses and adapters agree with one process training the same examples. Two
    processes lay the examples out in other rows than one, so an example can sit at another row
    offset: the same terms up to float32 reassociation and RoPE-angle rounding at those offsets
    (1e-5 on the losses, 1e-4 on the adapters after the run's updates, as test_fast_default's
    merged vs separate calls)."""
    model, data, root, _, _ = runs
    single, double = root / "packed-single", root / "packed-double"
    packed = ["--pack", "true", "--batch-size", "2", "--grad-accumulation", "1"]  # 2 examples a step
    assert run_cli(*_args(model, data, single, *packed)).returncode == 0
    r = run_cli(*_args(model, data, double, *packed, "--nproc", "2"))
    assert r.returncode == 0, r.stderr + r.stdout
    a, b = _losses(single), _losses(double)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) > 3
    for (_, _, x), (_, _, y) in zip(a, b):
        assert abs(x - y) / abs(x) < 1e-5
    wa, wb = _adapters(single), _adapters(double)
    diff = np.sqrt(sum(np.sum((wa[k] - wb[k]) ** 2) for k in wa))
    assert diff / np.sqrt(sum(np.sum(wa[k] ** 2) for k in wa)) < 1e-4
