"""Pure batching functions: every example once per epoch, the remainder kept, the schedule."""

import math

import numpy as np
import pytest

from steadytune.batching import (CPU_ATTENTION_SLOWDOWN, budget_width, call_layout, epoch_steps, layout_work, lr_at,
                                 pack_layout, pad_batch, pad_multiple, padding_fraction, pair_cost, plan_epoch,
                                 steps_per_epoch, token_budget_steps)


@pytest.mark.parametrize("n,b,a", [(10, 4, 1), (10, 1, 4), (23, 4, 2), (7, 8, 1), (64, 4, 4), (5, 2, 3)])
@pytest.mark.parametrize("group", [True, False])
def test_every_example_once_and_ceil_steps(n, b, a, group):
    lengths = np.random.default_rng(0).integers(3, 50, n)
    steps = epoch_steps(lengths, b, a, seed=1, epoch=0, group_by_length=group)
    assert len(steps) == math.ceil(n / (b * a)) == steps_per_epoch(n, b, a)
    seen = [i for step in steps for mb in step for i in mb]
    assert sorted(seen) == list(range(n))
    assert all(1 <= len(step) <= a for step in steps)
    assert all(1 <= len(mb) <= b for step in steps for mb in step)


def test_order_is_a_pure_function_of_seed_and_epoch():
    lengths = np.arange(40) % 7 + 2
    assert epoch_steps(lengths, 4, 2, 5, 3) == epoch_steps(lengths, 4, 2, 5, 3)
    assert epoch_steps(lengths, 4, 2, 5, 3) != epoch_steps(lengths, 4, 2, 5, 4)
    assert epoch_steps(lengths, 4, 2, 5, 3) != epoch_steps(lengths, 4, 2, 6, 3)


def test_grouping_by_length_cuts_padding():
    lengths = np.random.default_rng(0).integers(10, 500, 512)
    frac = {}
    for group in (True, False):
        steps = epoch_steps(lengths, 8, 1, 0, 0, group)
        frac[group] = padding_fraction([[int(lengths[i]) for i in mb] for s in steps for mb in s])
    assert frac[True] < 0.1 < frac[False]


def test_pad_batch_shifts_targets_and_masks():
    inputs, targets, mask = pad_batch([[5, 6, 7, 8], [9, 10]], [[0, 0, 1, 1], [1, 1]], pad_multiple=4)
    assert inputs.tolist() == [[5, 6, 7, 0], [9, 0, 0, 0]]
    assert targets.tolist() == [[6, 7, 8, 0], [10, 0, 0, 0]]
    assert mask.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]


def test_padding_fraction_exact():
    # widths: (5-1)->8 and (3-1)->8 with multiple 8: real 4+2 of 16
    assert padding_fraction([[5, 3]], pad_multiple=8) == 1 - 6 / 16


def test_lr_schedule_warmup_then_cosine():
    peak = 1e-3
    assert [lr_at(s, peak, 4, 20) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(4, peak, 4, 20) == pytest.approx(peak)
    assert lr_at(12, peak, 4, 20) == pytest.approx(peak / 2)
    assert lr_at(20, peak, 4, 20) == pytest.approx(0.0)
    assert lr_at(15, peak, 0, 20, "constant") == peak


def test_budget_width_uses_the_widest_padding_rule():
    # n tokens give n - 1 inputs; multiples of 8 up to 128 inputs, 16 up to 256, 128 above
    assert [budget_width(n) for n in (2, 9, 10, 129, 130, 257, 258, 1025)] == [8, 8, 16, 128, 144, 256, 384, 1024]
    assert [pad_multiple(w, "cpu") for w in (1, 128, 129, 256, 257)] == [8, 8, 16, 16, 32]
    assert pad_multiple(257, "cuda") == 128


@pytest.mark.parametrize("accum", [1, 3])
def test_token_budget_every_example_once_within_budget(accum):
    lengths = np.random.default_rng(0).integers(3, 600, 300)
    steps = token_budget_steps(lengths, 2048, accum, seed=4, epoch=1)
    seen = [i for step in steps for mb in step for i in mb]
    assert sorted(seen) == list(range(300))
    sizes = [len(mb) * budget_width(max(int(lengths[i]) for i in mb)) for step in steps for mb in step]
    assert max(sizes) <= 2048
    assert all(1 <= len(step) <= accum for step in steps) and all(len(s) == accum for s in steps[:-1])
    # pure function of (seed, epoch): what makes a resumed run continue the same plan
    assert steps == token_budget_steps(lengths, 2048, accum, 4, 1) != token_budget_steps(lengths, 2048, accum, 4, 2)


def test_token_budget_fills_micro_batches_where_a_count_cannot():
    """Skewed lengths (many short, a few long): a fixed count either wastes the short batches or
    overflows on the long ones; the budget keeps every micro-batch near its size."""
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(20, 60, 900), rng.integers(700, 1000, 60)])
    budget = 4096
    steps = token_budget_steps(lengths, budget, 1, 0, 0)
    sizes = [len(mb) * budget_width(max(int(lengths[i]) for i in mb)) for s in steps for mb in s]
    count = epoch_steps(lengths, 4, 1, 0, 0)  # 4 x 1024 fits the longest example, the same budget
    count_sizes = [len(mb) * budget_width(max(int(lengths[i]) for i in mb)) for s in count for mb in s]
    assert np.mean(sizes) > 0.8 * budget and np.mean(count_sizes) < 0.3 * budget
    assert len(steps) < len(count) / 3
    assert plan_epoch(lengths, 4, budget, 1, 0, 0) == steps and plan_epoch(lengths, 4, None, 1, 0, 0) == count


SMOLLM2 = pair_cost(134_515_008, 30 * 576)  # the default model: 30 layers of 9 heads x 64 queries


def test_pair_cost_is_attention_against_matmuls_per_position():
    assert SMOLLM2 == CPU_ATTENTION_SLOWDOWN * 2 * 17_280 / 134_515_008
    assert pair_cost(0, 576) == pair_cost(1000, 0) == 0.0  # unknown: every call packed
    assert layout_work(4, 64, 0.001) == 4 * 64 * (1 + 0.064)


def test_cpu_packs_a_call_only_where_that_computes_less():
    # four uniform short examples: one packed row of 256 (attention over all four) against four
    # rows of 64 (4 of 256 positions' padding): one a row, as --pack false lays it out
    assert pack_layout([61] * 4, 512) == ([[0, 1, 2, 3]], 256)
    assert call_layout([61] * 4, 512, "cpu", SMOLLM2) == ([[0], [1], [2], [3]], 64, False)
    # mixed lengths: one a row pads to the longest (4 x 88); packed saves more than its attention
    assert call_layout([89, 50, 52, 55], 512, "cpu", SMOLLM2) == ([[0, 3, 2, 1]], 256, True)
    assert call_layout([700, 100, 120, 90], 512, "cpu", SMOLLM2) == ([[0], [2, 1, 3]], 704, True)
    # no saving (every row as wide either way): the same work, one a row (no packed mask)
    assert call_layout([400] * 4, 512, "cpu", SMOLLM2) == ([[0], [1], [2], [3]], 416, False)


def test_gpu_and_unknown_cost_pack_every_call_as_before():
    for lengths in ([61] * 4, [400] * 4, [89, 50, 52, 55]):
        packed = (*pack_layout(lengths, 4096, "cuda"), True)
        assert call_layout(lengths, 4096, "cuda", SMOLLM2) == call_layout(lengths, 4096, "gpu", 0.0) == packed
        assert call_layout(lengths, 512, "cpu", 0.0) == (*pack_layout(lengths, 512), True)


def test_one_example_a_row_is_pad_batchs_layout():
    """The unpacked choice is exactly --pack false's: pad_batch's width on the CPU."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        lengths = rng.integers(2, 900, rng.integers(1, 9)).tolist()
        rows, width, packed = call_layout(lengths, 512, "cpu", SMOLLM2)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))  # every example once
        if not packed:
            ids = [[1] * n for n in lengths]
            assert rows == [[i] for i in range(len(lengths))]
            assert pad_batch(ids, [[True] * n for n in lengths], pad_multiple(max(lengths) - 1, "cpu"))[0].shape \
                == (len(lengths), width)
