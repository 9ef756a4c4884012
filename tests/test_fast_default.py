"""The default path is the fast one: packed rows, one compiled shape, accumulation merged into
one call where memory allows, with the same gradients as the micro-batches run one by one."""

import mlx.core as mx
from mlx.utils import tree_flatten

from conftest import make_chat_data, run_cli
from steadytune.batching import fill_rows, merge_group, merge_micro_batches, packed_eval_batches, pack_rows
from steadytune.config import Config
from steadytune.step import Step
from steadytune.trainer import Trainer, as_config, batches_line


def _trainer(tiny_model, data, tmp_path, **training):
    cfg = as_config({"model": {"path": str(tiny_model)}, "data": {"path": str(data), "max_seq_length": 256},
                     "training": dict({"eval_every": 0, "max_grad_norm": None, "learning_rate": 1e-2}, **training),
                     "output": {"dir": str(tmp_path / "run"), "progress": "none"}})
    t = Trainer(cfg)
    t.prepare()
    return t


def _step(t, **kw) -> Step:
    run = t.run
    return Step(run.model, run.optimizer, run.train_set, pack_width=run.pack_width,
                ce_chunk=run.compute["ce_chunk"], mask_dtype=run.mask_dtype, **kw)


def _rel(a, b) -> float:
    return float(mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten()))


def test_packing_is_the_default():
    assert Config().training.pack is True and Config().training.merge_micro_batches == "auto"


def test_merge_group_is_the_largest_divisor_that_fits():
    assert [merge_group(4, 1, n) for n in (1, 2, 3, 4, 100)] == [1, 2, 2, 4, 4]
    assert merge_group(6, 2, 7) == 3 and merge_group(5, 1, 4) == 1 and merge_group(1, 8, 0) == 1


def test_merge_and_fill_keep_every_row_once():
    step = [[[0, 1], [2]], [[3]], [[4], [5, 6]], [[7]]]
    merged = merge_micro_batches(step, 2)
    assert merged == [[[0, 1], [2], [3]], [[4], [5, 6], [7]]]
    assert fill_rows([[1], [2]], 4) == [[1], [2], [], []] and fill_rows([[1]], 1) == [[1]]
    assert merge_micro_batches(step, 1) is step


def test_validation_packs_into_the_training_shape():
    lengths = [30, 5, 17, 9, 9, 2, 40]
    batches = packed_eval_batches(lengths, 48, 2)
    assert sorted(i for mb in batches for row in mb for i in row) == list(range(7))
    assert all(len(mb) <= 2 for mb in batches)
    assert all(sum(lengths[i] - 1 for i in row) <= 48 for mb in batches for row in mb)
    assert [row for mb in batches for row in mb] == pack_rows([n - 1 for n in lengths], 48)


def test_merged_accumulation_equals_separate_calls(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 12)
    t = _trainer(tiny_model, d, tmp_path, batch_size=1, grad_accumulation=4)
    step = t.epoch_plan(0)[0]
    assert len(step) == 4 and all(len(mb) == 1 for mb in step)  # 4 micro-batches of 1 packed row
    one_by_one, merged = _step(t, rows=1, merge=1), _step(t, rows=1, merge=4)
    g1, loss1, n1, real1 = one_by_one.gradients(step)
    g4, loss4, n4, real4 = merged.gradients(step)
    assert (n1, real1) == (n4, real4)
    # float32 sums of the same terms in another order: relative error a few ulps of the
    # accumulated magnitude (eps 1.2e-7 x a handful of reductions), far below 1e-5
    assert abs(loss1.item() - loss4.item()) <= 1e-5 * abs(loss1.item())
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g4)):
        if float(mx.abs(b).max()) > 0:
            assert _rel(a, b) < 1e-5, k
    assert one_by_one.shapes["train"] == {(1, t.run.pack_width)}
    assert merged.shapes["train"] == {(4, t.run.pack_width)}


def test_short_last_micro_batch_is_filled_with_empty_rows_and_changes_nothing(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 12)
    t = _trainer(tiny_model, d, tmp_path, batch_size=3)
    short = [[t.epoch_plan(0)[0][0][0]]]  # one row where the micro-batches have 3
    filled, bare = _step(t, rows=3), _step(t, rows=0)
    gf, lf, nf, rf = filled.gradients(short)
    gb, lb, nb, rb = bare.gradients(short)
    assert (nf, rf) == (nb, rb) and filled.shapes["train"] == {(3, t.run.pack_width)}
    assert abs(lf.item() - lb.item()) <= 1e-6 * abs(lb.item())  # empty rows add exact zeros
    for (k, a), (_, b) in zip(tree_flatten(gf), tree_flatten(gb)):
        if float(mx.abs(b).max()) > 0:
            assert _rel(a, b) < 1e-5, k


def test_default_run_compiles_one_training_and_one_validation_shape(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 30, 7)
    out = tmp_path / "run"
    r = run_cli("train", "--model", tiny_model, "--data", d, "--out", out, "--epochs", "2",
                "--batch-size", "1", "--grad-accumulation", "4", "--eval-every", "3", "--progress", "lines")
    assert r.returncode == 0, r.stderr
    assert "run 4 at a time as one call" in r.stderr
    assert "compiled step shapes: 1 training, 1 validation" in r.stdout
    import json

    end = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and (end["step_shapes"], end["val_shapes"]) == (1, 1)


def test_batches_line_says_what_batch_size_means():
    t = Config().training
    assert batches_line(t, 640, 1) == ("batches: each micro-batch is 4 rows of 640 positions packed with "
                                       "whole examples (2560 tokens), 1 per optimizer step")
    t.pack, t.batch_size = False, 2
    assert batches_line(t, 0, 1) == "batches: micro-batches of 2 examples, 1 per optimizer step"


def test_the_program_hides_torch_and_python_callers_keep_it(tmp_path):
    """`steadytune` as a program makes torch invisible to transformers (its import is most of the
    start-up where torch is installed); `cli.main([...])` from Python leaves sys.modules alone."""
    import subprocess
    import sys

    data = make_chat_data(tmp_path / "d", 8)
    probe = ("import sys; from steadytune import cli; sys.argv = ['steadytune', 'check-data', {!r}]; "
             "rc = {}; print('torch:', 'absent' if 'torch' not in sys.modules else sys.modules['torch'])")
    out = {}
    for how, call in (("program", "cli.main()"), ("caller", f"cli.main(['check-data', {str(data)!r}])")):
        r = subprocess.run([sys.executable, "-c", probe.format(str(data), call)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out[how] = r.stdout.strip().splitlines()[-1]
    assert out == {"program": "torch: None", "caller": "torch: absent"}
