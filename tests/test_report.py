"""`steadytune report` and TrainResult.plot: pictures drawn from a run's metrics.jsonl, checked by
reading the figures back (the Line2D data) and the PNG files back (size, pixels of each curve's
color), and once in a real browser (headless Chromium) when one is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (comes with matplotlib)

from steadytune.errors import UserError  # noqa: E402
from steadytune.report import COLORS, load_series, plot_panel, plot_run, write_report  # noqa: E402

TRAIN = [  # step, loss, lr, tok/s, peak GB
    (1, 2.50, 1.0e-4, 900.0, 0.50), (2, 2.25, 9.0e-5, 1000.0, 0.52), (3, 2.00, 7.5e-5, 1100.0, 0.55),
    (4, 1.80, 5.0e-5, 1050.0, 0.55), (5, 1.70, 2.5e-5, 1000.0, 0.56), (6, 1.65, 1.0e-5, 1200.0, 0.58),
]
VAL = [(3, 2.10), (6, 1.90)]


def write_run(folder: Path, train=TRAIN, val=VAL, extra_lines=()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step, loss, lr, tps, mem in train:
        lines.append({"event": "train", "step": step, "epoch": step / 6, "loss": loss, "tokens": 100,
                      "lr": lr, "tok_per_s": tps, "peak_mem_gb": mem})
        lines += [{"event": "val", "step": s, "val_loss": v} for s, v in val if s == step]
    text = "".join(json.dumps(r) + "\n" for r in lines) + "".join(extra_lines)
    (folder / "metrics.jsonl").write_text(text)
    (folder / "config.yaml").write_text("model:\n  path: smollm2-135m\ndata:\n  path: chat.jsonl\n"
                                        "training:\n  batch_size: 2\n  grad_accumulation: 4\n"
                                        "  learning_rate: 0.0001\n  lr_schedule: cosine\n")
    return folder


def color_pixels(img: Image.Image, hex_color: str, tol: int = 8) -> int:
    """Pixels within `tol` of a curve's color in every channel."""
    import numpy as np

    want = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    a = np.asarray(img.convert("RGB")).astype(int)
    return int((np.abs(a - want) <= tol).all(axis=-1).sum())


def lines_by_gid(ax) -> dict:
    return {line.get_gid(): line for line in ax.get_lines()}


def test_figure_has_one_curve_per_logged_metric_with_the_logged_values(tmp_path):
    fig = plot_run(write_run(tmp_path / "run"))
    loss, lr, tps, mem = fig.axes
    curves = lines_by_gid(loss)
    assert sorted(curves) == ["train_loss", "val_loss"]
    assert list(curves["train_loss"].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(curves["train_loss"].get_ydata()) == [2.50, 2.25, 2.00, 1.80, 1.70, 1.65]
    assert list(curves["val_loss"].get_xdata()) == [3, 6]
    assert list(curves["val_loss"].get_ydata()) == [2.10, 1.90]
    assert list(lines_by_gid(lr)["lr"].get_ydata()) == [1.0e-4, 9.0e-5, 7.5e-5, 5.0e-5, 2.5e-5, 1.0e-5]
    assert list(lines_by_gid(tps)["tok_per_s"].get_ydata()) == [900, 1000, 1100, 1050, 1000, 1200]
    assert list(lines_by_gid(mem)["peak_mem_gb"].get_ydata()) == [0.50, 0.52, 0.55, 0.55, 0.56, 0.58]
    assert [ax.get_title() for ax in fig.axes] == ["Loss", "Learning rate", "Throughput", "Peak memory"]


def test_png_panels_show_the_curves_in_their_colors(tmp_path):
    run = write_run(tmp_path / "run")
    page = write_report(run)
    assert page == run / "report.html"
    for name in ("loss", "lr", "throughput", "memory"):
        img = Image.open(run / f"{name}.png")
        assert img.size == (640, 420)  # 6.4 x 4.2 inches at 100 dpi
        assert len(img.convert("RGB").getcolors(1 << 20)) > 30  # text, grid, curves: not blank
    loss = Image.open(run / "loss.png")
    assert color_pixels(loss, COLORS["train_loss"]) > 300
    assert color_pixels(loss, COLORS["val_loss"]) > 100
    assert color_pixels(loss, COLORS["lr"]) == 0
    lr = Image.open(run / "lr.png")
    assert color_pixels(lr, COLORS["lr"]) > 300 and color_pixels(lr, COLORS["train_loss"]) == 0
    combined = Image.open(run / "metrics.png")
    assert combined.size == (1100, 750)
    for key in COLORS:  # all five curves drawn in the 2x2 figure
        assert color_pixels(combined, COLORS[key]) > 100, key


def test_run_without_validation_draws_only_the_train_curve(tmp_path):
    run = write_run(tmp_path / "run", val=[])
    fig = plot_panel(run, "loss", tmp_path / "loss.png")
    assert sorted(lines_by_gid(fig.axes[0])) == ["train_loss"]
    img = Image.open(tmp_path / "loss.png")
    assert color_pixels(img, COLORS["train_loss"]) > 300
    assert color_pixels(img, COLORS["val_loss"]) == 0


def test_torn_last_line_is_skipped_and_a_repeated_step_keeps_its_last_value(tmp_path):
    again = json.dumps({"event": "train", "step": 6, "loss": 1.5, "lr": 1e-5, "tok_per_s": 1.0,
                        "peak_mem_gb": 0.6}) + "\n"
    run = write_run(tmp_path / "run", extra_lines=[again, '{"event": "train", "step": 7, "lo'])
    steps, losses = load_series(run).get("train_loss")
    assert steps == [1, 2, 3, 4, 5, 6]
    assert losses[-1] == 1.5


def test_html_embeds_every_panel_and_summarizes_the_run(tmp_path):
    run = write_run(tmp_path / "run <b>&")
    page = write_report(run, tmp_path / "out").read_text()
    assert page.count('<img alt="') == 4 and page.count("data:image/png;base64,") == 4
    assert "steadytune run run &lt;b&gt;&amp;" in page and "<b>&" not in page  # names are escaped
    assert "<th>best validation loss</th><td>1.9000</td>" in page
    assert "<th>last validation loss</th><td>1.9000 (step 6)</td>" in page
    assert "<th>median tokens/s</th><td>1,050</td>" in page
    assert "<th>peak memory</th><td>0.58 GB</td>" in page
    assert "<th>batch x accumulation</th><td>2 x 4</td>" in page


def test_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(UserError, match=r"nope: no such run folder; pass the folder"):
        load_series(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"metrics.jsonl: not found"):
        load_series(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"event": "train", "st')
    with pytest.raises(UserError, match=r"metrics.jsonl: no train or val records yet"):
        load_series(tmp_path / "empty")


def test_report_command_writes_the_page_and_fails_in_one_line(tmp_path):
    run = write_run(tmp_path / "run")
    ok = run_cli("report", run)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"report written to {run / 'report.html'} (PNGs beside it)"
    bad = run_cli("report", tmp_path / "missing")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: no such run folder; pass the folder steadytune train wrote "
        "(runs/<timestamp> unless --out was given)"]


def test_train_result_plot_draws_the_trained_run(tiny_model, chat_data, tmp_path):
    import steadytune

    result = steadytune.train({"model": {"path": str(tiny_model)}, "data": {"path": str(chat_data)},
                               "training": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "log_every": 1},
                               "output": {"dir": str(tmp_path / "run"), "progress": "none"}})
    fig = result.plot(tmp_path / "plot.png")
    curves = lines_by_gid(fig.axes[0])
    assert list(curves["train_loss"].get_xdata()) == [1, 2, 3, 4]
    logged = [r["loss"] for r in result.history if r["event"] == "train"]
    assert list(curves["train_loss"].get_ydata()) == logged
    assert list(curves["val_loss"].get_xdata()) == [2, 4]  # step 2 and the final validation
    assert Image.open(tmp_path / "plot.png").size == (1100, 750)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    page = write_report(write_run(tmp_path / "run"))
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,1400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    img = Image.open(shot)
    assert img.size == (1280, 1400)
    for key in COLORS:  # every curve made it onto the rendered page
        assert color_pixels(img, COLORS[key]) > 100, key


def read_tensorboard(folder: Path) -> dict:
    """{(tag, step): value} from TFRecord event files (length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for f in folder.glob("events.out.tfevents.*"):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            for v in ev.summary.value:
                out[(v.tag, ev.step)] = v.simple_value
    return out


def test_tensorboard_events_hold_what_metrics_jsonl_holds(tiny_model, chat_data, tmp_path):
    pytest.importorskip("tensorboardX")
    import steadytune

    result = steadytune.train({"model": {"path": str(tiny_model)}, "data": {"path": str(chat_data)},
                               "training": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "log_every": 2},
                               "output": {"dir": str(tmp_path / "run"), "progress": "none",
                                          "log_to": ["jsonl", "tensorboard"]}})
    events = read_tensorboard(result.run_dir / "tensorboard")
    train = [r for r in result.history if r["event"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        for key in ("loss", "lr", "tok_per_s", "peak_mem_gb"):
            assert events[(f"train/{key}", r["step"])] == pytest.approx(r[key], rel=1e-6)  # float32 in the file
    val = [r for r in result.history if r["event"] == "val" and not r.get("final")]
    assert [r["step"] for r in val] == [2]
    assert events[("val/val_loss", 2)] == pytest.approx(val[0]["val_loss"], rel=1e-6)
