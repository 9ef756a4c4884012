"""Progress lines (log_every, the silence limit, the steady-step ETA) and the metrics sinks: W&B in
offline mode and MLflow on a file store, both in temporary folders; nothing touches the network."""

from __future__ import annotations

import io
import json
import struct

import pytest

from steadytune.errors import UserError
from steadytune.progress import MAX_SILENCE_S, Metrics, Progress, check_sinks, first_step_note, steady_eta


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def lines(total, log_every, step_seconds, first_step_seconds=None):
    """The line display's output for steps of the given durations (a fake clock)."""
    out, clock = io.StringIO(), Clock()
    bar = Progress(total, 0, "lines", stream=out, log_every=log_every, clock=clock)
    for step in range(1, total + 1):
        clock.t += first_step_seconds if (step == 1 and first_step_seconds) else step_seconds
        bar.update(step, step / total, 1.0, 100.0, 0.5)
    return out.getvalue().splitlines()


def test_lines_come_every_log_every_steps_and_at_the_end():
    got = lines(total=23, log_every=5, step_seconds=0.5)
    assert [line.split()[1] for line in got] == ["5/23", "10/23", "15/23", "20/23", "23/23"]


def test_slow_steps_still_give_a_line_a_minute():
    # 25 s a step, log_every 10: the first line would otherwise come after 250 s
    got = lines(total=10, log_every=10, step_seconds=25.0)
    steps = [int(line.split()[1].split("/")[0]) for line in got]
    # a line once 60 s have passed since the last one: after steps 3 (75 s), 6, 9, then the end
    assert MAX_SILENCE_S == 60.0 and steps == [3, 6, 9, 10]


def test_eta_leaves_out_the_compiling_first_step():
    # step 1 compiles (300 s), then 2 s a step; at step 10 of 100, 90 steps are left: 180 s
    got = lines(total=100, log_every=10, step_seconds=2.0, first_step_seconds=300.0)
    assert got[0].startswith("step 1/100 ") and got[0].endswith("eta=--:--")  # 300 s silent: a line
    assert got[1].startswith("step 10/100 ") and got[1].endswith("eta=03:00")
    assert steady_eta(0.0, 1, 0.0, 1, 100) is None  # no steady step yet: no guess


def test_a_gpu_run_says_before_step_1_that_it_may_compile_for_minutes(monkeypatch):
    """Nothing is drawn until a step ends, and a fresh GPU machine's first step of a hybrid
    compiled for over 290 s: the run says so first, and where MLX keeps what it compiles. The CPU
    and Metal say nothing (their first steps take seconds)."""
    assert first_step_note("cpu") is None and first_step_note("metal") is None
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    note = first_step_note("cuda")
    assert "3 to 5 minutes or more for a MoE or hybrid" in note and note.endswith(
        "(kept for later runs in the temp folder; MLX_PTX_CACHE_DIR moves it)")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "/data/ptx")
    assert first_step_note("cuda").endswith("(kept for later runs in /data/ptx)")


def test_eta_unknown_until_a_steady_step():
    out = io.StringIO()
    bar = Progress(5, 0, "lines", stream=out, log_every=1, clock=Clock())
    bar.update(1, 0.2, 1.0, 1.0, 0.1)
    assert out.getvalue().strip().endswith("eta=--:--")


# --- sinks -------------------------------------------------------------------------------------

RECORDS = [{"event": "train", "step": 1, "loss": 2.5, "lr": 1e-4, "tokens": 40},
           {"event": "val", "step": 1, "val_loss": 2.75, "final": False},
           {"event": "train", "step": 2, "loss": 2.25, "lr": 5e-5, "tokens": 38}]
CONFIG = {"training": {"epochs": 3, "learning_rate": 1e-4}, "data": {"path": "d/"}}


def _log(run_dir, sinks):
    run_dir.mkdir()
    m = Metrics(run_dir / "metrics.jsonl", sinks, CONFIG)
    for r in RECORDS:
        m.log(r)
    m.close()
    assert [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == RECORDS


def _wandb_records(path):
    """The protobuf records of a W&B run file (a LevelDB-style log of 32 KiB blocks after a
    7-byte header; each chunk: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunk = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            yield rec


def test_wandb_offline_gets_the_same_records_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                 "WANDB_PROJECT": "steadytune-test"}.items():
        monkeypatch.setenv(k, v)
    _log(tmp_path / "run", ["jsonl", "wandb"])
    run_id = (tmp_path / "run" / "wandb-run-id").read_text()
    files = list(tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    history, config = [], {}
    for rec in _wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.append({k: v for k, v in items.items() if not k.startswith("_")} | {"step": items["_step"]})
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in rec.run.config.update}
    assert history == [{"train/loss": 2.5, "train/lr": 1e-4, "train/tokens": 40, "val/val_loss": 2.75, "step": 1},
                       {"train/loss": 2.25, "train/lr": 5e-5, "train/tokens": 38, "step": 2}]
    assert config["training"] == CONFIG["training"] and config["data"] == CONFIG["data"]


def test_mlflow_file_store_gets_the_same_records_and_the_config(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 otherwise wants a database
    _log(tmp_path / "run", ["jsonl", "mlflow"])
    client = mlflow.MlflowClient(tracking_uri=store)
    run = client.get_run((tmp_path / "run" / "mlflow-run-id").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params == {"training.epochs": "3", "training.learning_rate": "0.0001", "data.path": "d/"}
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
               for k in ("train/loss", "val/val_loss", "train/tokens")}
    assert history == {"train/loss": [(1, 2.5), (2, 2.25)], "val/val_loss": [(1, 2.75)],
                       "train/tokens": [(1, 40.0), (2, 38.0)]}
    assert "val/final" not in run.data.metrics  # flags are not metrics


@pytest.mark.parametrize("sink,package", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_sink_package_is_one_line_before_anything_loads(monkeypatch, sink, package):
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(UserError) as e:
        check_sinks(["jsonl", sink])
    assert str(e.value) == (f"output.log_to: {sink} needs the {package} package, which is not installed; run "
                            f"pip install 'steadytune[{sink}]', or leave {sink} out of --log-to")
    monkeypatch.setitem(sys.modules, package, None)  # and if the import itself fails later
    with pytest.raises(UserError, match=f"pip install 'steadytune\\[{sink}\\]'"):
        Metrics.__init__(Metrics.__new__(Metrics), "/dev/null", [sink])


def test_tensorboard_brings_back_the_torch_the_program_hid(tmp_path, monkeypatch):
    """cli.hide_torch makes torch invisible for start-up; a --log-to tensorboard run without
    tensorboardX still gets PyTorch's writer (a stand-in torch package here)."""
    import sys

    from steadytune.progress import summary_writer

    pkg = tmp_path / "torch" / "utils"
    pkg.mkdir(parents=True)
    (tmp_path / "torch" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "tensorboard.py").write_text("class SummaryWriter:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # not installed
    monkeypatch.setitem(sys.modules, "torch", None)  # hidden, as the program does
    try:
        assert summary_writer().__module__ == "torch.utils.tensorboard"
    finally:
        for name in ("torch.utils.tensorboard", "torch.utils"):
            sys.modules.pop(name, None)
