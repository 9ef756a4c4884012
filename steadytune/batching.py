"""Pure functions that decide what is trained when: epoch order, micro-batches, optimizer steps,
padding and the learning-rate schedule. No model, no MLX state: easy to test, and the same inputs
always give the same plan (that is what makes resume exact).
"""

from __future__ import annotations

import bisect
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


def padded_width(tokens: int, device: str) -> int:
    """Input width of a micro-batch whose longest example has `tokens` tokens, as pad_batch pads
    it on `device` (n tokens give n - 1 inputs)."""
    width = max(1, tokens - 1)
    k = pad_multiple(width, device)
    return math.ceil(width / k) * k


def row_width(tokens: int, device: str, bucket: bool = False) -> int:
    """Input width of an unpacked row whose longest example has `tokens` tokens: padded_width, or
    with `bucket` (buckets_rows: a GPU without a token budget) the power of two at or above it."""
    width = padded_width(tokens, device)
    return width_bucket(width, "gpu") if bucket else width


def budget_width(tokens: int) -> int:
    """Padded input width a token budget charges for a micro-batch whose longest example has
    `tokens` tokens: the widest padding of any device (CUDA's), so the same data and budget give
    the same micro-batches on every machine (resume stays exact) and no device pads past the
    budget."""
    return padded_width(tokens, "cuda")


def token_budget_steps(lengths, budget: int, accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """One epoch as optimizer steps whose micro-batches are filled to a token budget.

    The shuffled order is cut into windows of about LENGTH_WINDOW micro-batches' worth of tokens;
    inside a window examples are sorted longest first and taken greedily while
    (examples + 1) x budget_width(longest) <= budget, so a micro-batch holds many short examples or
    few long ones and its padded size never passes the budget (an example longer than the budget,
    which config validation prevents, would get a micro-batch of its own). Micro-batches are then
    shuffled and grouped `accum` per step. Every example appears exactly once; the number of steps
    depends on the lengths (and slightly on the epoch), not on a batch size.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    rng = epoch_rng(seed, epoch)
    order = rng.permutation(n)
    tokens = int(sum(budget_width(int(x)) for x in lengths)) if n else 0
    windows = max(1, math.ceil(tokens / (budget * accum * LENGTH_WINDOW)))
    micro: list[list[int]] = []
    for chunk in np.array_split(order, windows):
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        current: list[int] = []
        for i in chunk.tolist():
            if current and (len(current) + 1) * budget_width(int(lengths[current[0]])) > budget:
                micro.append(current)
                current = []
            current.append(i)
        if current:
            micro.append(current)
    micro = [micro[i] for i in rng.permutation(len(micro))]
    return [micro[i:i + accum] for i in range(0, len(micro), accum)]


# Packed layout: how a call's examples (one micro-batch, or a step's micro-batches merged) share
# rows. Packing never decides *which* examples a step trains on (plan_epoch does, the same packed
# or not); it only lays them out, so a packed run follows the unpacked run's optimization.
ROW_TARGET = {"cpu": 512, "gpu": 4096}  # positions per row when a call holds more than that


def row_target(device: str) -> int:
    """Positions a packed row aims at. Attention is computed over the whole row (the mask hides
    the other examples but they cost compute): on the CPU the unfused attention of a 2,048-wide
    row would cost a small model (SmolLM2) a quarter more work than its matmuls, at 512 about 8%.
    A GPU's fused attention makes one wide row per call (one call, no row-count shapes) pay."""
    return ROW_TARGET["cpu" if device == "cpu" else "gpu"]


def width_bucket(n: int, device: str = "cpu", floor: int = 128) -> int:
    """The packed row width for `n` positions: few distinct widths at little padding. On a GPU
    each new shape costs seconds (1.7-1.8 s a width for a 7B step on an H100, 2.7-3.2 s on an
    H200 waiting for each step; host-side set-up: cuDNN's attention is about 0.1 s of it and no
    kernel is compiled, bench/RESULTS.md), and a step of a few examples leaves it idle enough
    that padding is cheap: powers of two from `floor` (min_width). On the CPU a shape compiles
    in well under a second and every padded position costs its full share: multiples of 32,
    never finer than a sixteenth of the power of two at or above the width (eight widths a
    doubling, at most 12.5% padding from the rounding)."""
    n = max(1, int(n))
    if device != "cpu":
        return max(floor, 1 << (n - 1).bit_length())
    step = max(32, (1 << (n - 1).bit_length()) // 16)
    return -(-n // step) * step


# Parameters x positions a CUDA step computes in about the time its host takes to queue it (about
# 100 ms for a 7B-shaped step; 512 positions of a 7B model are about 15 TFLOP forward and back,
# some 30-40 ms of an H100). A 7B shape (7.24e9 parameters) gets a floor of 512: it changes 11 of
# the alpaca epoch's 238 steps (those under 256 positions) and saves their shape. On a warm H100,
# alternating floors of 128, 512 and 1,024 on that epoch (ABC CBA), the two 512 runs took 57.6
# and 60.3 s, the comparable run without a floor 60.6 s (the other, the first of the call, paid
# its start-up: 65.8 s); the median steps (119-148 ms) followed a drift of the machine that
# peaked mid-call, not the floor, which leaves the common 1,024-wide steps alone
# (bench/RESULTS.md). A floor of 1,024 (63 steps padded) ran in that peak and stays untested.
# Smaller models get the floor of the same product (at most 1,024; not measured on a GPU yet).
CUDA_IDLE_WORK = 7.5e9 * 512


def min_width(device: str, params: int) -> int:
    """The narrowest packed row on `device` for a model of `params` parameters: on CUDA the
    power of two (128 to 1,024) whose call the GPU computes while the host still queues it, so
    the narrow widths it absorbs need no set-up and their padding should cost no time (7B: 512;
    13B: 256; 70B: 128, no floor; 3B and smaller: 1,024). Elsewhere 128: Apple GPUs and the CPU
    compute the padding (the CPU does not use powers of two at all: width_bucket)."""
    if device != "cuda" or params <= 0:
        return 128
    fit = int(CUDA_IDLE_WORK // params)
    return min(1024, max(128, 1 << max(0, fit.bit_length() - 1)))


def row_bucket(r: int) -> int:
    """Rows of a packed call: 1-8 exactly, then 12, 16, 24, 32, ... (empty rows fill the rest: all
    padding, no loss, no gradient), so the row count adds few compiled shapes."""
    if r <= 8:
        return max(1, r)
    b = 8
    while b < r:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


def pack_rows(sizes, width: int) -> list[list[int]]:
    """Best fit decreasing: indexes of `sizes` into rows of at most `width`. Each item goes, the
    largest first, into the fullest row it still fits in (a new row if none), so rows come out
    nearly full when small items are there to fill the gaps of large ones."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted

    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        k = bisect.bisect_left(free, (sizes[i], -1))
        if k == len(free):
            rows.append([i])
            bisect.insort(free, (width - sizes[i], len(rows) - 1))
        else:
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - sizes[i], r))
    return rows


def pack_layout(lengths, target: int, device: str = "cpu", floor: int = 128) -> tuple[list[list[int]], int]:
    """(rows, width): the examples of one call (token lengths; an example of n tokens takes n - 1
    positions) laid out in rows of `width`. Up to `target` positions in all: one row of
    width_bucket(total). More: rows of about `target` positions, each at least as wide as the
    call's longest example (a long step gets rows as wide as its own longest example, not the
    data set's), packed best fit decreasing (pack_rows) into ceil(total / width) rows, widened
    until they fit; the row count rounded up by row_bucket (empty rows); on a GPU no row narrower
    than `floor` (min_width). A pure function of the lengths."""
    need = [max(int(n) - 1, 1) for n in lengths]
    if not need:
        return [], width_bucket(1, device, floor)
    total = sum(need)
    width = width_bucket(max(max(need), -(-total // -(-total // target))), device, floor)
    while len(rows := pack_rows(need, width)) > -(-total // width):
        width = width_bucket(width + 1, device, floor)
    width = width_bucket(max(sum(need[i] for i in row) for row in rows), device, floor)
    return rows + [[] for _ in range(row_bucket(len(rows)) - len(rows))], width


def eval_calls(sizes, rows: int, width: int) -> list[list[list[int]]]:
    """Indexes of `sizes` (positions per example) in calls of at most `rows` rows of `width`
    positions, first fit decreasing: the largest example first, into the first row of the open
    call with room, a new row while the call has fewer than `rows`, else a new call. Every call
    can then be laid out at one shape (rows x width, empty rows padded), so a validation compiles
    once. An example wider than `width` is a call of its own. A pure function of the sizes."""
    calls: list[list[list[int]]] = []
    call: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        n = sizes[i]
        if n > width:
            calls.append([[i]])
            continue
        r = next((k for k, free in enumerate(room) if free >= n), None)
        if r is None and len(call) == rows:
            calls.append(call)
            call, room = [], []
        if r is None:
            call.append([i])
            room.append(width - n)
        else:
            call[r].append(i)
            room[r] -= n
    return calls + ([call] if call else [])


# On the CPU a query-key pair of the unfused attention costs this many times its multiply-adds'
# share of a position's matmuls: its batched head_dim-wide products run below the weight
# matmuls' speed, and the mask, softmax and their backward are passes over rows x width^2 scores
# per head. Estimated from the default model's warm calls on 2 shared cores (bench/throughput.py
# cpulayout, bench/RESULTS.md): chatbot calls as one packed row of 224-288 against four rows of
# 64-80 put a pair at 0 to 1.1e-3 positions (the load's noise), about 6e-4 in the middle, 2.5
# times SmolLM2's multiply-add share (2.6e-4). Near the break-even either layout costs the same.
CPU_ATTENTION_SLOWDOWN = 2.5


def pair_cost(params: int, attention_dims: int) -> float:
    """Compute of one query-key pair of attention on the CPU, in units of one position's work:
    a position costs about params multiply-adds (every weight once; the frozen base's backward
    doubles it), a pair 2 x attention_dims (q.k and p.v over every layer's heads x head_dim;
    its backward doubles it too), times CPU_ATTENTION_SLOWDOWN. 0 when either is unknown."""
    if params <= 0 or attention_dims <= 0:
        return 0.0
    return CPU_ATTENTION_SLOWDOWN * 2 * attention_dims / params


def layout_work(rows: int, width: int, pair: float) -> float:
    """Computed work of a call of `rows` x `width` positions, in positions: each position, and
    each query-key pair of a row's attention (width^2 a row: the CPU's unfused attention scores
    the whole row, masked or not) at `pair` (pair_cost)."""
    return rows * width * (1 + pair * width)


def call_layout(lengths, target: int, device: str = "cpu", pair: float = 0.0,
                floor: int = 128) -> tuple[list[list[int]], int, bool]:
    """(rows, width, packed): how one call's examples are laid out when packing is on. On a GPU
    (fused attention) or with pair 0: pack_layout. On the CPU, packed only where that computes
    less than one example a row (layout_work, empty rows included): a packed row's attention
    spans every example in it, so packing pays where it removes more padding than the attention
    it adds. Else one example a row, as wide as pad_batch pads it (the --pack false layout).
    The examples are the same either way: a layout only."""
    rows, width = pack_layout(lengths, target, device, floor)
    if device != "cpu" or pair <= 0 or not lengths:
        return rows, width, True
    one = padded_width(max(int(n) for n in lengths), device)
    if layout_work(len(lengths), one, pair) <= layout_work(len(rows), width, pair):
        return [[i] for i in range(len(lengths))], one, False
    return rows, width, True


def layout_padding(calls, lengths, target: int, device: str = "cpu", pair: float = 0.0, floor: int = 128) -> float:
    """Share of computed positions that are padding when each call (a list of example indexes) is
    laid out by call_layout (pack_layout where pair is 0)."""
    real = total = 0
    for call in calls:
        lens = [int(lengths[i]) for i in call]
        rows, width, _ = call_layout(lens, target, device, pair, floor)
        real += sum(max(n - 1, 1) for n in lens)
        total += len(rows) * width
    return 1 - real / total if total else 0.0


def pack_batch(ids: list[list[list[int]]], masks: list[list[list[bool]]], width: int, pad_id: int = 0):
    """Inputs, targets, loss mask and segments of packed rows (`ids[r]` = the examples of row r).

    Each example contributes its n - 1 (input, target) pairs at the next free position of its row;
    segments[r, t] numbers the example of row r that position t belongs to, from 0, and the padding
    at a row's end is one segment more (it attends only to itself and carries no loss). Returns
    int32 inputs/targets/segments and a float32 mask (B, width)."""
    b = len(ids)
    inputs = np.full((b, width), pad_id, dtype=np.int32)
    targets = np.full((b, width), pad_id, dtype=np.int32)
    mask = np.zeros((b, width), dtype=np.float32)
    segments = np.zeros((b, width), dtype=np.int32)
    for r, (row, row_masks) in enumerate(zip(ids, masks)):
        if (held := sum(len(x) - 1 for x in row)) > width:
            raise ValueError(f"row {r} holds {held} positions, more than the width {width}")
        pos = 0
        for j, (x, m) in enumerate(zip(row, row_masks)):
            n = len(x) - 1
            inputs[r, pos:pos + n] = x[:-1]
            targets[r, pos:pos + n] = x[1:]
            mask[r, pos:pos + n] = m[1:]
            segments[r, pos:pos + n] = j
            pos += n
        segments[r, pos:] = len(row)
    return inputs, targets, mask, segments


def merge_micro_batches(micro_batches: list, group: int) -> list:
    """A step's micro-batches (lists of example indexes) joined `group` at a time into one call:
    the token-weighted loss of a step is a sum over its examples, so the gradients are the same,
    computed in fewer, larger calls."""
    if group <= 1:
        return micro_batches
    return [[i for mb in micro_batches[k:k + group] for i in mb] for k in range(0, len(micro_batches), group)]


def merge_group(accum: int, fits) -> int:
    """How many of a step's `accum` micro-batches run as one call: the largest divisor g of accum
    for which fits(g) (the memory plan of a call of g micro-batches), so every call of a step has
    about the same size."""
    return max(g for g in range(1, accum + 1) if accum % g == 0 and (g == 1 or fits(g)))


def plan_epoch(lengths, batch_size: int, batch_tokens: int | None, accum: int, seed: int, epoch: int,
               group_by_length: bool = True) -> list:
    """The epoch's steps, each a list of micro-batches of example indexes: by a token budget when
    `batch_tokens` is set, else `batch_size` examples a micro-batch. Packed or not, the same: packing
    lays out a step's examples (pack_layout), it does not choose them."""
    if batch_tokens:
        return token_budget_steps(lengths, batch_tokens, accum, seed, epoch)
    return epoch_steps(lengths, batch_size, accum, seed, epoch, group_by_length)


def shard(batch: list, rank: int, world: int) -> list:
    """This rank's share of a micro-batch's examples (contiguous, sizes differ by at most one)."""
    return [batch[i] for i in np.array_split(np.arange(len(batch)), world)[rank].tolist()]


def pad_multiple(width: int, device: str) -> int:
    """What a micro-batch's input width is rounded up to. Short widths: 8 (up to 128) or 16 (up to
    256): a 68-token average example (wikisql) then carries 9% padding instead of 20% with 32,
    at the price of a few more compiled shapes. Above 256 on CUDA: 128, since MLX's fused
    attention backward there (cuDNN) needs a multiple of 128 and otherwise falls back to unfused
    attention, 2.3-2.8x slower and holding batch x heads x T x T probabilities (8 GB for
    4 x 992 tokens on a 7B model; bench/RESULTS.md). Above 256 elsewhere: 32."""
    if width <= 128:
        return 8
    if width <= 256:
        return 16
    return 128 if device == "cuda" else 32


def default_pad_multiple(width: int) -> int:
    """pad_multiple on this process's device."""
    if width <= 256:
        return pad_multiple(width, "any")
    from .backend import device_kind

    return pad_multiple(width, device_kind())


def pad_batch(ids: list[list[int]], masks: list[list[bool]], pad_multiple: int | None = None,
              pad_id: int = 0, width: int | None = None):
    """Inputs, targets and loss mask for next-token prediction, right-padded.

    A sequence of n tokens gives n-1 (input, target) pairs. The width is `width` if given, else
    rounded up to a multiple of `pad_multiple` (default: default_pad_multiple) so compiled steps see
    few distinct shapes (and CUDA's fused attention its preferred sizes). Returns int32
    inputs/targets and a float32 mask (B, T).
    """
    if width is None:
        width = max(len(x) for x in ids) - 1
        pad_multiple = pad_multiple or default_pad_multiple(width)
        width = max(pad_multiple, math.ceil(width / pad_multiple) * pad_multiple)
    return pack_batch([[x] for x in ids], [[m] for m in masks], width, pad_id)[:3]  # one example a row


def padding_fraction(lengths_per_batch: list[list[int]], pad_multiple: int | None = None,
                     bucket: bool = False) -> float:
    """Share of computed positions that are padding, over a list of micro-batches of lengths
    (bucket: rows padded to powers of two, as unpacked calls on a GPU: row_width)."""
    real = total = 0
    for lens in lengths_per_batch:
        k = pad_multiple or default_pad_multiple(max(lens) - 1)
        width = max(k, math.ceil((max(lens) - 1) / k) * k)
        width = width_bucket(width, "gpu") if bucket else width
        real += sum(n - 1 for n in lens)
        total += width * len(lens)
    return 1 - real / total if total else 0.0


def buckets_rows(device: str, batch_tokens: int | None) -> bool:
    """Whether an unpacked call (one example a row: a model whose layers carry a state along the
    row, or --pack false) pads its rows to a power of two (width_bucket) instead of a multiple of
    128: on a GPU without a token budget. Why: each new width costs seconds there (2.3 s on a 7B
    shape, about 12 s on a Qwen3-Next shape, H100), and alpaca one a row has 23 widths at
    multiples, 4 at powers of two (padding 11.5% -> 32.2%; the default model's tokenizer). A token budget keeps the multiples:
    it charges every device the same widths (budget_width), so its micro-batches do not depend on
    the machine."""
    return device != "cpu" and not batch_tokens


def lr_at(step: int, peak: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Learning rate of optimizer update number `step` (0-based): linear warmup to the peak over
    `warmup` updates, then constant or cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


EXACT_EPOCHS = 10  # epochs whose steps planned_total counts; later ones are estimated from them


def planned_total(steps_in, epochs: int, fixed: bool) -> int:
    """Optimizer steps of `epochs` epochs, `steps_in(e)` being the steps of epoch e. By example
    count every epoch has the same steps: one plan times the epochs. Packed rows and token
    budgets differ a little from epoch to epoch: the first EXACT_EPOCHS are counted and any
    further ones estimated from their mean (a pure function, so a resumed run agrees; the last
    epoch may end a few steps early or late). Planning a huge --epochs thus costs at most 10
    plans (~3 s for 50k examples) instead of one per epoch (minutes of silence before step 1)."""
    if fixed:
        return steps_in(0) * epochs
    k = min(epochs, EXACT_EPOCHS)
    counted = sum(steps_in(e) for e in range(k))
    return counted + round(counted * (epochs - k) / k)
