"""`steadytune check-data PATH [--model M]`: validate data and print its statistics.

Reads the model's tokenizer and chat template only, never its weights: a folder's tokenizer files,
a GGUF file's metadata, or a Hub id's tokenizer files. The template is tried on the data first
(system turns folded as `train` would fold them), so a template that rejects the data is reported
here, as `file:line`, not after a model has loaded.
"""

from __future__ import annotations

import numpy as np

from ..config import DataConfig


def add_arguments(p) -> None:
    from ..config import DEFAULT_MODEL

    p.add_argument("path", help="a data file or a folder with train.jsonl [valid.jsonl test.jsonl]")
    p.add_argument("--model", default=None,
                   help=f"count tokens with this model's tokenizer and chat template (default: {DEFAULT_MODEL}); "
                        "only the tokenizer is read, never the weights")
    p.add_argument("--max-seq-length", type=int, default=DataConfig.max_seq_length)
    p.add_argument("--train-on-prompt", action="store_true")
    p.add_argument("--system-fold", default=DataConfig.system_fold, choices=["auto", "fold", "error"],
                   help="system turns on a template without a system role (as in train)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file to format the records with (as in train)")


def command(args) -> int:
    from ..config import DEFAULT_MODEL
    from ..data import Splits, check_template, find_files, read_file, tokenize_all
    from ..model import source_tokenizer

    from ..pairs import check_pair_files, is_pair_file, read_pairs

    files = find_files(args.path)
    pairs = is_pair_file(files["train"])  # preference pairs: checked as `train --method dpo` reads them
    examples = {split: (read_pairs if pairs else read_file)(f) for split, f in files.items()}  # every problem
    model = args.model or DEFAULT_MODEL
    tokenizer = source_tokenizer(model)
    default = "" if args.model else "; the default: pass --model YOUR_MODEL to count with yours"
    print(f"tokenizer: {model} (tokenizer and chat template only, no weights loaded{default})")
    if pairs:
        print("\n".join(check_pair_files(files, examples, tokenizer, args.max_seq_length)) + "\nok")
        return 0
    data_cfg = DataConfig(train_on_prompt=args.train_on_prompt, system_fold=args.system_fold,
                          chat_template=args.chat_template)
    others = [e for split, exs in examples.items() if split != "train" for e in exs]
    for note in check_template(Splits(examples["train"], others), tokenizer, data_cfg):
        print(f"note: {note}")
    for split, exs in examples.items():
        tok = tokenize_all(exs, tokenizer, max_seq_length=10**9, train_on_prompt=args.train_on_prompt)
        lens = tok.lengths()
        over = int((lens > args.max_seq_length).sum())
        p = np.percentile(lens, [50, 90, 95, 99, 100]).astype(int)
        targets = sum(sum(m[1:args.max_seq_length]) for m in tok.masks)
        print(f"{split}: {files[split]}")
        print(f"  records: {len(exs)}  format: {exs[0].kind}")
        print(f"  tokens per example: p50 {p[0]}  p90 {p[1]}  p95 {p[2]}  p99 {p[3]}  max {p[4]}")
        print(f"  longer than max_seq_length {args.max_seq_length}: {over}")
        print(f"  target tokens per epoch: {targets}")
        if split == "train":
            print(first_example(tokenizer, tok.ids[0], tok.masks[0]))
    print("ok")
    return 0


def first_example(tokenizer, ids: list[int], mask: list[bool], limit: int = 24) -> str:
    """The first training example's ids, decoded one token at a time with its special tokens (a
    BOS, the EOS), so a user sees exactly what the model is trained on; [brackets] mark the tokens
    in the loss. Long examples show their first and last `limit` tokens."""
    def show(i):
        piece = repr(tokenizer.decode([ids[i]]))[1:-1]
        return f"{ids[i]}:[{piece}]" if mask[i] and i else f"{ids[i]}:{piece}"  # the first predicts nothing

    at = list(range(len(ids)))
    if len(at) > 2 * limit:
        at = at[:limit] + [None] + at[-limit:]
    shown = " ".join("..." if i is None else show(i) for i in at)
    return f"  first example, {len(ids)} tokens (id:text, [in the loss]): {shown}"
