"""The Gated DeltaNet recurrence in training (steadytune/recurrence.py): the chunkwise form gives
mlx-lm's loss and gradients within float32 rounding in a few operations per chunk and a fraction
of the memory; mlx-lm's loop in chunks recomputed backward (kept for per-key gates) gives them bit
for bit; the planner counts what training keeps (Qwen3-Next and Qwen3.5 train unpacked on every
device but Metal's inference path, through the chunkwise form)."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from conftest import build_tokenizer, run_cli, write_jsonl

from steadytune import recurrence
from steadytune.plan import RECURRENCE_STATES, arch_from_config


def inputs(B, T, Hk, Hv, D, masked):
    mx.random.seed(1)
    q = mx.random.normal((B, T, Hk, D)) * 0.1
    k = mx.random.normal((B, T, Hk, D)) * 0.1
    v = mx.random.normal((B, T, Hv, D))
    a, b = mx.random.normal((B, T, Hv)), mx.random.normal((B, T, Hv))
    A, dt = mx.random.normal((Hv,)), mx.random.normal((Hv,))
    mask = (mx.arange(T)[None] < mx.array([[T], [T - 7]])[:B]) if masked else None
    mx.eval(q, k, v, a, b, A, dt)
    return (q, k, v, a, b), (A, dt, mask)


def loss_and_grads(ops, args, rest, masked_out=False):
    """mlx-lm's gated_delta_update through `ops`: loss sum(y^2) + sum(state), its gradients and
    the peak memory; masked_out: the outputs at masked (padding) positions left out, as training
    leaves them out (mlx-lm's loop writes there what the token would have given; the chunkwise
    form what the kept state gives)."""
    from mlx_lm.models import gated_delta

    A, dt, mask = rest

    def loss(q, k, v, a, b):
        saved = gated_delta.gated_delta_ops
        gated_delta.gated_delta_ops = ops
        try:
            y, state = gated_delta.gated_delta_update(q, k, v, a, b, A, dt, mask=mask, use_kernel=False)
        finally:
            gated_delta.gated_delta_ops = saved
        if masked_out and mask is not None:
            y = y * mask[..., None, None]
        return (y.astype(mx.float32) ** 2).sum() + state.sum()

    mx.reset_peak_memory()
    base = mx.get_active_memory()
    value, grads = mx.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    mx.eval(value, grads)
    return value, grads, mx.get_peak_memory() - base


@pytest.mark.parametrize("T,masked", [(37, False), (40, True)])
def test_chunks_give_mlx_lms_loss_and_gradients_bit_for_bit(T, masked):
    """T not a multiple of the chunk, value heads repeating the key heads, a padding mask."""
    args, rest = inputs(2, T, 2, 4, 32, masked)
    ref = loss_and_grads(recurrence.mlx_lm_ops(), args, rest)
    ours = loss_and_grads(recurrence.chunked_gated_delta_ops, args, rest)
    assert ours[0].item() == ref[0].item()
    for g_ref, g_ours in zip(ref[1], ours[1]):
        assert mx.array_equal(g_ref, g_ours)


@pytest.mark.parametrize("T,masked,D", [(37, False, 32), (40, True, 32), (200, True, 64), (64, False, 128),
                                         (5, False, 16)])
def test_chunkwise_form_gives_mlx_lms_loss_and_gradients(T, masked, D):
    """Within float32 rounding (measured: loss up to 3e-6 relative, gradients 3e-6 of their largest
    element): T below, at and not a multiple of the chunk, several chunks, value heads repeating
    the key heads, a padding mask (its outputs left out, as training leaves them)."""
    args, rest = inputs(2, T, 2, 4, D, masked)
    ref = loss_and_grads(recurrence.mlx_lm_ops(), args, rest, masked_out=True)
    ours = loss_and_grads(recurrence.chunkwise_gated_delta_ops, args, rest, masked_out=True)
    assert abs(ours[0].item() - ref[0].item()) <= 1e-5 * max(abs(ref[0].item()), 1.0)
    for g_ref, g_ours in zip(ref[1], ours[1]):
        assert (mx.abs(g_ours - g_ref).max() <= 5e-5 * mx.abs(g_ref).max()).item()


def test_chunkwise_state_and_outputs_in_bfloat16_and_with_a_vanished_decay():
    """The state carried out equals the loop's; bfloat16 inputs give the loop's bfloat16 outputs
    within their rounding; a decay that underflowed to 0 (log -inf) stays finite and equal."""
    from mlx_lm.models.gated_delta import compute_g

    (q, k, v, a, b), (A, dt, mask) = inputs(2, 150, 2, 4, 32, True)
    g, beta = compute_g(A, a, dt), mx.sigmoid(b)
    g = mx.where(mx.arange(150)[None, :, None] == 70, 0.0, g)  # every head forgets everything at 70
    for dtype, tol in ((mx.float32, 1e-5), (mx.bfloat16, 2e-2)):
        args = [x.astype(dtype) for x in (q, k, v)]
        y_ref, s_ref = recurrence.mlx_lm_ops()(*args, g, beta, None, mask)
        y, s = recurrence.chunkwise_gated_delta_ops(*args, g, beta, None, mask)
        assert y.dtype == y_ref.dtype == dtype and s.dtype == mx.float32
        assert (mx.abs(s - s_ref).max() <= 1e-5 * mx.abs(s_ref).max()).item()
        keep = mask[..., None, None]
        err = mx.abs((y - y_ref).astype(mx.float32) * keep).max()
        assert mx.isfinite(y).all().item() and (err <= tol * mx.abs(y_ref.astype(mx.float32)).max()).item()


def test_chunkwise_form_is_a_short_graph_and_a_fraction_of_the_memory():
    """400 tokens, 4 value heads of 128 x 128: the chunkwise form keeps under a quarter of the
    chunked loop's peak and is a graph of a few hundred operations, where the loop has about 24
    per token."""
    args, rest = inputs(2, 400, 2, 4, 128, False)
    mx.clear_cache()
    loop = loss_and_grads(recurrence.chunked_gated_delta_ops, args, rest)[2]
    mx.clear_cache()
    ours = loss_and_grads(recurrence.chunkwise_gated_delta_ops, args, rest)[2]
    assert ours < 0.25 * loop, (ours, loop)

    def ops(fn):  # operations in the forward graph (MLX's dot export: one box per primitive)
        import io

        out = io.StringIO()
        mx.export_to_dot(out, *fn(*args[:3], mx.sigmoid(args[3]), mx.sigmoid(args[4])))
        return out.getvalue().count("shape=rectangle")

    short, loop_ops = ops(recurrence.chunkwise_gated_delta_ops), ops(recurrence.mlx_lm_ops())
    assert short < 400 and loop_ops > 20 * short, (short, loop_ops)  # measured 337 and 9,611


def test_chunks_halve_the_memory_of_the_backward_pass():
    """Measured 0.53-0.58 of mlx-lm's peak from 300 to 1,200 tokens (4 value heads of 128 x 128):
    MLX still keeps about one state gradient a token, so not less."""
    args, rest = inputs(2, 400, 2, 4, 128, False)
    mx.clear_cache()
    ref = loss_and_grads(recurrence.mlx_lm_ops(), args, rest)[2]
    mx.clear_cache()
    ours = loss_and_grads(recurrence.chunked_gated_delta_ops, args, rest)[2]
    assert ours < 0.65 * ref, (ours, ref)


def test_planner_finds_the_recurrent_state_of_qwen3_next_and_qwen3_5():
    from arch_models import tiny_config

    for name in ("qwen3_next", "qwen3_5"):
        a = arch_from_config(tiny_config(name))
        assert (a.recurrent_state, a.recurrent_layers) == (4 * 16 * 16, 2)
    assert arch_from_config(tiny_config("llama")).recurrent_layers == 0


def test_planner_counts_a_qwen3_next_step_within_15_percent(tmp_path, capsys):
    """A qwen3_next whose Gated DeltaNet recurrence (4 value heads of 128 x 128) is a large share of
    the step's memory: the planner's MLX peak against a real step's peak_mem_gb, on the CPU. With
    mlx-lm's loop and no recurrence term the plan was 5x under (0.57 GB planned, 15.6 GB measured
    at 4 x 704 tokens)."""
    from arch_models import tiny_config

    from steadytune.cli import main
    from steadytune.model import model_skeleton

    cfg = dict(tiny_config("qwen3_next"), hidden_size=128, num_hidden_layers=2, full_attention_interval=2,
               linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=128,
               linear_value_head_dim=128, vocab_size=512, eos_token_id=2)
    folder = tmp_path / "hybrid"
    folder.mkdir()
    from mlx.utils import tree_flatten

    mx.random.seed(0)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model_skeleton(cfg).parameters())))
    (folder / "config.json").write_text(json.dumps(cfg))
    build_tokenizer(folder, 512)
    # two examples of one length a step, so every step is the planner's largest
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": " ".join(["select the name from table where"] * 40)}] * 4)
    args = ["--model", folder, "--data", data, "--valid-fraction", "0", "--batch-size", "2"]
    assert main(["plan", *map(str, args)]) == 0
    out = capsys.readouterr().out.splitlines()
    predicted = float(next(x for x in out if "of which MLX" in x).split()[-1])
    assert next(x for x in out if x.startswith("run ")).split()[1:3] == ["batch", "2"]  # unpacked, as trained
    r = run_cli("train", *args, "--max-steps", "1", "--log-every", "1", "--out", tmp_path / "run", "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert "training unpacked" in r.stdout
    peak = max(json.loads(x).get("peak_mem_gb", 0) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert abs(predicted - peak) <= 0.15 * peak, (predicted, peak)
    term = RECURRENCE_STATES * 4 * 128 * 128 * 4 * 2 * 600 / 1e9  # 4 heads x 128 x 128, 2 rows of ~600
    assert predicted - term < 0.85 * peak  # without the recurrence's term the plan would be under
