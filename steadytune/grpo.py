"""GRPO (group relative policy optimization) with verifiable rewards: `--method grpo`.

One optimizer step:

    prompts of the step (batch_size x grad_accumulation)          batching.plan_epoch, as SFT
    -> G completions each, sampled from the model as it is now     rollout(): mlx-lm's BatchGenerator,
       (LoRA applied, no second copy), seeded from (seed, step)    all rows of the step at once
    -> rewards (rewards.py) -> advantages within each group        advantages()
    -> one pass over prompt + completion per group: the clipped    grpo_loss()
       policy-gradient loss, plus beta times the KL to the base
       (the adapters switched off), weighted per token             token_weights()
    -> the clipped update with the non-finite guard                step.compile_step's update

The loss variants (`--grpo-loss`) differ only in how tokens are weighted over the step:
grpo (each completion's token mean, averaged over completions; Shao et al. 2024), dr_grpo (token
sums divided by max_new_tokens, advantages not divided by the group's std; Liu et al. 2025) and
dapo (token-level: every completion token of the step weighs the same; Yu et al. 2025). The
weights are known before any backward pass, so accumulation and several calls per group add up
to the same gradient as one call.

One update per rollout: the ratio pi / pi_old is exp(logp - stop_gradient(logp)), 1 in value,
so the clip (epsilon, epsilon_high) bounds nothing yet; the gradient is the policy gradient
(as TRL with num_iterations 1). Exact resume: the sampling draws from a generator seeded with
(seed, step), and everything else is a function of the restored adapters, so a resumed run
samples the same completions.

Rollouts run with the base weights in their decoding form: on CUDA the quantized kernels
(decoding reads each weight once per token; dequantizing them first would write them all per
token); on the CPU the compiled decoder (cpu_decode.py: the 4-bit weights read once per token for
all rows of the step, no copy) for the llama family, and for other families a float32 copy made
for the rollouts of a step and freed before its training pass (rollout_mode; MLX's CPU quantized
matmul is slow).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .data import Tokenized
from .errors import UserError
from .formats import _check_messages, _check_str, _has_lone_surrogate, _read_lines, raise_problems
from .step import StepBase, StepResult

LOSSES = ("grpo", "dr_grpo", "dapo")


# --- prompts ---------------------------------------------------------------------------------


@dataclass
class Prompt:
    where: str                    # file:line
    messages: list                # the conversation to answer (ends with a user turn)
    record: dict                  # the whole record: rewards read its fields ("answer", ...)

    @property
    def text(self) -> str:
        """The prompt as a reward sees it: the last user turn."""
        return str(self.messages[-1].get("content") or "")


def read_prompts(path: str | Path, raw: bytes | None = None) -> list[Prompt]:
    """Read one prompt file: records with "prompt" (text) or "messages" (a conversation ending
    with a user turn: the completion is what GRPO samples) and any other fields."""
    from .formats import read_bytes

    path = Path(path)
    problems, prompts, kinds = [], [], {}
    for n, rec in _read_lines(path, read_bytes(path) if raw is None else raw):
        where = f"{path}:{n}"
        before = len(problems)
        if not isinstance(rec, dict) or not ("prompt" in rec or "messages" in rec):
            what = f"keys: {', '.join(list(rec)[:5]) or 'none'}" if isinstance(rec, dict) else f"a {type(rec).__name__}"
            problems.append(f"{where}: not a GRPO prompt ({what}); use {{\"prompt\": ...}} or {{\"messages\": "
                            "[...]}} ending with a user turn, plus fields the rewards read (e.g. \"answer\")")
            continue
        kind = "messages" if "messages" in rec else "prompt"
        kinds.setdefault(kind, where)
        if kind == "prompt":
            _check_str(rec, "prompt", where, problems)
        else:
            _check_messages(rec, where, problems)
            if len(problems) == before and rec["messages"] and rec["messages"][-1].get("role") == "assistant":
                problems.append(f"{where}: the conversation ends with an assistant turn; GRPO samples the "
                                "answer, so end with the user turn (put the reference answer in a field "
                                "such as \"answer\")")
        if len(problems) == before and _has_lone_surrogate(rec):
            problems.append(f"{where}: a string holds an unpaired surrogate escape (like \\ud800); fix it")
        if len(problems) == before:
            msgs = rec["messages"] if kind == "messages" else [{"role": "user", "content": rec["prompt"]}]
            prompts.append(Prompt(where, msgs, rec))
    raise_problems(path, kinds, problems, "prompts")
    return prompts


def load_prompt_splits(path, valid_fraction: float = 0.05, seed: int = 0, max_examples: int | None = None):
    """train/valid prompts of a file or folder, split as data.load_splits splits examples."""
    from .data import Splits, find_files, hold_out, keep_first, read_splits

    files = find_files(path)
    data, fingerprint = read_splits(path, files, read_prompts, "prompts")
    s = Splits(data["train"], data.get("valid", []), data.get("test", []),
               files={k: str(v) for k, v in files.items()}, fingerprint=fingerprint)
    if not s.valid and valid_fraction > 0:
        if len(s.train) < 2:
            raise UserError(f"{files['train']}: only {len(s.train)} prompt: need at least 2 to hold one out, "
                            "or add a valid.jsonl (or pass --valid-fraction 0)")
        hold_out(s, valid_fraction, seed, "prompts")
    if max_examples is not None:
        n = keep_first(s, max_examples, seed)
        s.notes.append(f"max_examples {max_examples}: training on {len(s.train)} of {n} prompts")
    return s


@dataclass
class PromptSet(Tokenized):
    """Prompts as token ids (what the model is given to answer: data.prompt_ids) with their
    records; no masks: what is trained on is sampled."""

    prompts: list = field(default_factory=list)

    def target_tokens(self) -> np.ndarray:
        return np.zeros(len(self.ids), dtype=np.int64)  # completions are sampled: none known ahead


def tokenize_prompts(prompts: list[Prompt], tokenizer, max_seq_length: int, max_new_tokens: int) -> PromptSet:
    """Each prompt's ids (chat template with its generation prompt; raw text without one). A
    prompt that leaves no room for max_new_tokens within max_seq_length is refused by file:line."""
    from .data import prompt_ids

    out, too_long = PromptSet([], []), []
    room = max_seq_length - max_new_tokens
    for p in prompts:
        ids = prompt_ids(tokenizer, p.messages, where=p.where)
        if len(ids) > room:
            too_long.append(f"{p.where}: the prompt is {len(ids)} tokens; with --max-new-tokens "
                            f"{max_new_tokens} it needs --max-seq-length {len(ids) + max_new_tokens}")
        out.prompts.append(p)
        out.ids.append(ids)
    if len(too_long) == 1:
        raise UserError(too_long[0])
    if too_long:
        raise UserError(f"{len(too_long)} prompts are too long for --max-seq-length {max_seq_length} with "
                        f"--max-new-tokens {max_new_tokens}; raise it or shorten them", too_long)
    return out


# --- rollouts --------------------------------------------------------------------------------


class rollout_mode:
    """Within the block the model's quantized layers decode fast: on CUDA through the quantized
    kernels, the batch's rows as one matrix (qlora.RowsQuantizedLinear); on the CPU (models the
    compiled decoder does not cover) from a float32 copy of each dequantized weight (`floats`,
    made on entry unless the caller passes the copies to reuse). The adapters are untouched: rollouts sample from
    the model being trained. Nothing changes on Metal, where training already uses the
    quantized kernels."""

    def __init__(self, model, floats: dict | None = None):
        from .backend import device_kind

        self.model, self.device = model, device_kind()
        self.floats = {} if floats is None else floats
        self.swapped = []

    def __enter__(self):
        from . import qlora

        if self.device == "metal":
            return self
        for _, m in self.model.named_modules():
            cls = type(m)
            if cls is qlora.DequantLinear or (self.device == "cpu" and cls is nn.QuantizedLinear):
                new = _FloatLinear if self.device == "cpu" else qlora.RowsQuantizedLinear
            elif cls is qlora.DequantEmbedding or (self.device == "cpu" and cls is nn.QuantizedEmbedding):
                new = _FloatEmbedding if self.device == "cpu" else qlora.RowsQuantizedEmbedding
            else:
                continue
            if new in (_FloatLinear, _FloatEmbedding) and id(m) not in self.floats:
                w = mx.dequantize(m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits, mode=m.mode)
                self.floats[id(m)] = w.astype(mx.float32)
                mx.eval(self.floats[id(m)])
            self.swapped.append((m, cls))
            m.__class__ = new
            _FLOATS[id(m)] = self.floats.get(id(m))
        return self

    def __exit__(self, *exc):
        for m, cls in self.swapped:
            m.__class__ = cls
            _FLOATS.pop(id(m), None)
        self.swapped = []
        return False


_FLOATS: dict = {}  # id(layer) -> its float32 weight while rollout_mode holds it


class _FloatLinear(nn.QuantizedLinear):
    def __call__(self, x):
        y = x @ _FLOATS[id(self)].astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y


class _FloatEmbedding(nn.QuantizedEmbedding):
    def __call__(self, x):
        return _FLOATS[id(self)][x]

    def as_linear(self, x):
        return x @ _FLOATS[id(self)].astype(x.dtype).T


def float_copy_bytes(model) -> int:
    """Bytes of the float32 copy rollout_mode keeps on the CPU (the memory planner adds them)."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            n += m["scales"].size * m.group_size * 4
    return n


def rollout(model, prompts: list[list[int]], group: int, max_new_tokens: int, temperature: float,
            eos: set, key: int, fast: bool = True) -> list[list[int]]:
    """`group` completions of each prompt (token ids, ending with an end-of-turn id unless cut at
    max_new_tokens), in the order prompt 0's group, prompt 1's group, ...; all rows decode
    together. On the CPU, models the compiled decoder covers decode through it (the 4-bit weights
    read once a token for all rows, no float copy); otherwise mlx-lm's BatchGenerator in
    rollout_mode (`fast=False`: BatchGenerator on the model as it is, batch_problem's check).
    Sampling draws from MLX's generator seeded with `key`; temperature 0 is greedy."""
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(key)
    sampler = make_sampler(temp=temperature)
    if fast and (dec := cpu_decoder(model)) is not None:
        return dec.sample_rows(prompts, group, max_new_tokens, sampler, eos)
    from mlx_lm.generate import BatchGenerator

    rows = [p for p in prompts for _ in range(group)]
    with rollout_mode(model) if fast else contextlib.nullcontext():  # the float copy (CPU) is freed on exit
        gen = BatchGenerator(model, stop_tokens=[[t] for t in sorted(eos)], sampler=sampler,
                             completion_batch_size=len(rows), prefill_batch_size=len(rows))
        try:
            uids = gen.insert(rows, [max_new_tokens] * len(rows))
            out = {u: [] for u in uids}
            while responses := gen.next_generated():
                for r in responses:
                    out[r.uid].append(int(r.token))  # an end-of-turn token is kept: stopping is learned
        finally:
            gen.close()
    return [out[u] for u in uids]


def cpu_decoder(model):
    """The compiled CPU decoder over `model` as it is now (adapters included), or None: not on the
    CPU, or a model it does not cover (cpu_decode.MODEL_TYPES; those decode from a float copy)."""
    from .backend import device_kind
    from .cpu_decode import CpuDecoder, Unsupported

    if device_kind() != "cpu":
        return None
    try:
        return CpuDecoder(model)
    except Unsupported:
        return None


def batch_problem(model, eos: set) -> str | None:
    """None if mlx-lm's batched generation decodes `model`, else why not, in a few words: two
    prompts of different lengths (so the batch is padded), two greedy completions of one token
    each. mlx-lm 0.32 fails there on gemma2 (its attention broadcasts the batch's mask against its
    kv heads: a batch of 2 rows even decodes, with each row's padding applied to the wrong rows)
    and llama4 (its chunked cache has no batching). Used by GRPO's rollouts and by serve."""
    try:
        rollout(model, [[1, 2, 3], [1, 2, 3, 4, 5]], 2, 1, 0.0, eos, 0, fast=False)
    except Exception as e:  # noqa: BLE001  (whatever mlx-lm raises, said in one line)
        mt = getattr(getattr(model, "args", None), "model_type", type(model).__module__.rsplit(".", 1)[-1])
        return f"mlx-lm's batched generation fails on model type {mt} ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
    return None


def check_rollouts(model, eos: set) -> None:
    """Refuse, before training, a model whose rollouts mlx-lm cannot decode in a batch."""
    if problem := batch_problem(model, eos):
        raise UserError(f"--method grpo: {problem.replace('batched generation', 'batched generation, which the rollouts use,', 1)}; "
                        "train this model with --method sft, dpo or orpo")


# --- advantages, token weights and the loss ----------------------------------------------------


def advantages(rewards: np.ndarray, group: int, loss: str) -> np.ndarray:
    """Each completion's advantage from its total reward (completions in groups of `group`, in
    order): reward minus its group's mean, divided by the group's standard deviation (sample std,
    as TRL; + 1e-4) except for dr_grpo. A group whose rewards are all equal gets 0: no signal."""
    r = rewards.reshape(-1, group).astype(np.float64)
    a = r - r.mean(axis=1, keepdims=True)
    if loss != "dr_grpo":
        a = a / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return a.reshape(-1)


def token_weights(lengths: list[int], loss: str, max_new_tokens: int) -> np.ndarray:
    """Weight of each completion's tokens in the step's loss (the loss is the weighted sum over
    every completion token of the step): grpo 1 / (completions x its length), dr_grpo
    1 / (completions x max_new_tokens), dapo 1 / (completion tokens of the step)."""
    n = np.asarray(lengths, dtype=np.float64)
    if loss == "grpo":
        return 1.0 / (len(n) * np.maximum(n, 1))
    if loss == "dr_grpo":
        return np.full(len(n), 1.0 / (len(n) * max_new_tokens))
    return np.full(len(n), 1.0 / max(1.0, n.sum()))


def token_logps(model, inputs, targets):
    """log p(target) of every position, float32 (B, T). Padded rows, one example each
    (packing.model_inputs: a stand-in cache only where layers share keys through it)."""
    from .loss import token_cross_entropy
    from .packing import compute_dtype, model_inputs, shares_kv_through_cache

    extra = model_inputs(model, None, compute_dtype(model), inputs) if shares_kv_through_cache(model) else {}
    return -token_cross_entropy(model(inputs, **extra), targets)


def grpo_loss(model, inputs, targets, mask, weights, adv, ref, scale, *, beta: float, eps_low: float,
              eps_high: float):
    """(weighted loss x scale, weighted loss, [summed KL, completion tokens]) of a call: per token
    -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta KL(pi || ref), KL by the k3
    estimator exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative), weighted by
    `weights` (token_weights on completion tokens, 0 elsewhere)."""
    logp = token_logps(model, inputs, targets)
    ratio = mx.exp(logp - mx.stop_gradient(logp))
    a = adv[:, None]
    per_token = -mx.minimum(ratio * a, mx.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    if beta:
        d = ref - logp
        kl = mx.exp(d) - d - 1
        per_token = per_token + beta * kl
        kl_sum = mx.stop_gradient((kl * mask).sum())
    else:
        kl_sum = mx.array(0.0)
    total = (per_token * weights).sum()
    return total * scale, total, mx.stack([kl_sum, mask.sum()])


# --- the step --------------------------------------------------------------------------------


@dataclass
class Settings:
    group: int
    max_new_tokens: int
    temperature: float
    beta: float
    loss: str
    epsilon: float
    epsilon_high: float
    rows_per_call: int           # rows of one training call (a group may take several calls)

    @classmethod
    def of(cls, cfg, rows_per_call: int | None = None) -> "Settings":
        g = cfg.grpo
        return cls(g.group_size, g.max_new_tokens, g.temperature, cfg.training.beta, g.loss, g.epsilon,
                   g.epsilon_high if g.epsilon_high is not None else g.epsilon, rows_per_call or g.group_size)


class GRPOStep(StepBase):
    """step.Step for GRPO: `step(micro_batches, lr, index) -> StepResult` over micro-batches of
    prompt indexes; rollouts, rewards, then the gradient of the weighted loss and the update
    (step.compile_step's, with its non-finite guard). StepResult.loss is the step's loss,
    .tokens its completion tokens. `window()` returns the rollout statistics since it was last
    called, as metrics.jsonl fields."""

    def __init__(self, model, optimizer, prompts: PromptSet, rewards: list, settings: Settings, *, eos: set,
                 tokenizer, seed: int = 0, max_grad_norm=None, flat: bool = True, nan_at=frozenset()):
        from mlx.utils import tree_map

        super().__init__(model, optimizer, prompts, seed=seed, max_grad_norm=max_grad_norm, flat=flat,
                         nan_at=nan_at)
        self.rewards, self.s, self.eos, self.tokenizer = rewards, settings, set(eos), tokenizer
        self._window, self._last = _Window(len(rewards)), {}
        s = settings
        lvg = nn.value_and_grad(model, partial(grpo_loss, beta=s.beta, eps_low=s.epsilon, eps_high=s.epsilon_high))

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def grad(inputs, targets, mask, weights, adv, ref, scale, acc):
            (_, total, stats), g = lvg(model, inputs, targets, mask, weights, adv, ref, scale)
            return total, stats, g if acc is None else tree_map(mx.add, acc, g)

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def ref_logps(inputs, targets):
            return token_logps(model, inputs, targets)

        self.grad, self._ref_logps = grad, ref_logps

    # --- rollouts and rewards --------------------------------------------------------------------

    def sample(self, idx: list[int], index: int, group: int, temperature: float, data=None):
        """(completions, rewards (n, functions)) of the prompts `idx`, `group` each; seeded
        from (seed, step index)."""
        from .rewards import score

        data = data or self.examples
        self.model.eval()
        comps = rollout(self.model, [data.ids[i] for i in idx], group, self.s.max_new_tokens, temperature,
                        self.eos, key=(self.seed * 1_000_003 + index) ^ 0x6A09E667)
        if self.device == "cpu":  # and not kept in MLX's buffer cache either (the process's RSS)
            mx.clear_cache()
        self.model.train()
        texts = [self.tokenizer_decode(c) for c in comps]
        scores = np.concatenate([score(self.rewards, data.prompts[i].text, texts[k * group:(k + 1) * group],
                                       data.prompts[i].record, data.prompts[i].where)
                                 for k, i in enumerate(idx)])
        return comps, scores

    def tokenizer_decode(self, ids: list[int]) -> str:
        ids = [t for t in ids if t not in self.eos]
        return self.tokenizer.decode(ids)

    # --- the step --------------------------------------------------------------------------------

    def calls(self, idx, comps, adv, weights):
        """Training calls: rows prompt + completion, padded; `rows_per_call` rows each."""
        from .batching import pad_batch

        g, n = self.s.group, self.s.rows_per_call
        seqs, masks, rows = [], [], []
        for k, i in enumerate(idx):
            p = self.examples.ids[i]
            for j in range(g):
                c = comps[k * g + j]
                seqs.append(p + c)
                masks.append([False] * len(p) + [True] * len(c))
                rows.append(k * g + j)
        out = []
        for start in range(0, len(rows), n):
            r = rows[start:start + n]
            inputs, targets, mask = pad_batch([seqs[x] for x in r], [masks[x] for x in r])
            self.shapes["train"].add(inputs.shape)
            w = mask * np.asarray([weights[x] for x in r], np.float32)[:, None]
            out.append((mx.array(inputs), mx.array(targets), mx.array(mask), mx.array(w.astype(np.float32)),
                        mx.array(np.asarray([adv[x] for x in r], np.float32)),
                        int(sum(len(seqs[x]) - 1 for x in r))))
        return out

    def gradients(self, idx: list[int], comps: list[list[int]], scores: np.ndarray, index: int = 0):
        """(gradients, step loss, [summed KL, completion tokens], non-padding tokens) of the
        completions `comps` of prompts `idx` (`group` each, in order) with reward `scores`
        (completions, rewards); nothing is updated. The token weights already make the sum the
        step's loss, so the scale is 1 (NaN at a test fault step)."""
        from .preference import adapters_off

        s = self.s
        adv = advantages(scores.sum(axis=1), s.group, s.loss)
        weights = token_weights([len(c) for c in comps], s.loss, s.max_new_tokens)
        scale = self.begin(1, index)
        acc, total, stats, real = None, mx.array(0.0), mx.zeros(2), 0
        for inputs, targets, mask, w, a, n in self.calls(idx, comps, adv, weights):
            ref = mx.zeros(inputs.shape, mx.float32)
            if s.beta:
                with adapters_off(self.model):
                    ref = self._ref_logps(inputs, targets)
            t, st, acc = self.grad(inputs, targets, mask, w, a, ref, scale, acc)
            total, stats, real = total + t, stats + st, real + n
            mx.eval(acc, total, stats)
        return acc, total, stats, real

    def __call__(self, micro_batches, lr: float, index: int = 0) -> StepResult:
        s = self.s
        idx = [i for mb in micro_batches for i in mb]
        tic = time.perf_counter()
        comps, scores = self.sample(idx, index, s.group, s.temperature)
        gen_s = time.perf_counter() - tic
        acc, total, stats, real = self.gradients(idx, comps, scores, index)
        lengths = [len(c) for c in comps]
        loss = self.finish(acc, total, lr, 1, real, stats)
        result = StepResult(loss.loss, int(sum(lengths)), real, loss.norm)  # tokens: the completions'
        if result.finite:
            self._window.add(scores, scores.sum(axis=1), lengths, np.array(stats), s.group, s.max_new_tokens,
                             self.eos, comps, gen_s)
        self._last = {"reward": f"{scores.sum(axis=1).mean():.3f}", "len": f"{np.mean(lengths):.0f}"}
        return result

    def window(self) -> dict:
        return self._window.records([n for n, _ in self.rewards])

    def progress(self) -> dict:
        """The last step's mean reward and completion length, for the progress line."""
        return self._last

    def evaluate(self, prompts: PromptSet, batch: int) -> tuple[float, dict]:
        """Greedy answers to held-out prompts, `batch` prompts at a time: (-mean total reward,
        records val_reward and val_reward_NAME)."""
        scores = []
        for start in range(0, len(prompts), batch):
            idx = list(range(start, min(start + batch, len(prompts))))
            scores.append(self.sample(idx, 0, 1, 0.0, prompts)[1])
        s = np.concatenate(scores)
        names = [n for n, _ in self.rewards]
        records = {"val_reward": float(s.sum(axis=1).mean())}
        records.update({f"val_reward_{n}": float(s[:, j].mean()) for j, n in enumerate(names)})
        return -records["val_reward"], records


class _Window:
    """Rollout statistics summed over the steps since the last record."""

    def __init__(self, k: int):
        self.k = k
        self.reset()

    def reset(self):
        self.sum, self.sq = np.zeros(self.k), np.zeros(self.k)
        self.total = self.total_sq = 0.0
        self.n = self.groups = self.flat = self.cut = self.tokens = 0
        self.kl = self.kl_tokens = self.gen_s = 0.0

    def add(self, scores, total_r, lengths, stats, group, max_new, eos, comps, gen_s):
        self.sum += scores.sum(axis=0)
        self.sq += (scores ** 2).sum(axis=0)
        self.total += total_r.sum()
        self.total_sq += (total_r ** 2).sum()
        self.n += len(total_r)
        g = total_r.reshape(-1, group)
        self.groups += len(g)
        self.flat += int((g.max(axis=1) == g.min(axis=1)).sum())
        self.cut += sum(1 for c in comps if len(c) >= max_new and (not c or c[-1] not in eos))
        self.tokens += sum(lengths)
        self.kl += float(stats[0])
        self.kl_tokens += float(stats[1])
        self.gen_s += gen_s

    def records(self, names) -> dict:
        if not self.n:
            return {}
        mean = self.total / self.n
        out = {"reward": mean, "reward_std": math.sqrt(max(0.0, self.total_sq / self.n - mean ** 2))}
        for j, name in enumerate(names):
            m = self.sum[j] / self.n
            out[f"reward_{name}"] = m
            out[f"reward_{name}_std"] = math.sqrt(max(0.0, self.sq[j] / self.n - m ** 2))
        out.update(kl=self.kl / max(1.0, self.kl_tokens), completion_len=self.tokens / self.n,
                   completions=self.n, zero_std_groups=self.flat / self.groups, truncated=self.cut / self.n,
                   gen_s=round(self.gen_s, 3), completions_per_s=round(self.n / self.gen_s, 3) if self.gen_s else None)
        self.reset()
        return out
