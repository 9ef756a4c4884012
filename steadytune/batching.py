"""Pure functions that decide what is trained when: epoch order, micro-batches, optimizer steps,
padding and the learning-rate schedule. No model, no MLX state: easy to test, and the same inputs
always give the same plan (that is what makes resume exact).
"""

from __future__ import annotations

import math

import numpy as np

LENGTH_WINDOW = 32  # micro-batches per window sorted by length: enough to group, little enough to stay random


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's order: a pure function of (seed, epoch), so a resumed run
    rebuilds exactly the order it was in without storing it."""
    return np.random.default_rng([seed, epoch])


def epoch_steps(lengths, batch_size: int, accum: int, seed: int, epoch: int,
                group_by_length: bool = True) -> list[list[list[int]]]:
    """One epoch as optimizer steps; each step is a list of micro-batches of example indexes.

    Every example appears exactly once. The last micro-batch may be smaller than batch_size and the
    last step may hold fewer micro-batches than `accum`: nothing is dropped, so there are
    ceil(n / (batch_size * accum)) steps. With group_by_length, examples are sorted by length inside
    windows of the shuffled order, so micro-batches hold similar lengths (little padding), and the
    micro-batches are shuffled again so long and short ones alternate across the epoch.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    rng = epoch_rng(seed, epoch)
    order = rng.permutation(n)
    if group_by_length:
        w = batch_size * accum * LENGTH_WINDOW
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                for chunk in np.array_split(order, max(1, math.ceil(n / w)))])
    micro = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    if group_by_length:
        micro = [micro[i] for i in rng.permutation(len(micro))]
    return [micro[i:i + accum] for i in range(0, len(micro), accum)]


def steps_per_epoch(n: int, batch_size: int, accum: int) -> int:
    return math.ceil(n / (batch_size * accum))


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's share of a micro-batch (contiguous, sizes differ by at most one)."""
    return np.array_split(np.asarray(batch), world)[rank].tolist()


def default_pad_multiple(width: int) -> int:
    """32, or 128 for widths above 256 on CUDA: MLX's fused attention backward there (cuDNN) needs a
    sequence length that is a multiple of 128, else it falls back to unfused attention, 2.3-2.8x
    slower and holding batch x heads x T x T probabilities (8 GB for 4 x 992 tokens on a 7B model;
    bench/RESULTS.md). Short widths stay at 32: there attention is cheap and padding is not."""
    if width <= 256:
        return 32
    from .backend import device_kind

    return 128 if device_kind() == "cuda" else 32


def pad_batch(ids: list[list[int]], masks: list[list[bool]], pad_multiple: int | None = None,
              pad_id: int = 0):
    """Inputs, targets and loss mask for next-token prediction, right-padded.

    A sequence of n tokens gives n-1 (input, target) pairs. The width is rounded up to a multiple of
    `pad_multiple` (default: default_pad_multiple) so compiled steps see few distinct shapes (and
    CUDA's fused attention its preferred sizes). Returns int32 inputs/targets and a float32 mask (B, T).
    """
    width = max(len(x) for x in ids) - 1
    pad_multiple = pad_multiple or default_pad_multiple(width)
    width = max(pad_multiple, math.ceil(width / pad_multiple) * pad_multiple)
    b = len(ids)
    inputs = np.full((b, width), pad_id, dtype=np.int32)
    targets = np.full((b, width), pad_id, dtype=np.int32)
    mask = np.zeros((b, width), dtype=np.float32)
    for i, (x, m) in enumerate(zip(ids, masks)):
        n = len(x) - 1
        inputs[i, :n] = x[:-1]
        targets[i, :n] = x[1:]
        mask[i, :n] = m[1:]
    return inputs, targets, mask


def padding_fraction(lengths_per_batch: list[list[int]], pad_multiple: int | None = None) -> float:
    """Share of computed positions that are padding, over a list of micro-batches of lengths."""
    real = total = 0
    for lens in lengths_per_batch:
        k = pad_multiple or default_pad_multiple(max(lens) - 1)
        width = max(k, math.ceil((max(lens) - 1) / k) * k)
        real += sum(n - 1 for n in lens)
        total += width * len(lens)
    return 1 - real / total if total else 0.0


def lr_at(step: int, peak: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Learning rate of optimizer update number `step` (0-based): linear warmup to the peak over
    `warmup` updates, then constant or cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
