"""GRPO: rewards, advantages and token weights by hand, the loss and its gradient against a plain
computation from the papers' formulas, rollouts, and the training command (metrics, exact resume
after SIGKILL, errors that name the function and the record)."""

import json
import math
import signal

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import cli_env, read_adapters, run_cli, write_jsonl
from steadytune.errors import UserError
from steadytune.grpo import (GRPOStep, PromptSet, Settings, advantages, read_prompts, rollout,
                             tokenize_prompts, token_weights)
from steadytune.preference import adapters_off
from steadytune.rewards import answer, final_answer, format, load_rewards, score

# --- rewards (no model) ----------------------------------------------------------------------


def test_answer_reward_reads_the_last_tag_else_the_last_number():
    rec = {"answer": "42"}
    assert answer("", "I think <answer> 42 </answer>", rec) == 1.0
    assert answer("", "<answer>41</answer> no wait 42", rec) == 0.0  # a tag wins over numbers
    assert answer("", "<answer>41</answer> <answer>42</answer>", rec) == 1.0  # the last tag
    assert answer("", "40 + 2 = 42.0", rec) == 1.0  # numbers compare as numbers
    assert answer("", "<answer>1,234</answer>", {"answer": 1234}) == 1.0
    assert answer("", "no number here", rec) == 0.0
    assert answer("", "<answer>Paris</answer>", {"answer": " Paris"}) == 1.0
    assert final_answer("x 3 y -7") == "-7"


def test_format_reward_wants_exactly_one_non_empty_answer_tag():
    assert format("", "so <answer>7</answer>", {}) == 1.0
    assert format("", "<answer>7</answer><answer>8</answer>", {}) == 0.0
    assert format("", "<answer> </answer>", {}) == 0.0
    assert format("", "<answer>7", {}) == 0.0
    assert format("", "7", {}) == 0.0


def test_reward_problems_are_one_line_naming_the_function_and_the_record(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("def boom(p, c, r):\n    raise ValueError('bad input')\n"
                 "def text(p, c, r):\n    return 'x'\n"
                 "def nan(p, c, r):\n    return float('nan')\n"
                 "def flag(p, c, r):\n    return True\n")
    for name, message in [("boom", "data.jsonl:3: reward mine.boom raised ValueError: bad input"),
                          ("text", "data.jsonl:3: reward mine.text returned 'x', not a finite number"),
                          ("nan", "data.jsonl:3: reward mine.nan returned nan, not a finite number"),
                          ("flag", "data.jsonl:3: reward mine.flag returned True, not a finite number")]:
        with pytest.raises(UserError, match=message):
            score(load_rewards(f"{f}:{name}"), "p", ["c"], {}, "data.jsonl:3")
    with pytest.raises(UserError, match="data.jsonl:3: reward answer raised KeyError: .*no 'answer' field"):
        score(load_rewards("answer"), "p", ["1"], {}, "data.jsonl:3")
    with pytest.raises(UserError, match="unknown reward 'anser'; use answer, format or FILE.py:FUNCTION"):
        load_rewards("anser")
    with pytest.raises(UserError, match="has no function 'nope'"):
        load_rewards(f"{f}:nope")
    with pytest.raises(UserError, match="missing.py not found"):
        load_rewards(f"{tmp_path / 'missing.py'}:f")
    assert [n for n, _ in load_rewards(f"answer, format,{f}:text")] == ["answer", "format", "mine.text"]


def test_prompt_files_are_checked_by_file_and_line(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2 + 2?", "answer": "4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"question": "no prompt"},
        {"prompt": ""}])
    with pytest.raises(UserError) as e:
        read_prompts(f)
    text = "\n".join(e.value.problems)
    assert "p.jsonl:2: the conversation ends with an assistant turn" in text
    assert "p.jsonl:3: not a GRPO prompt (keys: question)" in text
    assert "p.jsonl:4: 'prompt' is empty" in text
    ok = read_prompts(write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4", "id": 7}]))
    assert ok[0].text == "What is 2 + 2?" and ok[0].record["id"] == 7 and ok[0].where.endswith("ok.jsonl:1")


# --- advantages and token weights, by hand ---------------------------------------------------


def test_advantages_are_relative_within_each_group():
    r = np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(1 / 3)  # sample std of (1, 0, 0, 1)
    np.testing.assert_allclose(advantages(r, 4, "grpo")[:4], np.array([.5, -.5, -.5, .5]) / (std + 1e-4))
    assert advantages(r, 4, "grpo")[4:].tolist() == [0, 0, 0, 0]  # equal rewards: no signal
    assert advantages(r, 4, "dr_grpo").tolist() == [.5, -.5, -.5, .5, 0, 0, 0, 0]  # not divided by the std


def test_token_weights_of_the_three_losses():
    assert token_weights([2, 4], "grpo", 8).tolist() == [1 / 4, 1 / 8]      # 1 / (completions x length)
    assert token_weights([2, 4], "dr_grpo", 8).tolist() == [1 / 16, 1 / 16]  # 1 / (completions x max new)
    assert token_weights([2, 4], "dapo", 8).tolist() == [1 / 6, 1 / 6]      # 1 / tokens of the step


# --- the loss and its gradient against the formulas, computed plainly -------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from steadytune.config import LoraConfig, ModelConfig
    from steadytune.model import apply_lora, load_base

    lm = load_base(ModelConfig(path=str(tiny_model), quantize="none"))
    apply_lora(lm.model, LoraConfig(), seed=0)
    rng = np.random.default_rng(1)  # LoRA B = 0 makes A's gradients 0: give B values
    for _, m in lm.model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.array(rng.normal(0, 0.05, m.lora_b.shape).astype(np.float32))
    return lm


@pytest.fixture(scope="module")
def prompts(loaded, tmp_path_factory):
    f = write_jsonl(tmp_path_factory.mktemp("prompts") / "train.jsonl",
                    [{"prompt": f"select the name where count is {i}", "answer": str(i)} for i in range(4)])
    return tokenize_prompts(read_prompts(f), loaded.tokenizer, 256, 16)


def plain_grpo_loss(model, prompts: PromptSet, idx, comps, scores, group, loss, beta, max_new):
    """The GRPO objective as the papers write it, one unpadded forward pass per completion:
    per token -(ratio A) + beta (exp(ref - logp) - (ref - logp) - 1) with ratio = 1 in value;
    grpo: mean over completions of each one's token mean; dr_grpo: token sums / (completions x
    max_new); dapo: token sum / tokens. A from the group's rewards (std-normalised but dr_grpo)."""
    r = scores.sum(axis=1).reshape(-1, group)
    a = r - r.mean(axis=1, keepdims=True)
    if loss != "dr_grpo":
        a = a / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    a = a.reshape(-1)
    sums, counts = [], []
    for k, i in enumerate(idx):
        for j in range(group):
            c = comps[k * group + j]
            seq = mx.array(prompts.ids[i] + c)
            n = len(c)

            def logps():
                logits = model(seq[None, :-1])[0].astype(mx.float32)
                lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                return mx.take_along_axis(lp, seq[1:, None], axis=-1)[-n:, 0]

            lp = logps()
            with adapters_off(model):
                ref = mx.stop_gradient(logps())
            per_token = -mx.exp(lp - mx.stop_gradient(lp)) * float(a[k * group + j])
            d = ref - lp
            per_token = per_token + beta * (mx.exp(d) - d - 1)
            sums.append(per_token.sum())
            counts.append(n)
    if loss == "grpo":
        return sum(s / n for s, n in zip(sums, counts)) / len(sums)
    if loss == "dr_grpo":
        return sum(sums) / (len(sums) * max_new)
    return sum(sums) / sum(counts)


def _completions(rng, n, vocab, eos):
    return [rng.integers(3, vocab, size=int(rng.integers(1, 9))).tolist() + ([eos] if k % 2 else [])
            for k in range(n)]


@pytest.mark.parametrize("loss,rows", [("grpo", 4), ("grpo", 1), ("dr_grpo", 2), ("dapo", 3)])
def test_step_gradient_equals_the_plain_formula(loaded, prompts, loss, rows):
    """The padded calls, any number of rows a call, give the loss and gradients of the plain
    per-completion computation (float32 rounding: 1e-5 relative)."""
    import mlx.optimizers as optim

    model, group, beta = loaded.model, 4, 0.2
    eos = loaded.tokenizer.eos_token_id
    rng = np.random.default_rng(0)
    idx = [1, 3]
    comps = _completions(rng, len(idx) * group, 300, eos)
    scores = rng.integers(0, 2, size=(len(comps), 2)).astype(np.float64)
    settings = Settings(group, 8, 1.0, beta, loss, 0.2, 0.2, rows)
    step = GRPOStep(model, optim.SGD(learning_rate=0.0), prompts, [("a", None), ("b", None)], settings,
                    eos={eos}, tokenizer=loaded.tokenizer)
    acc, total, stats, _ = step.gradients(idx, comps, scores)
    mx.eval(acc, total)
    model.train()
    want, grads = nn.value_and_grad(model, lambda m: plain_grpo_loss(m, prompts, idx, comps, scores, group,
                                                                      loss, beta, 8))(model)
    assert float(total) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    got, ref = dict(tree_flatten(acc)), dict(tree_flatten(grads))
    assert got.keys() == ref.keys()
    scale = max(float(mx.abs(v).max()) for v in ref.values())
    assert scale > 0
    for k in ref:
        np.testing.assert_allclose(np.array(got[k]), np.array(ref[k]), atol=2e-5 * scale, rtol=1e-4)
    assert float(stats[1]) == sum(len(c) for c in comps)  # completion tokens
    assert float(stats[0]) > 0  # LoRA B != 0: the policy differs from the base


def test_rollout_is_seeded_and_stops_at_the_end_of_turn(loaded, prompts):
    eos = {loaded.tokenizer.eos_token_id}
    ids = [prompts.ids[0], prompts.ids[2]]
    a = rollout(loaded.model, ids, 3, 12, 1.0, eos, key=7)
    b = rollout(loaded.model, ids, 3, 12, 1.0, eos, key=7)
    c = rollout(loaded.model, ids, 3, 12, 1.0, eos, key=8)
    assert a == b and a != c and len(a) == 6
    for x in a:
        assert 1 <= len(x) <= 12
        assert all(t not in eos for t in x[:-1])  # nothing after an end of turn
    greedy = rollout(loaded.model, ids, 2, 12, 0.0, eos, key=1)
    assert greedy[0] == greedy[1] and greedy[2] == greedy[3]  # temperature 0: the group agrees
    # the first greedy token is the model's own argmax after the prompt
    logits = loaded.model(mx.array(ids[0])[None])[0, -1]
    assert greedy[0][0] == int(mx.argmax(logits))


# --- the training command --------------------------------------------------------------------


REWARD = "def length(prompt, completion, record):\n    return min(len(completion), 40) / 40\n"


def _train_args(model, data, out, reward, *extra):
    return ["train", "--model", model, "--data", data, "--out", out, "--method", "grpo", "--reward",
            f"format,{reward}:length", "--group-size", "3", "--max-new-tokens", "10", "--batch-size", "2",
            "--max-steps", "6", "--learning-rate", "5e-3", "--log-every", "1", "--eval-every", "3",
            "--save-every", "2", "--progress", "lines", "--lora-dropout", "0.1", *extra]


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grpo_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [{"prompt": f"select the name where count is {i}", "answer": str(i)}
                                       for i in range(10)])
    write_jsonl(data / "valid.jsonl", [{"prompt": "select the team", "answer": "1"}] * 2)
    reward = root / "rewards.py"
    reward.write_text(REWARD)
    r = run_cli(*_train_args(tiny_model, data, root / "ref", reward))
    assert r.returncode == 0, r.stderr
    return tiny_model, data, root, reward, r.stdout + r.stderr


def test_grpo_run_logs_rewards_kl_and_lengths(grpo_run):
    *_, root, _, stdout = grpo_run
    recs = _records(root / "ref")
    train = [x for x in recs if x["event"] == "train"]
    assert len(train) == 6
    for x in train:
        assert {"reward", "reward_std", "reward_format", "reward_rewards.length", "kl", "completion_len",
                "completions", "zero_std_groups", "truncated", "gen_s"} <= x.keys()
        assert x["completions"] == 6 and 1 <= x["completion_len"] <= 10
    assert train[0]["kl"] == 0.0  # step 1 samples from the base: LoRA B = 0
    assert any(x["kl"] > 0 for x in train[1:])
    vals = [x for x in recs if x["event"] == "val"]
    assert [x["step"] for x in vals] == [3, 6] and all("val_reward_format" in x for x in vals)
    assert "train: 10 prompts, 3 completions each of up to 10 tokens" in stdout
    assert f"final val_reward {vals[-1]['val_reward']:.4f}" in stdout


def test_grpo_resume_after_sigkill_matches_uninterrupted_run(grpo_run):
    model, data, root, reward, _ = grpo_run
    out = root / "killed"
    r = run_cli(*_train_args(model, data, out, reward), env=dict(cli_env(), STEADYTUNE_TEST_CRASH="step:3"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = run_cli(*_train_args(model, data, out, reward, "--resume"))
    assert r.returncode == 0, r.stderr
    strip = lambda rs: [{k: v for k, v in x.items() if k not in ("tok_per_s", "peak_mem_gb", "gen_s",  # noqa: E731
                                                                 "completions_per_s")}
                        for x in rs if x["event"] in ("train", "val")]
    assert strip(_records(out)) == strip(_records(root / "ref"))  # the same completions, bitwise
    a, b = read_adapters(out), read_adapters(root / "ref")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_group_size(grpo_run):
    model, data, root, reward, _ = grpo_run
    args = _train_args(model, data, root / "ref", reward, "--resume")
    args[args.index("--group-size") + 1] = "4"
    r = run_cli(*args)
    assert r.returncode == 2
    assert "grpo.group_size: 3 in the checkpoint, 4 now (the objective would change)" in r.stderr


def test_a_failing_reward_stops_with_one_line_naming_it_and_the_record(grpo_run, tmp_path):
    model, data, _, _, _ = grpo_run
    bad = tmp_path / "bad.py"
    bad.write_text("def picky(prompt, completion, record):\n    return None if record['answer'] == '3' else 1.0\n")
    args = _train_args(model, data, tmp_path / "run", bad)
    args[args.index("--reward") + 1] = f"{bad}:picky"
    args[args.index("--max-steps") + 1] = "20"
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "train.jsonl:4: reward bad.picky returned None, not a finite number" in r.stderr


def test_a_family_mlx_lms_batched_generation_cannot_decode_is_refused_in_one_line(tmp_path):
    """gemma2's attention in mlx-lm 0.32 broadcasts a batch's mask against its kv heads: 4 rows
    fail, 2 rows decode with each row's padding on the wrong rows. Refused before the first step."""
    import arch_models

    model = arch_models.build(tmp_path / "gemma2", "gemma2")
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "answer": "1"}] * 4)
    r = run_cli("train", "--model", model, "--method", "grpo", "--data", f, "--reward", "format",
                "--group-size", "2", "--batch-size", "2", "--max-new-tokens", "4", "--max-steps", "1",
                "--out", tmp_path / "run", "--progress", "none")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert ("--method grpo: mlx-lm's batched generation, which the rollouts use, fails on model type gemma2 "
            "(ValueError: [broadcast_shapes]") in r.stderr
    assert r.stderr.strip().endswith("train this model with --method sft, dpo or orpo")
    assert not (tmp_path / "run" / "adapters").exists()


@pytest.mark.parametrize("extra,message", [
    (["--method", "sft", "--group-size", "8"], "--group-size) is GRPO's completions per prompt and needs "
                                               "--method grpo; the quantization group size is --quant-group-size"),
    (["--method", "grpo"], "--method grpo needs rewards"),
    (["--method", "grpo", "--reward", "answer", "--group-size", "1"], "grpo.group_size must be at least 2"),
    (["--method", "grpo", "--reward", "answer", "--batch-tokens", "4096"], "training.batch_tokens is not used by grpo"),
])
def test_grpo_settings_are_checked_before_anything_loads(tmp_path, extra, message):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "answer": "1"}] * 3)
    r = run_cli("train", "--data", f, "--out", tmp_path / "r", *extra)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


# --- memory plan and bundled data ------------------------------------------------------------


def test_a_group_that_does_not_fit_trains_in_smaller_calls_and_rollouts_are_planned(tiny_model, monkeypatch):
    from steadytune import plan
    from steadytune.objectives import GRPO, rollout_bytes
    from steadytune.trainer import as_config

    cfg = as_config({"model": {"path": str(tiny_model), "quantize": "none"},
                     "training": {"method": "grpo", "batch_size": 2},
                     "grpo": {"reward": ["format"], "group_size": 8, "max_new_tokens": 64}})
    obj, lengths = GRPO(), [40 + 64] * 6
    need = {r: plan.check_fits(obj.plan_config(cfg, r), data_stats=lengths, quiet=True).breakdown.required
            for r in (8, 4, 2)}
    assert need[8] > need[4] > need[2]  # rows of prompt + completion cost memory
    monkeypatch.setattr(plan, "device_memory", lambda device: ((need[4] + need[8]) / 2, "test"))
    p4 = plan.check_fits(obj.plan_config(cfg, 4), data_stats=lengths, quiet=True)
    assert rollout_bytes(p4, cfg, max(lengths)) < p4.available  # this test is about the training call
    assert obj.check_memory(cfg, None, lengths) == 4  # the largest part of a group that fits
    monkeypatch.setattr(plan, "device_memory", lambda device: (need[2] * 0.5, "test"))
    with pytest.raises(UserError, match="memory: this run is predicted to need"):
        obj.check_memory(cfg, None, lengths)
    # rollouts: 2 prompts x 8 completions x 104 positions of KV cache in every layer
    a, r = p4.arch, p4.run
    kv = 2 * a.layers * a.kv_heads * a.head_dim * 4 * 16 * 104  # float32 on the CPU
    b = p4.breakdown
    assert rollout_bytes(p4, cfg, 104) == b.base_weights + b.lora_weights + b.optimizer + kv \
        + 2 * 16 * a.vocab * 4 + b.overhead  # a float base: no float32 copy to make


def test_cpu_rollouts_of_a_quantized_base_plan_what_their_decoding_path_holds():
    """On the CPU the compiled decoder (llama family, 4/8-bit) holds float32 scales and biases, one
    pair a group; other families decode from a float32 copy of every weight."""
    from types import SimpleNamespace

    from steadytune import plan
    from steadytune.objectives import rollout_bytes
    from steadytune.trainer import as_config

    cfg = as_config({"training": {"method": "grpo", "batch_size": 1},
                     "grpo": {"reward": ["format"], "group_size": 2, "max_new_tokens": 8}})
    conf = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True,
                quantization={"bits": 4, "group_size": 32})
    b = plan.Breakdown(base_weights=0, lora_weights=0, optimizer=0, activations=0, logits=0, in_flight=0,
                       overhead=0)
    weights = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128) + 100 * 64
    kv_logits = 2 * 2 * 2 * 16 * 4 * 2 * 10 + 2 * 2 * 100 * 4
    of = {}
    for mt in ("llama", "gemma3_text"):
        arch = plan.arch_from_config(dict(conf, model_type=mt))
        p = SimpleNamespace(arch=arch, run=plan.Run(batch=1, seq=16, device="cpu"), breakdown=b)
        of[mt] = rollout_bytes(p, cfg, 10) - kv_logits
    assert of == {"llama": 8 * weights / 32, "gemma3_text": 4 * weights}
    assert cfg.training.grad_checkpoint is True  # GRPO checkpoints by default, SFT does not
    assert as_config({}).training.grad_checkpoint is False
    assert as_config({"training": {"method": "grpo", "grad_checkpoint": False},
                      "grpo": {"reward": ["format"]}}).training.grad_checkpoint is False


def test_the_bundled_arithmetic_set_is_the_generators_output(tmp_path):
    from pathlib import Path

    from steadytune.data import find_files
    from steadytune.grpo_data import write_arithmetic

    bundled = find_files("arithmetic")
    ours = write_arithmetic(tmp_path, 400, 40, seed=0)
    for split in ("train", "valid"):
        assert bundled[split].read_text() == (ours / f"{split}.jsonl").read_text()
    question = lambda r: r["messages"][-1]["content"]  # noqa: E731
    train = {question(json.loads(x)) for x in bundled["train"].read_text().splitlines()}
    valid = [json.loads(x) for x in bundled["valid"].read_text().splitlines()]
    assert len(valid) == 40 and not train & {question(v) for v in valid}  # held out
    assert all(len(read_prompts(bundled[s])) == n for s, n in (("train", 400), ("valid", 40)))
    for v in valid:  # the answers are right
        assert v["messages"][:2] == [  # one worked example first
            {"role": "user", "content": "What is 2 + 3? Work it out, then give the final number inside "
                                        "<answer></answer>."},
            {"role": "assistant", "content": "2 + 3 = 5\n<answer>5</answer>"}]
        a, op, b = question(v).split("?")[0].split()[2:5]
        assert int(v["answer"]) == eval(f"{int(a)} {op} {int(b)}")  # noqa: S307 (digits and + - *)
    assert Path(bundled["train"]).parent.name == "arithmetic"


def test_gpu_rollout_layers_multiply_a_decoding_batch_as_one_matrix_of_rows():
    """rollout_mode's CUDA layers flatten (rows, 1, in) to (rows, in) before the quantized kernel
    (MLX's CUDA kernel would read the whole weight once per row): the same products, in the same
    shape, as the quantized layers they stand in for, output layer (tied embedding) included."""
    from steadytune.qlora import RowsQuantizedEmbedding, RowsQuantizedLinear

    mx.random.seed(0)
    lin = nn.QuantizedLinear.from_linear(nn.Linear(128, 96, bias=True), group_size=64, bits=4)
    emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(96, 128), group_size=64, bits=4)
    x = mx.random.normal((32, 1, 128))
    want_lin, want_emb = lin(x), emb.as_linear(x)
    lin.__class__, emb.__class__ = RowsQuantizedLinear, RowsQuantizedEmbedding
    got_lin, got_emb = lin(x), emb.as_linear(x)
    assert got_lin.shape == want_lin.shape == (32, 1, 96) and got_emb.shape == (32, 1, 96)
    for got, want in ((got_lin, want_lin), (got_emb, want_emb)):  # float32: summation order only
        assert mx.abs(got - want).max().item() <= 1e-5 * mx.abs(want).max().item()
