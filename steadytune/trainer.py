"""The training loop: `Trainer(cfg).fit()`.

    run = setup(cfg)                                  # setup.py: everything built once
    step = make_step(run)                             # step.py: one optimizer step
    for micro_batches, lr in schedule:                # batching.py: a pure plan per epoch
        result = step(micro_batches, lr, index)      # loss, token-weighted accumulation, update
        report, validate, checkpoint                  # progress.py, checkpoint.py

This module holds the loop and what it does between steps: the non-finite policy, reporting,
validation, checkpoints, signals, and out-of-memory/disk errors turned into advice.
"""

from __future__ import annotations

import errno
import math
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import checkpoint as ckpt
from . import faults
from .batching import layout_padding, lr_at, merge_micro_batches, padding_fraction, plan_epoch, planned_total
from .config import Config, apply_overrides, load_yaml
from .errors import UserError
from .progress import Metrics, Progress, first_step_note
from .resume import TrainState, snapshot
from .setup import Run, make_step, setup
from .step import StepResult


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a checkpoint was saved on SIGINT/SIGTERM; the CLI exits with 130."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"interrupted; checkpoint saved at {checkpoint}")
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    final_train_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    stopped: str                      # "completed", "max_steps", "early_stopping"
    history: list = field(default_factory=list)
    final_val: dict = field(default_factory=dict)  # the last validation's records (val_loss; GRPO: val_reward, ...)

    def plot(self, path=None):
        """Draw the run's metrics (train/val loss, lr, tokens/s, memory) as a figure."""
        from .report import plot_run

        return plot_run(self.run_dir, path)


def as_config(config=None, **overrides) -> Config:
    """A Config from a Config, a nested dict, a YAML path, or None (defaults), plus overrides
    given as section={key: value} keyword arguments."""
    if isinstance(config, Config):
        cfg = config
    elif isinstance(config, (str, Path)):
        cfg = apply_overrides(Config(), load_yaml(config), str(config))
    else:
        cfg = apply_overrides(Config(), config or {}, "config")
    if overrides:
        apply_overrides(cfg, overrides, "arguments")
    return cfg.validate()


def run(config=None, **overrides) -> TrainResult:
    return Trainer(as_config(config, **overrides)).fit()


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stop_signal = None
        self.writer = ckpt.Writer()  # checkpoints are written while the next steps train
        self.saved = (None, None)  # (step, folder) of the last checkpoint queued
        group = mx.distributed.init()
        self.rank, self.world = group.rank(), group.size()

    def prepare(self) -> Run:
        """Build everything the run needs (setup.setup) and its Step."""
        self.run = setup(self.cfg, self.rank, self.world)
        self.step = make_step(self.run)
        return self.run

    @property
    def state(self) -> TrainState:
        return self.run.state

    # --- the loop ------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """For each optimizer step: get its micro-batches, step, report, validate and checkpoint;
        then a last validation and the adapters."""
        run = self.run if hasattr(self, "run") else self.prepare()
        total = self.total_steps()
        self._open_outputs(total)
        stopped = "max_steps" if self.cfg.training.max_steps else "completed"
        try:
            with _SignalGuard(self):
                queued = None  # a step left in flight: its loss is read after the next is queued
                for micro_batches, lr, epoch_len in self.schedule(total):
                    self.writer.check()  # a checkpoint that failed to write stops the run here
                    tic = time.perf_counter()
                    pending = self.dispatch(micro_batches, lr)
                    self.state.advance(epoch_len)
                    here = (pending, self.state.step, self.state.epoch + self.state.pos / self.per_epoch, tic)
                    if queued:  # its time: from its queuing to this step's
                        self.settle(*queued, total, until=tic)
                        faults.crash("step")  # test hook: STEADYTUNE_TEST_CRASH=step:N dies after step N
                    queued = None
                    if self.pipeline and pending.in_flight and not self.due(total):
                        queued = here
                        continue
                    self.settle(*here, total)
                    done = self.validate_and_checkpoint(total)
                    faults.crash("step")
                    if done:
                        stopped = "early_stopping"
                        break
            records = {}
            if len(self.run.val_set):  # valid_fraction 0: no validation
                _, records = self.evaluate()
                self.metrics.log({"event": "val", "step": self.state.step, **records, "final": True})
            if shapes := getattr(self.step, "shapes", None):
                self.metrics.log({"event": "end", "step": self.state.step, "step_shapes": len(shapes["train"]),
                                  "val_shapes": len(shapes["val"])})
        except (RuntimeError, MemoryError, OSError) as e:
            self.writer.wait(raise_error=False)  # the checkpoint being written is finished first
            _raise_if_out_of_resources(e, self.cfg, run.run_dir, self.state.step + 1)
            raise
        except BaseException:
            self.writer.wait(raise_error=False)
            raise
        finally:
            self.bar.close()
            self.metrics.close()
        return self._finish(stopped, records)

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (with a token budget the step count can differ a
        little between epochs: the windows differ)."""
        t = self.cfg.training
        return t.max_steps or planned_total(lambda e: len(self.epoch_plan(e)), t.epochs,
                                            fixed=not t.batch_tokens)  # a huge --epochs: lazy

    def epoch_plan(self, epoch: int) -> list:
        """The optimizer steps of `epoch` (a pure function of data lengths, settings and seed; the
        same packed or not)."""
        t = self.cfg.training
        return plan_epoch(self.run.train_set.step_lengths(), t.batch_size, t.batch_tokens, t.grad_accumulation,
                          t.seed, epoch, self.cfg.data.group_by_length)

    def schedule(self, total: int):
        """(micro-batches, learning rate, steps of its epoch) of each step from the state's
        position on; the caller advances the state after each."""
        s, t = self.state, self.cfg.training
        while s.step < total:
            plan = self.epoch_plan(s.epoch)
            for micro_batches in plan[s.pos:s.pos + total - s.step]:
                yield micro_batches, lr_at(s.step, t.learning_rate, t.warmup_steps, total, t.lr_schedule), len(plan)

    # Steps are left in flight (pipelined): the next step is queued before a step's loss is
    # read, except where something must see that step's result first (due). Same values; at a
    # few examples a step the device no longer idles while the host prepares the next one.
    pipeline = True

    def due(self, total: int) -> bool:
        """Whether the step just queued must be finished before the next is queued: a validation
        or checkpoint reads its weights (eval/save steps, an epoch's end, the last step), a signal
        asks for a checkpoint, several processes agree on signals every step, and a process's
        first step is timed alone (its `startup` record)."""
        s, t = self.state, self.cfg.training
        return bool(s.step == total or s.pos == 0 or self.stop_signal or self.world > 1
                    or "compile_s" not in self.run.timings
                    or (t.eval_every and s.step % t.eval_every == 0 and len(self.run.val_set))
                    or (t.save_every and s.step % t.save_every == 0))

    def settle(self, pending, step: int, epoch_f: float, tic: float, total: int,
               until: float | None = None) -> StepResult:
        """Read a queued step's result (waits for it), apply the non-finite policy, report it. Its
        time is from its queuing (tic) to `until` (the next step's queuing, for a step left in
        flight), else to now: queuing a step waits for the device to make room (MLX holds few
        command buffers in flight), so the steps' times partition the wall clock without
        counting any of it twice."""
        result = pending.result()
        self._check_finite(result, step)
        self.report(result, (until or time.perf_counter()) - tic, total, step, epoch_f)
        return result

    def dispatch(self, micro_batches, lr: float):
        """One optimizer step queued at the state's step number (step.Step.dispatch: its
        `.result()` waits for it)."""
        return self.step.dispatch(micro_batches, lr, self.state.step)

    def train_step(self, micro_batches, lr: float) -> StepResult:
        """One optimizer step (step.Step) at the state's step number, waited for; a non-finite
        loss or norm (the update was skipped on the device) is a warning, max_nonfinite in a row
        stop the run."""
        result = self.step(micro_batches, lr, self.state.step)
        self._check_finite(result, self.state.step + 1)
        return result

    def _check_finite(self, result: StepResult, step: int) -> None:
        if result.finite:
            self.state.nonfinite = 0
        else:
            self._nonfinite(result.loss, result.norm, step)

    def _nonfinite(self, loss, norm, step: int):
        s, t = self.state, self.cfg.training
        s.nonfinite += 1
        print(f"warning: step {step}: non-finite loss ({loss}), gradient norm or updated "
              f"weights (norm {norm}); update skipped")
        if s.nonfinite >= t.max_nonfinite:
            raise UserError(
                f"step {step}: {s.nonfinite} non-finite losses/gradients in a row; training "
                "stopped (the last good checkpoint is untouched). Likely causes: learning rate too high "
                f"({t.learning_rate}), float16 overflow (use --dtype bfloat16 or float32), or broken data")

    # --- reporting, validation, checkpoints ----------------------------------------------------

    def _open_outputs(self, total: int) -> None:
        """Metrics file and progress display; only rank 0 writes metrics, checkpoints and
        adapters, and draws progress."""
        cfg, zero = self.cfg, self.rank == 0
        self.metrics = Metrics(self.run.run_dir / "metrics.jsonl", cfg.output.log_to, cfg.to_dict()) if zero else _NoMetrics()
        self.bar = Progress(total, self.state.step, cfg.output.progress if zero else "none", log_every=cfg.training.log_every)
        self.window = {"loss": 0.0, "tokens": 0, "real": 0, "time": 0.0}
        self.per_epoch = len(self.epoch_plan(0))
        self._announce(total)

    def report(self, result: StepResult, seconds: float, total: int, step: int, epoch_f: float) -> float:
        """Progress after step `step` (1-based; at epoch_f epochs), a train record every log_every
        steps (token-weighted mean loss and tokens/s since the last record); after this process's
        first step, the `startup` record (its step time is mostly compilation). Returns the mean
        loss of the window."""
        t, w = self.cfg.training, self.window
        if "compile_s" not in self.run.timings:
            self.run.timings["compile_s"] = seconds
            self.metrics.log({"event": "startup", "step": step - 1,
                              **{k: round(v, 3) for k, v in self.run.timings.items()}})
        w["time"] += seconds
        if math.isfinite(result.loss):
            w["loss"] += result.loss * result.tokens
            w["tokens"] += result.tokens
        w["real"] += result.real
        tps = w["real"] / w["time"] if w["time"] else 0.0
        peak = mx.get_peak_memory() / 1e9
        mean = w["loss"] / w["tokens"] if w["tokens"] else float("nan")
        self.last_loss = mean
        self.bar.update(step, epoch_f, mean, tps, peak, self.step.progress())
        if step % t.log_every == 0 or step == total:
            self.metrics.log({"event": "train", "step": step, "epoch": round(epoch_f, 4), "loss": mean,
                              "tokens": w["tokens"], "lr": lr_at(step - 1, t.learning_rate,
                                                                 t.warmup_steps, total, t.lr_schedule),
                              "tok_per_s": round(tps, 1), "peak_mem_gb": round(peak, 3),
                              **self.step.window()})  # the objective's own statistics (rewards, ...)
            w.update(loss=0.0, tokens=0, real=0, time=0.0)
        return mean

    def validate_and_checkpoint(self, total: int) -> bool:
        """Validate every eval_every steps, checkpoint when due (every save_every steps, at the end
        of an epoch, at a new best, on a signal); True when early stopping says to stop."""
        s, t, run = self.state, self.cfg.training, self.run
        improved = False
        if t.eval_every and s.step % t.eval_every == 0 and s.step < total and len(run.val_set):
            val, records = self.evaluate()
            # Validation's buffers (other shapes than the step's) would stay in MLX's cache beside
            # the step's, and the cache creeps up validation after validation (bench/soak.py);
            # freed here, it holds about one step's worth. Costs one re-allocation per validation.
            mx.clear_cache()
            self.metrics.log({"event": "val", "step": s.step, **records})
            first = next(iter(records))
            self.bar.write(f"step {s.step}: {first} {records[first]:.4f}")
            improved = s.track_best(val)
        due = (t.save_every and s.step % t.save_every == 0) or s.pos == 0 or improved
        if self.world > 1:  # every rank must stop at the same step, whichever got the signal
            self.stop_signal = int(mx.distributed.all_sum(mx.array(int(bool(self.stop_signal)))).item())
        if (due or self.stop_signal) and self.rank == 0:
            self.save_checkpoint(best=improved)
        if self.stop_signal:
            self.writer.wait()
            raise TrainingInterrupted(run.run_dir / "checkpoints" / f"{ckpt.PREFIX}{s.step:07d}")
        if t.patience and s.bad_evals >= t.patience:
            self.bar.write(f"early stopping: no improvement in {t.patience} validations")
            return True
        return False

    def evaluate(self) -> tuple[float, dict]:
        """The objective's held-out score (lower is better; SFT: the token-weighted mean loss) and
        the records of its `val` event (objectives.Objective.validate)."""
        return self.run.objective.validate(self.step, self.run)

    def save_checkpoint(self, best: bool = False) -> Path:
        """The step's checkpoint, written on the writer's thread while training goes on (then
        best/ as links to it, then pruning); complete once `self.writer.wait()` returns."""
        run, keep = self.run, self.cfg.output.keep_last
        path = ckpt.save(run.run_dir, run.state.step, run.model, run.optimizer, run.adapter_config,
                         snapshot(run), writer=self.writer)
        if best:  # the same contents: best/ shares the step's files
            self.writer.submit(lambda: ckpt.save_as(path, "best"))
        self.writer.submit(lambda: ckpt.prune(run.run_dir, keep, protect={"best"}))
        self.saved = (run.state.step, path)
        return path

    def _finish(self, stopped: str, final_val: dict) -> TrainResult:
        """The adapters in mlx-lm's format (rank 0) and the result."""
        from .progress import read_metrics

        run, s = self.run, self.state
        self.writer.wait()
        if self.rank == 0:  # the last checkpoint's adapters, when it is of the last step
            same = self.saved[1] if self.saved[0] == s.step else None
            ckpt.save_final_adapters(run.run_dir, run.model, run.adapter_config, same_as=same)
            print(f"adapters saved to {run.run_dir / 'adapters'}")
        shapes = getattr(self.step, "shapes", None)
        if shapes is not None and self.rank == 0:  # each distinct shape compiles once (seconds on a GPU)
            print(f"compiled step shapes: {len(shapes['train'])} training, {len(shapes['val'])} validation")
        return TrainResult(run.run_dir, s.step, s.epoch, getattr(self, "last_loss", None), final_val.get("val_loss"),
                           s.best_val_loss, stopped, read_metrics(run.run_dir / "metrics.jsonl"), final_val)

    def _announce(self, total: int) -> None:
        from .backend import device_kind, fast_blas
        from .model import describe_parameters

        run = self.run
        lens = run.train_set.lengths()
        notes = list(run.splits.notes)
        if run.train_set.truncated:
            notes.append(f"{run.train_set.truncated} examples truncated to max_seq_length "
                         f"{self.cfg.data.max_seq_length}")
        blas = fast_blas() or ("none: CPU matmuls use the slow reference BLAS; install libopenblas0-pthread"
                               if device_kind() == "cpu" else "n/a")
        plan = self.epoch_plan(0)
        if run.pack_target:
            calls = [call for step in plan for call in merge_micro_batches(step, run.merge)]
            pad = layout_padding(calls, lens, run.pack_target, device_kind(), getattr(self.step, "pair", 0.0),
                                 getattr(self.step, "floor", 128))
        else:
            pad = padding_fraction([[int(lens[i]) for i in mb] for step in plan for mb in step],
                                   bucket=getattr(self.step, "bucket_rows", False))
        for line in notes + [
            f"run folder: {run.run_dir}",
            f"model: {run.loaded.source} ({device_kind()}, fast BLAS: {blas})",
            describe_parameters(run.model),
            *run.objective.describe(run, len(plan), total, pad),
            *filter(None, [first_step_note(device_kind())]),
        ]:
            self.bar.write(line)


_OOM = re.compile(r"out of memory|unable to allocate|attempting to allocate|insufficient memory|"
                  r"outofmemory|memoryallocation", re.IGNORECASE)
_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
def _raise_if_out_of_resources(e: BaseException, cfg: Config, run_dir: Path, step: int) -> None:
    """Out of memory (MLX raises RuntimeError: "[malloc] Unable to allocate ...", "[metal::malloc]
    Attempting to allocate ...") or a full/read-only disk mid-run: a UserError that says what to
    change and that the last complete checkpoint is intact. Anything else: return (re-raised)."""
    from .plan import advice

    last, _ = ckpt.latest(run_dir)
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _OOM.search(str(e))):
        what = " ".join(str(e).split())[:200] or type(e).__name__
        kept = (f"The last complete checkpoint, {last}, is intact: rerun with --resume "
                "--grad-checkpoint true to continue it with less memory (a smaller batch or sequence "
                "length needs a new --out)" if last else "No checkpoint was written yet")
        raise UserError(f"out of memory at step {step} ({what}). {advice(cfg)}. {kept}") from None
    if isinstance(e, OSError) and e.errno in _DISK:
        kept = (f"the last complete checkpoint, {last}, is intact: rerun with --resume"
                if last else "no checkpoint was written yet")
        raise UserError(f"{e.filename or run_dir}: cannot write at step {step} ({e.strerror}); free "
                        f"disk space or fix permissions; {kept}") from None


def batches_line(t, pack_target: int, merge: int) -> str:
    """What --batch-size and --grad-accumulation mean in this run, in one line."""
    what = (f"micro-batches of up to {t.batch_tokens} padded tokens (a varying number of examples)"
            if t.batch_tokens else f"micro-batches of {t.batch_size} example{'s' * (t.batch_size != 1)}")
    line = f"batches: {what}, {t.grad_accumulation} per optimizer step"
    if pack_target:
        line += (f"; each call's examples packed into rows of up to {pack_target} positions (wider for a "
                 "longer example), attention inside each example")
    else:
        line += "; one example a row, padded"
    if merge > 1:
        line += f"; {merge} micro-batches run as one call (they fit in memory; --merge-micro-batches off to stop)"
    return line


class _NoMetrics:
    """Metrics sink of ranks other than 0."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class _SignalGuard:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and raises
    TrainingInterrupted (exit status 130 from the CLI). A second signal interrupts at once."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.old = trainer, {}

    def _handler(self, signum, frame):
        if self.trainer.stop_signal:
            raise KeyboardInterrupt
        self.trainer.stop_signal = signum

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)
        return False
