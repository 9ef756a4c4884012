"""`steadytune train [CONFIG] [flags]`: fine-tune; Ctrl-C/SIGTERM save a checkpoint and exit 130.

`--nproc N` runs N data-parallel processes on this host through `mlx.launch` (ring backend on
CPUs and Macs, NCCL on NVIDIA GPUs); for several hosts, call `mlx.launch` yourself (docs/distributed.md).
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..config import add_config_flags, from_args
from ..errors import UserError


def add_arguments(parser) -> None:
    add_config_flags(parser)
    parser.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this host (via mlx.launch)")
    parser.add_argument("--backend", default="auto", choices=["auto", "ring", "nccl", "mpi"],
                        help="distributed backend for --nproc (auto: nccl on CUDA, else ring)")


def launch(nproc: int, backend: str, argv: list[str]) -> int:
    """Re-run this command under mlx.launch with N processes (without --nproc)."""
    if backend == "auto":
        import mlx.core as mx

        backend = "nccl" if mx.default_device() == mx.gpu and sys.platform != "darwin" else "ring"
    launcher = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; sys.exit(main())"
    cmd = [sys.executable, "-c", launcher, "-n", str(nproc), "--backend", backend,
           "--", sys.executable, "-m", "steadytune.cli", *argv]
    return subprocess.call(cmd)


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--backend"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--backend=")):
            continue
        out.append(a)
    return out


def command(args) -> int:
    from ..trainer import Trainer, TrainingInterrupted

    cfg = from_args(args)
    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1 (got {args.nproc})")
    if args.nproc > 1 and "MLX_RANK" not in os.environ:
        if not cfg.output.dir:
            raise UserError("--nproc needs --out RUN_FOLDER (shared by every process)")
        return launch(args.nproc, args.backend, _strip_nproc(sys.argv[1:]))
    try:
        result = Trainer(cfg).fit()
    except TrainingInterrupted as e:
        print(f"{e}; continue with: steadytune train ... --out {e.checkpoint.parent.parent} --resume")
        return 130
    if os.environ.get("MLX_RANK", "0") != "0":
        return 0
    name, val = next(iter(result.final_val.items()), ("val_loss", None))
    val = f"{val:.4f}" if val is not None else "n/a"
    print(f"done: {result.step} steps ({result.stopped}), final {name} {val}, run folder {result.run_dir}")
    return 0
