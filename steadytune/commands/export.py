"""`steadytune export RUN --format mlx|hf|gguf`: fuse a run's adapters into the base and write a
model (steadytune/export.py; docs/export.md)."""

from __future__ import annotations

from ..export import DTYPES, FORMATS, export


def add_arguments(p) -> None:
    p.add_argument("run", help="a run folder of steadytune train (or its adapters/ folder)")
    p.add_argument("--format", choices=FORMATS, default="mlx", help="what to write (default: mlx)")
    p.add_argument("--out", default=None,
                   help="where to write (default: RUN/export-FORMAT); must not exist or be empty")
    p.add_argument("--model", default=None, help="base model, if not the one in the run's config.yaml")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="weight dtype of the export")


def command(args) -> int:
    out = export(args.run, args.format, args.out, model=args.model, dtype=args.dtype)
    print(f"wrote {args.format} model to {out}")
    if args.format == "gguf":
        print(f"  ollama: cd {out} && ollama create my-model -f Modelfile")
    else:
        print(f"  try it: mlx_lm.generate --model {out} --prompt 'Hello'")
    return 0
