"""Memory soak (bench, not a test): does memory stay flat over a long run on data of varying length?

Users of MLX report training memory that grows until the Mac swaps or the run dies while the
reported peak stays flat: freed buffers kept in MLX's cache for reuse (every new batch shape leaves
some behind) and compiled graphs per shape. This runs `steadytune train` as a user would (the
default model, SmolLM2-135M-Instruct, with the trainer's cache limit from the planner's headroom)
for --steps optimizer steps and logs after each step the process's resident memory (RSS) and
MLX's active, cache and peak memory as `{"event": "memory", ...}` records in RUN/metrics.jsonl;
the run's report.html gets the trace as a plot (steadytune.report.plot_memory_trace).

Flat means: after warm-up (the first --warmup fraction of the steps, by which the widest batch
shapes have been seen) neither RSS nor MLX's active + cache drifts: the least-squares slope over
the rest, times its length, stays under --tolerance-mb, and the last tenth's mean stays within
--tolerance-mb of the first tenth's after warm-up. Exit status 1 when not flat.

    python bench/soak.py                           # 1,000 steps; data: ../shared/data/wikisql or the bundled chatbot
    python bench/soak.py --steps 300 --out runs/soak
    python bench/soak.py --summarize runs/soak     # the table again, from RUN/metrics.jsonl

Ctrl-C (SIGINT) stops the run at the next step (the trainer checkpoints first) and judges the
steps done so far.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import steadytune  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import numpy as np

from steadytune.backend import cache_limit, device_kind, fast_blas
from steadytune.trainer import Trainer, as_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wikisql"
BUNDLED = ROOT / "steadytune" / "data" / "chatbot"
GB = 1e9


def rss_bytes() -> int:
    """The process's resident memory now (not its peak: ru_maxrss would hide a fall)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # macOS without psutil: ps reports kilobytes
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True)
        return int(out.stdout.strip() or 0) * 1024


class SoakTrainer(Trainer):
    """The trainer, with one memory record written after each optimizer step."""

    def __init__(self, cfg, log):
        super().__init__(cfg)
        self.log, self.calls, self.t0 = log, 0, time.perf_counter()

    def train_step(self, micro_batches, lr):
        out = super().train_step(micro_batches, lr)
        self.calls += 1
        ids = (getattr(self, "run", None) or self).train_set.ids
        width = max((len(ids[i]) for mb in micro_batches for i in mb), default=0)
        self.log({"event": "memory", "step": self.calls, "rss_gb": round(rss_bytes() / GB, 4),
                  "mlx_active_gb": round(mx.get_active_memory() / GB, 4),
                  "mlx_cache_gb": round(mx.get_cache_memory() / GB, 4),
                  "mlx_peak_gb": round(mx.get_peak_memory() / GB, 4), "width": width,
                  "seconds": round(time.perf_counter() - self.t0, 2)})
        return out


def drift(values: np.ndarray) -> tuple[float, float]:
    """(slope x length, last tenth's mean - first tenth's mean) of a series, in its units."""
    x = np.arange(len(values), dtype=float)
    slope = np.polyfit(x, values, 1)[0] if len(values) > 1 else 0.0
    k = max(1, len(values) // 10)
    return float(slope * len(values)), float(values[-k:].mean() - values[:k].mean())


def verdict(records: list[dict], warmup: float, tolerance_mb: float) -> dict:
    """Per series: values at the end of warm-up and at the end, the drift after warm-up, flat or not."""
    start = int(len(records) * warmup)
    out = {"steps": len(records), "warmup_steps": start, "tolerance_mb": tolerance_mb, "series": {}}
    series = {"rss_gb": [r["rss_gb"] for r in records],
              "mlx_active_plus_cache_gb": [r["mlx_active_gb"] + r["mlx_cache_gb"] for r in records],
              "mlx_active_gb": [r["mlx_active_gb"] for r in records],
              "mlx_peak_gb": [r["mlx_peak_gb"] for r in records]}
    for name, vals in series.items():
        v = np.array(vals[start:]) * 1000  # MB
        trend, step = drift(v) if len(v) else (0.0, 0.0)
        out["series"][name] = {"after_warmup_gb": round(vals[start] if start < len(vals) else 0, 3),
                               "end_gb": round(vals[-1], 3), "max_gb": round(max(vals), 3),
                               "trend_mb": round(trend, 1), "tenths_mb": round(step, 1),
                               "flat": abs(trend) <= tolerance_mb and abs(step) <= tolerance_mb}
    out["flat"] = all(out["series"][k]["flat"] for k in ("rss_gb", "mlx_active_plus_cache_gb"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--data", default=str(SHARED if (SHARED / "train.jsonl").exists() else BUNDLED))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=384)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps not judged")
    p.add_argument("--tolerance-mb", type=float, default=64.0)
    p.add_argument("--out", default=f"runs/soak-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--summarize", metavar="RUN", help="judge and tabulate a finished (or stopped) soak run")
    a = p.parse_args(argv)
    if a.summarize:
        return summarize(Path(a.summarize), a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = as_config({"model": {"path": a.model}, "data": {"path": a.data, "max_seq_length": a.max_seq_length,
                                                          "val_max_examples": 16},
                     "training": {"epochs": 100, "max_steps": a.steps, "batch_size": a.batch_size,
                                  "learning_rate": 2e-4, "warmup_steps": 10, "eval_every": 100,
                                  "log_every": 1, "save_every": 250},
                     "output": {"dir": str(out), "progress": "none"}})
    records = []

    def log(rec):
        # opened per record: the trainer may replace metrics.jsonl when it starts (a held handle
        # would then write to the old file)
        records.append(rec)
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if rec["step"] % 50 == 0 or rec["step"] <= 3:
            print(f"step {rec['step']:5d}  rss {rec['rss_gb']:.3f}  active {rec['mlx_active_gb']:.3f}  "
                  f"cache {rec['mlx_cache_gb']:.3f}  peak {rec['mlx_peak_gb']:.3f} GB  "
                  f"width {rec['width']}  {rec['seconds']:.0f} s", flush=True)

    t0 = time.time()
    trainer = SoakTrainer(cfg, log)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        print(f"stopped after {len(records)} steps", flush=True)
    facts = dict(minutes=round((time.time() - t0) / 60, 1), device=device_kind(), blas=bool(fast_blas()),
                 cache_limit_gb=round((cache_limit() or 0) / GB, 2), data=a.data, batch_size=a.batch_size,
                 mlx=mx.__version__)
    (out / "soak_run.json").write_text(json.dumps(facts, indent=2) + "\n")
    return summarize(out, a)


def summarize(out: Path, a) -> int:
    """Judge the memory records of RUN/metrics.jsonl, write RUN/soak.json and the report, print the table."""
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if r.get("event") == "memory"]
    v = verdict(records, a.warmup, a.tolerance_mb)
    facts = out / "soak_run.json"
    v.update(json.loads(facts.read_text()) if facts.exists() else {})
    (out / "soak.json").write_text(json.dumps(v, indent=2) + "\n")
    try:
        from steadytune.report import write_report

        write_report(out)
    except ImportError as e:
        print(f"(no plots: {e})")
    print(f"\n{v['steps']} steps in {v.get('minutes', '?')} min on {v.get('device', '?')}, "
          f"cache limit {v.get('cache_limit_gb', '?')} GB, "
          f"warm-up {v['warmup_steps']} steps, tolerance {a.tolerance_mb:.0f} MB\n")
    print("| series | after warm-up GB | end GB | max GB | trend after warm-up MB | last - first tenth MB | flat |")
    print("|---|---|---|---|---|---|---|")
    for name, s in v["series"].items():
        print(f"| {name} | {s['after_warmup_gb']:.3f} | {s['end_gb']:.3f} | {s['max_gb']:.3f} | "
              f"{s['trend_mb']:+.1f} | {s['tenths_mb']:+.1f} | {'yes' if s['flat'] else 'NO'} |")
    print(f"\nflat: {'yes' if v['flat'] else 'NO'}   ({out / 'soak.json'}, {out / 'report.html'})")
    return 0 if v["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
