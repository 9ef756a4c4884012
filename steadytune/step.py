"""One optimizer step, as a public object a test, a bench or the planner can drive:

    step = Step(model, optimizer, examples, seed=0, max_grad_norm=1.0)
    result = step(micro_batches, lr, index)      # -> StepResult(loss, tokens, real, norm)

The step pads (or packs) its micro-batches, computes each one's summed cross-entropy divided by
the target tokens of the *whole group* (known before any compute), so the summed gradients equal
those of one batch of all the examples; then clips, updates, and keeps the old parameters and
optimizer state where the loss or the norm is not finite (decided on the device). The compiled
functions take the model, optimizer and random state as inputs/outputs, and that state is
evaluated every step, so the lazy graph never grows.

Every option is a constructor argument; nothing is stored on the model or in module globals.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .batching import (call_layout, eval_calls, merge_micro_batches, min_width, pack_batch, pad_batch,
                       pair_cost, row_width, shard)
from .loss import loss_fn


class Batch(NamedTuple):
    """One micro-batch as arrays; segments is None unless the rows are packed."""

    inputs: mx.array
    targets: mx.array
    mask: mx.array
    segments: mx.array | None
    real: int  # non-padding tokens


class StepResult(NamedTuple):
    loss: float    # mean cross-entropy per target token of the group
    tokens: int    # target tokens of the group (all processes)
    real: int      # non-padding tokens this process computed
    norm: float    # gradient norm before clipping

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.norm)


class Done(NamedTuple):
    """A step already read back (Step.dispatch of a step that cannot be left in flight)."""

    value: StepResult
    in_flight = False

    def result(self) -> StepResult:
        return self.value


class Pending(NamedTuple):
    """A step queued on the device (Step.dispatch): its loss and norm are read by result(), which
    waits for it. Until then the host is free to prepare and queue the next step."""

    total: mx.array
    norm: mx.array
    tokens: int
    real: int
    in_flight = True

    def result(self) -> StepResult:
        return StepResult(self.total.item() / self.tokens, self.tokens, self.real, self.norm.item())


class StepBase:
    """What every objective's step shares (step.Step for SFT, preference.PairStep, grpo.GRPOStep):
    the model, optimizer and random state its compiled functions read and write; the seeded start
    of a step (begin_step); the all-reduce of gradients across processes; and the clipped update
    with its non-finite guard (compile_step's `update`). A subclass adds how its micro-batches
    become arrays and gradients, and `window()`, its own statistics for metrics.jsonl."""

    def __init__(self, model: nn.Module, optimizer, examples, *, seed: int = 0,
                 max_grad_norm: float | None = None, flat: bool = True, rank: int = 0, world: int = 1,
                 nan_at=frozenset()):
        from .backend import device_kind

        self.model, self.optimizer, self.examples = model, optimizer, examples
        self.seed, self.rank, self.world, self.device = seed, rank, world, device_kind()
        self.max_norm = mx.array(max_grad_norm or float("inf"), dtype=mx.float32)
        self.nan_at = frozenset(nan_at)
        self.shapes = {"train": set(), "val": set()}  # distinct input shapes: each compiles once
        self.state = [model.state, optimizer.state, mx.random.state]
        self.update = compile_step(model, optimizer, self.state, loss_fn, flat)[2]

    def begin(self, count: int, index: int) -> mx.array:
        """The loss scale 1 / count of a step (begin_step: reseeded, training mode)."""
        return begin_step(self.model, count, index, self.seed, self.nan_at)

    def all_reduce(self, acc, *sums):
        """Gradients and sums added over processes (a rank with no rows adds zeros)."""
        if self.world == 1:
            return (acc, *sums)
        if acc is None:
            acc = tree_map(mx.zeros_like, self.model.trainable_parameters())
        return (all_sum_tree(acc), *(mx.distributed.all_sum(x) for x in sums))

    def finish(self, acc, total, lr: float, count: int, real: int, *more) -> StepResult:
        """The clipped update from summed gradients; StepResult with loss total / count."""
        norm = self.update(acc, total, mx.array(lr, dtype=mx.float32), self.max_norm)
        mx.eval(self.state, total, norm, *more)
        return StepResult(total.item() / count, count, real, norm.item())

    def dispatch(self, micro_batches, lr: float, index: int = 0):
        """The step queued; `.result()` of what it returns reads its StepResult. Here the step runs
        to its end (Done); step.Step leaves a one-call step in flight (Pending)."""
        return Done(self(micro_batches, lr, index))

    def window(self) -> dict:
        """The objective's own statistics since the last call, as metrics fields: none for SFT
        (the loop reports the loss)."""
        return {}

    def progress(self) -> dict:
        """The objective's own fields of the progress line after each step (text): none for SFT."""
        return {}


class Step(StepBase):
    """One optimizer step over micro-batches of `examples` (a data.Tokenized: ids and masks).

    seed: dropout masks are drawn from (seed, step index), so a resumed run draws the same ones.
    max_grad_norm: clip the gradient norm (None: no clipping). pack_target: > 0 packs each call's
    examples into rows of about this many positions (batching.call_layout: a layout only, the
    examples are the micro-batches' either way; on the CPU a call is packed only where that
    computes less, `pair` being a query-key pair's cost in positions, None: from the model,
    attention_pair_cost); 0 pads one example a row, to a power of two with bucket_rows
    (batching.buckets_rows). merge: micro-batches
    run this many at a time as one call (setup.merged_calls: the same gradients in fewer, larger
    calls). ce_chunk, mask_dtype: the loss's options (loss.loss_chunk, packing.prepare). flat: the update on one concatenated vector
    (flat_update) instead of array by array. rank, world: this process's share of each micro-batch
    and the all-reduce of the gradients. nan_at: step numbers (1-based) whose loss scale is made
    NaN: a test fault (faults.nan_steps)."""

    def __init__(self, model: nn.Module, optimizer, examples, *, seed: int = 0,
                 max_grad_norm: float | None = None, pack_target: int = 0, merge: int = 1,
                 pair: float | None = None, ce_chunk: int = 0, bucket_rows: bool = False,
                 mask_dtype=mx.float32, flat: bool = True, rank: int = 0, world: int = 1,
                 nan_at=frozenset()):
        super().__init__(model, optimizer, examples, seed=seed, max_grad_norm=max_grad_norm, flat=flat,
                         rank=rank, world=world, nan_at=nan_at)
        self.pack_target, self.merge, self.fused = pack_target, merge, fuses_update(world)
        self.bucket_rows = bucket_rows
        if pair is None:  # on the CPU from the model's shape; a GPU's fused attention packs every call
            pair = attention_pair_cost(model) if pack_target and self.device == "cpu" else 0.0
        self.pair = pair
        # no packed row narrower than the GPU computes while the host queues it: fewer shapes to set up
        self.floor = min_width(self.device, model_parameters(model))
        # validation in few shapes (validation_loss): on a GPU each shape costs seconds to set up
        # (2.3 s on a 7B shape, about 12 s on a Qwen3-Next shape); on the CPU calls of batch_size
        # examples at their own width compute less
        self.few_val_shapes = self.device != "cpu"
        loss = partial(loss_fn, chunk=ce_chunk, mask_dtype=mask_dtype)
        self.grad, self.grad_apply, self.update, self.eval_loss = compile_step(
            model, optimizer, self.state, loss, flat)

    # --- inputs ----------------------------------------------------------------------------------

    def begin_group(self, micro_batches, index: int = 0) -> tuple[mx.array, int]:
        """The loss scale (1 / target tokens of the whole group) and that token count; reseeds
        MLX's generator from (seed, index): dropout then does not depend on what ran before."""
        masks = self.examples.masks
        group_tokens = sum(int(sum(masks[i][1:])) for mb in micro_batches for i in mb)
        return self.begin(group_tokens, index), group_tokens

    def batches(self, micro_batches) -> list[Batch]:
        """This process's share of each call (merged micro-batches), padded or packed into arrays."""
        out = []
        for mb in merge_micro_batches(micro_batches, self.merge):
            mb = shard(mb, self.rank, self.world) if self.world > 1 else mb
            if mb:  # this rank's share of a short last micro-batch may be empty
                out.append(self.arrays(mb, "train", bucket=self.bucket_rows))
        return out

    def arrays(self, examples: list[int], kind: str, data=None, bucket: bool = False) -> Batch:
        """One call's arrays: the examples packed into rows (call_layout) or one a row, padded (to
        a power of two with `bucket`: batching.width_bucket)."""
        data = data or self.examples
        ids, masks = [data.ids[i] for i in examples], [data.masks[i] for i in examples]
        real = sum(len(x) - 1 for x in ids)
        rows, width, packed = call_layout([len(x) for x in ids], self.pack_target, self.device, self.pair, self.floor) \
            if self.pack_target else (None, 0, False)
        if packed:
            inputs, targets, mask, seg = pack_batch([[ids[j] for j in row] for row in rows],
                                                    [[masks[j] for j in row] for row in rows], width)
            seg = mx.array(seg)
        else:
            width = row_width(max(len(x) for x in ids), self.device, bucket) if bucket else None
            (inputs, targets, mask), seg = pad_batch(ids, masks, width=width), None
        self.shapes[kind].add(inputs.shape)
        return Batch(mx.array(inputs), mx.array(targets), mx.array(mask), seg, real)

    # --- gradients and update --------------------------------------------------------------------

    def gradients(self, micro_batches, index: int = 0):
        """Gradients of one step, summed over its micro-batches (and processes), each micro-batch's
        summed loss divided by the target tokens of the whole group. Returns (gradients, summed
        loss, group target tokens, non-padding tokens); nothing is updated."""
        scale, group_tokens = self.begin_group(micro_batches, index)
        batches = self.batches(micro_batches)
        acc, total = self._sum_grads(batches, scale)
        real = sum(b.real for b in batches)
        # the token-weighted rule across ranks: sum, already divided by the global count
        acc, total = self.all_reduce(acc, total)
        return acc, total, group_tokens, real

    def _sum_grads(self, batches, scale, acc=None):
        """Gradients and summed loss over padded micro-batches, evaluated after each one."""
        total = mx.array(0.0)
        for b in batches:
            part, acc = self.grad(b.inputs, b.targets, b.mask, b.segments, scale, acc)
            total = total + part
            mx.eval(acc, total)
        return acc, total

    def apply(self, grads, total, lr: float, max_grad_norm: float | None = None) -> mx.array:
        """The clipped update alone, from gradients and the summed loss (evaluated); returns the
        gradient norm. A non-finite loss or norm leaves parameters and state unchanged."""
        max_norm = self.max_norm if max_grad_norm is None else mx.array(max_grad_norm, dtype=mx.float32)
        norm = self.update(grads, total, mx.array(lr, dtype=mx.float32), max_norm)
        mx.eval(self.state, norm)
        return norm

    def validation_loss(self, examples, batch_size: int) -> float:
        """Token-weighted mean loss over `examples` (a data.Tokenized), in few shapes on a GPU
        (few_val_shapes). Packed there: in calls of one shape, each at most the positions of the
        widest call training makes (the `batch_size` longest training examples, laid out as a
        step lays them out: what the memory plan allowed for, and a forward pass keeps less), so
        a validation compiles once and takes a few calls (alpaca chat's 50 conversations on an
        H100: one compiled shape, six validations in 2.6 s instead of 4.3). Unpacked there (a
        model whose layers carry a state, or --pack false): calls of `batch_size` examples sorted
        by length, each padded to a power of two (the 50 alpaca conversations one a row: 3 widths
        instead of 17 with the default model's tokenizer; a Qwen3-Next-shaped model's validation
        took 50 s on an H100 for 21). On
        the CPU: calls of `batch_size` examples sorted by length, laid out as training lays out
        its calls. With several processes each evaluates every world-th call and the sums are
        added."""
        lens = [len(x) for x in examples.ids]
        if self.few_val_shapes and self.pack_target and lens:
            longest = sorted(len(x) for x in self.examples.ids)[-batch_size:]
            rows, width, _ = call_layout(longest, self.pack_target, self.device, self.pair, self.floor)
            calls = [(sum(c, []), partial(self.packed_call, c, len(rows), width, examples))
                     for c in eval_calls([n - 1 for n in lens], len(rows), width)]
        else:  # unpacked, or the CPU: calls of batch_size (on a GPU rows of powers of two)
            order = np.argsort(lens, kind="stable").tolist()
            calls = [(mb, partial(self.arrays, mb, "val", examples, bucket=self.few_val_shapes))
                     for mb in (order[i:i + batch_size] for i in range(0, len(order), batch_size))]
        self.model.eval()
        total, count = mx.array(0.0), 0
        for b, (call, arrays) in enumerate(calls):
            if b % self.world != self.rank:
                continue
            batch = arrays()
            total = total + self.eval_loss(batch.inputs, batch.targets, batch.mask, batch.segments)
            count += sum(int(sum(examples.masks[i][1:])) for i in call)
            mx.eval(total)
        self.model.train()
        if self.world > 1:
            total = mx.distributed.all_sum(total)
            count = int(mx.distributed.all_sum(mx.array(count)).item())
        return total.item() / count

    def packed_call(self, rows: list[list[int]], n_rows: int, width: int, data) -> Batch:
        """Examples of `data` in the given rows at shape (n_rows, width), empty rows padded; an
        example wider than `width` laid out alone, as training would."""
        if max(len(data.ids[i]) - 1 for row in rows for i in row) > width:
            return self.arrays(sum(rows, []), "val", data)
        ids = [[data.ids[i] for i in row] for row in rows] + [[]] * (n_rows - len(rows))
        masks = [[data.masks[i] for i in row] for row in rows] + [[]] * (n_rows - len(rows))
        inputs, targets, mask, seg = pack_batch(ids, masks, width)
        self.shapes["val"].add(inputs.shape)
        return Batch(mx.array(inputs), mx.array(targets), mx.array(mask), mx.array(seg),
                     sum(len(data.ids[i]) - 1 for row in rows for i in row))

    def __call__(self, micro_batches, lr: float, index: int = 0) -> StepResult:
        """One optimizer step at learning rate `lr`; `index` is the step's number (0-based)."""
        return self.dispatch(micro_batches, lr, index).result()

    def dispatch(self, micro_batches, lr: float, index: int = 0):
        """The step queued on the device without waiting for it (Pending; its result() waits):
        the loop prepares and queues the next step meanwhile. Why: at a few examples a step a
        GPU finishes a step about as fast as the host queues one, and a step that waits for its
        loss before the next is queued leaves the device idle while the host works. The values
        are the same; only where the host waits moves."""
        if not self.fused:
            acc, total, group_tokens, real = self.gradients(micro_batches, index)
            return Done(self.finish(acc, total, lr, group_tokens, real))
        scale, group_tokens = self.begin_group(micro_batches, index)
        batches = self.batches(micro_batches)
        real = sum(b.real for b in batches)
        acc, total = self._sum_grads(batches[:-1], scale)
        last = batches[-1]
        total, norm = self.grad_apply(last.inputs, last.targets, last.mask, last.segments, scale,
                                      acc, total, mx.array(lr, dtype=mx.float32), self.max_norm)
        mx.async_eval(self.state, total, norm)
        return Pending(total, norm, group_tokens, real)


def begin_step(model, count: int, index: int, seed: int, nan_at=frozenset()) -> mx.array:
    """The loss scale 1 / count (NaN at a step in `nan_at`, a test fault); reseeds MLX's generator
    from (seed, index), so dropout masks do not depend on what ran before and a resumed run draws
    the same ones; puts the model in training mode (validation, generation and the preference
    reference pass put the whole model in eval mode and back: the root's flag speaks for it)."""
    scale = mx.array(1.0 / count, dtype=mx.float32)
    if index + 1 in nan_at:
        scale = mx.array(float("nan"), dtype=mx.float32)
    mx.random.seed(seed * 1_000_003 + index)
    if not model.training:  # train() walks every module: ~900 on a 7B model, milliseconds a step
        model.train()
    return scale


def fuses_update(world: int) -> bool:
    """Whether the last micro-batch's compiled call also clips and updates (the memory planner
    asks too). One process: yes, so the update is queued right behind the backward pass with no
    round trip to Python (separate norm and update calls cost 30 of 367 ms per 7B step on an
    H100). Several processes: no, the all-reduce comes between, so the update runs in a call of
    its own. A measured cost of the fused call: with gradient checkpointing on the CPU, the norm
    in the backward's graph makes MLX compute the first block's gradients before the others, so
    every block keeps its LoRA inputs meanwhile (SmolLM2 shape, 4 x 224: 0.910 GB fused, 0.734
    GB separate; docs/plan-memory.md)."""
    return world == 1


def compile_step(model, opt, state, loss, flat: bool = True):
    """The compiled pieces of a step, with (model, optimizer, random) `state` as inputs and outputs:
    grad(inputs, targets, mask, segments, scale, acc) -> (summed loss, acc + gradients);
    grad_apply(..., acc, prev_total, lr, max_norm) -> (summed loss, norm): the last micro-batch and
    the update in one call; update(grads, total, lr, max_norm) -> norm; eval_loss(inputs, targets,
    mask, segments) -> summed loss."""
    lvg = nn.value_and_grad(model, loss)

    def grad_body(inputs, targets, mask, segments, scale, acc):
        (_, total), g = lvg(model, inputs, targets, mask, segments, scale)
        return total, g if acc is None else tree_map(mx.add, acc, g)

    def apply_body(g, total, lr, max_norm):
        """Clip to max_norm and update; if the loss or the norm is not finite, keep the old
        parameters and optimizer state (selected on the device: no host decision needed)."""
        opt.learning_rate = lr
        done = flat_update(opt, g, model.trainable_parameters(), max_norm, total) if flat else None
        if done is not None:
            params, norm = done
            model.update(params)
            return norm
        norm = mx.sqrt(sum(mx.sum(x.astype(mx.float32) ** 2) for _, x in tree_flatten(g)))
        ok = mx.isfinite(norm) & mx.isfinite(total)
        clip = mx.minimum(1.0, max_norm / (norm + 1e-6))
        old_params = model.trainable_parameters()
        old_opt = tree_map(lambda x: x, opt.state)
        opt.update(model, tree_map(lambda x: x * clip.astype(x.dtype), g))
        ok, norm = finite_weights_guard(ok, norm, [x for _, x in tree_flatten(model.trainable_parameters())])
        model.update(tree_map(lambda new, old: mx.where(ok, new, old), model.trainable_parameters(),
                              old_params))
        _keep_where(ok, opt.state, old_opt)
        return norm

    @partial(mx.compile, inputs=state, outputs=state)
    def grad(inputs, targets, mask, segments, scale, acc):
        return grad_body(inputs, targets, mask, segments, scale, acc)

    @partial(mx.compile, inputs=state, outputs=state)
    def grad_apply(inputs, targets, mask, segments, scale, acc, prev_total, lr, max_norm):
        total, g = grad_body(inputs, targets, mask, segments, scale, acc)
        total = prev_total + total
        return total, apply_body(g, total, lr, max_norm)

    @partial(mx.compile, inputs=state, outputs=state)
    def update(g, total, lr, max_norm):
        return apply_body(g, total, lr, max_norm)

    @partial(mx.compile, inputs=state, outputs=state)
    def eval_loss(inputs, targets, mask, segments=None):
        _, total = loss(model, inputs, targets, mask, segments, mx.array(1.0))
        return total

    return grad, grad_apply, update, eval_loss


def flat_update(opt, grads, params, max_norm, total):
    """The clipped optimizer update of every trainable array at once: gradients, parameters and
    each per-parameter state entry (AdamW's m and v) are concatenated into one vector each, the
    optimizer's own per-array rule (`apply_single`) runs once on those vectors, and the results are
    split back (the splits are views, not copies). The same arithmetic element by element as
    `opt.update` on each array; the gradient norm is one reduction. Why: a 7B model with LoRA on
    7 projections has 448 adapter arrays, and the per-array update was ~10 small kernels each
    (4,500 launches, ~30 ms of host time per step on an H100, bench/RESULTS.md); concatenating
    is one operation whose copies run side by side on the GPU.

    If the loss or the norm is not finite, parameters and state keep their old values (selected
    on the device). Returns (new parameter tree, gradient norm), or None where the arrays don't
    allow it (mixed dtypes, or state entries not shaped like their parameter: factored
    optimizers); the caller then updates array by array."""
    order = []
    if not opt._initialized:
        opt.init(grads)
    tree_map(lambda g, p, st: order.append((g, p, st)), grads, params, opt.state)
    if not order:
        return None
    dtype, keys = order[0][1].dtype, sorted(order[0][2])
    for g, p, st in order:
        if p.dtype != dtype or sorted(st) != keys or any(
                not isinstance(st[k], mx.array) or st[k].shape != p.shape for k in keys):
            return None

    arrays = [p for _, p, _ in order]
    gflat = concat_flat([g for g, _, _ in order])
    norm = mx.sqrt(mx.sum(mx.square(gflat.astype(mx.float32))))
    ok = mx.isfinite(norm) & mx.isfinite(total)
    clip = mx.minimum(1.0, max_norm / (norm + 1e-6))
    pflat = concat_flat(arrays)
    old = {k: concat_flat([st[k] for _, _, st in order]) for k in keys}
    state = dict(old)
    old_top = {k: v for k, v in opt.state.items() if isinstance(v, mx.array)}  # step, learning_rate
    for name, scheduler in opt._schedulers.items():
        opt.state[name] = scheduler(opt.step)
    opt.state["step"] = opt.step + 1
    new = opt.apply_single(gflat * clip.astype(gflat.dtype), pflat, state)
    ok, norm = finite_weights_guard(ok, norm, [new])
    new = mx.where(ok, new, pflat)
    state = {k: mx.where(ok, state[k], old[k]) for k in keys}
    for k, v in old_top.items():
        opt.state[k] = mx.where(ok, opt.state[k], v)
    for k in keys:  # in place: compiled functions hold the optimizer's state dicts themselves
        for (_, _, st), piece in zip(order, split_like(state[k], arrays)):
            st[k] = piece
    it = iter(split_like(new, arrays))
    return tree_map(lambda g: next(it), grads), norm


def finite_weights_guard(ok, norm, new_weights):
    """An update whose new adapter weights are not all finite is refused like a non-finite loss:
    (ok and the weights are finite, norm or NaN). Loss and norm can be finite at the very step
    whose update overflows (a huge learning rate or weight decay, float16), so they alone miss it;
    the NaN norm tells the host to count the step as non-finite."""
    finite = mx.all(mx.stack([mx.all(mx.isfinite(w)) for w in new_weights]))
    return ok & finite, mx.where(finite, norm, mx.array(float("nan"), dtype=norm.dtype))


def _keep_where(ok, tree, old) -> None:
    """In place: each array of the (nested dict/list) `tree` becomes where(ok, new, old). In place
    because compiled functions hold the optimizer's state dict itself."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in list(items):
        if isinstance(v, (dict, list)):
            _keep_where(ok, v, old[k])
        elif isinstance(v, mx.array):
            tree[k] = mx.where(ok, v, old[k])


def concat_flat(arrays):
    """The arrays' elements as one vector, in order (one operation; split_like undoes it)."""
    return mx.concatenate([x.reshape(-1) for x in arrays]) if len(arrays) > 1 else arrays[0].reshape(-1)


def split_like(flat, arrays) -> list:
    """Views of `flat` shaped like `arrays`, in order (the inverse of concat_flat)."""
    out, i = [], 0
    for x in arrays:
        out.append(flat[i:i + x.size].reshape(x.shape))
        i += x.size
    return out


def attention_pair_cost(model: nn.Module) -> float:
    """batching.pair_cost of `model`: its logical parameters (the adapters' left out, so the
    planner's model built from the config, plan.from_skeleton, gets the same number) against the
    query widths of all its attention layers (every q_proj's output features: heads x head_dim).
    0 where no q_proj is found (fused qkv projections): every call is then packed, as on a GPU."""
    dims = sum(m.weight.shape[0] for name, m in model.named_modules()
               if "q_proj" in name.split(".") and isinstance(m, (nn.Linear, nn.QuantizedLinear)))
    return pair_cost(model_parameters(model), dims)


def model_parameters(model: nn.Module) -> int:
    """The model's logical parameters, its adapters left out (so the planner's model built from
    the config, plan.from_skeleton, gets the same number)."""
    from .model import count_parameters

    lora = sum(v.size for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b"))
    return count_parameters(model)[1] - lora


def all_sum_tree(tree):
    """Sum a gradient tree over all processes in one all-reduce: the leaves are packed into one
    flat buffer (one call instead of one per tensor: 7 per block add up in latency)."""
    keys, leaves = zip(*tree_flatten(tree))
    flat = mx.distributed.all_sum(concat_flat(leaves))
    return tree_unflatten(list(zip(keys, split_like(flat, leaves))))
