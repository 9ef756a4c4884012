"""Training data: reading, validating, templating and loss masks.

Five record formats, detected per file (mixing them in one file is an error):
  chat        {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...], "tools"?: [...]}
  sharegpt    {"conversations": [{"from": "human"|"gpt"|"system"|"user"|"assistant", "value": str}, ...],
               "system"?: str}  (LLaMA-Factory, axolotl and much of the Hub)
  completion  {"prompt": str, "completion": str}
  text        {"text": str}
  alpaca      {"instruction": str, "input"?: str, "output": str}
in JSONL (one record a line) or a JSON array file. Every problem is reported as `file:line: ...`
before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


@dataclass
class Splits:
    train: list[Example]
    valid: list[Example]
    test: list[Example] = field(default_factory=list)
    files: dict = field(default_factory=dict)   # split -> path
    notes: list[str] = field(default_factory=list)


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


def _read_lines(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed JSON) pairs; a JSON array file gives element indexes as lines."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
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


def _check_messages(rec, where, problems):
    msgs = rec.get("messages")
    if not isinstance(msgs, list):
        problems.append(f"{where}: 'messages' must be a list of {{role, content}} objects, "
                        f"got {type(msgs).__name__}")
        return
    if not msgs:
        problems.append(f"{where}: 'messages' is empty; a conversation needs at least a user and an assistant turn")
        return
    for i, m in enumerate(msgs):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{at} must be an object with 'role' and 'content', got {type(m).__name__}")
            continue
        role = m.get("role")
        if role not in ROLES:
            problems.append(f"{at}: unknown role {_short(role)}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            if content is None and m.get("tool_calls"):
                continue
            problems.append(f"{at}: 'content' must be a string, got {type(content).__name__}")
        elif role == "assistant" and not content.strip():
            problems.append(f"{at}: assistant content is empty")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
        problems.append(f"{where}: no assistant turn; add the answer the model should learn")
    tools = rec.get("tools")
    if tools is not None and not isinstance(tools, list):
        problems.append(f"{where}: 'tools' must be a list, got {type(tools).__name__}")


def _role_of(speaker) -> str | None:
    """The chat role of a ShareGPT speaker; None for anything else (a list or a dict included)."""
    return SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None


def _check_conversations(rec, where, problems):
    """ShareGPT records, validated like chat records; messages name `conversations[i]`."""
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        problems.append(f"{where}: 'conversations' must be a list of {{from, value}} objects, "
                        f"got {type(turns).__name__}")
        return
    if not turns:
        problems.append(f"{where}: 'conversations' is empty; a conversation needs at least a human and a gpt turn")
        return
    _check_str(rec, "system", where, problems, required=False)
    for i, m in enumerate(turns):
        at = f"{where}: conversations[{i}]"
        if not isinstance(m, dict):
            problems.append(f"{at} must be an object with 'from' and 'value', got {type(m).__name__}")
            continue
        speaker = m.get("from")
        if _role_of(speaker) is None:
            problems.append(f"{at}: unknown 'from' {_short(speaker)}; use one of {', '.join(SHAREGPT_ROLES)}")
        value = m.get("value")
        if not isinstance(value, str):
            problems.append(f"{at}: 'value' must be a string, got {type(value).__name__}")
        elif _role_of(speaker) == "assistant" and not value.strip():
            problems.append(f"{at}: gpt value is empty")
    if not any(isinstance(m, dict) and _role_of(m.get("from")) == "assistant" for m in turns):
        problems.append(f"{where}: no gpt (assistant) turn; add the answer the model should learn")


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


def read_file(path: str | Path) -> list[Example]:
    """Read and validate one data file; raise one UserError listing every problem (up to 20)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found; check the path")
    problems: list[str] = []
    rows = _read_lines(path)
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


def read_splits(path, files: dict, reader, what: str) -> dict:
    """split -> reader(file) for every file; every file's problems reported together."""
    data, problems = {}, []
    for split, f in files.items():
        try:
            data[split] = reader(f)
        except UserError as e:
            problems += e.problems or [str(e)]
    raise_problems(path, {}, problems, what)
    return data


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


def find_files(path: str | Path) -> dict[str, Path]:
    """split -> file for a data argument (a file = train only; a folder = train/valid/test)."""
    p = Path(path)
    if p.is_file():
        return {"train": p}
    if p.is_dir() and p.suffix in (".jsonl", ".json"):
        raise UserError(f"{p}: is a folder, not a data file; pass a .jsonl/.json file, or a folder with train.jsonl")
    if p.is_dir():
        files = {}
        for split in ("train", "valid", "test"):
            for ext in (".jsonl", ".json"):
                if (p / f"{split}{ext}").is_dir():
                    raise UserError(f"{p / f'{split}{ext}'}: is a folder, not a data file; put the records in a "
                                    f"file named {split}{ext}")
                if (p / f"{split}{ext}").is_file():
                    files[split] = p / f"{split}{ext}"
                    break
        if "train" not in files:
            raise UserError(f"{p}: no train.jsonl in this folder; add one (valid.jsonl and test.jsonl are optional)")
        return files
    raise UserError(f"{p}: data not found; pass a .jsonl/.json file or a folder with train.jsonl")


def holdout(n: int, fraction: float, seed: int) -> np.ndarray:
    """Indexes of the seeded validation hold-out: round(fraction*n), at least 1, never all."""
    if n < 2:
        raise UserError(f"only {n} training example: need at least 2 to hold one out for validation, "
                        "or add a valid.jsonl")
    k = min(max(1, round(fraction * n)), n - 1)
    rng = np.random.default_rng([seed, 0x5EED])
    return np.sort(rng.permutation(n)[:k])


def load_splits(path: str | Path, valid_fraction: float = 0.05, seed: int = 0,
                max_examples: int | None = None) -> Splits:
    """The train/valid/test examples of a data argument. Without a validation file a seeded
    `valid_fraction` of train is held out (0: none, validation is skipped); then `max_examples`
    keeps the first N of a seeded shuffle of train (the hold-out does not depend on N, so a
    10-example trial validates on the same examples as the full run)."""
    files = find_files(path)
    data = read_splits(path, files, read_file, "data")
    splits = Splits(data["train"], data.get("valid", []), data.get("test", []),
                    files={k: str(v) for k, v in files.items()})
    if not splits.valid and valid_fraction == 0:
        splits.notes.append(f"no validation: no validation file and valid_fraction 0, so all "
                            f"{len(splits.train)} training examples are trained on and validation is skipped")
    elif not splits.valid:
        if len(splits.train) < 2:
            raise UserError(f"{files['train']}: only {len(splits.train)} training example: need at least "
                            "2 to hold one out for validation, or add a valid.jsonl (or pass "
                            "--valid-fraction 0 to skip validation)")
        held = set(holdout(len(splits.train), valid_fraction, seed).tolist())
        splits.valid = [e for i, e in enumerate(splits.train) if i in held]
        splits.train = [e for i, e in enumerate(splits.train) if i not in held]
        splits.notes.append(f"no validation file: held out {len(held)} of {len(held) + len(splits.train)} "
                            f"training examples (seed {seed})")
    if max_examples is not None:
        n = len(splits.train)
        keep = first_after_shuffle(n, max_examples, seed)
        splits.train = [splits.train[i] for i in keep]
        splits.notes.append(f"max_examples {max_examples}: training on {len(keep)} of {n} training examples "
                            f"(the first of a seeded shuffle, seed {seed})")
    return splits


def first_after_shuffle(n: int, k: int, seed: int) -> np.ndarray:
    """Indexes (in file order) of the first k of a seeded shuffle of n examples; all if k >= n.
    Its own generator stream, so the choice does not move the hold-out or the epoch order."""
    rng = np.random.default_rng([seed, 0xF125])
    return np.sort(rng.permutation(n)[:k])


# --- tokenization and loss masks -------------------------------------------------------------


def render_chat(tokenizer, messages, tools=None, add_generation_prompt=False, where="chat") -> str:
    """The model's chat template applied to `messages`, as text.

    The template is code that came with the model. transformers renders it in Jinja's
    ImmutableSandboxedEnvironment, so it cannot reach Python internals; whatever it raises (a
    SecurityError for such an attempt, raise_exception() for a conversation it rejects, a syntax or
    type error) becomes a UserError naming the record and the model."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as e:
        msg = " ".join(str(e).split())[:200] or "no message"
        if type(e).__name__ == "TemplateError":  # the template's raise_exception(): the roles tell why
            msg += "; roles: " + ", ".join(str(m.get("role")) if isinstance(m, dict) else "?" for m in messages)
        raise UserError(f"{where}: the chat template of {_model_name(tokenizer)} failed on this conversation "
                        f"({type(e).__name__}: {msg}); use roles the template accepts, "
                        "or fix the model's chat_template") from None


def _model_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "the model"


def fold_system(messages: list) -> list:
    """The conversation with each system turn's text put at the start of the next user turn
    (separated by a blank line), for chat templates that have no system role (Mistral's v0.2
    raises on one). Returned unchanged where no user turn follows a system turn."""
    out, pending = [], []
    for m in messages:
        if m.get("role") == "system":
            pending.append(m["content"])
            continue
        if pending and m.get("role") == "user":
            m = dict(m, content="\n\n".join([*pending, m["content"]]))
            pending = []
        out.append(m)
    return messages if pending else out


_PROBE = ("STEADYTUNE_SYSTEM_PROBE", "STEADYTUNE_USER_PROBE", "STEADYTUNE_ANSWER_PROBE")


def template_has_system_role(tokenizer) -> bool:
    """False when the chat template rejects a system turn (raises) or silently drops it, but
    renders the same conversation with the system text folded into the user turn."""
    system, user, answer = _PROBE
    convo = [{"role": "system", "content": system}, {"role": "user", "content": user},
             {"role": "assistant", "content": answer}]
    try:
        if system in render_chat(tokenizer, convo):
            return True
    except UserError:
        pass
    try:
        render_chat(tokenizer, fold_system(convo))
    except UserError:
        return True  # it fails without a system turn too: not a system-role problem; say so per record
    return False


def check_template(splits: Splits, tokenizer, data_cfg) -> list[str]:
    """The model's chat template against the data, before any weights load: system turns folded
    per data_cfg.system_fold (auto resolves to fold, recorded in data_cfg, where the template has
    no system role), then one example of each conversation shape (kind, roles, tools) tokenized
    in full, so a template that rejects the data fails here, naming file:line and the fix.
    Returns notes for the run's first lines. A None tokenizer (not available without
    downloading) checks nothing."""
    if tokenizer is None:
        return []
    examples = splits.train + splits.valid
    with_system = [e for e in examples if e.messages and any(
        isinstance(m, dict) and m.get("role") == "system" for m in e.messages)]
    notes = []
    if with_system and getattr(tokenizer, "chat_template", None):
        mode = data_cfg.system_fold
        if mode != "fold" and not template_has_system_role(tokenizer):
            if mode == "error":
                raise UserError(f"{with_system[0].where}: the chat template of {_model_name(tokenizer)} has "
                                f"no system role and {len(with_system)} examples have a system turn; remove "
                                "them, or pass --system-fold auto to fold each into the first user turn")
            mode = data_cfg.system_fold = "fold"
            notes.append(f"the chat template of {_model_name(tokenizer)} has no system role: the system turn "
                         f"of {len(with_system)} examples is folded into the first user turn "
                         "(--system-fold error refuses instead)")
        if mode == "fold":
            for e in with_system:
                e.messages = fold_system(e.messages)
    seen = set()
    for e in examples:
        shape = (e.kind, tuple(m.get("role") for m in e.messages or () if isinstance(m, dict)), bool(e.tools))
        if shape not in seen:
            seen.add(shape)
            tokenize(e, tokenizer, data_cfg.train_on_prompt)
    return notes


def _render(tokenizer, messages, tools, add_generation_prompt, where) -> str:
    return render_chat(tokenizer, messages, tools, add_generation_prompt, where)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _eos_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _chat_segments(ex: Example, tokenizer) -> list[tuple[str, bool]]:
    """Split the templated conversation into (text, is_target) pieces.

    Each assistant turn's target text is found as the difference between the template rendered up to
    that turn with the generation prompt (what the model sees at inference) and rendered through it.
    Pieces are tokenized separately, so the prompt tokens are exactly those inference would use.
    """
    msgs, tools = ex.messages, ex.tools
    full = _render(tokenizer, msgs, tools, False, ex.where)
    segs, pos = [], 0
    for i, m in enumerate(msgs):
        if m.get("role") != "assistant":
            continue
        start = len(_render(tokenizer, msgs[:i], tools, True, ex.where)) if i else 0
        upto = _render(tokenizer, msgs[: i + 1], tools, False, ex.where)
        end = len(upto)
        if not (full.startswith(upto) and upto[:start] == full[:start]) or start < pos:
            raise UserError(f"{ex.where}: the chat template does not render turns as prefixes of the "
                            "conversation, so assistant tokens cannot be masked; use train_on_prompt: true")
        segs += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    segs.append((full[pos:], False))
    return segs


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one call: a fast (Rust) tokenizer encodes the batch on all cores,
    where one call per text costs a Python round trip each (949 alpaca examples: 2,000 calls,
    seconds of a run's start-up). The same ids as `encode(text, add_special_tokens=False)`."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper holds the HF one
    if texts and getattr(hf, "is_fast", False):
        return [list(x) for x in hf(texts, add_special_tokens=False)["input_ids"]]
    return [_encode(tokenizer, t) for t in texts]


def tokenize(ex: Example, tokenizer, train_on_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids and a per-token target mask (True = in the loss).

    Targets are the assistant turns, each ending with the template's end-of-turn/EOS token (appended
    when the template has none) so the tuned model learns to stop. Tokens the template adds after the
    end-of-turn token (a newline, say) are prompt, not target.
    """
    return tokenize_many([ex], tokenizer, train_on_prompt)[0]


def tokenize_many(examples: list[Example], tokenizer, train_on_prompt: bool = False) -> list[tuple[list[int], list[bool]]]:
    """tokenize() of every example, the texts of all of them encoded in one batch (_encode_many)."""
    eos = _eos_ids(tokenizer)
    pieces, texts = [], []
    for ex in examples:
        if ex.kind == "text":
            segs = [(ex.text, True)]
        elif not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{ex.where}: the model's tokenizer has no chat template, so {ex.kind} records "
                            "cannot be formatted; use {\"text\"} records or a chat model")
        else:
            segs = _chat_segments(ex, tokenizer)
        pieces.append(segs)
        texts += [text for text, _ in segs if text]
    encoded = iter(_encode_many(tokenizer, texts))
    return [_assemble(ex, [(next(encoded) if text else [], target) for text, target in segs], tokenizer,
                      eos, train_on_prompt) for ex, segs in zip(examples, pieces)]


def _assemble(ex: Example, segs: list[tuple[list[int], bool]], tokenizer, eos: set,
              train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    """Ids and mask of one example from its encoded (ids, is_target) pieces (tokenize's rules)."""
    if ex.kind == "text":
        ids = segs[0][0]
        bos = tokenizer.bos_token_id
        if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids or ids[-1] not in eos:
            ids.append(tokenizer.eos_token_id)
        return ids, [True] * len(ids)
    ids, mask = [], []
    for toks, target in segs:
        if target:
            last = max((j for j, t in enumerate(toks) if t in eos), default=None)
            if last is None:
                toks, tail = toks + [tokenizer.eos_token_id], []
            else:
                toks, tail = toks[: last + 1], toks[last + 1:]
            ids += toks + tail
            mask += [True] * len(toks) + [train_on_prompt] * len(tail)
        else:
            ids += toks
            mask += [train_on_prompt] * len(toks)
    return ids, mask


@dataclass
class Tokenized:
    ids: list[list[int]]
    masks: list[list[bool]]
    truncated: int = 0

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    def target_tokens(self) -> np.ndarray:
        """Tokens in the loss per example (targets shift by one: the first token predicts nothing)."""
        return np.array([sum(m[1:]) for m in self.masks], dtype=np.int64)


def tokenize_all(examples: list[Example], tokenizer, max_seq_length: int, overlong: str = "truncate",
                 train_on_prompt: bool = False) -> Tokenized:
    out = Tokenized([], [])
    too_long = []
    for ex, (ids, mask) in zip(examples, tokenize_many(examples, tokenizer, train_on_prompt)):
        if len(ids) > max_seq_length:
            too_long.append(f"{ex.where}: {len(ids)} tokens is longer than max_seq_length {max_seq_length}")
            ids, mask = ids[:max_seq_length], mask[:max_seq_length]
            out.truncated += 1
        if not any(mask[1:]):
            raise UserError(f"{ex.where}: no target tokens left (the answer starts after max_seq_length "
                            f"{max_seq_length}); raise max_seq_length or shorten the prompt")
        out.ids.append(ids)
        out.masks.append(mask)
    if too_long and overlong == "error":
        raise UserError(f"{len(too_long)} examples are longer than max_seq_length; raise it or use "
                        "overlong: truncate", too_long)
    return out


def validate_path(path: str | Path) -> dict:
    """Validate without a model: {split: {"file", "records", "format"}}; raises UserError."""
    files = find_files(path)
    summary, problems = {}, []
    for split, f in files.items():
        try:
            exs = read_file(f)
            summary[split] = {"file": str(f), "records": len(exs), "format": exs[0].kind}
        except UserError as e:
            problems += e.problems or [str(e)]
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{path}: {len(problems)} problems in the data", problems)
    return summary
