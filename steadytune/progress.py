"""Progress and metrics that never hang.

The display is drawn from the training thread right after each step has been evaluated; there is
no monitor thread (tqdm's is switched off) that could hold the GIL or a lock while MLX waits on the
device. Three modes: a tqdm bar in a terminal or Jupyter, plain periodic lines when output goes to a
file (no carriage returns), or nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """Optimizer-step progress: epoch, loss, tokens/s, ETA, peak memory."""

    def __init__(self, total: int, initial: int = 0, mode: str = "auto", stream=None,
                 line_every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.total, self.n = total, initial
        if mode == "auto":
            tty = hasattr(self.stream, "isatty") and self.stream.isatty()
            mode = "bar" if (tty or _in_notebook()) else "lines"
        self.mode = mode
        self.line_every_s = line_every_s
        self._last_line = 0.0
        self._t0 = time.perf_counter()
        self._n0 = initial
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm
            from tqdm.auto import tqdm as auto_tqdm

            tqdm.monitor_interval = 0  # no monitor thread
            cls = auto_tqdm if _in_notebook() else tqdm
            try:
                self.bar = cls(total=total, initial=initial, unit="step", dynamic_ncols=True,
                               file=None if _in_notebook() else self.stream)
            except ImportError:  # tqdm.notebook without ipywidgets
                self.bar = tqdm(total=total, initial=initial, unit="step", file=self.stream)

    def update(self, step: int, epoch: float, loss: float, tok_per_s: float, peak_gb: float) -> None:
        self.n = step
        elapsed = time.perf_counter() - self._t0
        done = step - self._n0
        eta = elapsed / done * (self.total - step) if done else 0.0
        fields = {"epoch": f"{epoch:.2f}", "loss": f"{loss:.4f}", "tok/s": f"{tok_per_s:,.0f}",
                  "peak": f"{peak_gb:.2f}GB"}
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self._last_line >= self.line_every_s or step >= self.total:
                self._last_line = now
                kv = " ".join(f"{k}={v}" for k, v in fields.items())
                print(f"step {step}/{self.total} {kv} eta={_fmt_time(eta)}", file=self.stream, flush=True)

    def write(self, msg: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream if not _in_notebook() else None)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Metrics:
    """Appends one JSON object per line to RUN/metrics.jsonl, flushed per line; optionally
    TensorBoard too. On resume the file is first cut back to the checkpoint's step, so no step
    is duplicated or missing."""

    def __init__(self, path: Path, sinks=("jsonl",)):
        self.path = Path(path)
        self.f = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter  # type: ignore
            except ImportError:
                try:
                    from tensorboardX import SummaryWriter  # type: ignore
                except ImportError:
                    SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k not in ("event", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['event']}/{k}", v, step)

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records with step <= last_step (atomically), dropping a torn last line."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= last_step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out
