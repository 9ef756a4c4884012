"""Token-weighted gradient accumulation equals one big batch; nothing dropped."""

import mlx.core as mx
from mlx.utils import tree_flatten

from conftest import make_chat_data
from steadytune.trainer import Trainer, as_config


def _trainer(tiny_model, data, tmp_path, name, **training):
    cfg = as_config({"model": {"path": str(tiny_model)}, "data": {"path": str(data)},
                     "training": dict({"eval_every": 0, "max_grad_norm": None, "learning_rate": 1e-2}, **training),
                     "output": {"dir": str(tmp_path / name), "progress": "none"}})
    t = Trainer(cfg)
    t.prepare()
    t._build_steps()
    return t


def _rel(a, b):
    """Relative difference of two tensors: ||a - b|| / ||b||."""
    return float(mx.linalg.norm((a - b).flatten()) / mx.linalg.norm(b.flatten()))


def test_batch4_equals_batch1_times_accumulation4(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 8)
    big = _trainer(tiny_model, d, tmp_path, "big", batch_size=4, grad_accumulation=1)
    small = _trainer(tiny_model, d, tmp_path, "small", batch_size=1, grad_accumulation=4)
    examples = [0, 1, 2, 3]
    lengths = [len(big.train_set.ids[i]) for i in examples]
    assert len(set(lengths)) > 2  # different lengths, so padding and token counts differ per example
    g_big, loss_big, n_big, _ = big.accumulate([examples])
    g_small, loss_small, n_small, _ = small.accumulate([[i] for i in examples])
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
        t.optimizer = optim.SGD(learning_rate=1e-2)
        t.optimizer.init(t.model.trainable_parameters())
        t._build_steps()
    big.train_step([examples], lr=1e-2)
    small.train_step([[i] for i in examples], lr=1e-2)
    for (k, a), (_, b) in zip(tree_flatten(big.model.trainable_parameters()),
                              tree_flatten(small.model.trainable_parameters())):
        assert _rel(a, b) < 1e-5, k


def test_adamw_update_agrees_too(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 8)
    big = _trainer(tiny_model, d, tmp_path, "big", batch_size=4, grad_accumulation=1)
    small = _trainer(tiny_model, d, tmp_path, "small", batch_size=1, grad_accumulation=4)
    big.train_step([[0, 1, 2, 3]], lr=1e-2)
    small.train_step([[0], [1], [2], [3]], lr=1e-2)
    flat = lambda t: mx.concatenate([v.flatten() for _, v in tree_flatten(t.model.trainable_parameters())])  # noqa: E731
    assert _rel(flat(big), flat(small)) < 1e-5


def test_mean_of_micro_batch_means_would_differ(tiny_model, tmp_path):
    """The rule mlx-lm uses (average per-micro-batch means) gives another gradient on examples of
    different lengths; our accumulation does not, so the test above can fail."""
    d = make_chat_data(tmp_path / "data", 8)
    t = _trainer(tiny_model, d, tmp_path, "t", batch_size=1, grad_accumulation=4)
    ours, _, _, _ = t.accumulate([[0], [1], [2], [3]])
    means = [t.accumulate([[i]])[0] for i in range(4)]
    naive = {k: sum(dict(tree_flatten(m))[k] for m in means) / 4 for k, _ in tree_flatten(ours)}
    diffs = [_rel(naive[k], v) for k, v in tree_flatten(ours) if float(mx.abs(v).max()) > 0]
    assert max(diffs) > 1e-2


def test_epoch_steps_and_every_example_trained(tiny_model, tmp_path):
    d = make_chat_data(tmp_path / "data", 11)
    t = _trainer(tiny_model, d, tmp_path, "r", batch_size=2, grad_accumulation=2, epochs=2)
    seen = []
    orig = t.accumulate

    def spy(mbs):
        seen.append([i for mb in mbs for i in mb])
        return orig(mbs)

    t.accumulate = spy
    t.prepare = lambda: None
    result = t.fit()
    assert result.step == 2 * 3  # ceil(11 / 4) = 3 steps per epoch
    for epoch in range(2):
        assert sorted(i for s in seen[3 * epoch: 3 * epoch + 3] for i in s) == list(range(11))
    # each epoch follows its own seeded order (a new shuffle, not the first epoch's again)
    from steadytune.batching import epoch_steps

    lengths = t.train_set.lengths()
    expected = [[i for mb in st for i in mb] for e in range(2) for st in epoch_steps(lengths, 2, 2, 0, e)]
    assert seen == expected and seen[:3] != seen[3:]
