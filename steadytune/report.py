"""`steadytune report RUN`: pictures of a training run, drawn from RUN/metrics.jsonl.

Four panels against the optimizer step: train and validation loss, learning rate, tokens/s and
peak memory. `plot_run` returns the matplotlib Figure (a notebook shows it inline);
`write_report` saves one PNG per panel (loss.png, lr.png, throughput.png, memory.png), the combined
figure (metrics.png) and a self-contained report.html, in the run folder unless told otherwise.

Figures are built with matplotlib's object API (Figure + the Agg canvas), never pyplot, so making a
report neither needs a display nor changes the backend of the process that asked for it.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .progress import read_metrics

# One color per curve, so a curve can be found again in the PNG by its pixels.
COLORS = {"train_loss": "#1f77b4", "val_loss": "#ff7f0e", "lr": "#2ca02c", "tok_per_s": "#d62728",
          "peak_mem_gb": "#9467bd"}
# Preference runs (--method dpo|orpo) also log rewards; their panel is drawn only when they are there.
REWARD_COLORS = {"reward_accuracy": "#8c564b", "val_reward_accuracy": "#e377c2",
                 "reward_margin": "#17becf", "val_reward_margin": "#bcbd22"}
# GRPO runs (--method grpo) log their sampled answers' rewards; drawn only when they are there.
GRPO_COLORS = {"reward": "#8c564b", "val_reward": "#e377c2", "zero_std_groups": "#7f7f7f"}
# panel file name -> (title, y label, curves as (metric key, label))
PANELS = {
    "loss": ("Loss", "cross-entropy per target token",
             [("train_loss", "train"), ("val_loss", "validation")]),
    "lr": ("Learning rate", "learning rate", [("lr", "learning rate")]),
    "throughput": ("Throughput", "tokens/s", [("tok_per_s", "tokens/s")]),
    "memory": ("Peak memory", "GB", [("peak_mem_gb", "peak memory")]),
    "rewards": ("Preference rewards", "accuracy (share) / mean margin",
                [("reward_accuracy", "train accuracy"), ("val_reward_accuracy", "validation accuracy"),
                 ("reward_margin", "train margin"), ("val_reward_margin", "validation margin")]),
    "grpo": ("GRPO rewards", "mean reward / share of groups",
             [("reward", "sampled (train)"), ("val_reward", "greedy (validation)"),
              ("zero_std_groups", "groups with equal rewards")]),
}
OPTIONAL = {"rewards": REWARD_COLORS, "grpo": GRPO_COLORS}  # panels drawn only for the runs that log them


@dataclass
class Series:
    """Each metric as (steps, values), in step order, one value per step."""
    curves: dict  # metric key -> (list of steps, list of values)

    def get(self, key: str) -> tuple[list, list]:
        return self.curves.get(key, ([], []))


def metrics_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder; pass the folder steadytune train wrote "
                        "(runs/<timestamp> unless --out was given)")
    if not path.is_file():
        raise UserError(f"{path}: not found; this folder is not a training run, or the run has not "
                        "logged a step yet")
    return path


def load_series(run_dir: str | Path) -> Series:
    """Read metrics.jsonl; a torn last line (a run killed mid-write) is skipped, and a step
    logged twice keeps its last value."""
    path = metrics_path(run_dir)
    by_key: dict[str, dict[int, float]] = {k: {} for k in {**COLORS, **REWARD_COLORS, **GRPO_COLORS}}
    for rec in read_metrics(path):
        if not isinstance(rec.get("step"), int):
            continue
        if rec.get("event") == "train":
            for key in ("lr", "tok_per_s", "peak_mem_gb", "reward_accuracy", "reward_margin", "reward",
                        "zero_std_groups"):
                _put(by_key[key], rec, key, key)
            _put(by_key["train_loss"], rec, "loss", "train_loss")
        elif rec.get("event") == "val":
            for key in ("val_loss", "val_reward_accuracy", "val_reward_margin", "val_reward"):
                _put(by_key[key], rec, key, key)
    if not by_key["train_loss"] and not by_key["val_loss"]:
        raise UserError(f"{path}: no train or val records yet; wait for the first logged step "
                        "(training.log_every) and run the report again")
    return Series({k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_key.items() if v})


def _put(into: dict, rec: dict, field: str, key: str) -> None:
    v = rec.get(field)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        into[rec["step"]] = float(v)


def _draw_panel(ax, series: Series, name: str) -> None:
    title, ylabel, curves = PANELS[name]
    drawn = 0
    for key, label in curves:
        steps, values = series.get(key)
        if not steps:
            continue
        # A single point would be an invisible line: mark points when there are few.
        marker = "o" if len(steps) <= 20 else None
        ax.plot(steps, values, color={**COLORS, **REWARD_COLORS, **GRPO_COLORS}[key], label=label, marker=marker, markersize=4,
                linewidth=1.8, gid=key)
        drawn += 1
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn == 0:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif len(curves) > 1:
        ax.legend()
    if name == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def _new_figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself: savefig works with no pyplot and no display
    return fig


def plot_run(run_dir: str | Path, path: str | Path | None = None):
    """All four panels in one 2x2 figure; saved to `path` (PNG) when given. Returns the Figure."""
    series = load_series(run_dir)
    fig = _new_figure((11, 7.5))
    axes = fig.subplots(2, 2)
    for ax, name in zip(axes.flat, [n for n in PANELS if n not in OPTIONAL]):
        _draw_panel(ax, series, name)
    fig.suptitle(f"run {Path(run_dir).resolve().name}")
    if path is not None:
        fig.savefig(path)
    return fig


def plot_panel(run_dir: str | Path, name: str, path: str | Path | None = None, series=None):
    """One panel ('loss', 'lr', 'throughput', 'memory') as its own figure."""
    fig = _new_figure((6.4, 4.2))
    _draw_panel(fig.subplots(), series or load_series(run_dir), name)
    if path is not None:
        fig.savefig(path)
    return fig


def summary(run_dir: str | Path, series: Series) -> list[tuple[str, str]]:
    """Rows for the report's table: what ran and how it ended."""
    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    rows = [("run folder", str(run_dir)),
            ("model", str(cfg.get("model", {}).get("path", "?"))),
            ("data", str(cfg.get("data", {}).get("path", "?")))]
    steps, losses = series.get("train_loss")
    if steps:
        rows.append(("steps logged", f"{steps[-1]}"))
        rows.append(("last train loss", _num(losses[-1])))
    vsteps, vals = series.get("val_loss")
    if vals:
        rows.append(("last validation loss", f"{_num(vals[-1])} (step {vsteps[-1]})"))
        finite = [v for v in vals if math.isfinite(v)]
        if finite:
            rows.append(("best validation loss", _num(min(finite))))
    _, tps = series.get("tok_per_s")
    if tps:
        rows.append(("median tokens/s", f"{sorted(tps)[len(tps) // 2]:,.0f}"))
    _, mem = series.get("peak_mem_gb")
    if mem:
        rows.append(("peak memory", f"{max(mem):.2f} GB"))
    t = cfg.get("training", {})
    if t:
        rows.append(("batch x accumulation", f"{t.get('batch_size')} x {t.get('grad_accumulation')}"))
        rows.append(("learning rate", f"{t.get('learning_rate')} ({t.get('lr_schedule')})"))
    return rows


def _num(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else str(v)


def _config(run_dir: Path) -> dict:
    path = run_dir / "steadytune-config.yaml"  # written there when the user's config.yaml was in --out
    path = path if path.is_file() else run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return tree if isinstance(tree, dict) else {}


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """PNG per panel + metrics.png + report.html (images embedded: the page is one file)."""
    run_dir = Path(run_dir)
    series = load_series(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for name in PANELS:
        if name in OPTIONAL and not any(series.get(k)[0] for k in OPTIONAL[name]):
            continue  # not a preference (GRPO) run
        plot_panel(run_dir, name, out / f"{name}.png", series=series)
        images[name] = out / f"{name}.png"
    if plot_memory_trace(run_dir, out / "resident.png") is not None:  # only runs that log it (bench/soak.py)
        images["resident"] = out / "resident.png"
    plot_run(run_dir, out / "metrics.png")
    page = out / "report.html"
    page.write_text(_html(run_dir, series, images), encoding="utf-8")
    return page


# {"event": "memory", "step", "rss_gb", "mlx_active_gb", "mlx_cache_gb"} records, one per step
MEMORY_TRACE = ("Resident memory", [("rss_gb", "process RSS", "#9467bd"),
                                    ("mlx_active_gb", "MLX active", "#2ca02c"),
                                    ("mlx_cache_gb", "MLX cache", "#8c564b")])


def memory_trace(run_dir: str | Path) -> dict:
    """The per-step memory records' series, key -> (steps, GB); {} when the run logged none."""
    curves: dict[str, dict[int, float]] = {key: {} for key, _, _ in MEMORY_TRACE[1]}
    for rec in read_metrics(metrics_path(run_dir)):
        if rec.get("event") == "memory" and isinstance(rec.get("step"), int):
            for key in curves:
                _put(curves[key], rec, key, key)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in curves.items() if v}


def plot_memory_trace(run_dir: str | Path, path: str | Path | None = None):
    """Process RSS, MLX active and MLX cache memory per step, and active + cache: memory that grows
    over a long run shows here while the peak-memory panel stays flat. None without such records."""
    trace = memory_trace(run_dir)
    if not trace:
        return None
    fig = _new_figure((6.4, 4.2))
    ax = fig.subplots()
    for key, label, color in MEMORY_TRACE[1]:
        if key in trace:
            ax.plot(*trace[key], color=color, label=label, linewidth=1.5, gid=key)
    if "mlx_active_gb" in trace and "mlx_cache_gb" in trace:
        steps, active = trace["mlx_active_gb"]
        cache = dict(zip(*trace["mlx_cache_gb"]))
        ax.plot(steps, [a + cache.get(s, 0.0) for s, a in zip(steps, active)], color="#7f7f7f",
                linestyle="--", label="MLX active + cache", linewidth=1.2, gid="mlx_total")
    ax.set_title(MEMORY_TRACE[0])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("GB")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if path is not None:
        fig.savefig(path)
    return fig


def _title(name: str) -> str:
    return MEMORY_TRACE[0] if name == "resident" else PANELS[name][0]


def _html(run_dir: Path, series: Series, images: dict) -> str:
    esc = html.escape
    rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary(run_dir, series))
    figs = "\n".join(
        f'<figure><img alt="{esc(_title(n))}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{esc(_title(n))} '
        f"against optimizer step</figcaption></figure>" for n, p in images.items())
    title = esc(f"steadytune run {run_dir.resolve().name}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ text-align: left; padding: 0.25em 1em 0.25em 0; border-bottom: 1px solid #ddd; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 1em; }}
figure {{ margin: 0; }} img {{ max-width: 100%; }} figcaption {{ color: #666; font-size: 0.9em; }}
</style></head>
<body>
<h1>{title}</h1>
<table>
{rows}
</table>
<div class="grid">
{figs}
</div>
</body></html>
"""
