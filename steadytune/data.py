"""Training data: a data argument's files found and read (the record formats and their checks:
formats.py), the validation hold-out, templating and loss masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .formats import Example, raise_problems, read_bytes, read_file  # data.Example etc. stay importable
from .runinfo import data_fingerprint


@dataclass
class Splits:
    train: list[Example]
    valid: list[Example]
    test: list[Example] = field(default_factory=list)
    files: dict = field(default_factory=dict)   # split -> path
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""                       # runinfo.data_fingerprint of the files read


def read_splits(path, files: dict, reader, what: str) -> tuple[dict, str]:
    """(split -> reader(file, its bytes), data fingerprint) for every file, each file read once;
    every file's problems reported together."""
    data, raw, problems = {}, {}, []
    for split, f in files.items():
        try:
            raw[split] = read_bytes(Path(f))
            data[split] = reader(f, raw[split])
        except UserError as e:
            problems += e.problems or [str(e)]
    raise_problems(path, {}, problems, what)
    return data, data_fingerprint(raw)


def hold_out(splits, valid_fraction: float, seed: int, what: str) -> None:
    """Move a seeded `valid_fraction` of `splits.train` (Splits or pairs.PairSplits) to its
    validation set, with a note: for data without a validation file."""
    held = set(holdout(len(splits.train), valid_fraction, seed).tolist())
    splits.valid = [e for i, e in enumerate(splits.train) if i in held]
    splits.train = [e for i, e in enumerate(splits.train) if i not in held]
    splits.notes.append(f"no validation file: held out {len(held)} of {len(held) + len(splits.train)} "
                        f"training {what} (seed {seed})")


def keep_first(splits, max_examples: int, seed: int) -> int:
    """Keep the first `max_examples` of a seeded shuffle of `splits.train`; returns how many
    there were."""
    n = len(splits.train)
    splits.train = [splits.train[i] for i in first_after_shuffle(n, max_examples, seed)]
    return n


BUNDLED = ("chatbot", "arithmetic")  # data sets in the package: steadytune/data/NAME


def find_files(path: str | Path) -> dict[str, Path]:
    """split -> file for a data argument (a file = train only; a folder = train/valid/test; the
    name of a bundled set, where no such file or folder is here)."""
    p = Path(path)
    if str(path) in BUNDLED and not p.exists():
        p = Path(__file__).parent / "data" / str(path)
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
    data, fingerprint = read_splits(path, files, read_file, "data")
    splits = Splits(data["train"], data.get("valid", []), data.get("test", []),
                    files={k: str(v) for k, v in files.items()}, fingerprint=fingerprint)
    if not splits.valid and valid_fraction == 0:
        splits.notes.append(f"no validation: no validation file and valid_fraction 0, so all "
                            f"{len(splits.train)} training examples are trained on and validation is skipped")
    elif not splits.valid:
        if len(splits.train) < 2:
            raise UserError(f"{files['train']}: only {len(splits.train)} training example: need at least "
                            "2 to hold one out for validation, or add a valid.jsonl (or pass "
                            "--valid-fraction 0 to skip validation)")
        hold_out(splits, valid_fraction, seed, "examples")
    if max_examples is not None:
        n = keep_first(splits, max_examples, seed)
        splits.notes.append(f"max_examples {max_examples}: training on {len(splits.train)} of {n} training "
                            f"examples (the first of a seeded shuffle, seed {seed})")
    return splits


def first_after_shuffle(n: int, k: int, seed: int) -> np.ndarray:
    """Indexes (in file order) of the first k of a seeded shuffle of n examples; all if k >= n.
    Its own generator stream, so the choice does not move the hold-out or the epoch order."""
    rng = np.random.default_rng([seed, 0xF125])
    return np.sort(rng.permutation(n)[:k])


def val_subset(valid: list, k: int | None, seed: int) -> list:
    """A seeded `k` of the validation examples or pairs (data.val_max_examples), in their order;
    all if fewer or k is None."""
    if k is None or k >= len(valid):
        return valid
    keep = np.sort(np.random.default_rng([seed, 0xE7A1]).permutation(len(valid))[:k])
    return [valid[i] for i in keep]


# --- tokenization and loss masks -------------------------------------------------------------


def render_chat(tokenizer, messages, tools=None, add_generation_prompt=False, where="chat",
                template_kwargs: dict | None = None) -> str:
    """The model's chat template applied to `messages`, as text.

    The template is code that came with the model. transformers renders it in Jinja's
    ImmutableSandboxedEnvironment, so it cannot reach Python internals; whatever it raises (a
    SecurityError for such an attempt, raise_exception() for a conversation it rejects, a syntax or
    type error) becomes a UserError naming the record and the model."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **(template_kwargs or {}))
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
    downloading) checks nothing. A --chat-template file is given to the tokenizer first."""
    if tokenizer is None:
        return []
    use_chat_template(tokenizer, data_cfg)
    examples = splits.train + splits.valid
    with_system = [e for e in examples if e.messages and any(
        isinstance(m, dict) and m.get("role") == "system" for m in e.messages)]
    notes = []
    if with_system and has_chat_template(tokenizer):
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


def _render(tokenizer, messages, tools, add_generation_prompt, where, template_kwargs=None) -> str:
    return render_chat(tokenizer, messages, tools, add_generation_prompt, where, template_kwargs)


# --- token ids: exactly what the model sees ---------------------------------------------------
# One rule for every format, the one mlx-lm follows at inference (mlx_lm.generate, its text
# dataset): text the model reads raw is encoded as the tokenizer encodes it, its special tokens
# included (the BOS of SentencePiece, Gemma and Llama tokenizers); text rendered by a chat template
# is encoded without them, since the template writes its own BOS (encoding it with them would
# double it). A format that ends a turn ends with EOS. Nothing else is added.


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat_template(tokenizer, data_cfg) -> None:
    """Give `tokenizer` the chat template of data_cfg.chat_template (a Jinja file, or a JSON file
    with a "chat_template" key) for the run; the path is recorded absolute in data_cfg, so the run's
    config.yaml lets generate and chat use the same template. Nothing without the option."""
    path = getattr(data_cfg, "chat_template", None)
    if not path or tokenizer is None:
        return
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--chat-template {path}: cannot read the template "
                        f"({getattr(e, 'strerror', None) or e}); pass a Jinja chat template file") from None
    if p.suffix == ".json":
        import json

        try:
            text = json.loads(text)["chat_template"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--chat-template {path}: a .json template file must hold an object with a "
                            "\"chat_template\" string; or pass the Jinja text in a .jinja file") from None
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--chat-template {path}: the file is empty; pass a Jinja chat template")
    tokenizer.chat_template = text
    tokenizer.has_chat_template = True
    if hasattr(tokenizer, "_chat_template"):  # mlx-lm's own renderer for some models would win over it
        tokenizer._chat_template = None
    data_cfg.chat_template = str(p.resolve())


def _starts_with_bos(tokenizer, text: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def _raw_text(tokenizer, text: str) -> tuple[str, bool]:
    """(text, encode with the tokenizer's special tokens?) of text the model reads without a
    template: with them, unless the text writes the BOS itself (as mlx-lm's server decides)."""
    return text, not _starts_with_bos(tokenizer, text)


def _templated(text: str) -> tuple[str, bool]:
    return text, False


def raw_text_ids(tokenizer, text: str) -> list[int]:
    """The ids of text a model reads without a chat template (a text record without its EOS, a
    base model's prompt): as the tokenizer encodes it, its BOS included."""
    return _encode_many(tokenizer, [_raw_text(tokenizer, text)])[0]


def prompt_ids(tokenizer, messages: list[dict], tools=None, where: str = "prompt",
               template_kwargs: dict | None = None) -> list[int]:
    """The ids a model is given to answer `messages`: the chat template with its generation
    prompt, or, on a model without one, the turns' text joined by newlines as raw text (the BOS
    included), as a base model is trained on `prompt` records. The same ids a training example's
    prompt has (tokenize), and those mlx_lm.generate gives the model."""
    if has_chat_template(tokenizer):
        return _encode_many(tokenizer, [_templated(_render(tokenizer, messages, tools, True, where,
                                                           template_kwargs))])[0]
    return raw_text_ids(tokenizer, "\n".join(str(m.get("content") or "") for m in messages))


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


def _encode_many(tokenizer, pieces: list[tuple[str, bool]]) -> list[list[int]]:
    """Token ids of many (text, with special tokens?) pieces, a batch per kind: a fast (Rust)
    tokenizer encodes a batch on all cores, where one call per text costs a Python round trip each
    (949 alpaca examples: 2,000 calls, seconds of a run's start-up). The same ids as
    `tokenizer.encode(text, add_special_tokens=...)`."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper holds the HF one
    out: list = [None] * len(pieces)
    for special in (False, True):
        at = [i for i, (_, s) in enumerate(pieces) if s == special]
        texts = [pieces[i][0] for i in at]
        if texts and getattr(hf, "is_fast", False):
            ids = hf(texts, add_special_tokens=special)["input_ids"]
        else:
            ids = [tokenizer.encode(t, add_special_tokens=special) for t in texts]
        for i, x in zip(at, ids):
            out[i] = list(x)
    return out


def tokenize(ex: Example, tokenizer, train_on_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids and a per-token target mask (True = in the loss), by the rule above.

    text: the text as the tokenizer encodes it (its BOS included) + EOS, all target (mlx-lm's text
    dataset). prompt/completion on a model without a chat template (a base model): prompt +
    completion encoded as one text (its BOS included) + EOS, the prompt's tokens masked (TRL's
    rule). Every other case, through the chat template: targets are the assistant turns, each
    ending with the template's end-of-turn/EOS token (appended when the template has none) so the
    tuned model learns to stop; tokens the template adds after the end-of-turn token (a newline,
    say) are prompt, not target.
    """
    return tokenize_many([ex], tokenizer, train_on_prompt)[0]


def _plan(ex: Example, tokenizer) -> tuple[str, list[tuple[str, bool]], list[bool]]:
    """(how the pieces assemble, the (text, special tokens?) pieces to encode, which are targets)."""
    if ex.kind == "text":
        return "text", [_raw_text(tokenizer, ex.text)], [True]
    if not has_chat_template(tokenizer):
        if ex.kind == "completion":
            prompt, answer = ex.messages[0]["content"], ex.messages[1]["content"]
            return "completion", [_raw_text(tokenizer, prompt), _raw_text(tokenizer, prompt + answer)], [False, True]
        raise UserError(f"{ex.where}: the model's tokenizer has no chat template (a base model), so "
                        f"{ex.kind} records cannot be formatted; pass --chat-template FILE (a Jinja chat "
                        "template), or use {\"prompt\", \"completion\"} or {\"text\"} records")
    segs = _chat_segments(ex, tokenizer)
    return "chat", [_templated(t) for t, _ in segs], [target for _, target in segs]


def tokenize_many(examples: list[Example], tokenizer, train_on_prompt: bool = False) -> list[tuple[list[int], list[bool]]]:
    """tokenize() of every example, the texts of all of them encoded in one batch (_encode_many)."""
    eos = _eos_ids(tokenizer)
    plans = [_plan(ex, tokenizer) for ex in examples]
    flat = [p for _, pieces, _ in plans for p in pieces if p[0]]
    encoded = iter(_encode_many(tokenizer, flat))
    out = []
    for how, pieces, targets in plans:
        ids = [next(encoded) if text else [] for text, _ in pieces]
        out.append(_assemble(how, ids, targets, tokenizer, eos, train_on_prompt))
    return out


def _with_eos(ids: list[int], tokenizer, eos: set) -> list[int]:
    return ids if ids and ids[-1] in eos else ids + [tokenizer.eos_token_id]


def _assemble(how: str, pieces: list[list[int]], targets: list[bool], tokenizer, eos: set,
              train_on_prompt: bool) -> tuple[list[int], list[bool]]:
    """Ids and mask of one example from its encoded pieces (tokenize's rules)."""
    if how == "text":
        ids = _with_eos(pieces[0], tokenizer, eos)
        return ids, [True] * len(ids)
    if how == "completion":
        prompt, ids = pieces[0], _with_eos(pieces[1], tokenizer, eos)
        # where prompt and completion merge into one token at the seam, that token is the answer's
        n = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
        return ids, [train_on_prompt] * n + [True] * (len(ids) - n)
    ids, mask = [], []
    for toks, target in zip(pieces, targets):
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

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    def step_lengths(self) -> np.ndarray:
        """The lengths the epoch's steps are planned from (batching.plan_epoch)."""
        return self.lengths()

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
    data, _ = read_splits(path, files, read_file, "data")
    return {split: {"file": str(files[split]), "records": len(exs), "format": exs[0].kind}
            for split, exs in data.items()}
