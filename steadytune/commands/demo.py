"""`steadytune demo`: the whole job on the embedded default model, offline.

Answers held-out questions with SmolLM2-135M-Instruct, fine-tunes it on the bundled chatbot data
("Pip", the assistant of a community garden), answers the same questions again, and writes the
loss curve. The persona questions show the change plainly: before, the model does not know it is Pip.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DATA = Path(__file__).parents[1] / "data" / "chatbot"


def add_arguments(p) -> None:
    p.add_argument("--out", default=None, help="run folder (default runs/demo-<timestamp>)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop early (a quick look)")
    p.add_argument("--max-tokens", type=int, default=48)


def _answers(loaded, system, prompts, max_tokens) -> list[str]:
    from ..generation import answer_all

    chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in prompts]
    return [a.strip() for a in answer_all(loaded, chats, max_tokens)]


def command(args) -> int:
    from ..generation import load_tuned
    from ..trainer import run

    prompts = json.loads((DATA / "prompts.json").read_text())
    system, held_out = prompts["system"], prompts["held_out"]
    out = Path(args.out) if args.out else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    print("== before fine-tuning ==", flush=True)
    before = _answers(load_tuned(None, inference=True), system, held_out, args.max_tokens)
    for q, a in zip(held_out, before):
        print(f"Q: {q}\nA: {a}\n", flush=True)
    t0 = time.time()
    result = run({"data": {"path": str(DATA), "max_seq_length": 384, "group_by_length": True},
                  # the last 16 of 30 blocks (mlx-lm's default): the backward pass stops there, 16%
                  # less wall on 2 cores. One epoch of 17 steps of 8 at lr 1e-3 keeps the demo near
                  # 2 minutes on 2 cores, with a margin for a busy machine (bench/RESULTS.md)
                  "lora": {"rank": 16, "alpha": 32, "num_layers": 16},
                  # pack False with examples of similar length a step: the chatbot examples are all
                  # 50-88 tokens, so one example a row pads 7% and a packed row's attention spans 8
                  # examples (0.77-0.88x the speed on a 2-core CPU, bench/RESULTS.md, issue 28)
                  "training": {"epochs": args.epochs, "max_steps": args.max_steps, "batch_size": 8,
                               "pack": False, "learning_rate": 1e-3, "warmup_steps": 2, "eval_every": 20,
                               "log_every": 2, "save_every": 50},
                  "output": {"dir": str(out)}})
    minutes = (time.time() - t0) / 60
    print(f"\n== after fine-tuning ({result.step} steps, {minutes:.1f} min, "
          f"val_loss {result.final_val_loss:.3f}) ==", flush=True)
    after = _answers(load_tuned(result.run_dir, inference=True), system, held_out, args.max_tokens)
    lines = []
    for q, a, b in zip(held_out, before, after):
        print(f"Q: {q}\nA: {b}\n", flush=True)
        lines.append({"question": q, "before": a, "after": b})
    (result.run_dir / "demo_answers.json").write_text(json.dumps(lines, indent=2) + "\n")
    try:
        from ..report import write_report

        write_report(result.run_dir)
        print(f"loss curve and report: {result.run_dir}/report.html (PNG files beside it)")
    except ImportError as e:
        print(f"(no plots: {e}; pip install matplotlib)")
    print(f"adapters: {result.run_dir}/adapters   try: steadytune chat {result.run_dir}")
    return 0
