"""Memory that stays flat on a long run: MLX's cache limited to the planner's headroom, and the
per-step memory trace (bench/soak.py) drawn in the report."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx.core as mx
import pytest

from steadytune import backend
from steadytune.report import memory_trace, plot_memory_trace, write_report


def test_cache_limit_is_the_headroom_and_never_negative():
    assert backend.cache_limit_bytes(16e9, 5e9) == 11_000_000_000
    assert backend.cache_limit_bytes(4e9, 5e9) == 0  # no headroom: MLX frees buffers at once


def test_cpu_cache_holds_at_most_one_calls_buffers():
    """On the CPU the cache is also capped at the plan's largest call (what one call allocates
    and frees): a shared machine keeps the rest of the headroom."""
    assert backend.cache_limit_bytes(23e9, 3e9, step=2.5e9) == 2_500_000_000
    assert backend.cache_limit_bytes(8e9, 3e9, step=6e9) == 5_000_000_000  # the headroom, if smaller
    assert backend.cache_limit_bytes(4e9, 5e9, step=1e9) == 0
    assert backend.cache_limit_bytes(23e9, 3e9) == 20_000_000_000  # a GPU: the headroom


def test_limit_cache_caps_the_cpu_cache_from_the_plans_call_memory(monkeypatch):
    monkeypatch.setattr(mx, "set_cache_limit", lambda n: 0)
    monkeypatch.setitem(backend._state, "cache_limit", None)
    breakdown = SimpleNamespace(required=3e9, activations=1.5e9, logits=0.25e9, in_flight=0.25e9)
    plan = SimpleNamespace(available=23e9, breakdown=breakdown)
    for device, limit in (("cpu", 2_000_000_000), ("gpu", 20_000_000_000)):
        monkeypatch.setattr(backend, "device_kind", lambda: device)
        assert backend.limit_cache(plan) == limit


def test_limit_cache_sets_mlx_cache_limit_from_a_plan(monkeypatch):
    seen = []
    monkeypatch.setattr(mx, "set_cache_limit", lambda n: seen.append(n) or 0)
    monkeypatch.setitem(backend._state, "cache_limit", None)
    step = dict(activations=4e9, logits=1e9, in_flight=1e9)  # a call of 6 GB: the headroom is the cap
    plan = SimpleNamespace(available=8e9, breakdown=SimpleNamespace(required=3e9, **step))
    assert backend.limit_cache(plan) == 5_000_000_000 == backend.cache_limit()
    assert seen == [5_000_000_000]
    # not planned (a Hub model not downloaded yet) or memory unknown: MLX's default stays
    assert backend.limit_cache(None) is None
    assert backend.limit_cache(SimpleNamespace(available=0, breakdown=plan.breakdown)) is None
    assert seen == [5_000_000_000]


def _run_with_trace(folder, steps=5):
    folder.mkdir()
    lines = []
    for s in range(1, steps + 1):
        lines.append({"event": "train", "step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-4, "tok_per_s": 100.0,
                      "peak_mem_gb": 0.5})
        lines.append({"event": "memory", "step": s, "rss_gb": 1.0 + 0.01 * s, "mlx_active_gb": 0.2,
                      "mlx_cache_gb": 0.3})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_memory_trace_reads_the_memory_records(tmp_path):
    run = _run_with_trace(tmp_path / "run")
    trace = memory_trace(run)
    assert trace["rss_gb"] == ([1, 2, 3, 4, 5], [1.01, 1.02, 1.03, 1.04, 1.05])
    assert trace["mlx_cache_gb"][1] == [0.3] * 5


def test_the_report_draws_the_trace_only_when_it_was_logged(tmp_path):
    pytest.importorskip("matplotlib")
    run = _run_with_trace(tmp_path / "run")
    fig = plot_memory_trace(run)
    gids = {line.get_gid() for line in fig.axes[0].get_lines()}
    assert gids == {"rss_gb", "mlx_active_gb", "mlx_cache_gb", "mlx_total"}
    total = next(line for line in fig.axes[0].get_lines() if line.get_gid() == "mlx_total")
    assert list(total.get_ydata()) == pytest.approx([0.5] * 5)
    page = write_report(run)
    assert (run / "resident.png").is_file() and "Resident memory" in page.read_text()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": 1.0}) + "\n")
    assert plot_memory_trace(plain) is None
    write_report(plain)
    assert not (plain / "resident.png").exists()
