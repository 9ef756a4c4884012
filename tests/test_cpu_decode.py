"""The compiled CPU decoder (steadytune/cpu_decode.py) against mlx-lm's own forward pass.

Tiny random models of each layout the decoder covers: logits of a prompt and of decode steps
after it, through a KV cache, must equal MLX's within float32 summation-order error, and the
cache must trim and copy like mlx-lm's (the server's prompt cache relies on both).
"""

from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from steadytune import cpu_decode  # noqa: E402

# Built by the machine's C compiler (gcc on Linux, clang on a Mac). Only a machine with none skips;
# a compiler that fails on the source fails the tests.
pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang")),
    reason="no C compiler here: answering falls back to the float32 copy (tests/test_serve.py runs it)")

BASE = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=96,
            tie_word_embeddings=False, max_position_embeddings=512)
PROMPT = [5, 17, 3, 88, 41, 9, 60]  # 7 tokens: one tile of 4 and a short one of 3 in the prefill


def tiny(model_type="llama", quant=(4, 64), lora=False, seed=0, **overrides):
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import llama, qwen2

    mod = {"llama": llama, "qwen2": qwen2}[model_type]
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict(dict(BASE, model_type=model_type, **overrides)))
    # larger-than-default init, so the logits spread out and a wrong sum shows
    model.update(tree_unflatten([(k, v * 4 if v.ndim == 2 else v) for k, v in tree_flatten(model.parameters())]))
    if quant:
        nn.quantize(model, group_size=quant[1], bits=quant[0])
    if lora:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        model.freeze()
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                          "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]})
        # lora_b starts at zero, which would hide a wrong product: give it values
        model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05)
                                     for k, v in tree_flatten(model.trainable_parameters()) if "lora_b" in k]))
    model.eval()
    mx.eval(model.parameters())
    return model


def logits_both(model, steps=3):
    """Logits of the prompt's last token, then of `steps` greedy decode steps, from MLX and from
    the decoder, each through its own cache."""
    from mlx_lm.models.cache import make_prompt_cache

    dec = cpu_decode.CpuDecoder(model)
    rc, dc = make_prompt_cache(model), dec.make_cache()
    ref, got = [model(mx.array([PROMPT]), cache=rc)[0, -1]], [dec(mx.array([PROMPT]), cache=dc)[0, -1]]
    for _ in range(steps):
        tok = mx.array([[int(mx.argmax(ref[-1]))]])
        ref.append(model(tok, cache=rc)[0, -1])
        got.append(dec(tok, cache=dc)[0, -1])
    return np.array(mx.stack(ref)), np.array(mx.stack(got))


@pytest.mark.parametrize("name,kw", [
    ("4-bit g64", dict()),
    ("4-bit g32", dict(quant=(4, 32))),
    ("8-bit g64", dict(quant=(8, 64))),
    ("float32", dict(quant=None)),
    ("LoRA on 4-bit", dict(lora=True)),
    ("qwen2 (q/k/v biases)", dict(model_type="qwen2")),
    ("traditional RoPE, tied embeddings", dict(rope_traditional=True, tie_word_embeddings=True)),
    ("llama3 RoPE scaling", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
])
def test_logits_equal_mlx(name, kw):
    ref, got = logits_both(tiny(**kw))
    scale = np.abs(ref).max()
    assert scale > 1.0  # a distribution with spread, so the bound below means something
    # float32 sums in another order: measured 1.7e-6 to 3.9e-6 of the largest logit here
    assert np.abs(ref - got).max() <= 2e-5 * scale, (name, np.abs(ref - got).max(), scale)
    assert (ref.argmax(-1) == got.argmax(-1)).all()


def test_lora_is_applied_not_ignored():
    """The LoRA case above would pass if the decoder read the base only and the adapters were
    tiny: here the adapters move the logits by far more than the bound."""
    base_ref, _ = logits_both(tiny(), steps=0)
    ref, got = logits_both(tiny(lora=True), steps=0)
    assert np.abs(ref - base_ref).max() > 100 * np.abs(ref - got).max()


def test_rows_decode_together_as_each_alone_in_mlx():
    """sample_rows (GRPO's CPU rollouts): prompts of different lengths, each read once and copied
    to its group's rows, then one pass over the weights per token for all unfinished rows. Each
    row's log-probabilities equal MLX's for that sequence alone, greedy tokens equal MLX's, and a
    row stops after an end id while the others go on."""
    from mlx_lm.models.cache import make_prompt_cache

    model = tiny(lora=True)
    prompts, group, new = [PROMPT, [40, 2, 77]], 2, 6

    def alone(prompt):  # MLX's greedy continuation and log-probabilities, one sequence
        cache, x, toks, lps = make_prompt_cache(model), mx.array([prompt]), [], []
        for _ in range(new):
            lg = model(x, cache=cache)[0, -1]
            lps.append(np.array(lg - mx.logsumexp(lg)))
            toks.append(int(mx.argmax(lg)))
            x = mx.array([[toks[-1]]])
        return toks, lps

    ref = [alone(p) for p in prompts]
    end = ref[0][0][1]  # prompt 0's rows end after their second token
    seen = []

    def greedy(lp):
        seen.append(np.array(lp))
        return mx.argmax(lp, axis=-1)

    out = cpu_decode.CpuDecoder(model).sample_rows(prompts, group, new, greedy, {end})
    for i, (toks, _) in enumerate(ref):
        want = toks[:toks.index(end) + 1] if end in toks else toks
        assert out[i * group:(i + 1) * group] == [want] * group
    assert len(out[0]) == 2 and len(out[2]) > 2  # the rows of prompt 1 went on alone
    for step in (0, 1):  # all four rows live: rows 0-1 are prompt 0's, rows 2-3 prompt 1's
        got, want = seen[step], np.stack([ref[r // group][1][step] for r in range(4)])
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max(), (step, np.abs(got - want).max())


def test_cache_trims_and_copies_like_mlx_lm():
    from mlx_lm.models.cache import trim_prompt_cache

    model = tiny()
    dec = cpu_decode.CpuDecoder(model)
    c = dec.make_cache()
    dec(mx.array([PROMPT]), cache=c)
    snapshot = copy.deepcopy(c)  # the server's prompt cache keeps copies
    assert trim_prompt_cache(c, 3) == 3 and c[0].offset == len(PROMPT) - 3
    a = np.array(dec(mx.array([[70, 71, 72]]), cache=c))
    fresh = dec.make_cache()
    b = np.array(dec(mx.array([PROMPT[:-3] + [70, 71, 72]]), cache=fresh))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    # the copy kept its own keys: it continues as the untrimmed cache would
    c2 = np.array(dec(mx.array([[70]]), cache=snapshot))
    d = np.array(dec(mx.array([PROMPT + [70]]), cache=dec.make_cache()))
    assert np.abs(c2 - d).max() <= 1e-5 * np.abs(d).max()
    assert c[0].nbytes == fresh[0].nbytes == 2 * 2 * 2 * 7 * 32 * 4  # layers, K+V, kv heads, tokens, dim
    # a long sequence grows the cache past its first capacity (256) without losing what it held
    long = list(range(1, 90)) * 3
    ref = np.array(dec(mx.array([long]), cache=dec.make_cache()))
    c3 = dec.make_cache()
    dec(mx.array([long[:200]]), cache=c3)
    assert np.abs(np.array(dec(mx.array([long[200:]]), cache=c3)) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_what_it_does_not_cover_is_refused_with_the_reason():
    with pytest.raises(cpu_decode.Unsupported, match="3-bit"):
        cpu_decode.CpuDecoder(tiny(quant=(3, 64)))
    from steadytune.generation import answering_model

    model, mode = answering_model(tiny(quant=(3, 64)))
    assert "does not cover it" in mode and "3-bit" in mode and not isinstance(model, cpu_decode.CpuDecoder)


def test_no_compiler_means_mlx_answers(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_decode, "_LIB", None)
    monkeypatch.setattr(cpu_decode, "_LIB_ERROR", None)
    monkeypatch.setenv("STEADYTUNE_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(cpu_decode.Unsupported, match="could not build"):
        cpu_decode.library()
    from steadytune.generation import answering_model

    model, mode = answering_model(tiny())
    assert mode.startswith("a float32 copy") and "could not build" in mode


def test_a_server_answering_several_at_once_keeps_the_batched_path():
    """serve --concurrency N > 1 must not make a short answer wait for a long one, and the decoder
    answers one sequence at a time: the server then gets the batched float32 copy."""
    from steadytune.generation import answering_model

    model, mode = answering_model(tiny(), batched=True)
    assert not isinstance(model, cpu_decode.CpuDecoder) and "--concurrency 1" in mode
    model, mode = answering_model(tiny(), batched=False)
    assert isinstance(model, cpu_decode.CpuDecoder)


def _fresh(monkeypatch, cache):
    monkeypatch.setattr(cpu_decode, "_LIB", None)
    monkeypatch.setattr(cpu_decode, "_LIB_ERROR", None)
    monkeypatch.setenv("STEADYTUNE_CACHE_DIR", str(cache))


def _replace(path, data: bytes):
    """A new file under the old name: the old one may be mapped into this process (the library
    loaded), and changing those pages in place would kill it."""
    path.unlink()
    path.write_bytes(data)


def test_cached_library_is_verified_rebuilt_when_damaged_and_refused_in_a_folder_others_can_write(
        monkeypatch, tmp_path):
    """Built with CC="gcc -O2" (split as a shell would), in a folder created 0700 whatever the
    umask; a library whose bytes differ from the hash recorded at build (one flipped byte: same
    size, still a valid ELF header) is rebuilt; a folder others can write is refused; a "compiler"
    that writes nothing is named."""
    import hashlib

    cache = tmp_path / "cache"
    _fresh(monkeypatch, cache)
    monkeypatch.setenv("CC", f"{shutil.which('gcc') or shutil.which('cc') or shutil.which('clang')} -O2")
    old = os.umask(0)
    try:
        cpu_decode.library()
    finally:
        os.umask(old)
    assert cache.stat().st_mode & 0o777 == 0o700
    (lib,) = cache.glob("cpu_decode-*.so")
    assert lib.stat().st_mode & 0o022 == 0
    good = lib.read_bytes()
    record = cache / (lib.name + ".sha256")
    assert record.read_text() == hashlib.sha256(good).hexdigest()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    _replace(lib, bytes(flipped))
    _fresh(monkeypatch, cache)
    cpu_decode.library()  # rebuilt, not loaded as it was
    assert hashlib.sha256(lib.read_bytes()).hexdigest() == record.read_text() != hashlib.sha256(flipped).hexdigest()
    cache.chmod(0o777)
    _fresh(monkeypatch, cache)
    with pytest.raises(cpu_decode.Unsupported, match=f"{cache} is writable by other users or not yours.*chmod 700"):
        cpu_decode.library()
    _fresh(monkeypatch, tmp_path / "b")
    monkeypatch.setenv("CC", "/bin/true")
    with pytest.raises(cpu_decode.Unsupported, match="CC=/bin/true exited 0 but wrote no library; set CC to a C "
                                                     "compiler such as gcc or clang"):
        cpu_decode.library()


def test_token_ids_past_the_embedding_table_are_refused_not_read():
    dec = cpu_decode.CpuDecoder(tiny())
    with pytest.raises(ValueError, match=r"token id 96 is outside the model's embedding table \(ids 0 to 95\)"):
        dec(mx.array([[5, 96]]))
