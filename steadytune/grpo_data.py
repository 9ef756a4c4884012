"""A verifiable task for GRPO, generated: small arithmetic with known answers.

    arithmetic(n, seed)      -> [{"messages": [EXAMPLE..., {"role": "user", "content": "What is 17 + 25? ..."}],
                                  "answer": "42"}, ...]
    write_arithmetic(folder) -> train.jsonl and valid.jsonl in `folder`

The package holds the default set (400 train, 40 held out, seed 0) in data/arithmetic
(`steadytune train --method grpo --data arithmetic`); a test checks it is this module's output.

Each prompt asks for the result inside <answer></answer>, so the built-in `answer` and `format`
rewards (rewards.py) score it, after one worked example as an earlier turn of the conversation:
the default model (SmolLM2-135M-Instruct) never writes the tag when only asked to (0 of 32
completions), and GRPO learns only from groups whose completions differ in reward. With the
example it writes it in about half of its samples at temperature 1 (greedy: 7 of 8). The example
shows the sum before the tag: with a bare <answer>5</answer> the model learned to skip the
working and its accuracy fell from 0.38 to 0.05 while the format reached 1.0 (bench/RESULTS.md). Sums and differences of numbers
below 20 and products of one-digit numbers: easy enough that it gets some right before training,
hard enough to improve.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

INSTRUCTION = "Work it out, then give the final number inside <answer></answer>."
EXAMPLE = [{"role": "user", "content": f"What is 2 + 3? {INSTRUCTION}"},
           {"role": "assistant", "content": "2 + 3 = 5\n<answer>5</answer>"}]


def arithmetic(n: int, seed: int = 0) -> list[dict]:
    """`n` prompts with their answers, the same for the same seed."""
    rng = np.random.default_rng([seed, 0xA417])
    out = []
    for _ in range(n):
        op = rng.choice(["+", "-", "*"])
        if op == "*":
            a, b = (int(x) for x in rng.integers(2, 10, size=2))
        else:
            a, b = (int(x) for x in rng.integers(1, 20, size=2))
            if op == "-" and b > a:
                a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append({"messages": EXAMPLE + [{"role": "user", "content": f"What is {a} {op} {b}? {INSTRUCTION}"}],
                    "answer": str(value)})
    return out


def write_arithmetic(folder: str | Path, train: int = 400, valid: int = 40, seed: int = 0) -> Path:
    """train.jsonl and valid.jsonl of arithmetic prompts in `folder` (created); returns it. The
    validation prompts come from another stream and none of them is a training prompt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    question = lambda r: r["messages"][-1]["content"]  # noqa: E731
    seen = {question(r) for r in arithmetic(train, seed)}
    held = [r for r in arithmetic(20 * valid, seed + 1) if question(r) not in seen]
    held = [r for i, r in enumerate(held) if question(r) not in {question(x) for x in held[:i]}][:valid]
    for name, records in (("train", arithmetic(train, seed)), ("valid", held)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder
