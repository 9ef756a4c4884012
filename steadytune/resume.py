"""The state a checkpoint holds beyond the tensors, gathered and restored in one place.

    saved = snapshot(run)        # state.json of a checkpoint: where the run is, what it is
    restore(run, checkpoint)     # the newest sound checkpoint's adapters, optimizer and TrainState

A resumable field is added in TrainState (or in an objective's `resume_keys`, for a setting
that must not change) and nowhere else: snapshot writes every TrainState field, restore reads
them back, checkpoint.check_state checks the counters, runinfo.compare_for_resume compares the
settings. Randomness needs no saving: the epoch order is drawn from (seed, epoch), dropout and
GRPO's sampling from (seed, step), so the restored counters give the same draws.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint's state.json and restored on resume."""

    step: int = 0                      # optimizer steps done
    epoch: int = 0
    pos: int = 0                       # steps done in this epoch
    best_val_loss: float | None = None  # the objective's held-out score (lower is better)
    bad_evals: int = 0                 # validations since the best one (early stopping)
    nonfinite: int = 0                 # non-finite steps in a row

    @classmethod
    def from_saved(cls, saved: dict) -> "TrainState":
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__})

    def advance(self, epoch_steps: int) -> None:
        """One step done, in an epoch of `epoch_steps` steps; the next epoch has a new order."""
        self.step, self.pos = self.step + 1, self.pos + 1
        if self.pos == epoch_steps:
            self.epoch, self.pos = self.epoch + 1, 0

    def track_best(self, val: float) -> bool:
        """Note a validation score; True when it is the best so far."""
        if self.best_val_loss is None or val < self.best_val_loss:
            self.best_val_loss, self.bad_evals = val, 0
            return True
        self.bad_evals += 1
        return False


def snapshot(run) -> dict:
    """state.json of a checkpoint of `run` now: its TrainState, how its data order is drawn, and
    what identifies the run (config, data and model fingerprints, adapter layout), which a resume
    compares (runinfo.compare_for_resume)."""
    t = run.cfg.training
    return dict(asdict(run.state), data_generator={"kind": "numpy.default_rng([seed, epoch])",
                                                   "seed": t.seed, "epoch": run.state.epoch},
                config=run.cfg.to_dict(), fingerprints=run.fingerprints, adapter_config=run.adapter_config)


def restore(run, path: Path) -> None:
    """Load the newest sound checkpoint from `path` (a damaged one is skipped) into `run`: its
    adapters and optimizer state, then its TrainState; refused first if it is another run."""
    from . import checkpoint as ckpt
    from .progress import truncate_metrics
    from .runinfo import compare_for_resume

    same_run = partial(compare_for_resume, cfg=run.cfg, fingerprints=run.fingerprints,
                       adapter_config=run.adapter_config)  # checked before the tensors
    saved, path = ckpt.load_good(path, run.model, run.optimizer, lambda s, p: same_run(s, where=p))
    run.optimizer.init(run.model.trainable_parameters())
    run.state = TrainState.from_saved(saved)
    if run.rank == 0:
        truncate_metrics(run.run_dir / "metrics.jsonl", saved["step"])
    print(f"resuming from {path} (step {saved['step']}, epoch {saved['epoch']})")
