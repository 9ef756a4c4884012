"""`steadytune train [CONFIG] [flags]`: fine-tune; Ctrl-C/SIGTERM save a checkpoint and exit 130."""

from __future__ import annotations

from ..config import add_config_flags, from_args


def add_arguments(parser) -> None:
    add_config_flags(parser)


def command(args) -> int:
    from ..trainer import Trainer, TrainingInterrupted

    cfg = from_args(args)
    try:
        result = Trainer(cfg).fit()
    except TrainingInterrupted as e:
        print(f"{e}; continue with: steadytune train --out {e.checkpoint.parent.parent} --resume ...")
        return 130
    val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "n/a"
    print(f"done: {result.step} steps ({result.stopped}), final val_loss {val}, run folder {result.run_dir}")
    return 0
