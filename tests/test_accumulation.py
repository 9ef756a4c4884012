"""Token-weighted gradient accumulation equals one big batch; nothing dropped."""

import math

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map

from conftest import make_chat_data
from steadytune.setup import make_step
from steadytune.trainer import Trainer, as_config


def _trainer(tiny_model, data, tmp_path, name, **training):
    cfg = as_config({"model": {"path": str(tiny_model)}, "data": {"path": str(data)},
                     # micro-batches here are lists of example indexes: one example a row (--pack false);
                     # the packed default is pinned by test_packed_accumulation_* below
                     "training": dict({"eval_every": 0, "max_grad_norm": None, "learning_rate": 1e-2,
                                       "pack": False}, **training),
                     "output": {"dir": str(tmp_path / name), "progress": "none"}})
    t = Trainer(cfg)
    t.prepare()
    return t


def _rel(a, b):
    """Relative difference of two tensors: ||a - b|| / ||b||."""
    return float(mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten()))


def test_batch4_equals_batch1_times_accumulation4(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 8)
    big = _trainer(tiny_model, d, tmp_path, "big", batch_size=4, grad_accumulation=1)
    small = _trainer(tiny_model, d, tmp_path, "small", batch_size=1, grad_accumulation=4)
    examples = [0, 1, 2, 3]
    lengths = [len(big.run.train_set.ids[i]) for i in examples]
    assert len(set(lengths)) > 2  # different lengths, so padding and token counts differ per example
    g_big, loss_big, n_big, _ = big.step.gradients([examples])
    g_small, loss_small, n_small, _ = small.step.gradients([[i] for i in examples])
    assert n_big == n_small
    for (k, a), (_, b) in zip(tree_flatten(g_big), tree_flatten(g_small)):
        if float(mx.abs(b).max()) > 0:
            assert _rel(a, b) < 1e-5, k
    assert abs(loss_big.item() - loss_small.item()) / loss_big.item() < 1e-5
    # ... and so are the LoRA weights after one update. With SGD the update is the gradient times
    # the learning rate, so the weights carry the gradients' agreement. (AdamW divides each element
    # by its own magnitude: where a gradient is near zero, its last bits decide a full-size step.)
    import mlx.optimizers as optim

    for t in (big, small):
        sgd = optim.SGD(learning_rate=1e-2)
        sgd.init(t.run.model.trainable_parameters())
        t.step = make_step(t.run, sgd)
    big.train_step([examples], lr=1e-2)
    small.train_step([[i] for i in examples], lr=1e-2)
    for (k, a), (_, b) in zip(tree_flatten(big.run.model.trainable_parameters()),
                              tree_flatten(small.run.model.trainable_parameters())):
        assert _rel(a, b) < 1e-5, k


def test_adamw_update_agrees_too(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 8)
    big = _trainer(tiny_model, d, tmp_path, "big", batch_size=4, grad_accumulation=1)
    small = _trainer(tiny_model, d, tmp_path, "small", batch_size=1, grad_accumulation=4)
    g, _, ntok, _ = big.step.gradients([[0, 1, 2, 3]])
    big.train_step([[0, 1, 2, 3]], lr=1e-2)
    small.train_step([[0], [1], [2], [3]], lr=1e-2)
    flat = lambda tree: mx.concatenate([v.flatten() for _, v in tree_flatten(tree)])  # noqa: E731
    a, b, g = flat(big.run.model.trainable_parameters()), flat(small.run.model.trainable_parameters()), flat(g)
    # AdamW's first step moves an element by f(g) = lr c1 g / (sqrt(c2) |g| + eps) (c1 = 1 - beta1,
    # c2 = 1 - beta2 without bias correction, 1 with it), whose slope lr c1 eps / (sqrt(c2) |g| + eps)^2
    # is huge near g = 0. The two runs' gradients differ only in float32 summation order: by at
    # most delta = ops * n * u of the largest gradient (n: the step's target tokens; ops: 2 blocks
    # of 15 operations, forward and back). So each element agrees to slope * delta, at most
    # 2 max|f| (a flipped sign, where |g| is within delta of 0), plus each run's own rounding of
    # the update (~8 roundings: m, v, sqrt, + eps, divide, lr, decay, subtract; u |p| each): 16 u |p|.
    # (A norm-wise 1e-5 failed with 2 OpenBLAS threads: 1.1e-5, from 9 elements with |g| ~ 1e-6.)
    opt = big.run.optimizer
    c1, c2 = (1.0, 1.0) if getattr(opt, "bias_correction", False) else (1 - opt.betas[0], 1 - opt.betas[1])
    u = mx.finfo(mx.float32).eps / 2
    delta = 2 * 2 * 15 * ntok * u * float(mx.abs(g).max())
    near = mx.maximum(mx.abs(g) - delta, 0.0)
    slope = 1e-2 * c1 * opt.eps / (c2 ** 0.5 * near + opt.eps) ** 2
    bound = mx.minimum(slope * delta, 2 * 1e-2 * c1 / c2 ** 0.5) + 16 * u * mx.abs(b)
    assert mx.all(mx.abs(a - b) <= bound).item()
    # not vacuous: the bound is under 1e-4 of a step for a large share of the elements (measured
    # 45%; the lora_a half has g = 0 at step 1 and does not move)
    assert mx.mean((bound < 1e-6).astype(mx.float32)).item() > 0.25


def test_mean_of_micro_batch_means_would_differ(tiny_model, tmp_path):
    """The rule mlx-lm uses (average per-micro-batch means) gives another gradient on examples of
    different lengths; our accumulation does not, so the test above can fail."""
    d = make_chat_data(tmp_path / "data", 8)
    t = _trainer(tiny_model, d, tmp_path, "t", batch_size=1, grad_accumulation=4)
    ours, _, _, _ = t.step.gradients([[0], [1], [2], [3]])
    means = [t.step.gradients([[i]])[0] for i in range(4)]
    naive = {k: sum(dict(tree_flatten(m))[k] for m in means) / 4 for k, _ in tree_flatten(ours)}
    diffs = [_rel(naive[k], v) for k, v in tree_flatten(ours) if float(mx.abs(v).max()) > 0]
    assert max(diffs) > 1e-2


def _flat_state(t):
    return [(k, mx.array(v)) for k, v in tree_flatten([t.run.model.trainable_parameters(), t.run.optimizer.state])]


def test_fused_update_clips_like_a_separate_clip_then_adamw(tiny_model, tmp_path):
    """train_step's one compiled call (backward, norm, clip, AdamW) equals: gradients, then clip by
    max_norm / norm in Python, then a fresh AdamW's update on the same parameters."""
    d = make_chat_data(tmp_path / "data", 8)
    t = _trainer(tiny_model, d, tmp_path, "clip", batch_size=2, grad_accumulation=2, max_grad_norm=0.05,
                 weight_decay=0.1)
    params0 = tree_map(mx.array, t.run.model.trainable_parameters())
    g, total, ntok, _ = t.step.gradients([[0, 1], [2, 3]])
    norm = math.sqrt(sum(float(mx.sum(x.astype(mx.float32) ** 2)) for _, x in tree_flatten(g)))
    assert norm > 0.05  # clipping is active
    ref = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
    expected = ref.apply_gradients(tree_map(lambda x: x * (0.05 / (norm + 1e-6)), g), params0)
    loss, n2, _, _ = t.train_step([[0, 1], [2, 3]], lr=1e-2)
    assert n2 == ntok and loss == pytest.approx(total.item() / ntok, rel=1e-6)
    got = dict(tree_flatten(t.run.model.trainable_parameters()))
    for k, v in tree_flatten(expected):
        assert _rel(got[k] - dict(tree_flatten(params0))[k], v - dict(tree_flatten(params0))[k]) < 1e-4, k


def test_nonfinite_step_leaves_parameters_and_optimizer_state_bitwise_unchanged(tiny_model, tmp_path):
    """The skip is decided on the device (mx.where on the finite check), not by Python."""
    d = make_chat_data(tmp_path / "data", 8)
    t = _trainer(tiny_model, d, tmp_path, "nan", batch_size=2)
    t.train_step([[0, 1]], lr=1e-2)  # a real update first: non-zero moments to keep
    before = _flat_state(t)
    g, total, _, _ = t.step.gradients([[2, 3]])
    g = tree_map(lambda x: x.at[0].add(float("nan")) if x.ndim else x, g)
    norm = t.step.apply(g, total, 1e-2, float("inf"))
    assert not math.isfinite(norm.item())
    after = _flat_state(t)
    assert [k for k, _ in before] == [k for k, _ in after]
    assert all(mx.array_equal(a, b).item() for (_, a), (_, b) in zip(before, after))
    t.step.apply(tree_map(mx.zeros_like, g), mx.array(float("inf")), 1e-2, 1.0)  # loss inf
    assert all(mx.array_equal(a, b).item() for (_, a), (_, b) in zip(before, _flat_state(t)))


@pytest.mark.parametrize("budget", [None, 96])
def test_epoch_steps_and_every_example_trained(tiny_model, tmp_path, budget):
    d = make_chat_data(tmp_path / "data", 11)
    t = _trainer(tiny_model, d, tmp_path, "r", batch_size=2, grad_accumulation=2, epochs=2)
    if budget:  # micro-batches by a token budget: the steps come from the plan, still every example once
        t.cfg.training.batch_tokens = budget
        plans = [t.epoch_plan(e) for e in range(2)]
        seen = []
        orig = t.dispatch
        t.dispatch = lambda mbs, lr: (seen.append(sorted(i for mb in mbs for i in mb)), orig(mbs, lr))[1]
        t.prepare = lambda: None
        result = t.fit()
        assert result.step == sum(map(len, plans))
        assert seen == [sorted(i for mb in st for i in mb) for p in plans for st in p]
        for p in plans:
            assert sorted(i for st in p for mb in st for i in mb) == list(range(11))
        return
    seen = []
    orig = t.dispatch

    def spy(mbs, lr):
        seen.append([i for mb in mbs for i in mb])
        return orig(mbs, lr)

    t.dispatch = spy
    t.prepare = lambda: None
    result = t.fit()
    assert result.step == 2 * 3  # ceil(11 / 4) = 3 steps per epoch
    for epoch in range(2):
        assert sorted(i for s in seen[3 * epoch: 3 * epoch + 3] for i in s) == list(range(11))
    # each epoch follows its own seeded order (a new shuffle, not the first epoch's again)
    from steadytune.batching import epoch_steps

    lengths = t.run.train_set.lengths()
    expected = [[i for mb in st for i in mb] for e in range(2)
                for st in epoch_steps(lengths, 2, 2, 0, e, t.cfg.data.group_by_length)]
    assert seen == expected and seen[:3] != seen[3:]


@pytest.mark.parametrize("make", [lambda: optim.AdamW(learning_rate=1e-2, weight_decay=0.1),
                                  lambda: optim.SGD(learning_rate=1e-2, momentum=0.9)])
def test_flat_update_is_the_per_array_update_bit_for_bit(make):
    """step.flat_update (one concatenated vector through the optimizer's own rule) against
    opt.update on each array: equal bits for three steps when no clipping applies; a factored
    optimizer (state not shaped like the parameters) is declined."""
    from steadytune.step import flat_update

    mx.random.seed(3)
    shapes = {"a": (7, 3), "b": [(3, 5), (2,)], "c": {"d": (4, 4, 2)}}
    params = tree_map(lambda s: mx.random.normal(s), shapes, is_leaf=lambda x: isinstance(x, tuple))
    flat_opt, ref_opt, ref = make(), make(), params
    for step in range(3):
        grads = tree_map(lambda p: mx.random.normal(p.shape), params)
        ref = ref_opt.apply_gradients(grads, ref)
        flat_opt.learning_rate = 1e-2
        params, norm = flat_update(flat_opt, grads, params, mx.array(float("inf")), mx.array(1.0))
        expected = math.sqrt(sum(float(mx.sum(g * g)) for _, g in tree_flatten(grads)))
        assert norm.item() == pytest.approx(expected, rel=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(params), tree_flatten(ref)):
        assert mx.array_equal(a, b).item(), k
    for (k, a), (_, b) in zip(tree_flatten(flat_opt.state), tree_flatten(ref_opt.state)):
        assert mx.array_equal(a, b).item(), k
    assert flat_update(optim.Adafactor(), {"w": mx.ones((4, 6))}, {"w": mx.ones((4, 6))},
                       mx.array(1.0), mx.array(1.0)) is None
