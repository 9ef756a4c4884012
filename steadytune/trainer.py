"""The training loop.

    for each optimizer step of each epoch:
        get the step's micro-batches -> forward, loss + gradients (summed over micro-batches)
        -> check finite, clip, update -> evaluate the state -> report, validate, checkpoint

Loss and gradients are token-weighted over the whole accumulation group: each micro-batch's summed
cross-entropy is divided by the target tokens of the *whole group* (known before any compute), so
an update equals the one a single batch of all those examples would give. The step functions are
compiled with the model, optimizer and random state as inputs/outputs, and that state is evaluated
every step, so the lazy graph never grows.
"""

from __future__ import annotations

import errno
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import checkpoint as ckpt
from .batching import (examples_of, lr_at, pack_batch, pack_width, packed_padding_fraction, pad_batch,
                       padding_fraction, plan_epoch, shard)
from .config import Config, apply_overrides, load_yaml, save_yaml
from .data import Tokenized, load_splits, tokenize_all
from .errors import UserError
from .progress import Metrics, Progress, truncate_metrics
from .runinfo import compare_for_resume, data_fingerprint, model_fingerprint, new_run_dir


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

    def plot(self, path=None):
        """Draw the run's metrics (train/val loss, lr, tokens/s, memory) as a figure."""
        from .report import plot_run

        return plot_run(self.run_dir, path)


def loss_fn(model, inputs, targets, mask, segments, scale):
    """Summed masked cross-entropy times `scale` (1 / target tokens of the accumulation group).
    Large vocabularies go through the output layer in chunks (qlora.set_loss_chunking); packed
    rows (segments not None) attend inside each example (packing.py)."""
    from .qlora import masked_ce_sum

    total = masked_ce_sum(model, inputs, targets, mask, segments)
    return total * scale, total


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
        group = mx.distributed.init()
        self.rank, self.world = group.rank(), group.size()

    # --- setup ---------------------------------------------------------------------------------

    def prepare(self):
        """Everything that can fail on bad input happens here, before training starts: data
        validation first (cheap), then the run folder, the memory plan, the model."""
        from .model import apply_lora, check_source, load_base, resolve_source

        cfg, t = self.cfg, self.cfg.training
        if not cfg.data.path:
            raise UserError("no training data: pass --data FILE_OR_FOLDER (JSONL with chat, "
                            "prompt/completion, text or alpaca records)")
        self.splits = load_splits(cfg.data.path, cfg.data.valid_fraction, t.seed)
        check_source(*resolve_source(cfg.model.path))  # before the planner reads the model's files
        self.run_dir, self.resume_from = self._run_folder()
        self._check_memory()
        self.loaded = load_base(cfg.model)
        self.tokenizer = self.loaded.tokenizer
        tok = partial(tokenize_all, tokenizer=self.tokenizer, max_seq_length=cfg.data.max_seq_length,
                      overlong=cfg.data.overlong, train_on_prompt=cfg.data.train_on_prompt)
        self.train_set: Tokenized = tok(self.splits.train)
        self.val_set: Tokenized = tok(self._val_subset(self.splits.valid))
        self._pack_width = pack_width(self.train_set.lengths()) if t.pack else 0
        self.model = self.loaded.model
        self.adapter_config = apply_lora(self.model, cfg.lora, t.seed)
        self.adapter_config["base_model"] = self.loaded.source
        self._apply_compute_options()
        self.optimizer = optim.AdamW(learning_rate=t.learning_rate, weight_decay=t.weight_decay)
        self.optimizer.init(self.model.trainable_parameters())
        self.fingerprints = {"data": data_fingerprint(self.splits.files, cfg.data),
                             "model": model_fingerprint(self.loaded.source, self.loaded.kind)}
        self.state = {"step": 0, "epoch": 0, "pos": 0, "best_val_loss": None, "bad_evals": 0,
                      "nonfinite": 0}
        if self.resume_from:
            self._restore(self.resume_from)
        if self.rank == 0:
            save_yaml(cfg, self.run_dir / "config.yaml")

    def _val_subset(self, valid):
        k = self.cfg.data.val_max_examples
        if k is None or k >= len(valid):
            return valid
        keep = np.sort(np.random.default_rng([self.cfg.training.seed, 0xE7A1]).permutation(len(valid))[:k])
        return [valid[i] for i in keep]

    def _run_folder(self) -> tuple[Path, Path | None]:
        out, resume = self.cfg.output.dir, self.cfg.training.resume
        if resume:
            run_dir = Path(out) if out else _newest_run()
            last, incomplete = ckpt.latest(run_dir)
            for p in incomplete:
                print(f"note: {p} is incomplete (interrupted while writing) and is skipped")
            if last is None:
                raise UserError(f"{run_dir}: no complete checkpoint to resume from; start a new run "
                                "without --resume")
            return run_dir, last
        if not out and self.world > 1:
            raise UserError("distributed training needs --out RUN_FOLDER (the same for every process)")
        run_dir = Path(out) if out else new_run_dir()
        if (run_dir / "checkpoints").exists() or (run_dir / "adapters").exists():
            raise UserError(f"{run_dir}: already holds a run; continue it with --resume, or pass "
                            "another --out (nothing was changed)")
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, None

    def _check_memory(self):
        """Refuse a configuration the planner predicts will not fit (unless --force)."""
        try:
            from .plan import check_fits
        except ImportError:
            return
        check_fits(self.cfg)

    def _apply_compute_options(self):
        from .qlora import apply_compute, set_loss_chunking

        self.compute = apply_compute(self.model, self.cfg.model.compute)
        self.compute["ce_chunk"] = set_loss_chunking(self.model, self.cfg.training.chunked_ce)
        if self.cfg.training.pack:
            from .packing import prepare

            prepare(self.model)
        if self.cfg.training.grad_checkpoint:
            checkpoint_blocks(self.model)

    def _restore(self, path: Path):
        saved = ckpt.load(path, self.model, self.optimizer)
        self.optimizer.init(self.model.trainable_parameters())
        compare_for_resume(saved, self.cfg, self.fingerprints, self.adapter_config, path)
        self.state = {k: saved[k] for k in self.state}
        if self.rank == 0:
            truncate_metrics(self.run_dir / "metrics.jsonl", saved["step"])
        print(f"resuming from {path} (step {saved['step']}, epoch {saved['epoch']})")

    # --- the loop ------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        if not hasattr(self, "model"):
            self.prepare()
        cfg, t, s = self.cfg, self.cfg.training, self.state
        n = len(self.train_set.ids)
        per_epoch = len(self._epoch_plan(0))
        # With a token budget the step count can differ a little between epochs (the windows differ)
        total = t.max_steps or sum(len(self._epoch_plan(e)) for e in range(t.epochs))
        self._build_steps()
        # Only rank 0 writes metrics, checkpoints and adapters, and draws progress.
        metrics = Metrics(self.run_dir / "metrics.jsonl", cfg.output.log_to) if self.rank == 0 else _NoMetrics()
        bar = Progress(total, s["step"], cfg.output.progress if self.rank == 0 else "none")
        self._announce(bar, n, per_epoch, total)
        try:
            with _SignalGuard(self):
                stopped, last_loss = self._loop(total, per_epoch, metrics, bar)
            final_val = self.evaluate()
            metrics.log({"event": "val", "step": s["step"], "val_loss": final_val, "final": True})
        except (RuntimeError, MemoryError, OSError) as e:
            _raise_if_out_of_resources(e, self.cfg, self.run_dir, s["step"] + 1)
            raise
        finally:
            bar.close()
            metrics.close()
        if self.rank == 0:
            ckpt.save_final_adapters(self.run_dir, self.model, self.adapter_config)
            print(f"adapters saved to {self.run_dir / 'adapters'}")
        from .progress import read_metrics

        return TrainResult(self.run_dir, s["step"], s["epoch"], last_loss, final_val,
                           s["best_val_loss"], stopped, read_metrics(self.run_dir / "metrics.jsonl"))

    def _loop(self, total, per_epoch, metrics, bar) -> tuple[str, float | None]:
        """Epochs of optimizer steps: get the step's batches, loss + gradients, update, report,
        then validate and checkpoint. Returns (why it stopped, last reported loss)."""
        cfg, t, s = self.cfg, self.cfg.training, self.state
        lengths = self.train_set.lengths()
        window = {"loss": 0.0, "tokens": 0, "real": 0, "time": 0.0}
        last_loss = None
        while s["step"] < total:
            plan = self._epoch_plan(s["epoch"])
            for pos in range(s["pos"], min(len(plan), s["pos"] + total - s["step"])):
                lr = lr_at(s["step"], t.learning_rate, t.warmup_steps, total, t.lr_schedule)
                tic = time.perf_counter()
                loss, ntok, nreal = self.train_step(plan[pos], lr)
                window["time"] += time.perf_counter() - tic
                s["step"], s["pos"] = s["step"] + 1, pos + 1
                if s["pos"] == len(plan):  # the epoch is done: the next one has a new order
                    s["epoch"], s["pos"] = s["epoch"] + 1, 0
                last_loss = self._report(loss, ntok, nreal, window, metrics, bar, per_epoch, total)
                if self._after_step(metrics, bar, total, end_of_epoch=s["pos"] == 0):
                    return "early_stopping", last_loss
        return ("max_steps" if t.max_steps else "completed"), last_loss

    def _epoch_plan(self, epoch: int) -> list:
        """The optimizer steps of `epoch` (a pure function of data lengths, settings and seed)."""
        t = self.cfg.training
        return plan_epoch(self.train_set.lengths(), t.batch_size, t.batch_tokens, t.grad_accumulation,
                          t.seed, epoch, self.cfg.data.group_by_length, t.pack)

    def _begin_step(self, micro_batches) -> tuple[mx.array, int]:
        """The step's loss scale (1 / target tokens of the whole group, known before any compute)
        and that token count; reseeds MLX's generator from (seed, step): dropout masks then do
        not depend on what ran before, so a resumed run draws the same ones."""
        masks = self.train_set.masks
        group_tokens = sum(int(sum(masks[i][1:])) for mb in micro_batches for i in examples_of(mb))
        scale = mx.array(1.0 / group_tokens, dtype=mx.float32)
        if self.state["step"] + 1 in _TEST_NAN_STEPS:
            scale = mx.array(float("nan"), dtype=mx.float32)
        mx.random.seed(self.cfg.training.seed * 1_000_003 + self.state["step"])
        self.model.train()
        return scale, group_tokens

    def _padded(self, micro_batches):
        """(inputs, targets, mask, segments, non-padding tokens) of this process's share of each
        micro-batch; segments is None unless the rows are packed."""
        ids, masks = self.train_set.ids, self.train_set.masks
        for mb in micro_batches:
            mb = shard(mb, self.rank, self.world) if self.world > 1 else mb
            if not mb:  # this rank's share of a short last micro-batch is empty
                continue
            real = sum(len(ids[i]) - 1 for i in examples_of(mb))
            if self.cfg.training.pack:
                inputs, targets, mask, seg = pack_batch([[ids[i] for i in row] for row in mb],
                                                        [[masks[i] for i in row] for row in mb],
                                                        self._pack_width)
                yield mx.array(inputs), mx.array(targets), mx.array(mask), mx.array(seg), real
            else:
                inputs, targets, mask = pad_batch([ids[i] for i in mb], [masks[i] for i in mb])
                yield mx.array(inputs), mx.array(targets), mx.array(mask), None, real

    def accumulate(self, micro_batches):
        """Gradients of one optimizer step, summed over its micro-batches, each micro-batch's
        summed loss divided by the target tokens of the whole group. Returns (gradients, summed
        loss, group target tokens, non-padding tokens)."""
        scale, group_tokens = self._begin_step(micro_batches)
        batches = list(self._padded(micro_batches))
        acc, total = self._sum_grads(batches, scale)
        real = sum(b[4] for b in batches)
        if self.world > 1:  # the token-weighted rule across ranks: sum, already divided by the global count
            if acc is None:
                acc = tree_map(mx.zeros_like, self.model.trainable_parameters())
            acc = all_sum_tree(acc)
            total = mx.distributed.all_sum(total)
        return acc, total, group_tokens, real

    def _sum_grads(self, batches, scale, acc=None):
        """Gradients and summed loss over padded micro-batches, evaluated after each one."""
        total = mx.array(0.0)
        for inputs, targets, mask, segments, _ in batches:
            part, acc = self._grad(inputs, targets, mask, segments, scale, acc)
            total = total + part
            mx.eval(acc, total)
        return acc, total

    def train_step(self, micro_batches, lr: float):
        """One optimizer step; returns (mean loss, target tokens, non-padding tokens).

        One process: the last micro-batch's compiled call also computes the gradient norm, clips
        and updates, so the update is queued right behind the backward pass with no round trip to
        Python (separate norm and update calls cost 30 of 367 ms per 7B step on an H100). Several
        processes: the gradients are all-reduced first, then the same update runs in a call of its
        own. A measured cost of the fused call: with gradient checkpointing on the CPU, the norm in
        the backward's graph makes MLX compute the first block's gradients before the others, so
        every block keeps its LoRA inputs meanwhile (SmolLM2 shape, 4 x 224: 0.910 GB fused, 0.734 GB
        separate; docs/plan-memory.md)."""
        t = self.cfg.training
        lr = mx.array(lr, dtype=mx.float32)
        max_norm = mx.array(t.max_grad_norm or float("inf"), dtype=mx.float32)
        if not self._fused:
            acc, total, group_tokens, real = self.accumulate(micro_batches)
            norm = self._apply(acc, total, lr, max_norm)
        else:
            scale, group_tokens = self._begin_step(micro_batches)
            batches = list(self._padded(micro_batches))
            real = sum(b[4] for b in batches)
            acc, total = self._sum_grads(batches[:-1], scale)
            inputs, targets, mask, segments, _ = batches[-1]
            total, norm = self._grad_apply(inputs, targets, mask, segments, scale, acc, total, lr, max_norm)
        mx.eval(self.compiled_state, total, norm)
        loss, norm = total.item() / group_tokens, norm.item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._nonfinite(loss, norm)  # the compiled update already left the state unchanged
        else:
            self.state["nonfinite"] = 0
        return loss, group_tokens, real

    def _build_steps(self):
        self._fused = self.world == 1  # with several processes the all-reduce comes between
        model, opt = self.model, self.optimizer
        state = [model.state, opt.state, mx.random.state]
        self.compiled_state = state
        lvg = nn.value_and_grad(model, loss_fn)

        def grad_body(inputs, targets, mask, segments, scale, acc):
            (_, total), g = lvg(model, inputs, targets, mask, segments, scale)
            return total, g if acc is None else tree_map(mx.add, acc, g)

        def apply_body(g, total, lr, max_norm):
            """Clip to max_norm and update; if the loss or the norm is not finite, keep the old
            parameters and optimizer state (selected on the device: no host decision needed)."""
            opt.learning_rate = lr
            flat = flat_update(opt, g, model.trainable_parameters(), max_norm, total) if FLAT_UPDATE else None
            if flat is not None:
                params, norm = flat
                model.update(params)
                return norm
            norm = mx.sqrt(sum(mx.sum(x.astype(mx.float32) ** 2) for _, x in tree_flatten(g)))
            ok = mx.isfinite(norm) & mx.isfinite(total)
            clip = mx.minimum(1.0, max_norm / (norm + 1e-6))
            old_params = model.trainable_parameters()
            old_opt = tree_map(lambda x: x, opt.state)
            opt.update(model, tree_map(lambda x: x * clip.astype(x.dtype), g))
            model.update(tree_map(lambda new, old: mx.where(ok, new, old), model.trainable_parameters(),
                                  old_params))
            _keep_where(ok, opt.state, old_opt)
            return norm

        @partial(mx.compile, inputs=state, outputs=state)
        def grad(inputs, targets, mask, segments, scale, acc):
            return grad_body(inputs, targets, mask, segments, scale, acc)

        @partial(mx.compile, inputs=state, outputs=state)
        def grad_apply(inputs, targets, mask, segments, scale, acc, prev_total, lr, max_norm):
            total, g = grad_body(inputs, targets, mask, segments, scale, acc)
            total = prev_total + total
            return total, apply_body(g, total, lr, max_norm)

        @partial(mx.compile, inputs=state, outputs=state)
        def apply(g, total, lr, max_norm):
            return apply_body(g, total, lr, max_norm)

        @partial(mx.compile, inputs=state, outputs=state)
        def evaluate(inputs, targets, mask):
            _, total = loss_fn(model, inputs, targets, mask, None, mx.array(1.0))
            return total

        self._grad, self._grad_apply, self._apply, self._eval = grad, grad_apply, apply, evaluate

    def _nonfinite(self, loss, norm):
        s, t = self.state, self.cfg.training
        s["nonfinite"] += 1
        print(f"warning: step {s['step'] + 1}: non-finite loss ({loss}) or gradient norm ({norm}); "
              "update skipped")
        if s["nonfinite"] >= t.max_nonfinite:
            raise UserError(
                f"step {s['step'] + 1}: {s['nonfinite']} non-finite losses/gradients in a row; training "
                "stopped (the last good checkpoint is untouched). Likely causes: learning rate too high "
                f"({t.learning_rate}), float16 overflow (use --dtype bfloat16 or float32), or broken data")

    # --- reporting, validation, checkpoints ----------------------------------------------------

    def _report(self, loss, ntok, nreal, window, metrics, bar, per_epoch, total):
        s, t = self.state, self.cfg.training
        if math.isfinite(loss):
            window["loss"] += loss * ntok
            window["tokens"] += ntok
        window["real"] += nreal
        tps = window["real"] / window["time"] if window["time"] else 0.0
        peak = mx.get_peak_memory() / 1e9
        epoch_f = s["epoch"] + s["pos"] / per_epoch
        mean = window["loss"] / window["tokens"] if window["tokens"] else float("nan")
        bar.update(s["step"], epoch_f, mean, tps, peak)
        if s["step"] % t.log_every == 0 or s["step"] == total:
            metrics.log({"event": "train", "step": s["step"], "epoch": round(epoch_f, 4), "loss": mean,
                         "tokens": window["tokens"], "lr": lr_at(s["step"] - 1, t.learning_rate,
                                                                 t.warmup_steps, total, t.lr_schedule),
                         "tok_per_s": round(tps, 1), "peak_mem_gb": round(peak, 3)})
            window.update(loss=0.0, tokens=0, real=0, time=0.0)
        return mean

    def _after_step(self, metrics, bar, total, end_of_epoch: bool) -> bool:
        """Validate and checkpoint; True when early stopping says to stop."""
        s, t = self.state, self.cfg.training
        improved = False
        if t.eval_every and s["step"] % t.eval_every == 0 and s["step"] < total:
            val = self.evaluate()
            metrics.log({"event": "val", "step": s["step"], "val_loss": val})
            bar.write(f"step {s['step']}: val_loss {val:.4f}")
            improved = self._track_best(val)
        due = (t.save_every and s["step"] % t.save_every == 0) or end_of_epoch or improved
        if self.world > 1:  # every rank must stop at the same step, whichever got the signal
            self.stop_signal = int(mx.distributed.all_sum(mx.array(int(bool(self.stop_signal)))).item())
        if (due or self.stop_signal) and self.rank == 0:
            self.save_checkpoint()
            if improved:
                ckpt.save(self.run_dir, s["step"], self.model, self.optimizer, self.adapter_config,
                          self._state_json(), name="best")
        if self.stop_signal:
            raise TrainingInterrupted(self.run_dir / "checkpoints" / f"{ckpt.PREFIX}{s['step']:07d}")
        ckpt._crash_hook("step")  # test hook: STEADYTUNE_TEST_CRASH=step:N dies after step N
        if t.patience and s["bad_evals"] >= t.patience:
            bar.write(f"early stopping: no improvement in {t.patience} validations")
            return True
        return False

    def _track_best(self, val: float) -> bool:
        s = self.state
        if s["best_val_loss"] is None or val < s["best_val_loss"]:
            s["best_val_loss"], s["bad_evals"] = val, 0
            return True
        s["bad_evals"] += 1
        return False

    def evaluate(self) -> float:
        """Token-weighted mean loss over the validation set (sorted by length: little padding;
        with several processes each evaluates every world-th batch and the sums are added)."""
        ids, masks = self.val_set.ids, self.val_set.masks
        order = np.argsort([len(x) for x in ids], kind="stable")
        bs = self.cfg.training.batch_size
        self.model.eval()
        total, count = mx.array(0.0), 0
        for b, i in enumerate(range(0, len(order), bs)):
            if b % self.world != self.rank:
                continue
            mb = order[i:i + bs]
            inputs, targets, mask = pad_batch([ids[j] for j in mb], [masks[j] for j in mb])
            total = total + self._eval(mx.array(inputs), mx.array(targets), mx.array(mask))
            count += int(mask.sum())
            mx.eval(total)
        self.model.train()
        if self.world > 1:
            total = mx.distributed.all_sum(total)
            count = int(mx.distributed.all_sum(mx.array(count)).item())
        return total.item() / count

    def _state_json(self) -> dict:
        t = self.cfg.training
        return dict(self.state, data_generator={"kind": "numpy.default_rng([seed, epoch])",
                                                "seed": t.seed, "epoch": self.state["epoch"]},
                    config=self.cfg.to_dict(), fingerprints=self.fingerprints,
                    adapter_config=self.adapter_config)

    def save_checkpoint(self) -> Path:
        path = ckpt.save(self.run_dir, self.state["step"], self.model, self.optimizer,
                         self.adapter_config, self._state_json())
        ckpt.prune(self.run_dir, self.cfg.output.keep_last, protect={"best"})
        return path

    def _announce(self, bar, n, per_epoch, total):
        from .backend import device_kind, fast_blas
        from .model import count_parameters

        tr, tot = count_parameters(self.model)
        lens = self.train_set.lengths()
        notes = list(self.splits.notes)
        if self.train_set.truncated:
            notes.append(f"{self.train_set.truncated} examples truncated to max_seq_length "
                         f"{self.cfg.data.max_seq_length}")
        blas = fast_blas() or ("none: CPU matmuls use the slow reference BLAS; install libopenblas0-pthread"
                               if device_kind() == "cpu" else "n/a")
        t = self.cfg.training
        plan = self._epoch_plan(0)
        if t.pack:
            pad = packed_padding_fraction([mb for step in plan for mb in step], lens, self._pack_width)
        else:
            pad = padding_fraction([[int(lens[i]) for i in mb] for step in plan for mb in step])
        for line in notes + [
            f"run folder: {self.run_dir}",
            f"model: {self.loaded.source} ({device_kind()}, fast BLAS: {blas})",
            f"trainable parameters: {tr / 1e6:.3f}M of {tot / 1e6:.1f}M",
            f"train: {n} examples, {int(self.train_set.target_tokens().sum())} target tokens per epoch, "
            f"{per_epoch} steps per epoch, {total} steps in all; "
            + (f"packed rows of {self._pack_width} positions, " if t.pack else "") + f"padding {pad:.1%}",
            f"valid: {len(self.val_set.ids)} examples",
        ]:
            bar.write(line)


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing per transformer block: the block's activations are recomputed in
    the backward pass. Done by giving each block instance a subclass whose __call__ is
    checkpointed, so parameter names (and adapter files) are unchanged and no other model in the
    process is affected (mlx-lm's helper patches the class itself)."""
    for layer in model.layers:
        cls = type(layer)
        if getattr(cls, "_steadytune_ckpt", False):
            continue
        base_call = cls.__call__

        def call(self, *args, _base=base_call, **kwargs):
            def inner(params, *a, **k):
                self.update(params)
                return _base(self, *a, **k)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        layer.__class__ = type(cls.__name__, (cls,), {"__call__": call, "_steadytune_ckpt": True})


_OOM = re.compile(r"out of memory|unable to allocate|attempting to allocate|insufficient memory|"
                  r"outofmemory|memoryallocation", re.IGNORECASE)
_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_GENERIC_ADVICE = ("lower --batch-size (raise --grad-accumulation to keep the effective batch), lower "
                   "--max-seq-length, or add --grad-checkpoint true")


def _memory_advice(cfg: Config) -> str:
    """The planner's recommendation for this configuration (steadytune.plan.advice), if there is a planner."""
    try:
        from .plan import advice
    except ImportError:
        return _GENERIC_ADVICE
    return advice(cfg)


def _raise_if_out_of_resources(e: BaseException, cfg: Config, run_dir: Path, step: int) -> None:
    """Out of memory (MLX raises RuntimeError: "[malloc] Unable to allocate ...", "[metal::malloc]
    Attempting to allocate ...") or a full/read-only disk mid-run: a UserError that says what to
    change and that the last complete checkpoint is intact. Anything else: return (re-raised)."""
    last, _ = ckpt.latest(run_dir)
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and _OOM.search(str(e))):
        what = " ".join(str(e).split())[:200] or type(e).__name__
        kept = (f"The last complete checkpoint, {last}, is intact: rerun with --resume "
                "--grad-checkpoint true to continue it with less memory (a smaller batch or sequence "
                "length needs a new --out)" if last else "No checkpoint was written yet")
        raise UserError(f"out of memory at step {step} ({what}). {_memory_advice(cfg)}. {kept}") from None
    if isinstance(e, OSError) and e.errno in _DISK:
        kept = (f"the last complete checkpoint, {last}, is intact: rerun with --resume"
                if last else "no checkpoint was written yet")
        raise UserError(f"{e.filename or run_dir}: cannot write at step {step} ({e.strerror}); free "
                        f"disk space or fix permissions; {kept}") from None


def _newest_run() -> Path:
    runs = sorted((p for p in Path("runs").glob("*") if (p / "checkpoints").is_dir()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError("--resume: no run with checkpoints under runs/; pass --out RUN_FOLDER")
    return runs[-1]


_TEST_NAN_STEPS = {int(x) for x in os.environ.get("STEADYTUNE_TEST_NAN_STEPS", "").split(",") if x}


FLAT_UPDATE = True  # a switch for A/B measurements (bench/throughput.py --ab ...,-flat)


def flat_update(opt, grads, params, max_norm, total):
    """The clipped optimizer update of every trainable array at once: gradients, parameters and
    each per-parameter state entry (AdamW's m and v) are concatenated into one vector each, the
    optimizer's own per-array rule (`apply_single`) runs once on those vectors, and the results are
    split back (the splits are views, not copies). The same arithmetic element by element as
    `opt.update` on each array; the gradient norm is one reduction. Why: a 7B model with LoRA on
    7 projections has 448 adapter arrays, and the per-array update was ~10 small kernels each
    (4,500 launches, ~30 ms of host time per step on an H100, bench/RESULTS.md); concatenating
    is one operation whose copies run side by side on the GPU.

    If the loss or the norm is not finite, parameters and state keep their old values (selected
    on the device). Returns (new parameter tree, gradient norm), or None where the arrays don't
    allow it (mixed dtypes, or state entries not shaped like their parameter: factored
    optimizers); the caller then updates array by array."""
    order = []
    if not opt._initialized:
        opt.init(grads)
    tree_map(lambda g, p, st: order.append((g, p, st)), grads, params, opt.state)
    if not order:
        return None
    dtype, keys = order[0][1].dtype, sorted(order[0][2])
    for g, p, st in order:
        if p.dtype != dtype or sorted(st) != keys or any(
                not isinstance(st[k], mx.array) or st[k].shape != p.shape for k in keys):
            return None

    arrays = [p for _, p, _ in order]
    gflat = concat_flat([g for g, _, _ in order])
    norm = mx.sqrt(mx.sum(mx.square(gflat.astype(mx.float32))))
    ok = mx.isfinite(norm) & mx.isfinite(total)
    clip = mx.minimum(1.0, max_norm / (norm + 1e-6))
    pflat = concat_flat(arrays)
    old = {k: concat_flat([st[k] for _, _, st in order]) for k in keys}
    state = dict(old)
    old_top = {k: v for k, v in opt.state.items() if isinstance(v, mx.array)}  # step, learning_rate
    for name, scheduler in opt._schedulers.items():
        opt.state[name] = scheduler(opt.step)
    opt.state["step"] = opt.step + 1
    new = opt.apply_single(gflat * clip.astype(gflat.dtype), pflat, state)
    new = mx.where(ok, new, pflat)
    state = {k: mx.where(ok, state[k], old[k]) for k in keys}
    for k, v in old_top.items():
        opt.state[k] = mx.where(ok, opt.state[k], v)
    for k in keys:  # in place: compiled functions hold the optimizer's state dicts themselves
        for (_, _, st), piece in zip(order, split_like(state[k], arrays)):
            st[k] = piece
    it = iter(split_like(new, arrays))
    return tree_map(lambda g: next(it), grads), norm


def _keep_where(ok, tree, old) -> None:
    """In place: each array of the (nested dict/list) `tree` becomes where(ok, new, old). In place
    because compiled functions hold the optimizer's state dict itself."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            _keep_where(ok, v, old[k])
        elif isinstance(v, mx.array):
            tree[k] = mx.where(ok, v, old[k])


def concat_flat(arrays):
    """The arrays' elements as one vector, in order (one operation; split_like undoes it)."""
    return mx.concatenate([x.reshape(-1) for x in arrays]) if len(arrays) > 1 else arrays[0].reshape(-1)


def split_like(flat, arrays) -> list:
    """Views of `flat` shaped like `arrays`, in order (the inverse of concat_flat)."""
    out, i = [], 0
    for x in arrays:
        out.append(flat[i:i + x.size].reshape(x.shape))
        i += x.size
    return out


def all_sum_tree(tree):
    """Sum a gradient tree over all processes in one all-reduce: the leaves are packed into one
    flat buffer (one call instead of one per tensor: 7 per block add up in latency)."""
    keys, leaves = zip(*tree_flatten(tree))
    flat = mx.distributed.all_sum(concat_flat(leaves))
    return tree_unflatten(list(zip(keys, split_like(flat, leaves))))


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
