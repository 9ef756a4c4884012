"""Record formats of training data: a data file's JSON read and each record validated in its format.

Five record formats, detected per file (mixing them in one file is an error):
  chat        {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...], "tools"?: [...]}
  sharegpt    {"conversations": [{"from": "human"|"gpt"|"system"|"user"|"assistant", "value": str}, ...],
               "system"?: str}  (LLaMA-Factory, axolotl and much of the Hub)
  completion  {"prompt": str, "completion": str}
  text        {"text": str}
  alpaca      {"instruction": str, "input"?: str, "output": str}
in JSONL (one record a line) or a JSON array file. Every problem is reported as `file:line: ...`
before any model loads. The preference-pair reader (pairs.py) shares the JSON reading and the
text checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError


ROLES = ("system", "user", "assistant", "tool")
FORMATS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
MAX_PROBLEMS = 20
# ShareGPT speakers -> chat roles ("human"/"gpt" in the original dumps; many tools write user/assistant)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclass
class Example:
    where: str                    # "file:line", for messages
    kind: str                     # one of FORMATS
    messages: list | None = None  # chat form (every format but text)
    text: str | None = None       # text form
    tools: list | None = None


def _loads(text: str):
    """json.loads that reports Python's own limits (integers over 4300 digits, nesting deeper than
    the recursion limit) as malformed JSON instead of letting ValueError/RecursionError escape."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested deeper than Python's limit", text, 0) from None
    except ValueError:
        raise json.JSONDecodeError("an integer longer than Python's 4300-digit limit", text, 0) from None


def read_bytes(path: Path) -> bytes:
    """A data file's bytes, read once: parsed here and hashed for the run's data fingerprint."""
    if not path.is_file():
        raise UserError(f"{path}: data file not found; check the path")
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None


def _read_lines(path: Path, raw: bytes) -> list[tuple[int, object]]:
    """(line number, parsed JSON) pairs of a file's bytes `raw`; a JSON array file gives element
    indexes as lines."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#x}); re-save the file as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty; add at least one record")
    if "\x00" in text:  # NUL is valid UTF-8 but never valid JSON: UTF-16 without a BOM, or binary
        line = text[: text.index("\x00")].count("\n") + 1
        raise UserError(f"{path}:{line}: NUL bytes in the text (UTF-16 or a binary file?); "
                        "re-save the file as UTF-8 JSONL")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            arr = _loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the syntax") from None
        if not isinstance(arr, list):
            raise UserError(f"{path}: a .json data file must hold an array of records; "
                            "use JSONL for one record per line")
        return [(i + 1, r) for i, r in enumerate(arr)]
    out, problems = [], []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            out.append((n, _loads(line)))
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                            "each line must be one JSON object")
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{path}: {len(problems)} malformed lines", problems)
    if not out:
        raise UserError(f"{path}: the file is empty; add at least one record")
    return out


def _short(value, limit: int = 40) -> str:
    """repr for messages, cut so a hostile megabyte-long value cannot flood the terminal."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _has_lone_surrogate(value) -> bool:
    """True if any string in a parsed record holds an unpaired surrogate (JSON allows the escape
    "\\ud800"; Python keeps it; tokenizers then fail). Iterative: records may nest deeply."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v
    return False


def detect_format(rec: object) -> str | None:
    if not isinstance(rec, dict):
        return None
    for kind, keys in FORMATS.items():
        if keys[0] in rec:
            return kind
    return None


def _check_str(rec, key, where, problems, required=True):
    v = rec.get(key)
    if v is None:
        if required:
            problems.append(f"{where}: missing field '{key}'")
        return
    if not isinstance(v, str):
        problems.append(f"{where}: '{key}' must be a string, got {type(v).__name__}")
    elif required and not v.strip():
        problems.append(f"{where}: '{key}' is empty")


def _role_of(speaker) -> str | None:
    """The chat role of a ShareGPT speaker; None for anything else (a list or a dict included)."""
    return SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None


@dataclass(frozen=True)
class _Turns:
    """How a conversation format names its parts in messages: chat records say
    messages[i] {role, content}, ShareGPT ones conversations[i] {from, value}."""

    field: str             # the record's list of turns
    speaker: str           # a turn's speaker key
    text: str              # a turn's text key
    speaker_name: str      # the speaker key, as an unknown-speaker message names it
    needs: str             # the turns a conversation needs at least
    assistant: str         # the assistant's name
    assistant_turn: str    # the assistant's name in "no ... turn"
    speakers: tuple        # the speakers accepted, as listed in messages
    role_of: Callable      # speaker -> chat role; None if unknown
    tool_calls: bool       # a turn with tool_calls may have no text


_CHAT = _Turns("messages", "role", "content", "role", "a user and an assistant", "assistant", "assistant",
               ROLES, lambda role: role if role in ROLES else None, tool_calls=True)
_SHAREGPT = _Turns("conversations", "from", "value", "'from'", "a human and a gpt", "gpt", "gpt (assistant)",
                   tuple(SHAREGPT_ROLES), _role_of, tool_calls=False)


def _turn_list(rec, where, problems, t: _Turns) -> list | None:
    """The record's turns (a non-empty list), or None after a problem."""
    turns = rec.get(t.field)
    if not isinstance(turns, list):
        problems.append(f"{where}: '{t.field}' must be a list of {{{t.speaker}, {t.text}}} objects, "
                        f"got {type(turns).__name__}")
        return None
    if not turns:
        problems.append(f"{where}: '{t.field}' is empty; a conversation needs at least {t.needs} turn")
        return None
    return turns


def _check_turns(turns: list, where, problems, t: _Turns) -> None:
    """Each turn's speaker and text, and at least one answer to learn."""
    for i, m in enumerate(turns):
        at = f"{where}: {t.field}[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{at} must be an object with '{t.speaker}' and '{t.text}', got {type(m).__name__}")
            continue
        speaker, text = m.get(t.speaker), m.get(t.text)
        if t.role_of(speaker) is None:
            problems.append(f"{at}: unknown {t.speaker_name} {_short(speaker)}; use one of {', '.join(t.speakers)}")
        if not isinstance(text, str):
            if not (t.tool_calls and text is None and m.get("tool_calls")):
                problems.append(f"{at}: '{t.text}' must be a string, got {type(text).__name__}")
        elif t.role_of(speaker) == "assistant" and not text.strip():
            problems.append(f"{at}: {t.assistant} {t.text} is empty")
    if not any(isinstance(m, dict) and t.role_of(m.get(t.speaker)) == "assistant" for m in turns):
        problems.append(f"{where}: no {t.assistant_turn} turn; add the answer the model should learn")


def _check_messages(rec, where, problems):
    msgs = _turn_list(rec, where, problems, _CHAT)
    if msgs is None:
        return
    _check_turns(msgs, where, problems, _CHAT)
    tools = rec.get("tools")
    if tools is not None and not isinstance(tools, list):
        problems.append(f"{where}: 'tools' must be a list, got {type(tools).__name__}")


def _check_conversations(rec, where, problems):
    """ShareGPT records, validated like chat records; messages name `conversations[i]`."""
    turns = _turn_list(rec, where, problems, _SHAREGPT)
    if turns is None:
        return
    _check_str(rec, "system", where, problems, required=False)
    _check_turns(turns, where, problems, _SHAREGPT)


def _to_example(rec: dict, kind: str, where: str) -> Example:
    if kind == "chat":
        return Example(where, kind, messages=rec["messages"], tools=rec.get("tools"))
    if kind == "sharegpt":
        msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
        msgs += [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in rec["conversations"]]
        return Example(where, kind, messages=msgs)
    if kind == "completion":
        return Example(where, kind, messages=[{"role": "user", "content": rec["prompt"]},
                                              {"role": "assistant", "content": rec["completion"]}])
    if kind == "alpaca":
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        return Example(where, kind, messages=[{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": rec["output"]}])
    return Example(where, kind, text=rec["text"])


def read_file(path: str | Path, raw: bytes | None = None) -> list[Example]:
    """Read and validate one data file (`raw`: its bytes, if read already); raise one UserError
    listing every problem."""
    path = Path(path)
    problems: list[str] = []
    rows = _read_lines(path, read_bytes(path) if raw is None else raw)
    kinds = {}
    examples = []
    for n, rec in rows:
        where = f"{path}:{n}"
        kind = detect_format(rec)
        if kind is None:
            if not isinstance(rec, dict):
                problems.append(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
            else:
                keys = ", ".join(_short(k, 30) for k in list(rec)[:5]) + (", ..." if len(rec) > 5 else "")
                problems.append(f"{where}: unknown record format (keys: {keys or 'none'}); "
                                "use messages, prompt+completion, text, instruction+output, or conversations (ShareGPT)")
            continue
        kinds.setdefault(kind, where)
        before = len(problems)
        if kind == "chat":
            _check_messages(rec, where, problems)
        elif kind == "sharegpt":
            _check_conversations(rec, where, problems)
        elif kind == "completion":
            _check_str(rec, "prompt", where, problems)
            _check_str(rec, "completion", where, problems)
        elif kind == "alpaca":
            _check_str(rec, "instruction", where, problems)
            _check_str(rec, "output", where, problems)
            _check_str(rec, "input", where, problems, required=False)
        else:
            _check_str(rec, "text", where, problems)
        if len(problems) == before and _has_lone_surrogate(rec):
            problems.append(f"{where}: a string holds an unpaired surrogate escape (like \\ud800), "
                            "which is not text; fix or remove the escape")
        if len(problems) == before:
            examples.append(_to_example(rec, kind, where))
    raise_problems(path, kinds, problems, "data")
    return examples


def raise_problems(path, kinds: dict, problems: list[str], what: str) -> None:
    """A file's problems as one UserError: mixed formats first, then one problem as it is or all
    of them at once (shared by the SFT and the pair readers)."""
    if len(kinds) > 1:
        first = ", ".join(f"{k} (first at {w})" for k, w in kinds.items())
        problems.insert(0, f"{path}: records mix formats: {first}; use one format per file")
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{path}: {len(problems)} problems in the {what}", problems)
