"""Steps left in flight (the next queued before a step's loss is read), validation in few shapes and
unpacked rows padded to powers of two on a GPU: the same numbers as waiting for every step,
validating in calls of batch_size and padding to multiples."""

import json

import mlx.core as mx
import numpy as np

from conftest import make_chat_data, read_adapters
from steadytune.batching import call_layout
from steadytune.trainer import Trainer, as_config


def _trainer(tiny_model, data, out, **training):
    cfg = as_config({"model": {"path": str(tiny_model)}, "data": {"path": str(data)},
                     "training": dict({"epochs": 2, "batch_size": 2, "learning_rate": 1e-2, "eval_every": 3,
                                       "save_every": 4, "log_every": 1}, **training),
                     "output": {"dir": str(out), "progress": "none"}})
    t = Trainer(cfg)
    t.prepare()
    return t


def _records(run, event):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("event") == event]


def test_steps_in_flight_train_exactly_as_waiting_steps(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 13, 3)
    order = []
    runs = {}
    for pipelined in (True, False):
        t = _trainer(tiny_model, d, tmp_path / f"run-{pipelined}")
        t.pipeline = pipelined
        dispatch, settle = t.dispatch, t.settle
        t.dispatch = lambda mbs, lr, t=t, dispatch=dispatch: (order.append(("queue", t.state.step + 1)), dispatch(mbs, lr))[1]
        t.settle = lambda p, step, *a, settle=settle, **k: (order.append(("read", step)), settle(p, step, *a, **k))[1]
        order.clear()
        result = t.fit()
        runs[pipelined] = (t.run.run_dir, result, list(order))
    (a, ra, oa), (b, rb, ob) = runs[True], runs[False]
    assert ra.step == rb.step == 14  # 7 steps an epoch (13 examples, 2 a step), 2 epochs
    # in flight: step 3 was queued before step 2's loss was read; waiting: never
    assert oa.index(("queue", 3)) < oa.index(("read", 2))
    assert all(ob[2 * i:2 * i + 2] == [("queue", i + 1), ("read", i + 1)] for i in range(14))
    # what must see a step's weights still does: validations at 3, 6, 9, 12, checkpoints at
    # 4, 8, 12 and the epoch ends (7, 14); the step after each was queued only after it was read
    for step in (1, 3, 4, 6, 7, 8, 9, 12):
        assert oa.index(("read", step)) < oa.index(("queue", step + 1)), step
    for event in ("train", "val"):
        ka = [{k: v for k, v in r.items() if k not in ("tok_per_s", "peak_mem_gb")} for r in _records(a, event)]
        kb = [{k: v for k, v in r.items() if k not in ("tok_per_s", "peak_mem_gb")} for r in _records(b, event)]
        assert ka == kb and len(ka) > 3, event  # the same losses, bit for bit
    wa, wb = read_adapters(a), read_adapters(b)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    ckpts = sorted(p.name for p in (a / "checkpoints").iterdir())
    assert ckpts == sorted(p.name for p in (b / "checkpoints").iterdir())


def test_validation_in_calls_of_one_shape_equals_calls_of_batch_size(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 8, 11)
    t = _trainer(tiny_model, d, tmp_path / "r")
    step, val = t.step, t.run.val_set
    assert step.pack_target and not step.few_val_shapes  # the CPU validates in calls of batch_size
    by_batch = step.validation_loss(val, 2)
    assert len(step.shapes["val"]) > 1
    step.few_val_shapes, step.shapes["val"] = True, set()
    calls = []
    arrays = step.packed_call
    step.packed_call = lambda rows, *a: (calls.append(rows), arrays(rows, *a))[1]
    packed = step.validation_loss(val, 2)
    # every call at the shape of training's widest call: the 2 longest training examples laid out
    # as a step lays them out
    longest = sorted(len(x) for x in t.run.train_set.ids)[-2:]
    rows, width, _ = call_layout(longest, step.pack_target, step.device, step.pair)
    assert step.shapes["val"] == {(len(rows), width)} and len(calls) < -(-len(val) // 2)
    assert sorted(i for c in calls for row in c for i in row) == list(range(len(val)))
    # the same token-weighted mean: float32 sums in another order
    assert abs(packed - by_batch) <= 2e-6 * abs(by_batch)


def test_unpacked_validation_on_a_gpu_pads_to_powers_of_two(tiny_model, tmp_path):
    """A model trained unpacked (--pack false here; Qwen3-Next's layers carry a state) validates
    in calls of batch_size examples; on a GPU each padded to a power of two (at least 128), so a
    validation compiles a few widths: the same loss."""
    d = make_chat_data(tmp_path / "data", 8, 23)
    t = _trainer(tiny_model, d, tmp_path / "r", pack=False)
    step, val = t.step, t.run.val_set
    assert not step.pack_target and not step.few_val_shapes
    by_width = step.validation_loss(val, 2)
    widths = {w for _, w in step.shapes["val"]}
    step.few_val_shapes, step.shapes["val"] = True, set()
    bucketed = step.validation_loss(val, 2)
    buckets = {w for _, w in step.shapes["val"]}
    assert len(buckets) < len(widths) and all(w >= 128 and w & (w - 1) == 0 for w in buckets), (widths, buckets)
    assert {r for r, _ in step.shapes["val"]} <= {1, 2}
    assert abs(bucketed - by_width) <= 2e-6 * abs(by_width)


def test_unpacked_rows_on_a_gpu_pad_to_powers_of_two_with_the_same_gradients(tiny_model, tmp_path):
    """Step.bucket_rows (batching.buckets_rows: a GPU, no token budget): an unpacked call's rows
    are as wide as the next power of two (at least 128); the loss and gradients are those of the
    rows padded to multiples (right padding carries no loss and comes after every real token)."""
    from mlx.utils import tree_flatten

    from steadytune.batching import buckets_rows

    assert buckets_rows("cuda", None) and buckets_rows("metal", None)
    assert not buckets_rows("cpu", None) and not buckets_rows("cuda", 4096)
    d = make_chat_data(tmp_path / "data", 8, 2)
    t = _trainer(tiny_model, d, tmp_path / "r", pack=False)
    step = t.step
    assert not step.bucket_rows  # the CPU
    mbs = [[0, 3], [5]]
    plain = step.batches(mbs)
    g1, l1, n1, _ = step.gradients(mbs)
    step.bucket_rows = True
    wide = step.batches(mbs)
    widths = [b.inputs.shape[1] for b in wide]
    assert all(w >= 128 and w & (w - 1) == 0 for w in widths) and widths != [b.inputs.shape[1] for b in plain]
    g2, l2, n2, _ = step.gradients(mbs)
    assert n1 == n2 and abs(l1.item() - l2.item()) <= 1e-6 * abs(l1.item())
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert (mx.abs(a - b).max() <= 1e-5 * (mx.abs(a).max() + 1e-12)).item(), k


def test_a_step_puts_the_model_back_in_training_mode_and_walks_it_only_then():
    """begin_step after a validation (model.eval()) puts every module back in training mode
    (dropout on); a step after a step does not walk the model's modules again (milliseconds a
    step on a 7B model, on the host that queues the GPU's work)."""
    import mlx.nn as nn

    from steadytune.step import begin_step

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.1)))
    walks = []
    real = model.train
    model.train = lambda mode=True: (walks.append(mode), real(mode))[1]
    model.eval()
    walks.clear()  # eval() is train(False)
    begin_step(model, 1, 0, 0)
    assert walks == [True] and all(m.training for _, m in model.named_modules())
    begin_step(model, 1, 1, 0)
    assert walks == [True]
