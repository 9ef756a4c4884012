"""What only Apple Silicon does: the device choice, compute `auto`, progress during long Metal steps,
Metal's memory reading and a short training run on the GPU. They run on a Mac (CI: macos-14) and are
skipped elsewhere; every other test computes on the CPU, on a Mac too (conftest.cpu_by_default)."""

from __future__ import annotations

import io
import threading
import time

import mlx.core as mx

from conftest import make_chat_data, metal_only
from steadytune import backend, qlora
from steadytune.plan import device_memory
from steadytune.progress import Progress


@metal_only
def test_a_mac_computes_on_metal_in_half_precision():
    assert backend.device_kind() == "metal"
    # bfloat16 for a folder base; float16 for a GGUF base, whose scales are float16
    assert backend.compute_dtype("auto", "folder") == mx.bfloat16
    assert backend.compute_dtype("auto", "gguf") == mx.float16


@metal_only
def test_compute_auto_is_native_quantized_matmul_on_metal():
    assert qlora.resolve_mode("auto") == "native"


@metal_only
def test_peak_memory_reads_what_a_metal_computation_allocated():
    n = 64 * 1024 * 1024  # 256 MB of float32
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    x = mx.ones((n,), dtype=mx.float32) * 2
    mx.eval(x)
    assert mx.get_peak_memory() >= 4 * n
    assert backend.memory_gb()["total"] > 0
    avail, source = device_memory("metal")
    assert avail > 4 * n and source == "Metal's recommended working set"
    del x


@metal_only
def test_progress_keeps_drawing_around_a_long_metal_step():
    """The display adds no thread, and while a long GPU step runs the Python side is not blocked
    (MLX releases the GIL while it waits on the device): a ticker thread keeps ticking, and the
    bar is drawn right after the step."""
    out = io.StringIO()
    threads = threading.active_count()
    bar = Progress(total=2, mode="bar", stream=out)
    assert threading.active_count() == threads  # no monitor thread
    ticks, stop = [], threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.01)

    t = threading.Thread(target=ticker)
    t.start()
    a = mx.random.normal((2048, 2048), key=mx.random.key(0))
    start = time.perf_counter()
    y = a
    for _ in range(200):  # ~3.4 TFLOP: a second or more on an M1-class GPU
        y = (y @ a) * (1.0 / 2048)
    mx.eval(y)
    took = time.perf_counter() - start
    bar.update(1, 0.5, 1.0, 100.0, mx.get_peak_memory() / 1e9)
    stop.set()
    t.join()
    bar.close()
    during = [x for x in ticks if start <= x <= start + took]
    # a blocked GIL would leave a gap as long as the step; 10 ms ticks allow a few skipped
    assert took < 0.2 or len(during) >= 0.25 * took / 0.01, (took, len(during))
    assert "1/2" in out.getvalue()


@metal_only
def test_a_short_run_trains_on_metal_with_the_cache_limited(tiny_model, tmp_path):
    from steadytune.trainer import run

    data = make_chat_data(tmp_path / "data", 8)
    result = run({"model": {"path": str(tiny_model)}, "data": {"path": str(data)},
                  "training": {"max_steps": 3, "batch_size": 2, "eval_every": 0, "log_every": 1},
                  "output": {"dir": str(tmp_path / "run"), "progress": "none"}})
    train = [r for r in result.history if r.get("event") == "train"]
    assert len(train) == 3 and all(r["loss"] == r["loss"] for r in train)  # finite, not NaN
    assert all(r["peak_mem_gb"] > 0 for r in train)
    limit = backend.cache_limit()
    assert limit is not None and 0 < limit <= device_memory("metal")[0]
