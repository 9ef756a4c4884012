"""Checkpoints written on a thread of their own (checkpoint.Writer) and the safetensors writer
they use."""

from __future__ import annotations

import os
import threading

import mlx.core as mx
import numpy as np
import pytest

from steadytune import checkpoint as ckpt


def test_safetensors_written_from_host_copies_read_back_exactly(tmp_path):
    """Every dtype a checkpoint holds, bfloat16 included (its bits leave the device as uint16),
    0-d arrays too: mx.load and the safetensors package read the same values, shapes and dtypes."""
    arrays = {"b.w": mx.random.normal((3, 5)).astype(mx.bfloat16), "a.w": mx.random.normal((7,)),
              "h": mx.arange(6).reshape(2, 3).astype(mx.float16), "step": mx.array(12),
              "big": mx.array([2 ** 40], dtype=mx.uint64), "flag": mx.array([True, False])}
    path = tmp_path / "x.safetensors"
    ckpt._write_safetensors(path, ckpt.host_tensors(arrays), {"format": "mlx"})
    back = mx.load(str(path))
    assert back.keys() == arrays.keys()
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape and mx.array_equal(back[k], a).item(), k
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(path), "np") as f:  # (numpy has no bfloat16: the others)
        assert sorted(f.keys()) == sorted(arrays) and f.metadata() == {"format": "mlx"}
        assert np.array_equal(f.get_tensor("a.w"), np.array(arrays["a.w"])) and f.get_tensor("step").shape == ()
        assert np.array_equal(f.get_tensor("big"), np.array([2 ** 40], dtype=np.uint64))
    assert (int.from_bytes(path.read_bytes()[:8], "little") + 8) % 8 == 0  # data 8-byte aligned


def test_host_copies_refuse_nan_and_inf_by_name_but_not_a_learning_rate():
    """host_tensors(what=...) checks every float group in one read; the refusal names the first
    bad tensor and counts them; the optimizer's learning_rate is a setting, not a state."""
    from steadytune.errors import UserError

    good = {"a": mx.ones((3,)), "b": mx.ones((2, 2), dtype=mx.bfloat16), "step": mx.array(3)}
    assert ckpt.host_tensors({**good, "learning_rate": mx.array(float("nan"))}, "x")["a"][1].tolist() == [1, 1, 1]
    bad = {**good, "c": mx.array([1.0, float("inf")]), "d": mx.array([float("nan")], dtype=mx.bfloat16)}
    with pytest.raises(UserError, match=r"^ckpt/step-3: c holds NaN or inf \(2 tensors in all\)"):
        ckpt.host_tensors(bad, "ckpt/step-3")
    assert ckpt.host_tensors(bad)["c"][1][0] == 1.0  # without `what`: copied as they are


def test_writer_runs_jobs_in_order_off_the_calling_thread_and_waits_for_them(tmp_path):
    w, seen, gate = ckpt.Writer(), [], threading.Event()
    w.submit(lambda: (gate.wait(5), seen.append(("a", threading.current_thread().name))))
    w.submit(lambda: seen.append(("b", threading.current_thread().name)))
    assert seen == []  # queued: the caller goes on
    gate.set()
    w.wait()
    assert seen == [("a", "steadytune-checkpoints"), ("b", "steadytune-checkpoints")]
    w.submit(lambda: seen.append(("c", threading.current_thread().name)))  # a new thread after the last ended
    w.wait()
    assert seen[-1][0] == "c"


def test_writer_raises_a_failure_on_the_calling_thread_and_drops_the_jobs_after_it():
    w, seen = ckpt.Writer(), []

    def fail():
        raise ckpt.WriteError("step-0000003: could not write (No space left on device)", "No space left on device")

    gate = threading.Event()
    w.submit(lambda: gate.wait(5))
    w.submit(fail)
    w.submit(lambda: seen.append("best/ of the failed checkpoint"))
    gate.set()
    with pytest.raises(ckpt.WriteError, match="No space left"):
        w.wait()
    assert seen == []
    w.wait()  # raised once; the writer is usable again
    w.submit(lambda: seen.append("next"))
    w.wait()
    assert seen == ["next"]


def test_a_checkpoint_and_final_adapters_share_files_when_of_the_same_step(tiny_model, tmp_path):
    """The last step's checkpoint (the epoch's end) is queued, the run waits for it, and
    adapters/ is its adapter files hard-linked (same bytes, same inode)."""
    from steadytune.config import from_dict
    from steadytune.trainer import Trainer

    from conftest import make_chat_data

    cfg = from_dict({"model": {"path": str(tiny_model), "quantize": "none"},
                     "data": {"path": str(make_chat_data(tmp_path / "data", 8))},
                     "training": {"epochs": 1, "batch_size": 2, "save_every": 0, "eval_every": 0},
                     "output": {"dir": str(tmp_path / "run"), "progress": "none"}})
    Trainer(cfg).fit()
    run = tmp_path / "run"
    last = ckpt.latest(run)[0]
    for f in ckpt.ADAPTER_FILES:
        assert os.path.samefile(run / "adapters" / f, last / f)
    assert ckpt.is_complete(run / "adapters") and not list(run.glob(".*tmp*"))

