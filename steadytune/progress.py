"""Progress and metrics that never hang.

The display is drawn from the training thread right after each step has been evaluated; there is
no monitor thread (tqdm's is switched off) that could hold the GIL or a lock while MLX waits on the
device. Three modes: a tqdm bar in a terminal or Jupyter, plain lines when output goes to a file (no
carriage returns: one every `log_every` steps, and one at least every minute while steps are slow),
or nothing. The ETA is measured on steady steps only: the first step of a process includes
compiling the step functions and can take as long as dozens of later steps.

Metrics go to RUN/metrics.jsonl and, optionally, TensorBoard, Weights & Biases and MLflow: the same
records, with the run's config as W&B config / MLflow parameters.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

from .errors import UserError

# steps at the start of a process left out of the ETA: the first one compiles the step functions
WARMUP_STEPS = 1
# the longest the line display stays silent, whatever log_every says (slow steps: large models)
MAX_SILENCE_S = 60.0


def first_step_note(device: str) -> str | None:
    """The line said before a GPU run's first step, which nothing else explains while it lasts
    (no step line is drawn until a step ends): on a machine whose MLX kernel cache is empty, the
    first step also compiles MLX's CUDA kernels. Measured on H100s: about 60 s for a dense 7B,
    178 s for a Qwen3-30B-A3B-shaped MoE, over 290 s for a Qwen3-Next-shaped hybrid
    (bench/RESULTS.md). MLX keeps them on disk (MLX_PTX_CACHE_DIR, else the temp folder)."""
    if device != "cuda":
        return None
    where = os.environ.get("MLX_PTX_CACHE_DIR") or "the temp folder; MLX_PTX_CACHE_DIR moves it"
    return ("note: step 1 compiles the training step; a machine's first run also compiles MLX's CUDA "
            "kernels: about a minute for a dense model, 3 to 5 minutes or more for a MoE or hybrid model, "
            f"with no step line until it ends (kept for later runs in {where})")


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


def steady_eta(t_from: float, step_from: int, now: float, step: int, total: int) -> float | None:
    """Seconds left at the pace of the steps since (t_from, step_from), the end of the warm-up
    steps; None until one steady step is done."""
    if step <= step_from:
        return None
    return (now - t_from) / (step - step_from) * (total - step)


class Progress:
    """Optimizer-step progress: epoch, loss, tokens/s, ETA, peak memory."""

    def __init__(self, total: int, initial: int = 0, mode: str = "auto", stream=None, log_every: int = 10,
                 max_silence_s: float = MAX_SILENCE_S, clock=time.perf_counter):
        self.stream = stream or sys.stderr
        self.total, self.n = total, initial
        if mode == "auto":
            tty = hasattr(self.stream, "isatty") and self.stream.isatty()
            mode = "bar" if (tty or _in_notebook()) else "lines"
        self.mode = mode
        self.log_every, self.max_silence_s, self.clock = max(1, log_every), max_silence_s, clock
        self._last_line = clock()
        self._steady = None  # (time, step) at the end of the warm-up steps
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

    def update(self, step: int, epoch: float, loss: float, tok_per_s: float, peak_gb: float,
               extra: dict | None = None) -> None:
        """`extra`: the objective's own fields (step.progress(): GRPO's reward), shown after the loss."""
        self.n = step
        now = self.clock()
        if self._steady is None and step - self._n0 >= WARMUP_STEPS:
            self._steady = (now, step)
        eta = steady_eta(*self._steady, now, step, self.total) if self._steady else None
        fields = {"epoch": f"{epoch:.2f}", "loss": f"{loss:.4f}", **(extra or {}), "tok/s": f"{tok_per_s:,.0f}",
                  "peak": f"{peak_gb:.2f}GB"}
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.mode == "lines":
            if (step % self.log_every == 0 or step >= self.total
                    or now - self._last_line >= self.max_silence_s):
                self._last_line = now
                kv = " ".join(f"{k}={v}" for k, v in fields.items())
                left = "--:--" if eta is None else _fmt_time(eta)
                print(f"step {step}/{self.total} {kv} eta={left}", file=self.stream, flush=True)

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


# sink -> (module to import, pip extra of steadytune)
OPTIONAL_SINKS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_sinks(sinks) -> None:
    """Refuse, before anything loads, a metrics sink whose package is missing (one line each)."""
    for name in sinks:
        if name in OPTIONAL_SINKS and importlib.util.find_spec(OPTIONAL_SINKS[name][0]) is None:
            _missing(name)


def summary_writer():
    """tensorboardX's SummaryWriter, else PyTorch's (None: neither is installed). The steadytune
    program hides torch for a fast start (cli.hide_torch); by now the tokenizers are loaded, so
    torch may come back for its writer."""
    for name in ("tensorboardX", "torch.utils.tensorboard"):
        if name.startswith("torch.") and "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
        try:
            return importlib.import_module(name).SummaryWriter
        except ImportError:
            continue
    return None


def _missing(name: str):
    module, extra = OPTIONAL_SINKS[name]
    raise UserError(f"output.log_to: {name} needs the {module} package, which is not installed; run "
                    f"pip install 'steadytune[{extra}]', or leave {name} out of --log-to")


def _import(name: str):
    try:
        return importlib.import_module(OPTIONAL_SINKS[name][0])
    except ImportError:
        _missing(name)


def _scalars(record: dict) -> dict:
    """The record's numbers, keyed event/name (bools and None left out)."""
    return {f"{record.get('event', 'train')}/{k}": float(v) for k, v in record.items()
            if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class WandbSink:
    """A Weights & Biases run per run folder: its id is kept in RUN/wandb-run-id, so a resumed
    run continues the same W&B run. Project from WANDB_PROJECT (default steadytune); WANDB_MODE,
    WANDB_DIR and the rest of W&B's environment apply as usual (local files go to the run folder
    unless WANDB_DIR says otherwise)."""

    def __init__(self, run_dir: Path, config: dict | None):
        wandb = _import("wandb")
        id_file = run_dir / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "steadytune"), name=run_dir.name,
                              id=run_id, resume="allow" if run_id else None, config=config or {},
                              dir=os.environ.get("WANDB_DIR") or str(run_dir), allow_val_change=True)
        id_file.write_text(self.run.id)

    def log(self, record: dict) -> None:
        values = _scalars(record)
        if values:
            self.run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """An MLflow run per run folder (id kept in RUN/mlflow-run-id; a resumed run continues it),
    through MlflowClient, so no global active run is left behind. Tracking URI from
    MLFLOW_TRACKING_URI, experiment from MLFLOW_EXPERIMENT_NAME (default steadytune); the run's
    config is logged once as parameters (MLflow refuses to change a parameter)."""

    def __init__(self, run_dir: Path, config: dict | None):
        mlflow = _import("mlflow")
        from mlflow.entities import Metric, Param

        self.Metric = Metric
        self.client = mlflow.MlflowClient()
        id_file = run_dir / "mlflow-run-id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "steadytune")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        id_file.write_text(self.run_id)
        params = [Param(k, str(v)[:500]) for k, v in _flat(config or {}).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, record: dict) -> None:
        ms, step = int(time.time() * 1000), int(record.get("step", 0))
        metrics = [self.Metric(k, v, ms, step) for k, v in _scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _open_sink(name: str, run_dir: Path, config: dict | None):
    """A W&B or MLflow sink; its own start-up failures (no login, no tracking store) as one line."""
    try:
        return {"wandb": WandbSink, "mlflow": MlflowSink}[name](run_dir, config)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001  (each raises its own types)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        hint = {"wandb": "log in with `wandb login`, or set WANDB_MODE=offline",
                "mlflow": "set MLFLOW_TRACKING_URI to your tracking server or store"}[name]
        raise UserError(f"output.log_to: {name} could not start ({type(e).__name__}: {first}); {hint}, "
                        f"or leave {name} out of --log-to") from None


class Metrics:
    """Appends one JSON object per line to RUN/metrics.jsonl, flushed per line; optionally
    TensorBoard, W&B and MLflow too (the same records). On resume the file is first cut back to
    the checkpoint's step, so no step is duplicated or missing."""

    def __init__(self, path: Path, sinks=("jsonl",), config: dict | None = None):
        self.path = Path(path)
        try:
            self.f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise _unwritable(self.path, e) from None
        self.remote = []
        for name in sinks:
            if name in OPTIONAL_SINKS:
                self.remote.append(_open_sink(name, self.path.parent, config))
        self.tb = None
        if "tensorboard" in sinks and (writer := summary_writer()) is not None:
            self.tb = writer(str(self.path.parent / "tensorboard"))

    def log(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k not in ("event", "step") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['event']}/{k}", v, step)
        for sink in self.remote:
            sink.log(record)

    def close(self) -> None:
        self.f.close()
        for sink in self.remote:
            sink.close()
        if self.tb is not None:
            self.tb.close()


def _unwritable(path: Path, e: OSError) -> UserError:
    what = "is a folder, not a file" if path.is_dir() else f"cannot be read and rewritten ({e.strerror or e})"
    return UserError(f"{path}: the run's metrics log {what}; make it a writable file (or move it away "
                     "to start a new log), then run again")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records with step <= last_step (atomically), dropping a torn last line."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    tmp, made = path.with_name(f".{path.name}.tmp-{os.getpid()}"), False
    try:
        if not path.is_file():
            raise IsADirectoryError(21, "not a file", str(path))
        keep = [json.dumps(rec) for rec in read_metrics(path) if rec.get("step", 0) <= last_step]
        with open(tmp, "x", encoding="utf-8") as f:
            made = True
            f.write("".join(k + "\n" for k in keep))
        os.replace(tmp, path)
        with open(path, "a", encoding="utf-8"):
            pass  # the file the run appends to: refused now, not after the first step
    except OSError as e:
        if made and tmp.is_file():
            tmp.unlink()
        raise _unwritable(path, e) from None


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in order; a torn line (a run killed mid-write) is skipped.
    The one reader of the file (the trainer's result, truncation on resume, report)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
