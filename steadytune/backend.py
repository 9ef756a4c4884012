"""Backend facts: which device MLX computes on, and a fast BLAS on Linux CPUs.

MLX's Linux CPU wheel links the reference BLAS (~8 GFLOP/s on a 1024^3 float32 matmul). Loading
OpenBLAS with RTLD_GLOBAL *before* mlx is imported makes MLX's cblas calls resolve to it (~257
GFLOP/s, ~30x). That only works before the first `import mlx`, which is why `steadytune/__init__.py`
calls `use_fast_blas()` first thing; `doctor` and the training log say whether it took effect.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_state = {"blas": None}  # path of the fast BLAS loaded, or a reason it was not

# MLX's CUDA backend records kernels into CUDA graphs and keeps the last 100 instantiated graphs
# (MLX_CUDA_GRAPH_CACHE_SIZE). Training on data of varying length runs a handful of batch shapes,
# each with its own graphs, and 100 evicts them between steps of different shapes. Measured on an
# H100 (7B, --batch-tokens 4096, bench/RESULTS.md): 1000 gave +18% on alpaca and +15% on wikisql,
# fixed-length steps unchanged; 4000 ran out of GPU memory (instantiated graphs live outside
# MLX's allocator). Read by MLX when the first graph is cached, so set before any GPU work; a
# value the user set is kept. No effect on the CPU or Metal.
CUDA_GRAPH_CACHE_SIZE = "1000"


def tune_mlx_env() -> None:
    os.environ.setdefault("MLX_CUDA_GRAPH_CACHE_SIZE", CUDA_GRAPH_CACHE_SIZE)


def device_from_env() -> None:
    """STEADYTUNE_DEVICE=cpu (or gpu) makes MLX compute there by default. The test suite runs with
    cpu on a Mac, so the same numbers are checked on every machine and the Metal tests choose the
    GPU themselves; a user can take the CPU of a Mac the same way. Other values are ignored, and
    mlx is imported only when the variable is set."""
    want = os.environ.get("STEADYTUNE_DEVICE", "").strip().lower()
    if want in ("cpu", "gpu"):
        import mlx.core as mx

        mx.set_default_device(mx.cpu if want == "cpu" else mx.gpu)


def use_fast_blas() -> str | None:
    """Load OpenBLAS globally if this is Linux, it exists, and mlx is not imported yet."""
    if _state["blas"] is not None:
        return _state["blas"]
    if not sys.platform.startswith("linux") or os.environ.get("STEADYTUNE_NO_FAST_BLAS"):
        _state["blas"] = ""
        return ""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if "openblas" in preloaded:
        _state["blas"] = preloaded
        return preloaded
    if "mlx.core" in sys.modules:
        _state["blas"] = ""  # too late: mlx already bound the reference BLAS
        return ""
    for path in OPENBLAS_CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                _state["blas"] = path
                return path
            except OSError:
                continue
    _state["blas"] = ""
    return ""


def fast_blas() -> str:
    """The fast BLAS in use ('' if none)."""
    return _state["blas"] or ""


def device_kind() -> str:
    """'cpu', 'cuda' or 'metal'."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    if sys.platform == "darwin":
        return "metal"
    return "cuda"


def compute_dtype(name: str, source_kind: str = "folder"):
    """The compute dtype for `model.dtype`. auto: float32 on the CPU; on a GPU bfloat16, except
    for GGUF bases, whose quantization scales are float16: rounding them to bfloat16 moves the
    default model's logits by up to 1.5, so GGUF bases compute in float16."""
    import mlx.core as mx

    if name == "auto":
        if device_kind() == "cpu":
            name = "float32"
        else:
            name = "float16" if source_kind == "gguf" else "bfloat16"
    return getattr(mx, name)


def memory_gb() -> dict:
    """Device memory facts in GB: total (what MLX may use), active, peak."""
    import mlx.core as mx

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    total = info.get("memory_size") or info.get("total_memory") or 0
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 0
    return {"total": total / 1e9, "active": mx.get_active_memory() / 1e9, "peak": mx.get_peak_memory() / 1e9}


def cache_limit_bytes(available: float, required: float, step: float | None = None) -> int:
    """How much MLX's buffer cache may keep: the planner's headroom, the memory the device offers
    minus what the run needs. MLX keeps freed buffers for reuse up to its cache limit, which by
    default is its memory limit (1.5x Metal's recommended working set): with data of varying
    length every new batch shape leaves buffers behind, so active + cache can grow past the
    working set until macOS swaps while the reported peak (active only) stays flat. Capped at the
    headroom, active + cache stays within what the planner counted as available.

    `step` (the CPU): the plan's memory of its largest call, what a call allocates and frees
    (activations, logits, work in flight); the cache is capped at that too. MLX reuses a cached
    buffer only for a request of about its size: one call's buffers serve the next call of that
    shape and every call's shape-free ones (each layer's dequantized weight), and more holds
    sizes of shapes that recur only after several others. On the CPU those are resident memory
    of this process that other jobs on a shared machine cannot have, while what they save is
    page faults. Measured (SmolLM2, alpaca steps of 4 mixed examples, 2 cores; bench/RESULTS.md):
    a 10 GB cache grew to 5.4 GB in 3 steps for no speed gain over MLX's CPU default of 32 MiB
    (63.4 vs 66.7 s, within the load's noise); alpaca runs with the headroom as limit were
    OOM-killed at 18 GB resident, MLX's peak 6 GB."""
    headroom = max(0, int(available - required))
    return headroom if step is None else min(headroom, int(step))


def limit_cache(plan) -> int | None:
    """Set MLX's cache limit from a memory plan (steadytune.plan.Plan; None: not planned, left as
    is). Returns the limit set, in bytes; `cache_limit()` reads it back for the log and doctor."""
    if plan is None or not plan.available:
        return None
    import mlx.core as mx

    b = plan.breakdown
    step = b.activations + b.logits + b.in_flight if device_kind() == "cpu" else None
    limit = cache_limit_bytes(plan.available, b.required, step)
    mx.set_cache_limit(limit)
    _state["cache_limit"] = limit
    return limit


def cache_limit() -> int | None:
    """The cache limit limit_cache() set in this process (None: MLX's default)."""
    return _state.get("cache_limit")
