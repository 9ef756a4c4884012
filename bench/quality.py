"""Quality of a real fine-tune (bench, not a test): the default model (SmolLM2-135M-Instruct, GGUF)
on ../shared/data/wikisql for one epoch. Reports validation loss and exact-match accuracy of the
generated SQL on valid.jsonl, before and after.

    python bench/quality.py [--epochs 1] [--limit-valid 100] [--out runs/quality]
"""

import argparse
import json
import time
from pathlib import Path

import steadytune  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx

from steadytune.generation import complete
from steadytune.trainer import Trainer, as_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikisql"


def exact_match(model, tokenizer, records) -> float:
    model.eval()
    hits = 0
    for r in records:
        prompt, answer = r["text"].rsplit("A: ", 1)
        got = complete(model, tokenizer, prompt + "A: ", max_tokens=64, stop="\n").strip()
        hits += " ".join(got.split()) == " ".join(answer.split())
    return hits / len(records)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit-valid", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=None, help="a quick smoke run")
    p.add_argument("--model", default="smollm2-135m", help="the default model, or its GGUF file")
    p.add_argument("--data", default=str(DATA), help="a folder with train.jsonl and valid.jsonl")
    p.add_argument("--out", default=f"runs/quality-{time.strftime('%Y%m%d-%H%M%S')}")
    a = p.parse_args()
    valid = [json.loads(x) for x in (Path(a.data) / "valid.jsonl").read_text().splitlines()][: a.limit_valid]
    cfg = as_config({"model": {"path": a.model}, "data": {"path": a.data, "max_seq_length": 512},
                     "lora": {"rank": 16, "alpha": 32},
                     "training": {"epochs": a.epochs, "max_steps": a.max_steps, "batch_size": a.batch_size, "learning_rate": 5e-4,
                                  "warmup_steps": 10, "eval_every": 0, "log_every": 10, "save_every": 1000},
                     "output": {"dir": a.out}})
    t = Trainer(cfg)
    run = t.prepare()
    tok = run.loaded.tokenizer
    before_loss = t.evaluate()
    before_em = exact_match(run.model, tok, valid)
    t0 = time.time()
    result = t.fit()
    minutes = (time.time() - t0) / 60
    after_em = exact_match(run.model, tok, valid)
    rows = [("validation loss", f"{before_loss:.4f}", f"{result.final_val_loss:.4f}"),
            (f"exact match ({len(valid)} valid)", f"{before_em:.1%}", f"{after_em:.1%}")]
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF) on wikisql, {result.step} steps, {minutes:.1f} min, "
          f"device {mx.default_device()}")
    print("| metric | before | after |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(json.dumps({"before_loss": before_loss, "after_loss": result.final_val_loss, "before_em": before_em,
                      "after_em": after_em, "steps": result.step, "minutes": minutes}))


if __name__ == "__main__":
    main()
