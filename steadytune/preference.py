"""Preference tuning on pairs: pair batches, the DPO and ORPO losses, the reference
log-probabilities and the optimizer step. Reading, validating and tokenizing pairs (the record
formats, the answer masks, the truncation rule) is pairs.py's.

Both sequences of a pair go through the model in one forward pass: as neighbouring rows of a
padded batch (rows 2j and 2j+1 are pair j's chosen and rejected), or packed into the same row as
two segments that cannot see each other (packing.py).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .pairs import TokenizedPairs
from .step import StepBase
# the pair readers and tokenizers, importable from here as before the split
from .pairs import (Pair, PairSplits, answer_mask, load_pair_splits, read_pairs, tokenize_pair,  # noqa: F401
                    tokenize_pair_splits, tokenize_pairs)

METHODS = ("dpo", "orpo")


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

    logp = -token_cross_entropy(model(inputs, **model_inputs(model, segments, mask_dtype, inputs)), targets) * mask
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


class PairStep(StepBase):
    """step.Step for preference pairs: the same call, `step(micro_batches, lr, index) ->
    StepResult`, over micro-batches of pair indexes (packed into rows or not). Each micro-batch is
    one forward pass over both sides of its pairs; its summed pair losses are divided by the pairs
    of the whole accumulation group (and of all processes), so micro-batches add up to one big
    batch, weighted by pairs. StepResult.tokens is that pair count. The clipped update with its
    non-finite guard is step.py's own compiled `update`. `window()` returns the reward statistics
    summed since it was last called, as metrics.jsonl fields.

    ref: (pairs, 2) reference log-probabilities of chosen and rejected (DPO; reference_logps),
    or None (ORPO)."""

    def __init__(self, model, optimizer, pairs: TokenizedPairs, ref, *, method: str, beta: float,
                 seed: int = 0, max_grad_norm=None, pack_target: int = 0, mask_dtype=mx.float32,
                 flat: bool = True, rank: int = 0, world: int = 1, nan_at=frozenset()):
        from functools import partial

        import mlx.nn as nn
        from mlx.utils import tree_map

        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        super().__init__(model, optimizer, pairs, seed=seed, max_grad_norm=max_grad_norm, flat=flat,
                         rank=rank, world=world, nan_at=nan_at)
        self.ref = np.zeros((len(pairs), 2), np.float32) if ref is None else np.asarray(ref, np.float32)
        self.pack_target = pack_target
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


    def batches(self, micro_batches) -> list:
        """This process's share of each micro-batch as (arrays, reference rows, non-padding tokens);
        packed, the pairs are laid out in rows by batching.pack_layout (both sides of a pair in
        one row)."""
        from .batching import pack_layout, shard

        out = []
        for mb in micro_batches:
            mb = shard(mb, self.rank, self.world) if self.world > 1 else mb
            if not mb:
                continue
            width = None
            if self.pack_target:
                lengths = self.examples.lengths(packed=True)
                rows, width = pack_layout([lengths[i] for i in mb], self.pack_target, self.device)
                mb = [[mb[j] for j in row] for row in rows]
            idx = [i for row in mb for i in row] if width else mb
            arrays = pair_batch(self.examples, mb, width)
            real = sum(len(self.examples.seqs[s]) - 1 for i in idx for s in (2 * i, 2 * i + 1))
            out.append((tuple(None if a is None else mx.array(a) for a in arrays),
                        mx.array(self.ref[idx]), real))
        return out

    def gradients(self, micro_batches, index: int = 0):
        """(gradients, summed loss, summed statistics, group pairs, non-padding tokens) of one
        step, summed over micro-batches and processes; nothing is updated."""
        pairs = sum(len(mb) for mb in micro_batches)  # weighted by pairs: 1 / pairs of the whole group
        scale = self.begin(pairs, index)
        acc, total, stats, real = None, mx.array(0.0), mx.zeros(4), 0
        for batch, ref, n in self.batches(micro_batches):
            t, st, acc = self.grad(batch, ref, scale, acc)
            total, stats, real = total + t, stats + st, real + n
            mx.eval(acc, total, stats)
        acc, total, stats = self.all_reduce(acc, total, stats)
        return acc, total, stats, pairs, real

    def __call__(self, micro_batches, lr: float, index: int = 0):
        acc, total, stats, pairs, real = self.gradients(micro_batches, index)
        result = self.finish(acc, total, lr, pairs, real, stats)
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
