"""`steadytune check-data PATH [--model M]`: validate data and print its statistics."""

from __future__ import annotations

import numpy as np

from ..config import DataConfig


def add_check_data_arguments(p) -> None:
    p.add_argument("path", help="a data file or a folder with train.jsonl [valid.jsonl test.jsonl]")
    p.add_argument("--model", default=None, help="tokenize with this model's tokenizer (default: smollm2-135m)")
    p.add_argument("--max-seq-length", type=int, default=DataConfig.max_seq_length)
    p.add_argument("--train-on-prompt", action="store_true")


def check_data_command(args) -> int:
    from ..config import DEFAULT_MODEL, ModelConfig
    from ..data import find_files, read_file, tokenize_all
    from ..model import load_base

    files = find_files(args.path)
    examples = {split: read_file(f) for split, f in files.items()}  # raises with every problem
    loaded = load_base(ModelConfig(path=args.model or DEFAULT_MODEL))
    for split, exs in examples.items():
        tok = tokenize_all(exs, loaded.tokenizer, max_seq_length=10**9, train_on_prompt=args.train_on_prompt)
        lens = tok.lengths()
        over = int((lens > args.max_seq_length).sum())
        p = np.percentile(lens, [50, 90, 95, 99, 100]).astype(int)
        targets = sum(sum(m[1:args.max_seq_length]) for m in tok.masks)
        print(f"{split}: {files[split]}")
        print(f"  records: {len(exs)}  format: {exs[0].kind}")
        print(f"  tokens per example: p50 {p[0]}  p90 {p[1]}  p95 {p[2]}  p99 {p[3]}  max {p[4]}")
        print(f"  longer than max_seq_length {args.max_seq_length}: {over}")
        print(f"  target tokens per epoch: {targets}")
    print("ok")
    return 0
