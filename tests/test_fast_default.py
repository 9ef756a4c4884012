"""The default path is the fast one: a step's examples packed into rows of few compiled shapes,
accumulation merged into one call where memory allows, with the same gradients as the
micro-batches run one by one; and packing never changes which examples a step trains on."""

import mlx.core as mx
from mlx.utils import tree_flatten

import numpy as np

from conftest import make_chat_data, read_adapters, run_cli
from steadytune.batching import (call_layout, merge_group, merge_micro_batches, min_width, pack_layout, row_bucket,
                                 width_bucket)
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
    return Step(run.model, run.optimizer, run.train_set, pack_target=run.pack_target,
                ce_chunk=run.compute["ce_chunk"], mask_dtype=run.mask_dtype, **kw)


def _rel(a, b) -> float:
    return float(mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten()))


def test_packing_is_the_default():
    assert Config().training.pack is True and Config().training.merge_micro_batches == "auto"


def test_merge_group_is_the_largest_divisor_that_fits():
    fits = lambda limit: lambda g: g <= limit  # noqa: E731
    assert [merge_group(4, fits(n)) for n in (1, 2, 3, 4, 100)] == [1, 2, 2, 4, 4]
    assert merge_group(6, fits(3)) == 3 and merge_group(5, fits(4)) == 1 and merge_group(1, fits(0)) == 1


def test_merging_joins_the_examples_of_micro_batches():
    step = [[0, 1], [2], [3, 4], [5]]
    assert merge_micro_batches(step, 2) == [[0, 1, 2], [3, 4, 5]]
    assert merge_micro_batches(step, 4) == [[0, 1, 2, 3, 4, 5]]
    assert merge_micro_batches(step, 1) is step


def test_widths_and_row_counts_come_from_few_buckets():
    # CPU: multiples of 32, at least a sixteenth of the power of two above; GPU: powers of two
    assert [width_bucket(n) for n in (1, 33, 200, 257, 300, 513, 1000, 1100)] == \
        [32, 64, 224, 288, 320, 576, 1024, 1152]
    assert [width_bucket(n, "cuda") for n in (1, 129, 300, 1000, 1025, 5000)] == [128, 256, 512, 1024, 2048, 8192]
    assert [row_bucket(r) for r in range(1, 14)] == [1, 2, 3, 4, 5, 6, 7, 8, 12, 12, 12, 12, 16]
    widths = {width_bucket(n) for n in range(1, 4097)}
    assert len(widths) == 16 + 8 + 8 + 8  # up to 512 by 32 (16), then 8 a doubling: few shapes


def test_cuda_rows_are_no_narrower_than_the_gpu_computes_while_the_host_queues():
    # parameters x positions a step computes while the host queues it: 7.5e9 x 512
    # (batching.CUDA_IDLE_WORK; a 7B shape, 7.24e9 parameters, gets 512)
    assert [min_width("cuda", p) for p in (135_000_000, 1_000_000_000, 3_000_000_000, 7_241_732_096,
                                           13_000_000_000, 70_000_000_000, 0)] == [1024, 1024, 1024, 512, 256, 128, 128]
    assert min_width("cpu", 135_000_000) == min_width("metal", 7_200_000_000) == 128
    assert [width_bucket(n, "cuda", 1024) for n in (1, 300, 1000, 1025, 5000)] == [1024, 1024, 1024, 2048, 8192]
    # with a floor of 1,024 (a 135M model) narrow calls (4 examples of 60-130 tokens: 256 and 512
    # wide without it) share the 1,024-wide shape of the common calls; the layout is the same
    for lengths in ([61, 60, 65, 66], [130, 120, 101, 99], [300, 200, 250, 240]):
        rows, width, packed = call_layout(lengths, 4096, "cuda", 0.0, 1024)
        assert (width, packed) == (1024, True) and rows == call_layout(lengths, 4096, "cuda")[0]
    assert call_layout([61, 60, 65, 66], 4096, "cuda")[1] == 256
    assert call_layout([700, 650, 600, 500], 4096, "cuda", 0.0, 1024)[1] == 4096  # wide calls as before


def test_pack_layout_holds_every_example_once_in_rows_that_fit():
    import numpy as np

    rng = np.random.default_rng(0)
    for device in ("cpu", "cuda"):
        target = 512 if device == "cpu" else 4096
        for _ in range(200):
            lengths = rng.integers(2, 900, rng.integers(1, 17)).tolist()
            rows, width = pack_layout(lengths, target, device)
            assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
            assert all(sum(lengths[i] - 1 for i in row) <= width for row in rows)
            assert width == width_bucket(width, device) and len(rows) == row_bucket(len(rows))
            assert width >= max(lengths) - 1  # rows as wide as the call's own longest example
            real = sum(n - 1 for n in lengths)
            if real <= target:  # small calls: one row
                assert len(rows) == 1
    # a pure function of the lengths
    assert pack_layout([300, 20, 200, 90, 90], 512) == pack_layout([300, 20, 200, 90, 90], 512)
    # by hand: positions 299, 19, 199, 89, 89 (695 > 512: two rows); width 352 (695 / 2 rounded)
    # leaves the second 89 without a row, 384 fits: 299 + 19 and 199 + 89 + 89 (best fit decreasing)
    assert pack_layout([300, 20, 200, 90, 90], 512) == ([[0, 1], [2, 3, 4]], 384)


def test_merged_accumulation_equals_separate_calls(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 12)
    t = _trainer(tiny_model, d, tmp_path, batch_size=1, grad_accumulation=4)
    step = t.epoch_plan(0)[0]
    assert len(step) == 4 and all(len(mb) == 1 for mb in step)  # 4 micro-batches of 1 example
    one_by_one, merged = _step(t, merge=1), _step(t, merge=4)
    g1, loss1, n1, real1 = one_by_one.gradients(step)
    g4, loss4, n4, real4 = merged.gradients(step)
    assert (n1, real1) == (n4, real4)
    # merged, the examples sit at row offsets > 0: the same terms up to float32 reassociation and
    # the rounding of RoPE angles at larger positions (offset x eps32 ~ 300 x 6e-8 = 2e-5 rad):
    # 1e-5 on the loss, 1e-4 on the gradients (as test_packing's packed vs padded)
    assert abs(loss1.item() - loss4.item()) <= 1e-5 * abs(loss1.item())
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g4)):
        if float(mx.abs(b).max()) > 0:
            assert _rel(a, b) < 1e-4, k
    assert len(one_by_one.shapes["train"]) >= 1 and len(merged.shapes["train"]) == 1


def test_empty_rows_change_nothing(tiny_model, tmp_path):
    """A call whose row count is rounded up (row_bucket) gets empty rows: all padding, exact zeros."""
    from steadytune.batching import pack_batch

    d = make_chat_data(tmp_path / "data", 12)
    t = _trainer(tiny_model, d, tmp_path, batch_size=3)
    ids, masks = t.run.train_set.ids[:2], t.run.train_set.masks[:2]
    width = max(len(x) for x in ids)
    s = _step(t)
    losses = []
    for extra in (0, 3):
        rows = [[ids[0]], [ids[1]]] + [[] for _ in range(extra)]
        rmasks = [[masks[0]], [masks[1]]] + [[] for _ in range(extra)]
        inputs, targets, mask, seg = pack_batch(rows, rmasks, width)
        losses.append(s.eval_loss(mx.array(inputs), mx.array(targets), mx.array(mask), mx.array(seg)).item())
    assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[0])


def test_packed_and_unpacked_runs_train_the_same_examples_per_step(tiny_model, tmp_path):
    """--batch-size 4 means 4 examples per optimizer step, packed or not: the same steps with the
    same target tokens, the first loss equal up to float32 reassociation (1e-5, the same weights),
    and the later ones close. Why only close: AdamW moves each weight by about lr whatever its
    gradient's size, so a rounding-level difference in a near-zero gradient can move that weight
    by up to 2 lr; the loss then differs by at most about sum|g| x 2 lr x steps (first order),
    which for this 2-layer model at lr 1e-3 is ~1e-3 of the loss after 16 steps."""
    import json

    d = make_chat_data(tmp_path / "data", 30, 7)
    runs, adapters = {}, {}
    for pack in (True, False):
        out = tmp_path / f"run-{pack}"
        r = run_cli("train", "--model", tiny_model, "--data", d, "--out", out, "--epochs", "2",
                    "--batch-size", "4", "--pack", str(pack).lower(), "--log-every", "1",
                    "--eval-every", "0", "--learning-rate", "1e-3", "--progress", "lines")
        assert r.returncode == 0, r.stderr
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[pack] = [(x["step"], x["tokens"], x["loss"]) for x in recs if x["event"] == "train"]
        adapters[pack] = read_adapters(out)
    assert len(runs[True]) == len(runs[False]) == 2 * -(-30 // 4)  # 30 train examples, 4 a step
    assert [x[:2] for x in runs[True]] == [x[:2] for x in runs[False]]  # the same examples each step
    (_, _, first_p), (_, _, first_u) = runs[True][0], runs[False][0]
    assert abs(first_p - first_u) <= 1e-5 * first_u
    for (step, _, lp), (_, _, lu) in zip(runs[True], runs[False]):
        assert abs(lp - lu) <= 2e-3 * lu, (step, lp, lu)
    for k in adapters[False]:  # each adapter within 2 lr x steps of the other run's, elementwise
        assert np.abs(adapters[True][k] - adapters[False][k]).max() <= 2 * 1e-3 * 16, k


def test_default_run_compiles_few_shapes_and_reports_them(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 30, 7)
    out = tmp_path / "run"
    r = run_cli("train", "--model", tiny_model, "--data", d, "--out", out, "--epochs", "2",
                "--batch-size", "1", "--grad-accumulation", "4", "--eval-every", "3", "--progress", "lines")
    assert r.returncode == 0, r.stderr
    assert "steps per epoch of 4 examples" in r.stderr
    import json

    end = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    # 16 steps of 4 examples of 7-60 tokens: few widths of 32 on the CPU (no more than a handful)
    assert end["event"] == "end" and 1 <= end["step_shapes"] <= 12 and end["val_shapes"] <= 3
    assert f"compiled step shapes: {end['step_shapes']} training, {end['val_shapes']} validation" in r.stdout


def test_batches_line_says_what_batch_size_means():
    t = Config().training
    assert batches_line(t, 512, 1) == ("batches: micro-batches of 4 examples, 1 per optimizer step; each call's "
                                       "examples packed into rows of up to 512 positions (wider for a longer "
                                       "example), attention inside each example")
    t.pack, t.batch_size, t.grad_accumulation = False, 2, 3
    assert batches_line(t, 0, 3) == ("batches: micro-batches of 2 examples, 3 per optimizer step; one example a "
                                     "row, padded; 3 micro-batches run as one call (they fit in memory; "
                                     "--merge-micro-batches off to stop)")


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


def test_the_plan_counts_the_parameters_the_step_counts(tiny_model, tmp_path):
    """Run.params (from the model built from its config) equals the trained model's count, its
    adapters left out: the planner and the trainer choose the same narrowest row (min_width)."""
    import json

    from steadytune import plan
    from steadytune.step import model_parameters

    t = _trainer(tiny_model, make_chat_data(tmp_path / "data", 8), tmp_path)
    config = json.loads((tiny_model / "config.json").read_text())
    assert plan.from_skeleton(config, t.cfg.lora)["params"] == model_parameters(t.run.model) > 0
