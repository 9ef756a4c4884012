"""`steadytune doctor`: every problem is named with its fix, and the exit status says whether any
was found."""

from __future__ import annotations

import json
import sys

from steadytune import doctor
from steadytune.cli import main
from steadytune.config import Config

from conftest import make_chat_data, write_jsonl


def config(model: str, data=None, out=None) -> Config:
    cfg = Config()
    cfg.model.path, cfg.data.path, cfg.output.dir = model, data, out
    return cfg


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_a_complete_setup_passes_model_data_and_disk(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": f"example {i}"} for i in range(5)])
    checks = by_name(doctor.run_checks(config(str(tiny_model), str(data), str(tmp_path / "run"))))
    assert {"python", "mlx", "device", "memory", "fast BLAS", "model", "data", "disk"} <= set(checks)
    for name in ("python", "mlx", "model", "data", "disk"):
        assert checks[name].ok, checks[name].line()
    assert "train 5 records (text)" in checks["data"].detail
    assert "readable" in checks["model"].detail


def test_a_missing_model_folder_fails_with_the_fix_and_exit_status_1(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["doctor", "--model", str(missing), "--out", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("FAIL  model"))
    assert str(missing) in line and "no such model folder" in line
    assert "fix: pass --model with a folder" in out
    assert "1 problem found" in out


def test_a_model_folder_without_weights_fails(tiny_model, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model / "config.json").read_text())
    check = doctor.check_model(str(folder))
    assert not check.ok and "no *.safetensors" in check.detail


def test_a_missing_data_file_fails(tiny_model, tmp_path):
    check = doctor.check_data(str(tmp_path / "missing.jsonl"))
    assert not check.ok and "missing.jsonl: data not found" in check.detail
    assert "pass --data with" in check.fix


def test_a_malformed_data_line_is_named_by_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"text": broken\n')
    check = doctor.check_data(str(data))
    assert not check.ok and f"{data}:2" in check.detail and "check-data" in check.fix


def test_no_data_is_a_note_not_a_problem():
    check = doctor.check_data(None)
    assert check.ok and check.note


def test_missing_fast_blas_on_a_linux_cpu_says_how_to_install_it(monkeypatch):
    import steadytune.backend as backend

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(backend, "device_kind", lambda: "cpu")
    monkeypatch.setattr(backend, "fast_blas", lambda: "")
    check = doctor.check_blas()
    assert not check.ok and "libopenblas0-pthread" in check.fix


def test_too_little_free_disk_where_the_run_writes_fails(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10e9, 9.9e9, 0.1e9))
    check = doctor.check_disk(str(tmp_path / "deep" / "run"))
    assert not check.ok and f"{tmp_path}: 0.10 GB free" in check.detail and "--out" in check.fix


def test_all_fine_exits_0(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "check_blas", lambda: doctor.Check("fast BLAS", True, "stub"))
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello"}] * 3)
    assert main(["doctor", "--model", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "r")]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_bench_trains_briefly_and_ends_with_one_line_of_json(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "check_blas", lambda: doctor.Check("fast BLAS", True, "stub"))
    data = make_chat_data(tmp_path / "data", 8)
    assert main(["doctor", "--bench", "--bench-steps", "3", "--model", str(tiny_model), "--data", str(data),
                 "--batch-size", "2", "--out", str(tmp_path / "unused")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    r = json.loads(lines[-1])
    assert r["steps"] == 3 and r["batch_size"] == 2 and r["model"] == str(tiny_model)
    assert r["tokens_per_s"] > 0 and r["peak_gb"] > 0 and r["predicted_peak_gb"] > 0
    # each GB figure is rounded to 1e-3 and the ratio to 1e-3: the product is within 2e-3 of the peak
    assert abs(r["peak_vs_predicted"] * r["predicted_peak_gb"] - r["peak_gb"]) <= 2e-3
    assert r["cache_limit_gb"] is not None and 0 < r["cache_limit_gb"] <= r["available_gb"]
    assert r["device"] in ("cpu", "metal", "cuda") and r["mlx"] and r["python"]
    assert any(line.startswith("memory     peak") for line in lines)
    assert not (tmp_path / "unused").exists()  # the bench trains in a temporary folder


def test_bench_is_skipped_when_a_check_failed(tmp_path, capsys):
    assert main(["doctor", "--bench", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 1
    assert "bench:" not in capsys.readouterr().out
