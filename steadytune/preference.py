"""Preference pairs: reading and validating, templating with answer-only masks, pair batches,
and the DPO and ORPO losses.

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

Both sequences of a pair go through the model in one forward pass: as neighbouring rows of a
padded batch (rows 2j and 2j+1 are pair j's chosen and rejected), or packed into the same row as
two segments that cannot see each other (packing.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .data import Example, find_files, first_after_shuffle, holdout, raise_problems, read_splits, tokenize
from .data import _has_lone_surrogate, _read_lines, _short  # the SFT reader's JSON and text checks
from .errors import UserError

PAIR_FORMATS = {"sharegpt": "conversations", "trl": "prompt"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
METHODS = ("dpo", "orpo")


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


def detect_pair_format(rec) -> str | None:
    if not isinstance(rec, dict):
        return None
    return next((k for k, key in PAIR_FORMATS.items() if key in rec), None)


def read_pairs(path: str | Path) -> list[Pair]:
    """Read and validate one pair file; one UserError lists every problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found; check the path")
    problems: list[str] = []
    kinds: dict[str, str] = {}
    pairs = []
    for n, rec in _read_lines(path):
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
    data = read_splits(path, files, read_pairs, "pairs")
    s = PairSplits(data["train"], data.get("valid", []), data.get("test", []),
                   files={k: str(v) for k, v in files.items()})
    if not s.valid and valid_fraction > 0:
        held = set(holdout(len(s.train), valid_fraction, seed).tolist())
        s.valid = [p for i, p in enumerate(s.train) if i in held]
        s.train = [p for i, p in enumerate(s.train) if i not in held]
        s.notes.append(f"no validation file: held out {len(held)} of {len(held) + len(s.train)} "
                       f"training pairs (seed {seed})")
    if max_examples is not None:
        n = len(s.train)
        s.train = [s.train[i] for i in first_after_shuffle(n, max_examples, seed)]
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
        ids, mask = tokenize(Example(pair.where, "chat", messages=pair.prompt + side), tokenizer)
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


def tokenize_pairs(pairs: list[Pair], tokenizer, max_seq_length: int, overlong: str = "truncate") -> TokenizedPairs:
    out = TokenizedPairs([], [])
    problems = []
    for p in pairs:
        try:
            c, cm, r, rm, cut = tokenize_pair(p, tokenizer, max_seq_length, overlong)
        except UserError as e:
            problems.append(str(e))
            continue
        out.seqs += [c, r]
        out.masks += [cm, rm]
        out.truncated += bool(cut)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} pairs cannot be used (max_seq_length {max_seq_length})", problems)
    return out


# --- pair batches ----------------------------------------------------------------------------


def pair_batch(tp: TokenizedPairs, micro_batch: list, width: int | None = None):
    """One forward pass's arrays for a micro-batch of pairs: (inputs, targets, mask, segments,
    seq). Padded (`micro_batch` = pair indexes): rows 2j, 2j + 1 are pair j's chosen and rejected,
    segments None, seq None. Packed (`micro_batch` = rows of pair indexes, `width` = row width):
    both sides of a pair share a row as two segments, and seq[r, t] numbers the sequence that
    position belongs to in the batch (2j chosen, 2j + 1 rejected of the micro-batch's j-th pair)."""
    from .batching import pack_batch, pad_batch

    if width is None:
        rows = [s for i in micro_batch for s in (2 * i, 2 * i + 1)]
        inputs, targets, mask = pad_batch([tp.seqs[s] for s in rows], [tp.masks[s] for s in rows])
        return inputs, targets, mask, None, None
    rows = [[s for i in row for s in (2 * i, 2 * i + 1)] for row in micro_batch]
    inputs, targets, mask, segments = pack_batch([[tp.seqs[s] for s in row] for row in rows],
                                                 [[tp.masks[s] for s in row] for row in rows], width)
    sizes = np.array([len(row) for row in rows])[:, None]
    first = np.cumsum(sizes, axis=0) - sizes
    seq = np.where(segments < sizes, segments + first, 0).astype(np.int32)  # padding: any index, its mask is 0
    return inputs, targets, mask, segments, seq


def sequence_logps(model, inputs, targets, mask, segments=None, seq=None, n: int = 0, mask_dtype=mx.float32):
    """(summed answer log-probabilities, answer tokens) of every sequence of a pair batch, in
    float32, shape (sequences,); packed batches (seq given) hold `n` sequences. Full logits: the
    chunked output layer of SFT (loss.py) sums over the whole batch, not per sequence."""
    from .loss import token_cross_entropy
    from .packing import model_inputs

    logp = -token_cross_entropy(model(inputs, **model_inputs(model, segments, mask_dtype)), targets) * mask
    if seq is None:
        return logp.sum(-1), mask.sum(-1)
    onehot = (seq[..., None] == mx.arange(n)).astype(mx.float32)  # (B, T, sequences)
    return mx.einsum("bt,bts->s", logp, onehot), mx.einsum("bt,bts->s", mask, onehot)


def log_sigmoid(x):
    return -mx.logaddexp(mx.zeros_like(x), -x)


def log1m_exp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012); x is clipped just below 0
    so a sequence the model is certain of gives a large finite value, not -inf."""
    x = mx.minimum(x, -1e-7)
    return mx.where(x > -math.log(2), mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def dpo_loss(pc, pr, ref_c, ref_r, beta: float):
    """Per pair (Rafailov et al. 2023, eq. 7): rewards beta * (log pi - log pi_ref) of each side
    and the loss -log sigmoid(reward_chosen - reward_rejected). Returns (losses, rc, rr)."""
    rc, rr = beta * (pc - ref_c), beta * (pr - ref_r)
    return -log_sigmoid(rc - rr), rc, rr


def orpo_loss(pc, pr, nc, nr, beta: float):
    """Per pair (Hong et al. 2024, eqs. 2-7): the chosen answer's mean token NLL plus beta (the
    paper's lambda) times -log sigmoid(log odds(chosen) - log odds(rejected)), where
    odds(y) = P / (1 - P) with P the mean token probability exp(mean log p). Rewards as TRL
    reports them: beta * mean log p. Returns (losses, rc, rr)."""
    mc, mr = pc / nc, pr / nr
    log_odds = (mc - mr) - (log1m_exp(mc) - log1m_exp(mr))
    return -mc - beta * log_sigmoid(log_odds), beta * mc, beta * mr


def pair_loss(model, batch, ref, method: str, beta: float, scale, mask_dtype=mx.float32):
    """Summed per-pair loss of a pair batch times `scale` (1 / pairs of the accumulation group),
    for value_and_grad; also the unscaled sum and the reward statistics, summed over pairs:
    [rewards_chosen, rewards_rejected, pairs with a positive margin, margin]. `batch` is
    pair_batch's tuple (inputs, targets, mask, segments, seq); `ref` is (pairs, 2) reference
    log-probabilities (DPO; ORPO only takes the pair count from its shape)."""
    inputs, targets, mask, segments, seq = batch
    lp, n = sequence_logps(model, inputs, targets, mask, segments, seq, 2 * ref.shape[0], mask_dtype)
    pc, pr, nc, nr = lp[0::2], lp[1::2], n[0::2], n[1::2]
    if method == "dpo":
        losses, rc, rr = dpo_loss(pc, pr, ref[:, 0], ref[:, 1], beta)
    else:
        losses, rc, rr = orpo_loss(pc, pr, nc, nr, beta)
    total = losses.sum()
    margin = rc - rr
    stats = mx.stack([rc.sum(), rr.sum(), (margin > 0).astype(mx.float32).sum(), margin.sum()])
    return total * scale, total, mx.stop_gradient(stats)


def pair_records(stats, pairs: int) -> dict:
    """metrics.jsonl fields from summed statistics (pair_loss) over `pairs` pairs."""
    s = np.asarray(stats, dtype=np.float64) / max(1, pairs)
    return {"rewards_chosen": float(s[0]), "rewards_rejected": float(s[1]),
            "reward_accuracy": float(s[2]), "reward_margin": float(s[3])}


# --- the reference: the base model with the adapters switched off ----------------------------


class adapters_off:
    """Within the block, every LoRA layer of `model` adds exactly 0 (its scale is 0): the model
    is its base, with no second copy of the weights."""

    def __init__(self, model):
        self.layers = [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]

    def __enter__(self):
        self.saved = [m.scale for m in self.layers]
        for m in self.layers:
            m.scale = 0.0
        return self

    def __exit__(self, *exc):
        for m, s in zip(self.layers, self.saved):
            m.scale = s
        return False


def eval_order(tp: TokenizedPairs, batch_pairs: int) -> list[list[int]]:
    """Pairs sorted by length (little padding) in batches of `batch_pairs`: a fixed layout, so
    reference log-probabilities are the same bits whenever they are computed."""
    order = np.argsort(tp.lengths(), kind="stable").tolist()
    return [order[i:i + batch_pairs] for i in range(0, len(order), batch_pairs)]


def all_logps(model, tp: TokenizedPairs, batch_pairs: int = 4) -> np.ndarray:
    """(pairs, 2) summed answer log-probabilities of chosen and rejected under `model` as it is
    (eval mode: no dropout), computed in the fixed layout of eval_order."""
    out = np.zeros((len(tp), 2), dtype=np.float32)
    model.eval()
    fn = mx.compile(lambda i, t, m: sequence_logps(model, i, t, m)[0])
    for mb in eval_order(tp, batch_pairs):
        inputs, targets, mask, _, _ = pair_batch(tp, mb)
        lp = np.array(fn(mx.array(inputs), mx.array(targets), mx.array(mask)))
        out[mb] = lp.reshape(-1, 2)
    model.train()
    return out


def reference_logps(model, tp: TokenizedPairs, batch_pairs: int = 4) -> np.ndarray:
    """The DPO reference: all_logps of the base model (adapters switched off). Computed once per
    run: the reference never changes, so one pass over the data replaces a second forward pass
    in every step (bench/preference.py measures both)."""
    with adapters_off(model):
        return all_logps(model, tp, batch_pairs)


def preference_scores(policy: np.ndarray, ref: np.ndarray | None, answer_tokens: np.ndarray,
                      method: str, beta: float) -> dict:
    """Held-out metrics from (pairs, 2) log-probabilities: reward accuracy (the share of pairs
    whose implicit reward margin is positive), mean margin, and the baseline: the share of pairs
    where the reference (base) gives the chosen answer the higher mean token log-probability."""
    p = policy.astype(np.float64)
    n = answer_tokens.astype(np.float64)
    if method == "dpo":
        margin = beta * ((p[:, 0] - ref[:, 0]) - (p[:, 1] - ref[:, 1]))
    else:
        margin = beta * (p[:, 0] / n[:, 0] - p[:, 1] / n[:, 1])
    out = {"pairs": int(len(p)), "accuracy": float((margin > 0).mean()), "mean_margin": float(margin.mean())}
    if ref is not None:
        r = ref.astype(np.float64) / n
        out["base_accuracy"] = float((r[:, 0] > r[:, 1]).mean())
    return out


# --- the optimizer step on pairs -------------------------------------------------------------


class PairStep:
    """step.Step for preference pairs: the same call, `step(micro_batches, lr, index) ->
    StepResult`, over micro-batches of pair indexes (or packed rows of them). Each micro-batch is
    one forward pass over both sides of its pairs; its summed pair losses are divided by the pairs
    of the whole accumulation group (and of all processes), so micro-batches add up to one big
    batch, weighted by pairs. StepResult.tokens is that pair count. The clipped update with its
    non-finite guard is step.py's own compiled `update`. `window()` returns the reward statistics
    summed since it was last called, as metrics.jsonl fields.

    ref: (pairs, 2) reference log-probabilities of chosen and rejected (DPO; reference_logps),
    or None (ORPO)."""

    def __init__(self, model, optimizer, pairs: TokenizedPairs, ref, *, method: str, beta: float,
                 seed: int = 0, max_grad_norm=None, pack_width: int = 0, mask_dtype=mx.float32,
                 flat: bool = True, rank: int = 0, world: int = 1, nan_at=frozenset()):
        from functools import partial

        import mlx.nn as nn
        from mlx.utils import tree_map

        from .loss import loss_fn
        from .step import compile_step

        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.model, self.optimizer, self.examples = model, optimizer, pairs
        self.ref = np.zeros((len(pairs), 2), np.float32) if ref is None else np.asarray(ref, np.float32)
        self.seed, self.pack_width, self.rank, self.world = seed, pack_width, rank, world
        self.max_norm = mx.array(max_grad_norm or float("inf"), dtype=mx.float32)
        self.nan_at = frozenset(nan_at)
        self.state = [model.state, optimizer.state, mx.random.state]
        self.update = compile_step(model, optimizer, self.state, loss_fn, flat)[2]
        self._stats, self._pairs = np.zeros(4), 0
        loss = partial(pair_loss, method=method, beta=beta, mask_dtype=mask_dtype)
        lvg = nn.value_and_grad(model, loss)

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def grad(batch, ref, scale, acc):
            (_, total, stats), g = lvg(model, batch, ref, scale=scale)
            return total, stats, g if acc is None else tree_map(mx.add, acc, g)

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def eval_loss(batch, ref):
            _, total, stats = loss(model, batch, ref, scale=mx.array(1.0))
            return total, stats

        self.grad, self.eval_loss = grad, eval_loss

    def begin(self, micro_batches, index: int = 0):
        """The loss scale (1 / pairs of the whole group) and that pair count; reseeds MLX's
        generator from (seed, index) as step.Step does (dropout masks independent of history)."""
        from .batching import examples_of
        from .step import begin_step

        pairs = sum(len(examples_of(mb)) for mb in micro_batches)
        return begin_step(self.model, pairs, index, self.seed, self.nan_at), pairs

    def batches(self, micro_batches) -> list:
        """This process's share of each micro-batch as (arrays, reference rows, non-padding tokens)."""
        from .batching import examples_of, shard

        out = []
        for mb in micro_batches:
            mb = shard(mb, self.rank, self.world) if self.world > 1 else mb
            if not mb:
                continue
            idx = examples_of(mb)
            arrays = pair_batch(self.examples, mb, self.pack_width or None)
            real = sum(len(self.examples.seqs[s]) - 1 for i in idx for s in (2 * i, 2 * i + 1))
            out.append((tuple(None if a is None else mx.array(a) for a in arrays),
                        mx.array(self.ref[idx]), real))
        return out

    def gradients(self, micro_batches, index: int = 0):
        """(gradients, summed loss, summed statistics, group pairs, non-padding tokens) of one
        step, summed over micro-batches and processes; nothing is updated."""
        from mlx.utils import tree_map

        from .step import all_sum_tree

        scale, pairs = self.begin(micro_batches, index)
        acc, total, stats, real = None, mx.array(0.0), mx.zeros(4), 0
        for batch, ref, n in self.batches(micro_batches):
            t, st, acc = self.grad(batch, ref, scale, acc)
            total, stats, real = total + t, stats + st, real + n
            mx.eval(acc, total, stats)
        if self.world > 1:
            if acc is None:
                acc = tree_map(mx.zeros_like, self.model.trainable_parameters())
            acc = all_sum_tree(acc)
            total, stats = mx.distributed.all_sum(total), mx.distributed.all_sum(stats)
        return acc, total, stats, pairs, real

    def __call__(self, micro_batches, lr: float, index: int = 0):
        from .step import StepResult

        acc, total, stats, pairs, real = self.gradients(micro_batches, index)
        norm = self.update(acc, total, mx.array(lr, dtype=mx.float32), self.max_norm)
        mx.eval(self.state, total, norm, stats)
        result = StepResult(total.item() / pairs, pairs, real, norm.item())
        if result.finite:
            self._stats += np.array(stats, dtype=np.float64)
            self._pairs += pairs
        return result

    def window(self) -> dict:
        """Reward statistics of the (finite) steps since the last call, as metrics fields."""
        out = pair_records(self._stats, self._pairs) if self._pairs else {}
        self._stats, self._pairs = np.zeros(4), 0
        return out

    def evaluate(self, pairs: TokenizedPairs, ref, batch_pairs: int) -> tuple[float, dict]:
        """(mean pair loss, reward records) over `pairs` in the fixed eval_order layout; with
        several processes each takes every world-th batch and the sums are added."""
        ref = np.zeros((len(pairs), 2), np.float32) if ref is None else ref
        self.model.eval()
        total, stats = mx.array(0.0), mx.zeros(4)
        for b, mb in enumerate(eval_order(pairs, batch_pairs)):
            if b % self.world != self.rank:
                continue
            batch = tuple(None if a is None else mx.array(a) for a in pair_batch(pairs, mb))
            t, st = self.eval_loss(batch, mx.array(ref[mb]))
            total, stats = total + t, stats + st
            mx.eval(total, stats)
        self.model.train()
        if self.world > 1:
            total, stats = mx.distributed.all_sum(total), mx.distributed.all_sum(stats)
        return total.item() / len(pairs), pair_records(np.array(stats), len(pairs))


# --- what the run's setup calls (setup.py) ---------------------------------------------------


def tokenize_pair_splits(cfg, splits: PairSplits, tokenizer):
    """(train, validation) TokenizedPairs of a run; None without a tokenizer. The train set's
    lengths() are what the batch planner needs: packed or not."""
    if tokenizer is None:
        return None
    d = cfg.data
    train = tokenize_pairs(splits.train, tokenizer, d.max_seq_length, d.overlong)
    train.packed = cfg.training.pack
    k = d.val_max_examples
    valid = splits.valid
    if k is not None and k < len(valid):
        keep = np.sort(np.random.default_rng([cfg.training.seed, 0xE7A1]).permutation(len(valid))[:k])
        valid = [valid[i] for i in keep]
    return train, tokenize_pairs(valid, tokenizer, d.max_seq_length, d.overlong)


def make_pair_step(run) -> PairStep:
    """The run's PairStep. DPO's reference log-probabilities of the train and validation pairs
    are computed here, once, with the adapters switched off: in a fixed layout, so a resumed run
    computes the same bits."""
    from . import faults

    t = run.cfg.training
    ref = val_ref = None
    if t.method == "dpo":
        ref = reference_logps(run.model, run.train_set, t.batch_size)
        val_ref = reference_logps(run.model, run.val_set, t.batch_size) if len(run.val_set) else None
    step = PairStep(run.model, run.optimizer, run.train_set, ref, method=t.method, beta=t.beta,
                    seed=t.seed, max_grad_norm=t.max_grad_norm, pack_width=run.pack_width,
                    mask_dtype=run.mask_dtype, rank=run.rank, world=run.world, nan_at=faults.nan_steps())
    step.val_ref = val_ref
    return step


def plan_config(cfg):
    """The configuration the memory planner (plan.py) predicts a pair run's step with: `cfg`
    itself for SFT; for pairs, twice the rows (a micro-batch of B pairs is 2B sequences; packed,
    lengths() already counts both sides) and no chunked output layer (pair log-probabilities
    need every sequence's logits: sequence_logps)."""
    import copy

    if cfg.training.method == "sft":
        return cfg
    c = copy.deepcopy(cfg)
    if not c.training.pack:
        c.training.batch_size *= 2
        c.training.batch_tokens = c.training.batch_tokens and c.training.batch_tokens * 2
    c.training.chunked_ce = "off"
    return c
