"""`steadytune export RUN --format mlx|hf|gguf|ollama|gguf-lora [--quant Q]`: fuse a run's adapters
into the base and write a model, or write the adapters as a llama.cpp LoRA GGUF
(steadytune/export.py; docs/export.md)."""

from __future__ import annotations

from ..export import DTYPES, FORMATS, export
from ..gguf_quantize import QUANTS


def add_arguments(p) -> None:
    p.add_argument("run", help="a run folder of steadytune train (or its adapters/ folder)")
    p.add_argument("--format", choices=FORMATS, default="mlx", help="what to write (default: mlx)")
    p.add_argument("--out", default=None,
                   help="where to write (default: RUN/export-FORMAT); must not exist or be empty")
    p.add_argument("--model", default=None, help="base model, if not the one in the run's config.yaml")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="weight dtype of the export")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help="gguf / ollama: llama.cpp file type (default: f16 for gguf, q4_k_m for ollama)")


def command(args) -> int:
    out = export(args.run, args.format, args.out, model=args.model, dtype=args.dtype, quant=args.quant)
    print(f"wrote {args.format} model to {out}")
    if args.format in ("gguf", "ollama"):
        print(f"  llama.cpp: llama-cli -m {out}/model.gguf")
        print(f"  ollama: cd {out} && ollama create my-model -f Modelfile")
    elif args.format == "gguf-lora":
        print(f"  llama.cpp: llama-cli -m BASE.gguf --lora {out}/adapter.gguf")
    else:
        print(f"  try it: mlx_lm.generate --model {out} --prompt 'Hello'")
    return 0
