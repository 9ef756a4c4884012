"""Packed rows (training.pack): a packed call gives the gradients of the same examples padded one
per row (attention stays inside each example, positions restart in effect), packing leaves less
padding than one example a row on real lengths, and a packed run resumes exactly."""

import json
import signal

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import SHARED_DATA, cli_env, make_chat_data, read_adapters, run_cli
from steadytune.batching import layout_padding, pack_batch, pack_layout, pack_rows, padding_fraction, plan_epoch
from steadytune.packing import PackedCache, attention_bias, block_causal, check_packable
from steadytune.trainer import Trainer, as_config


def test_pack_rows_is_best_fit_decreasing():
    # largest first, each into the fullest row it fits: 7 -> new row, 5 -> new row (3 left in the
    # first), 4 -> the 5's row, 3 -> the 7's row (exactly full), 2 -> new row (1 and 0 left), 2 -> that one
    assert pack_rows([2, 7, 3, 5, 4, 2], 10) == [[1, 2], [3, 4], [0, 5]]


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_en_demo.json").exists(), reason="shared data not present")
def test_packing_leaves_less_padding_on_real_lengths():
    """Lengths of the bundled data (characters / 4, about tokens), 4 examples a step as the
    default: the step's examples packed carry less padding than one a row padded to the longest
    (length-grouped, as the trainer groups them), on the CPU; on a GPU the widths are powers of
    two (few shapes), which costs padding but not time on calls this small."""
    import json

    recs = json.loads((SHARED_DATA / "alpaca_en_demo.json").read_text())
    lengths = np.array([len(r["instruction"] + r.get("input", "") + r["output"]) // 4 + 8 for r in recs])
    plan = plan_epoch(lengths, 4, None, 1, 0, 0)
    calls = [mb for step in plan for mb in step]
    packed = layout_padding(calls, lengths, 512, "cpu")
    one_per_row = padding_fraction([[int(lengths[i]) for i in mb] for mb in calls])
    assert packed < one_per_row < 0.2 and packed < 0.11, (packed, one_per_row)
    gpu = layout_padding(calls, lengths, 4096, "cuda")
    assert gpu < 0.35, gpu


def test_pack_batch_lays_out_examples_and_segments():
    ids = [[[1, 2, 3], [4, 5]], [[6, 7, 8, 9]]]
    masks = [[[0, 1, 1], [1, 1]], [[0, 0, 1, 1]]]
    inputs, targets, mask, seg = pack_batch(ids, masks, width=4)
    assert inputs.tolist() == [[1, 2, 4, 0], [6, 7, 8, 0]]
    assert targets.tolist() == [[2, 3, 5, 0], [7, 8, 9, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 0]]
    assert seg.tolist() == [[0, 0, 1, 2], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="more than the width"):
        pack_batch([[[1, 2, 3, 4, 5, 6]]], [[[1] * 6]], width=4)


def test_attention_bias_is_block_diagonal_causal():
    bias = attention_bias(mx.array([[0, 0, 1, 1, 1]]), mx.float32)
    low = float(np.finfo(np.float32).min)
    keep = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert bias.shape == (1, 1, 5, 5)
    assert bias[0, 0].tolist() == [[0.0 if k else low for k in row] for row in keep]
    # sliding-window layers get the window on top
    win = PackedCache(block_causal(mx.array([[0, 0, 1, 1, 1]])), mx.float32).make_mask(5, window_size=1)
    assert (np.array(win[0, 0]) == 0).tolist() == [[r == c for c in range(5)] for r in range(5)]


def _trainer(tiny_model, data, tmp_path, name, **training):
    cfg = as_config({"model": {"path": str(tiny_model)}, "data": {"path": str(data)},
                     "training": dict({"eval_every": 0, "max_grad_norm": None}, **training),
                     "output": {"dir": str(tmp_path / name), "progress": "none"}})
    t = Trainer(cfg)
    t.prepare()
    return t


@pytest.mark.parametrize("ckpt", [False, True])
def test_packed_gradients_equal_one_example_per_row(tiny_model, tmp_path, ckpt):
    """Six examples padded one per row vs the same six packed into rows: the same loss, token
    counts and gradients (float32), with and without gradient checkpointing. Packed examples sit
    at row offsets > 0, so this also checks that their positions restart in effect."""
    d = make_chat_data(tmp_path / "data", 12)
    padded = _trainer(tiny_model, d, tmp_path, "padded", batch_size=6, pack=False, grad_checkpoint=ckpt)
    packed = _trainer(tiny_model, d, tmp_path, "packed", batch_size=6, pack=True, grad_checkpoint=ckpt)
    ex = list(range(6))
    rows, _ = pack_layout([len(packed.run.train_set.ids[i]) for i in ex], packed.run.pack_target)
    assert len([r for r in rows if r]) < 6 and any(len(r) > 1 for r in rows)  # really packed: offsets > 0
    g1, l1, n1, r1 = padded.step.gradients([ex])
    g2, l2, n2, r2 = packed.step.gradients([ex])
    assert (n1, r1) == (n2, r2)
    assert abs(l1.item() - l2.item()) / l1.item() < 1e-5
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        scale = float(mx.linalg.norm(a.flatten()))
        if scale:
            assert float(mx.linalg.norm((a - b).flatten())) / scale < 1e-4, k


def test_model_with_absolute_positions_is_refused():
    from mlx_lm.models import gpt2

    model = gpt2.Model(gpt2.ModelArgs(model_type="gpt2", n_ctx=64, n_embd=32, n_head=2, n_layer=1,
                                      n_positions=64, layer_norm_epsilon=1e-5, vocab_size=50))
    assert "absolute position" in check_packable(model)


def test_packed_run_resumes_exactly_and_reports_padding(tiny_model, tmp_path):
    data = make_chat_data(tmp_path / "data", 26, 5)

    def args(out, *extra):
        return ["train", "--model", tiny_model, "--data", data, "--out", out, "--epochs", "2",
                "--pack", "true", "--batch-tokens", "512", "--max-seq-length", "256",
                "--learning-rate", "5e-3", "--log-every", "1", "--eval-every", "2", "--save-every", "2",
                "--progress", "lines", *extra]

    ref, out = tmp_path / "ref", tmp_path / "crash"
    r = run_cli(*args(ref))
    assert r.returncode == 0, r.stderr
    assert "packed into rows of up to" in r.stderr and "padding" in r.stderr
    r = run_cli(*args(out), env=dict(cli_env(), STEADYTUNE_TEST_CRASH="step:3"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = run_cli(*args(out, "--resume"))
    assert r.returncode == 0, r.stderr
    def losses(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in recs if r["event"] == "train"]

    assert losses(out) == losses(ref) and len(losses(ref)) > 4  # bitwise: JSON keeps every digit
    a, b = read_adapters(out), read_adapters(ref)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    r = run_cli("train", "--model", tiny_model, "--data", data, "--out", out, "--resume")
    assert r.returncode == 2 and "pack" in r.stderr  # packing is part of the run


def test_shard_splits_a_micro_batch_between_processes():
    from steadytune.batching import shard

    assert shard([1, 2, 3, 4, 5], 0, 2) == [1, 2, 3] and shard([1, 2, 3, 4, 5], 1, 2) == [4, 5]
    assert shard([7, 8, 9], 1, 2) == [9]
