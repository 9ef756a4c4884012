"""Rewards for GRPO (`--reward answer,format,my_rewards.py:brevity`), and a verifiable task to try them on.

A reward is a function `(prompt: str, completion: str, record: dict) -> float`: the prompt as
text (a chat prompt's last user turn), the completion's text, and the whole data record (so a
reward can read `record["answer"]` or any other field). Built-ins:

    answer   1.0 when the final answer equals the record's "answer": the text inside the last
             <answer>...</answer>, or else the last number in the completion; numbers compare as
             numbers (" 12.0" equals "12"), anything else as stripped text
    format   1.0 when the completion holds exactly one <answer>...</answer> with something in it

A reward that raises or returns something that is not a finite number stops the run with one
line naming the function and the record (file:line): a silently wrong reward trains the wrong
thing for hours.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np

from .errors import UserError

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def final_answer(completion: str) -> str | None:
    """The text inside the last <answer>...</answer>, else the last number, else None."""
    tagged = _ANSWER.findall(completion)
    if tagged:
        return tagged[-1].strip()
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def _same(a: str, b) -> bool:
    a, b = str(a).strip(), str(b).strip()
    try:
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return a == b


def answer(prompt: str, completion: str, record: dict) -> float:
    """1.0 when the completion's final answer equals record["answer"]."""
    if "answer" not in record:
        raise KeyError("the record has no 'answer' field (the answer reward compares against it)")
    got = final_answer(completion)
    return float(got is not None and _same(got, record["answer"]))


def format(prompt: str, completion: str, record: dict) -> float:  # noqa: A001 (the reward's name)
    """1.0 when the completion holds exactly one non-empty <answer>...</answer>."""
    tagged = _ANSWER.findall(completion)
    return float(len(tagged) == 1 and completion.count("<answer>") == 1 and bool(tagged[0].strip()))


BUILTIN = {"answer": answer, "format": format}


def load_rewards(spec: str | list) -> list[tuple[str, object]]:
    """(name, function) for each comma-separated entry of `spec`: a built-in name or
    `file.py:function`. Refused with one line: an unknown name, a missing file or function."""
    items = spec if isinstance(spec, list) else [s.strip() for s in str(spec).split(",")]
    out = []
    for item in items:
        if not item:
            continue
        if item in BUILTIN:
            out.append((item, BUILTIN[item]))
            continue
        path, sep, name = item.rpartition(":")
        if not sep or not path.endswith(".py"):
            raise UserError(f"--reward: unknown reward {item!r}; use {', '.join(BUILTIN)} or FILE.py:FUNCTION")
        file = Path(path)
        if not file.is_file():
            raise UserError(f"--reward {item}: {file} not found")
        spec_ = importlib.util.spec_from_file_location(f"steadytune_reward_{file.stem}", file)
        module = importlib.util.module_from_spec(spec_)
        try:
            spec_.loader.exec_module(module)
        except Exception as e:  # the user's file: say where it failed, in one line
            raise UserError(f"--reward {item}: importing {file} failed: {type(e).__name__}: {e}") from None
        fn = getattr(module, name, None)
        if not callable(fn):
            raise UserError(f"--reward {item}: {file} has no function {name!r}")
        out.append((f"{file.stem}.{name}", fn))
    if not out:
        raise UserError("--method grpo needs --reward: answer, format or FILE.py:FUNCTION (comma-separated)")
    return out


def score(rewards: list, prompt: str, completions: list[str], record: dict, where: str) -> np.ndarray:
    """(completions, rewards) float64 array of every reward of every completion of one prompt."""
    out = np.zeros((len(completions), len(rewards)))
    for j, (name, fn) in enumerate(rewards):
        for i, c in enumerate(completions):
            try:
                v = fn(prompt, c, record)
            except Exception as e:
                raise UserError(f"{where}: reward {name} raised {type(e).__name__}: {e}; fix the function "
                                "or the record (the last checkpoint is intact)") from None
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(float(v)):
                raise UserError(f"{where}: reward {name} returned {v!r}, not a finite number; it must "
                                "return a float (the last checkpoint is intact)")
            out[i, j] = float(v)
    return out
