"""GGUF export of every model family steadytune writes, checked in a real llama.cpp.

    .venv/bin/python bench/gguf_families.py --llama-venv VENV [--work DIR] [--families qwen3_moe,lfm2]

VENV is a Python environment with llama.cpp's C API (`bash ../shared/tools/llama-cpp-ref.sh VENV`
builds one: the prebuilt llama-cpp-py-sync wheel and a glibc shim; a bench dependency only).

For each family: the tiny random 4-bit model of tests/arch_models.py with random nonzero LoRA adapters
(tests/test_export.py's make_run), exported with `--format gguf` (float16) and `--quant q4_k_m`. The
reference is the MLX model fused with the same float16 weights (`--format mlx`, computed in float32);
llama.cpp loads the float16 file and computes the logits of every position of four prompts (fed as
the same token ids), and greedy answers through its KV cache. For scale, both are also held against
base + adapters in float32 (what rounding the weights to float16 moves). Then llama.cpp's own
`llama_model_quantize` of our float16 file is compared with our q4_k_m file tensor by tensor (type
and bytes), and the tokenizer with the model's: llama.cpp's token ids of the prompts against the HF
tokenizer's. Variants (`family+variant`) take the released models' RoPE scaling (YaRN), expert
count, attention without RoPE and a dense MLP (Granite 4.0-H), or Mamba-2 groups (Nemotron-H) on the
tiny model. gemma3n runs in the released models' layout (RELEASED: what llama.cpp's code fixes) with
some parameters drawn again (RETUNED), and through mlx-lm's prompt cache (KV_SHARED). The llama.cpp
half runs in VENV (this file again, with --llama-side); a table is printed and the numbers written to
WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # arch_models, test_export.make_run
FAMILIES = ("qwen3_moe", "olmo2", "smollm3", "ministral3", "mistral3", "gpt_oss", "deepseek_v3", "glm4_moe", "lfm2",
            "glm4_moe_lite", "mixtral", "lfm2_moe", "granitemoehybrid", "nemotron_h",
            "gemma3n", "olmo3", "granite", "ministral3+yarn", "gpt_oss+yarn",
            "deepseek_v3+yarn", "mixtral+8x", "granitemoehybrid+nope", "granitemoehybrid+dense", "nemotron_h+groups")
# Settings of the released models the tiny ones differ in, where the tiny setting is not exported
# (it is refused, and tests/test_export_families.py pins that refusal)
RELEASED = {"qwen3_moe": {"mlp_only_layers": []}, "deepseek_v3": {"rms_norm_eps": 1e-6},
            "granitemoehybrid": {"mamba_n_heads": 8, "mamba_expand": 2},  # Mamba-2 inner size 2 x hidden
            "nemotron_h": {"hybrid_override_pattern": ["M", "*", "E", "M", "E"]},  # experts in every MLP layer
            # what llama.cpp's gemma3n fixes in code (gguf_arch.GEMMA3N_FIXED, _gemma3n_refuse): 20 layers
            # with their own KV and 2 sharing it, every 5th global, sparsity in the first 10; 1024 wide,
            # since llama.cpp's sparsity cutoff takes the sample std (n - 1) where mlx-lm and HF take the
            # population std: 1 / (2 x width) apart, 128 wide that moves these logits by up to 0.4
            "gemma3n": {"text_config": {
                "num_hidden_layers": 22, "num_kv_shared_layers": 2, "laurel_rank": 64,
                "hidden_size_per_layer_input": 256,
                "layer_types": ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(22)],
                "activation_sparsity_pattern": [0.95] * 10 + [0.0] * 12, "intermediate_size": [1024] * 22}}}
# Parameters of a random model drawn again, closer to a trained model's, (name suffix, scale of a normal
# draw). gemma3n: correct_output_scale, which mlx-lm starts at zero, gates the whole per-layer input
# path; AltUp coefficients drawn as nn.Linear draws them multiply the four streams by up to ~9 in each
# of 22 layers; q/k norms of 1 (attention scale 1, no 1/sqrt(head_dim)) make every softmax nearly
# one-hot, and post-norms of 1 let each block swamp the stream: drawn as they are, a model whose logits
# float16 rounding of the weights moves by up to 3 (and llama.cpp's own rounding, from a float32 file,
# by up to 0.5); drawn so, by 0.005
RETUNED = {"gemma3n": ((".altup.correct_output_scale", 1.0), (".altup.prediction_coefs.weight", 0.05),
                       (".altup.correction_coefs.weight", 0.05), (".self_attn.q_norm.weight", 0.3),
                       (".self_attn.k_norm.weight", 0.3), (".post_attention_layernorm.weight", 0.3),
                       (".post_feedforward_layernorm.weight", 0.3), (".laurel.post_laurel_norm.weight", 0.3),
                       (".post_per_layer_input_norm.weight", 0.3))}
KV_SHARED = ("gemma3n",)
# RoPE scaling as in Ministral 3, gpt-oss and DeepSeek V3 (their config.json), on the tiny models
YARN = {
    "ministral3": {"rope_parameters": {"rope_type": "yarn", "type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                                       "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0,
                                       "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1},
                   "max_position_embeddings": 512},
    "gpt_oss": {"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "original_max_position_embeddings": 16, "truncate": False}},
    "deepseek_v3": {"rope_scaling": {"type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 16}},
}
PROMPTS = ["The capital of France is", "<|im_start|>user\nhello, who are you?<|im_end|>\n<|im_start|>assistant\n",
           "select the name from the table where the year is 1999 and the score is",
           "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30"]
N_NEW = 8
# Largest |logit difference| llama.cpp may show against the MLX model with the same float16 weights
# (llama.cpp multiplies in float16 where MLX here computes in float32): these tiny models' logits reach
# ~4; a wrong layout moves them by ~1 or more
TOLERANCE = 0.03
GOLDEN = ROOT / "tests" / "data" / "gguf_export_tensors.txt"


# --------------------------------------------------------------------------- steadytune side

def settings(family: str) -> tuple[str, dict]:
    """(mlx-lm model type, config overrides) of a family name such as deepseek_v3+yarn."""
    name, _, variant = family.partition("+")
    overrides = dict(RELEASED.get(name, {}))
    if "text_config" in overrides:  # over the tiny model's own text settings
        import arch_models

        overrides["text_config"] = {**arch_models._CONFIGS[name]["text_config"], **overrides["text_config"]}
    if variant == "yarn":
        overrides.update(YARN[name])
    elif variant == "8x":  # Mixtral's 8 experts, for which llama-quantize gives attn_v and attn_k Q8_0
        overrides.update(num_local_experts=8)
    elif variant == "nope":  # Granite 4.0-H's attention without RoPE (position_embedding_type "nope")
        overrides.update(position_embedding_type="nope")
    elif variant == "dense":  # granitemoehybrid without experts: a dense MLP in every block
        overrides.update(num_local_experts=0, num_experts_per_tok=0)
    elif variant == "groups":  # Mamba-2 with more than one group: the gated norm per group
        overrides.update(n_groups=2)
    elif variant:
        raise SystemExit(f"unknown variant {variant!r} of {name}")
    return name, overrides


def prepare(family: str, work: Path) -> dict:
    """Build, export and measure one family on the MLX side; the job for the llama.cpp side."""
    import time

    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load

    import arch_models
    from test_export import make_run

    from steadytune.export import export
    from steadytune.generation import load_tuned

    name, overrides = settings(family)
    folder = work / family / "base"
    shutil.rmtree(work / family, ignore_errors=True)
    saved = arch_models._CONFIGS[name]
    arch_models._CONFIGS[name] = {**saved, **overrides}
    try:
        arch_models.build(folder, name)
    finally:
        arch_models._CONFIGS[name] = saved
    if name in RETUNED:
        weights, key = mx.load(str(folder / "model.safetensors")), mx.random.key(2)
        for suffix, scale in RETUNED[name]:
            for k in sorted(k for k in weights if k.endswith(suffix)):
                key, sub = mx.random.split(key)
                weights[k] = (scale * mx.random.normal(weights[k].shape, key=sub)).astype(weights[k].dtype)
        mx.save_safetensors(str(folder / "model.safetensors"), weights)
    run = make_run(work / family, str(folder), "run")
    tuned = load_tuned(run, dtype="float32")
    seqs = [tuned.tokenizer.encode(p) for p in PROMPTS]
    exact = [np.array(forward(tuned.model, ids, name)[0].astype(mx.float32)) for ids in seqs]
    t0 = time.perf_counter()
    gguf_dir = export(run, "gguf", work / family / "gguf")
    seconds = time.perf_counter() - t0
    export(run, "gguf", work / family / "q4_k_m", quant="q4_k_m")
    # the reference: the fused model with the file's float16 weights, computed in float32 (MLX's CPU
    # gather_mm, which experts run on, computes float32 only)
    fused, _ = load(str(export(run, "mlx", work / family / "mlx16")))
    fused.apply(lambda x: x.astype(mx.float32))
    ref = [np.array(forward(fused, ids, name)[0]) for ids in seqs]
    greedy, margins = zip(*(mlx_greedy(fused, ids, name) for ids in seqs))
    np.savez(work / family / "ref.npz", *ref)
    np.savez(work / family / "exact.npz", *exact)
    return {"family": family, "gguf": str(gguf_dir / "model.gguf"), "seqs": seqs, "greedy": greedy, "margins": margins,
            "f16_vs_exact": max(float(np.abs(r - e).max()) for r, e in zip(ref, exact)), "export_s": seconds,
            "scale": max(float(np.abs(r).max()) for r in ref)}


def forward(model, ids: list[int], name: str):
    """The logits of every position; for KV_SHARED families through mlx-lm's prompt cache, as
    generation runs them: gemma3n's KV-shared layers read the earlier layers' keys and values only
    from the cache (without one they project their own, which neither generation nor llama.cpp does)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    return model(mx.array([ids]), cache=make_prompt_cache(model) if name in KV_SHARED else None)


def mlx_greedy(model, ids: list[int], name: str) -> tuple[list[int], list[float]]:
    """N_NEW greedy tokens and, for each, how far the runner-up was below it."""
    import mlx.core as mx

    out, margins = [], []
    for _ in range(N_NEW):
        row = forward(model, ids + out, name)[0, -1]
        top2 = mx.sort(row)[-2:]
        out.append(int(row.argmax().item()))
        margins.append(float(top2[1] - top2[0]))
    return out, margins


def same_tensors(ours: Path, theirs: Path) -> str:
    """'same type / same bytes' over llama.cpp's tensors."""
    import gguf
    import numpy as np

    mine = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    other = gguf.GGUFReader(str(theirs)).tensors
    types = sum(mine[t.name].tensor_type == t.tensor_type for t in other)
    # flattened: llama-quantize writes a (1, n) tensor such as Mamba-2's one-group ssm_norm with ne [n]
    # (ggml drops a trailing 1), the converter and steadytune with ne [n, 1]; the same values
    data = sum(np.array_equal(np.asarray(mine[t.name].data).reshape(-1).view(np.uint8),
                              np.asarray(t.data).reshape(-1).view(np.uint8)) for t in other)
    return f"{types}/{len(other)} / {data}/{len(other)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-venv", required=True, help="a venv made by shared/tools/llama-cpp-ref.sh")
    p.add_argument("--work", default="runs/bench-gguf-families", help="folder for the models and exports")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--golden", action="store_true", help=f"write {GOLDEN.relative_to(ROOT)} (every family "
                   "within TOLERANCE)")
    p.add_argument("--llama-side", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama_side:
        return llama_side(Path(args.llama_side))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    jobs = [prepare(f, work) for f in args.families.split(",") if f]
    (work / "job.json").write_text(json.dumps({"jobs": jobs, "threads": args.threads, "prompts": PROMPTS}))
    python = str(Path(args.llama_venv) / "bin" / "python")
    done = subprocess.run([python, __file__, "--llama-venv", args.llama_venv, "--llama-side", str(work)],
                          stderr=subprocess.PIPE, text=True)  # llama.cpp logs every tensor it quantizes
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line or "Traceback" in line]
        sys.exit("the llama.cpp side failed:\n" + "\n".join(lines[-20:] or done.stderr.splitlines()[-40:]))
    results = json.loads((work / "results.json").read_text())
    import gguf

    for row in results["rows"]:
        row["tensors"] = len(gguf.GGUFReader(str(work / row["family"] / "gguf" / "model.gguf")).tensors)
        q4 = work / row["family"] / "q4_k_m" / "model.gguf"
        row["q4_k_m"] = same_tensors(q4, work / row["family"] / "llama-q4_k_m.gguf")
    (work / "results.json").write_text(json.dumps(results, indent=1))
    report(results)
    if args.golden:
        golden(work, results)


def golden(work: Path, results: dict) -> None:
    """The tensors of each verified family's files, for tests/test_export_families.py: name, shape
    (llama.cpp's ne order), type in the float16 file, and the type llama.cpp's own quantizer gives
    it in Q4_K_M."""
    import gguf

    bad = [r["family"] for r in results["rows"] if r["diff"] > TOLERANCE]
    if bad:
        sys.exit(f"not writing {GOLDEN}: {', '.join(bad)} differ from MLX by more than {TOLERANCE}")
    lines = [f"# Written by bench/gguf_families.py --golden, each file checked in llama.cpp {results['llama_cpp']}",
             f"# (max abs logit difference from MLX under {TOLERANCE}): name, ne, type in the f16 file, and the type",
             "# llama.cpp's llama_model_quantize gives the tensor in q4_k_m"]
    for row in results["rows"]:
        if "+" in row["family"]:
            continue  # a variant of a family above (its RoPE scaling, its expert count)
        f16 = gguf.GGUFReader(str(work / row["family"] / "gguf" / "model.gguf")).tensors
        theirs = gguf.GGUFReader(str(work / row["family"] / "llama-q4_k_m.gguf")).tensors
        q4 = {t.name: t.tensor_type.name for t in theirs}
        lines.append(f"[{row['family']} {row['arch']}]")
        lines += [f"{t.name} {','.join(str(int(n)) for n in t.shape)} {t.tensor_type.name} {q4[t.name]}" for t in f16]
    GOLDEN.write_text("\n".join(lines) + "\n")
    print(f"wrote {GOLDEN}")


def report(r: dict) -> None:
    print(f"\nllama.cpp {r['llama_cpp']}: the float16 GGUF against the MLX model fused with the same float16 "
          f"weights (base + adapters), {len(PROMPTS)} prompts, {r['positions']} positions")
    print("| family | GGUF arch | tensors | max abs logit | max abs diff, llama.cpp vs MLX fused | greedy tokens "
          f"equal ({N_NEW} each) | for scale: max abs diff of float16 weights (MLX) / of llama.cpp, from base + "
          "adapters in float32 | same token ids | q4_k_m vs llama-quantize: same type / bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in r["rows"]:
        print(f"| {m['family']} | {m['arch']} | {m['tensors']} | {m['scale']:.2f} | {m['diff']:.4f} | "
              f"{m['greedy_same']}/{len(PROMPTS)}{tie(m)} | {m['f16_vs_exact']:.4f} / {m['diff_exact']:.4f} | "
              f"{m['ids_same']}/{len(PROMPTS)} | {m.get('q4_k_m', '')} |")


def tie(row: dict) -> str:
    gap = row.get("tie_at_difference")
    return "" if gap is None else f" (MLX's top two {gap:.4f} apart where they part)"


# --------------------------------------------------------------------------- llama.cpp side (in VENV)

class Runner:
    """One llama.cpp model in a context of its own that computes logits only (the wrapper's context
    also computes embeddings, and llama.cpp's lfm2 then computes no logits at all): every position's
    logits, and greedy answers through the KV cache."""

    def __init__(self, path: Path, threads: int):
        from llama_cpp_py_sync import Llama

        self.llm = Llama(str(path), n_ctx=256, n_batch=256, n_threads=threads, verbose=False)
        self.lib, self.ffi = self.llm._lib, self.llm._ffi
        params = self.lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 256, 256, 256
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = False
        self.ctx = self.lib.llama_init_from_model(self.llm._model, params)
        assert self.ctx != self.ffi.NULL
        self.n_vocab = self.llm.n_vocab

    def close(self) -> None:
        self.lib.llama_free(self.ctx)

    def decode(self, ids: list[int], start: int, all_logits: bool):
        """Feed ids at positions start.. and return the logits of every one (or of the last)."""
        import numpy as np

        batch = self.lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + i, 1
                batch.logits[i] = 1 if all_logits or i == len(ids) - 1 else 0
                batch.seq_id[i][0] = 0
            assert self.lib.llama_decode(self.ctx, batch) == 0
            rows = range(len(ids)) if all_logits else [len(ids) - 1]
            return np.stack([np.frombuffer(self.ffi.buffer(self.lib.llama_get_logits_ith(self.ctx, i),
                                                           4 * self.n_vocab), dtype=np.float32).copy() for i in rows])
        finally:
            self.lib.llama_batch_free(batch)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def logits(self, ids: list[int]):
        self.clear()
        return self.decode(ids, 0, all_logits=True)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.clear()
        out = [int(self.decode(ids, 0, all_logits=False)[-1].argmax())]
        while len(out) < n:
            out.append(int(self.decode(out[-1:], len(ids) + len(out) - 1, all_logits=False)[-1].argmax()))
        return out


def llama_side(work: Path) -> None:
    import llama_cpp_py_sync
    import numpy as np

    job = json.loads((work / "job.json").read_text())
    rows = []
    for j in job["jobs"]:
        runner = Runner(Path(j["gguf"]), job["threads"])
        ref, exact = np.load(work / j["family"] / "ref.npz"), np.load(work / j["family"] / "exact.npz")
        logits = [runner.logits(ids) for ids in j["seqs"]]
        diff = max(float(np.abs(x - ref[f"arr_{k}"]).max()) for k, x in enumerate(logits))
        diff_exact = max(float(np.abs(x - exact[f"arr_{k}"]).max()) for k, x in enumerate(logits))
        greedy = [runner.greedy(ids, N_NEW) for ids in j["seqs"]]
        ids = [runner.llm.tokenize(p, add_special=False, parse_special=True) for p in job["prompts"]]
        lib, ffi = runner.lib, runner.ffi
        buf = ffi.new("char[64]")
        lib.llama_model_meta_val_str(runner.llm._model, b"general.architecture", buf, 64)
        arch = ffi.string(buf).decode()
        runner.close()
        del runner
        params = lib.llama_model_quantize_default_params()
        params.ftype, params.nthread = 15, job["threads"]  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        pp = ffi.new("llama_model_quantize_params *", params)
        theirs = work / j["family"] / "llama-q4_k_m.gguf"
        assert lib.llama_model_quantize(j["gguf"].encode(), str(theirs).encode(), pp) == 0
        row = {"family": j["family"], "arch": arch, "diff": diff, "diff_exact": diff_exact,
               "f16_vs_exact": j["f16_vs_exact"], "scale": j["scale"], "export_s": j["export_s"],
               "greedy_same": sum(a == b for a, b in zip(greedy, j["greedy"])), "greedy": greedy,
               # where an answer differs: how close MLX's own choice was there (a near tie, or not)
               "tie_at_difference": max((m[next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)]
                                         for a, b, m in zip(greedy, j["greedy"], j["margins"]) if a != b),
                                        default=None),
               "ids_same": sum(a == b for a, b in zip(ids, j["seqs"]))}
        rows.append(row)
        print(row, flush=True)
    results = {"llama_cpp": f"{llama_cpp_py_sync.__version__} ({llama_cpp_py_sync.__llama_cpp_commit__})",
               "positions": sum(len(s) for s in job["jobs"][0]["seqs"]) if job["jobs"] else 0, "rows": rows}
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
