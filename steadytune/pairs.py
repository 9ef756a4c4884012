"""Preference pairs before the model: reading and validating, templating with answer-only masks.

Two record formats, detected per file:
  trl       {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...],
             "chosen": {"from": "gpt", "value": str}, "rejected": {"from": "gpt", "value": str},
             "system"?: str}
in JSONL or a JSON array file. Every problem is reported as `file:line: ...` before a model loads.

A pair is two sequences, prompt + chosen and prompt + rejected. Only the answer's tokens (its
assistant turns, each with its end-of-turn token) count in a sequence's log-probability; turns of
the prompt never do. Truncation rule: the prompt is kept whole and each answer is cut at its end
so that prompt + answer fits in max_seq_length; a prompt that leaves no room for a single answer
token is an error (truncating it would change the question the answer replies to).

Pure Python and NumPy; the batches, the losses and the step on pairs are preference.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import find_files, hold_out, keep_first, read_splits, tokenize, use_chat_template, val_subset
from .errors import UserError
from .formats import Example, _check_str, _has_lone_surrogate, _read_lines, _short, raise_problems, read_bytes


PAIR_FORMATS = {"sharegpt": "conversations", "trl": "prompt"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}


@dataclass
class Pair:
    where: str           # "file:line"
    prompt: list         # messages, ending with a user turn
    chosen: list         # the preferred answer: assistant messages
    rejected: list       # the other answer


@dataclass
class PairSplits:
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair] = field(default_factory=list)
    files: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""  # runinfo.data_fingerprint of the files read


# --- reading and validating ------------------------------------------------------------------


def _messages(value, key: str, where: str, problems: list, answer: bool) -> list | None:
    """A TRL field (a string or a list of {role, content}) as messages; None after a problem."""
    if isinstance(value, str):
        if not value.strip():
            problems.append(f"{where}: '{key}' is empty" + ("; a pair needs two non-empty answers" if answer else ""))
            return None
        return [{"role": "assistant" if answer else "user", "content": value}]
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: '{key}' must be a string or a non-empty list of {{role, content}} "
                        f"messages, got {_short(value)}")
        return None
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            problems.append(f"{where}: {key}[{i}] must be {{\"role\": system|user|assistant, "
                            f"\"content\": str}}, got {_short(m)}")
            return None
        out.append({"role": m["role"], "content": m["content"]})
    if answer and (any(m["role"] != "assistant" for m in out) or not any(m["content"].strip() for m in out)):
        problems.append(f"{where}: '{key}' must hold assistant messages with non-empty content")
        return None
    if not answer and out[-1]["role"] != "user":
        problems.append(f"{where}: the prompt must end with a user turn (the answers reply to it)")
        return None
    return out


def _sharegpt_turn(value, key: str, where: str, problems: list) -> dict | None:
    if not isinstance(value, dict) or not isinstance(value.get("value"), str):
        problems.append(f"{where}: '{key}' must be {{\"from\": \"gpt\", \"value\": str}}, got {_short(value)}")
        return None
    if SHAREGPT_ROLES.get(value.get("from", "gpt")) != "assistant":
        problems.append(f"{where}: '{key}' must come from gpt, got {_short(value.get('from'))}")
        return None
    if not value["value"].strip():
        problems.append(f"{where}: '{key}' is empty; a pair needs two non-empty answers")
        return None
    return {"role": "assistant", "content": value["value"]}


def _sharegpt_prompt(conv, where: str, problems: list) -> list | None:
    if not isinstance(conv, list) or not conv:
        problems.append(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
        return None
    out = []
    for i, t in enumerate(conv):
        role = SHAREGPT_ROLES.get(t.get("from")) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            problems.append(f"{where}: conversations[{i}] must be {{\"from\": system|human|gpt, "
                            f"\"value\": str}}, got {_short(t)}")
            return None
        if role == "system" and i:
            problems.append(f"{where}: conversations[{i}]: a system turn may only come first")
            return None
        out.append({"role": role, "content": t["value"]})
    if out[-1]["role"] != "user":
        problems.append(f"{where}: the conversation must end with a human turn (chosen and rejected answer it)")
        return None
    return out


def parse_pair(rec, kind: str, where: str, problems: list) -> Pair | None:
    """A validated Pair from one record of `kind`, or None after appending its problems."""
    before = len(problems)
    for key in (PAIR_FORMATS[kind], "chosen", "rejected"):
        if key not in rec:
            problems.append(f"{where}: missing field '{key}'; a pair needs "
                            f"{PAIR_FORMATS[kind]}, chosen and rejected")
    if len(problems) > before:
        return None
    if kind == "sharegpt":
        prompt = _sharegpt_prompt(rec["conversations"], where, problems)
        chosen = _sharegpt_turn(rec["chosen"], "chosen", where, problems)
        rejected = _sharegpt_turn(rec["rejected"], "rejected", where, problems)
        chosen, rejected = (None if x is None else [x] for x in (chosen, rejected))
        _check_str(rec, "system", where, problems, required=False)  # as the SFT reader checks it
        system = rec.get("system")  # LLaMA-Factory's optional system column
        if prompt and isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system}] + prompt
    else:
        prompt = _messages(rec["prompt"], "prompt", where, problems, answer=False)
        chosen = _messages(rec["chosen"], "chosen", where, problems, answer=True)
        rejected = _messages(rec["rejected"], "rejected", where, problems, answer=True)
    if len(problems) > before:
        return None
    if chosen == rejected:
        problems.append(f"{where}: chosen and rejected are identical; a pair must differ (fix or remove it)")
        return None
    if _has_lone_surrogate(rec):
        problems.append(f"{where}: a string holds an unpaired surrogate escape (like \\ud800), which "
                        "is not text; fix or remove the escape")
        return None
    return Pair(where, prompt, chosen, rejected)


def is_pair_file(path: str | Path, raw: bytes | None = None) -> bool:
    """Whether a data file holds preference pairs (its first record is one): check-data reads it
    as pairs, and reports pair problems, not SFT ones."""
    try:
        for _, rec in _read_lines(Path(path), read_bytes(Path(path)) if raw is None else raw):
            # "prompt" and "conversations" also start SFT records: a pair has answers to compare
            return detect_pair_format(rec) is not None and ("chosen" in rec or "rejected" in rec)
    except UserError:
        return False
    return False


def check_pair_files(files: dict, pairs_read: dict, tokenizer, max_seq_length: int) -> list[str]:
    """check-data's report of pair files ({split: file}, {split: read_pairs(file)}): per split, the
    pairs and their token lengths; a UserError lists every problem as `file:line`, as `train` would."""
    lines = []
    for split, f in files.items():
        pairs = pairs_read[split]
        full = tokenize_pairs(pairs, tokenizer, 10**9)
        tokenize_pairs(pairs, tokenizer, max_seq_length)  # refuses what train would refuse
        lens = full.lengths(packed=False)
        p = np.percentile(lens, [50, 90, 100]).astype(int)
        lines += [f"{split}: {f}", f"  pairs: {len(pairs)}  format: preference pairs",
                  f"  tokens per pair (the longer side): p50 {p[0]}  p90 {p[1]}  max {p[2]}",
                  f"  longer than max_seq_length {max_seq_length}: {int((lens > max_seq_length).sum())}"]
    return lines


def detect_pair_format(rec) -> str | None:
    if not isinstance(rec, dict):
        return None
    return next((k for k, key in PAIR_FORMATS.items() if key in rec), None)


def read_pairs(path: str | Path, raw: bytes | None = None) -> list[Pair]:
    """Read and validate one pair file (`raw`: its bytes, if read already); one UserError lists
    every problem."""
    path = Path(path)
    problems: list[str] = []
    kinds: dict[str, str] = {}
    pairs = []
    for n, rec in _read_lines(path, read_bytes(path) if raw is None else raw):
        where = f"{path}:{n}"
        kind = detect_pair_format(rec)
        if kind is None:
            what = f"keys: {', '.join(_short(k, 30) for k in list(rec)[:5]) or 'none'}" \
                if isinstance(rec, dict) else f"a {type(rec).__name__}"
            problems.append(f"{where}: not a preference pair ({what}); use prompt+chosen+rejected "
                            "or conversations+chosen+rejected")
            continue
        kinds.setdefault(kind, where)
        p = parse_pair(rec, kind, where, problems)
        if p is not None:
            pairs.append(p)
    raise_problems(path, kinds, problems, "pairs")
    return pairs


def load_pair_splits(path: str | Path, valid_fraction: float = 0.05, seed: int = 0,
                     max_examples: int | None = None) -> PairSplits:
    """train/valid/test pairs of a file or folder, split as data.load_splits splits examples:
    without a validation file a seeded `valid_fraction` of train is held out (0: none), then
    `max_examples` keeps the first N of a seeded shuffle of train."""
    files = find_files(path)
    data, fingerprint = read_splits(path, files, read_pairs, "pairs")
    s = PairSplits(data["train"], data.get("valid", []), data.get("test", []),
                   files={k: str(v) for k, v in files.items()}, fingerprint=fingerprint)
    if not s.valid and valid_fraction > 0:
        hold_out(s, valid_fraction, seed, "pairs")
    if max_examples is not None:
        n = keep_first(s, max_examples, seed)
        s.notes.append(f"max_examples {max_examples}: training on {len(s.train)} of {n} pairs")
    return s


# --- tokens and answer masks -----------------------------------------------------------------


def answer_mask(mask: list[bool], prompt_turns: int) -> list[bool]:
    """`mask` (True on every assistant turn of the conversation) with its first `prompt_turns` runs
    of True turned off: the prompt's own assistant turns, which a pair's answers do not include."""
    out, runs, prev = list(mask), 0, False
    for i, m in enumerate(mask):
        if m and not prev:
            runs += 1
        if m and runs <= prompt_turns:
            out[i] = False
        prev = m
    return out


def truncate_answer(ids: list[int], mask: list[bool], max_seq_length: int, where: str) -> tuple[list, list, bool]:
    """The truncation rule: keep the prompt (everything before the first answer token) whole, cut
    the answer's end. Returns (ids, mask, truncated); UserError if the prompt leaves no room."""
    if True not in mask:
        raise UserError(f"{where}: no answer tokens found after templating; check the model's chat_template")
    start = mask.index(True)
    if start >= max_seq_length:
        raise UserError(f"{where}: the prompt is {start} tokens, which leaves no room for the answer "
                        f"within max_seq_length {max_seq_length}; raise --max-seq-length or shorten "
                        "the prompt")
    if len(ids) <= max_seq_length:
        return ids, mask, False
    return ids[:max_seq_length], mask[:max_seq_length], True


@dataclass
class TokenizedPairs:
    """Per pair: chosen and rejected token ids with answer masks; sequence 2j is pair j's
    chosen, 2j + 1 its rejected (`seqs`, `masks`)."""
    seqs: list[list[int]]
    masks: list[list[bool]]
    truncated: int = 0
    packed: bool = False  # what lengths() gives the batch planner by default

    def __len__(self) -> int:
        return len(self.seqs) // 2

    def seq_lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.seqs], dtype=np.int64)

    def lengths(self, packed: bool | None = None) -> np.ndarray:
        """Per pair, the length the batch planner (batching.py) sees: the longer side for padded
        rows (both sides get a row of that width), or chosen + rejected - 1 when packed (the
        planner gives an example of n tokens n - 1 positions; the two sides take (c - 1) + (r - 1))."""
        s = self.seq_lengths().reshape(-1, 2)
        return s.sum(1) - 1 if (self.packed if packed is None else packed) else s.max(1)

    def step_lengths(self) -> np.ndarray:
        """The lengths the epoch's steps are planned from (batching.plan_epoch): the same packed or
        not, so packing never changes which pairs a step trains on."""
        return self.lengths(packed=False)

    @property
    def ids(self) -> list:
        """One entry per pair (its chosen side): len() and truth like data.Tokenized.ids."""
        return self.seqs[0::2]

    def target_tokens(self) -> np.ndarray:
        """Answer tokens per pair, both sides."""
        return self.answer_tokens().sum(1)

    def answer_tokens(self) -> np.ndarray:
        """(pairs, 2) answer tokens of chosen and rejected (the first token predicts nothing)."""
        return np.array([sum(m[1:]) for m in self.masks], dtype=np.int64).reshape(-1, 2)


def tokenize_pair(pair: Pair, tokenizer, max_seq_length: int, overlong: str = "truncate"):
    """(chosen ids, chosen mask, rejected ids, rejected mask, truncated sides) through the model's
    chat template; masks are True on the answer's tokens only."""
    k = sum(m["role"] == "assistant" for m in pair.prompt)
    out, cut = [], 0
    for side in (pair.chosen, pair.rejected):
        ids, mask = tokenize(Example(pair.where, _kind(pair.prompt, side), messages=pair.prompt + side), tokenizer)
        mask = answer_mask(mask, k)
        ids, mask, t = truncate_answer(ids, mask, max_seq_length, pair.where)
        if t and overlong == "error":
            raise UserError(f"{pair.where}: prompt + answer is longer than max_seq_length "
                            f"{max_seq_length}; raise it, or use overlong: truncate (cuts the answer's end)")
        out += [ids, mask]
        cut += t
    start = out[1].index(True)
    if out[0][:start] != out[2][:start]:  # both sides must be answers to the same tokens
        raise UserError(f"{pair.where}: the chat template renders the prompt differently before the "
                        "two answers, so they cannot be compared; check the model's chat_template")
    return (*out, cut)


def _kind(prompt: list, answer: list) -> str:
    """A pair side as data.tokenize formats it: one user turn answered once is a prompt/completion
    record (plain text on a model without a chat template, as SFT trains it), anything else chat."""
    one = len(prompt) == 1 and len(answer) == 1 and prompt[0]["role"] == "user" and answer[0]["role"] == "assistant"
    return "completion" if one else "chat"


def tokenize_pairs(pairs: list[Pair], tokenizer, max_seq_length: int, overlong: str = "truncate") -> TokenizedPairs:
    out = TokenizedPairs([], [])
    problems = []
    for p in pairs:
        try:
            c, cm, r, rm, cut = tokenize_pair(p, tokenizer, max_seq_length, overlong)
        except UserError as e:
            problems.append(str(e))
            continue
        if c == r:  # the answers differ only past the cut: a pair that teaches nothing (loss log 2)
            problems.append(f"{p.where}: chosen and rejected are identical once cut to max_seq_length "
                            f"{max_seq_length}; raise --max-seq-length, or remove the pair")
            continue
        out.seqs += [c, r]
        out.masks += [cm, rm]
        out.truncated += bool(cut)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} pairs cannot be used (max_seq_length {max_seq_length})", problems)
    return out




def tokenize_pair_splits(cfg, splits: PairSplits, tokenizer):
    """(train, validation) TokenizedPairs of a run; None without a tokenizer. The train set's
    lengths() are what the batch planner needs: packed or not."""
    if tokenizer is None:
        return None
    d = cfg.data
    use_chat_template(tokenizer, d)
    train = tokenize_pairs(splits.train, tokenizer, d.max_seq_length, d.overlong)
    train.packed = cfg.training.pack
    valid = val_subset(splits.valid, d.val_max_examples, cfg.training.seed)
    return train, tokenize_pairs(valid, tokenizer, d.max_seq_length, d.overlong)
