"""The LoRA GGUF export (`--format gguf-lora`) on its base in a real llama.cpp, against the fused export.

    .venv/bin/python bench/gguf_lora.py RUN --llama-venv VENV [--work DIR] [--reuse]

VENV is a Python environment with llama.cpp's C API (`bash ../shared/tools/llama-cpp-ref.sh VENV`).
About 40 minutes on a shared, loaded 2-core machine for the default model (7 models in llama.cpp).
RUN should be a run whose adapters matter (a few steps at a high learning rate); the table shows it
(the base alone against the fused export).

Reference: `steadytune export RUN --format gguf` (float16, adapters fused into the dequantized base),
run by llama.cpp. Against it, each run by llama.cpp on 49 held-out texts (at most 128 tokens each) and
the demo's 4 prompts (48 greedy tokens):
- the fused export in float32: how much float16 rounding of the weights alone moves the logits (the
  scale for the next row);
- adapter.gguf on the base exported in float16 (the run with lora_b = 0: the dequantized base the
  adapters were trained on): the adapter path alone, names, transposes, q/k row order and alpha;
- adapter.gguf on the base file itself (for a GGUF base such as the default model's Q4_1), as a user
  loads it: llama.cpp applies the LoRA on top of the quantized matrices;
- each base alone, to show what the adapters change.
Two more rows separate the quantized base's error from the adapter's: the quantized base + LoRA against
the float16 base + LoRA, and the quantized base alone against the float16 base alone. Tolerances
(F16_FACTOR, QUANT_FACTOR) are checked against those anchors and printed as PASS/FAIL.
Before llama.cpp runs, the weights themselves: every adapted matrix of the fused export against the
float16 base + alpha / rank * B·A read back from adapter.gguf with the `gguf` package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_quant import Runner, _log_softmax, demo_prompts, held_out_texts  # noqa: E402

N_NEW = 48  # greedy tokens per demo prompt
# (row, model file key, with the adapter?, reference key): each row is compared with its reference
ROWS = (("fused export, float32", "fused_f32", False, "fused_f16"),
        ("float16 base + adapter.gguf", "base_f16", True, "fused_f16"),
        ("base file ({base_type}) + adapter.gguf", "base_file", True, "fused_f16"),
        ("float16 base alone", "base_f16", False, "fused_f16"),
        ("base file ({base_type}) alone", "base_file", False, "fused_f16"),
        ("base file ({base_type}) + adapter.gguf", "base_file", True, "base_f16+lora"),
        ("base file ({base_type}) alone", "base_file", False, "base_f16"))
# Tolerances, against the anchors measured in the same run: the adapter on the float16 base within
# float16 rounding (its KL at most twice the fused float32 export's); on a quantized base file, the
# adapter adds at most 10% to the KL the file's own quantization gives without it.
F16_FACTOR, QUANT_FACTOR = 2.0, 1.1
LABELS = {"fused_f16": "fused export, float16", "base_f16": "float16 base alone",
          "base_f16+lora": "float16 base + adapter.gguf"}


# --------------------------------------------------------------------------- steadytune side

def base_file(run: Path) -> Path | None:
    """The run's base model file when it is a GGUF (the default model's Q4_1 file), else None."""
    from steadytune.generation import run_model_config
    from steadytune.model import resolve_source

    kind, path = resolve_source(run_model_config(run).path)
    return Path(path) if kind == "gguf" else None


def _base_type(path: Path) -> str:
    """The file type of a GGUF base, as its most common matrix type (Q4_1 for the default model)."""
    import collections

    import gguf

    types = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2)
    return types.most_common(1)[0][0]


def zeroed_run(run: Path, work: Path) -> Path:
    """A copy of RUN whose adapters change nothing (lora_b = 0): its export is the base the
    adapters were trained on, as llama.cpp would load it under the LoRA GGUF."""
    import mlx.core as mx

    copy = work / "run-zeroed"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "export-*", "bench-*"))
    path = copy / "adapters" / "adapters.safetensors"
    weights = mx.load(str(path))
    mx.save_safetensors(str(path), {k: mx.zeros_like(v) if k.endswith("lora_b") else v for k, v in weights.items()})
    return copy


def export_all(run: Path, work: Path) -> dict:
    from steadytune.export import export

    seconds = {}
    for key, source, fmt, kw in (("fused_f16", run, "gguf", {}), ("fused_f32", run, "gguf", {"dtype": "float32"}),
                                 ("lora", run, "gguf-lora", {}), ("base_f16", zeroed_run(run, work), "gguf", {})):
        out = work / key
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        export(source, fmt, out, **kw)
        seconds[key] = time.perf_counter() - t0
    return seconds


def weight_check(work: Path) -> dict:
    """max |fused - (base + alpha/rank * B·A)| over every adapted matrix, next to the largest float16
    rounding step of those matrices (the fused and base files are float16; the sum is float32)."""
    import gguf
    import numpy as np

    def tensors(path):
        return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    lora, fused, base = (tensors(work / k / f) for k, f in (("lora", "adapter.gguf"), ("fused_f16", "model.gguf"),
                                                            ("base_f16", "model.gguf")))
    reader = gguf.GGUFReader(str(work / "lora" / "adapter.gguf"))
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    worst, step, n = 0.0, 0.0, 0
    for name in sorted(k[:-len(".lora_a")] for k in lora if k.endswith(".lora_a")):
        a = np.asarray(lora[f"{name}.lora_a"].data, np.float32)   # (rank, in)
        b = np.asarray(lora[f"{name}.lora_b"].data, np.float32)   # (out, rank)
        want = np.asarray(base[name].data, np.float32) + alpha / a.shape[0] * (b @ a)
        got = np.asarray(fused[name].data, np.float32)
        worst = max(worst, float(np.abs(got - want).max()))
        step = max(step, float(np.spacing(np.abs(want).max().astype(np.float16))))
        n += 1
    return {"matrices": n, "alpha": alpha, "max_abs": worst, "f16_step": step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="a run folder of steadytune train")
    p.add_argument("--llama-venv", required=True, help="a venv made by shared/tools/llama-cpp-ref.sh")
    p.add_argument("--work", default=None, help="folder for the exports (default: RUN/bench-gguf-lora)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true", help="measure the exports already in --work again")
    p.add_argument("--llama-side", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama_side:
        return llama_side(Path(args.llama_side))
    run = Path(args.run)
    work = Path(args.work) if args.work else run / "bench-gguf-lora"
    work.mkdir(parents=True, exist_ok=True)
    if not args.reuse:
        base = base_file(run)
        job = {"export_seconds": export_all(run, work), "texts": held_out_texts(), "prompts": demo_prompts(run),
               "base_file": str(base) if base else None, "base_type": _base_type(base) if base else None}
        (work / "job.json").write_text(json.dumps(job))
    job = json.loads((work / "job.json").read_text())
    job["threads"] = args.threads
    (work / "job.json").write_text(json.dumps(job))
    weights = weight_check(work)
    python = str(Path(args.llama_venv) / "bin" / "python")
    subprocess.run([python, __file__, "--llama-venv", args.llama_venv, "--llama-side", str(work)], check=True)
    results = json.loads((work / "results.json").read_text())
    results["weights"] = weights
    (work / "results.json").write_text(json.dumps(results, indent=1))
    report(results, run)


def report(r: dict, run: Path) -> None:
    w = r["weights"]
    print(f"\n{run}: llama.cpp {r['llama_cpp']}, {r['positions']} positions of held-out text, "
          f"{r['n_prompts']} demo prompts x {N_NEW} greedy tokens")
    print(f"weights: {w['matrices']} adapted matrices, alpha {w['alpha']:g}: max |fused - (base + alpha/rank B·A)| "
          f"= {w['max_abs']:.2e} (largest float16 step of those matrices: {w['f16_step']:.2e})")
    print("| in llama.cpp | against | mean KL | max KL | max abs logit diff | same top-1 | greedy answers equal "
          "| tokens before the first difference |")
    print("|---|---|---|---|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['name']} | {row['against']} | {row['kl']:.2e} | {row['kl_max']:.2e} | {row['max_abs']:.4f} | "
              f"{row['top1']:.4f} | {row['greedy_same']}/{r['n_prompts']} | {row['prefix']}/{row['tokens']} |")
    rows = r["rows"]
    f32, lora = rows[0], rows[1]
    print(f"adapter on the float16 base: KL {lora['kl']:.2e} = {lora['kl'] / f32['kl']:.2f}x the float16 rounding's "
          f"({f32['kl']:.2e}; tolerance {F16_FACTOR:g}x), greedy {lora['greedy_same']}/{r['n_prompts']}: "
          f"{'PASS' if lora['kl'] <= F16_FACTOR * f32['kl'] and lora['greedy_same'] == r['n_prompts'] else 'FAIL'}")
    if len(rows) == len(ROWS):
        with_lora, alone = rows[5], rows[6]
        print(f"adapter on the base file: KL against the float16 base + adapter {with_lora['kl']:.2e} = "
              f"{with_lora['kl'] / alone['kl']:.2f}x the file's own error without it ({alone['kl']:.2e}; tolerance "
              f"{QUANT_FACTOR:g}x), greedy vs the fused export {rows[2]['greedy_same']}/{r['n_prompts']}: "
              f"{'PASS' if with_lora['kl'] <= QUANT_FACTOR * alone['kl'] else 'FAIL'}")


# --------------------------------------------------------------------------- llama.cpp side (in VENV)

def llama_side(work: Path) -> None:
    import llama_cpp_py_sync
    import numpy as np

    job = json.loads((work / "job.json").read_text())
    threads, lora = job["threads"], work / "lora" / "adapter.gguf"
    files = {"fused_f16": work / "fused_f16" / "model.gguf", "fused_f32": work / "fused_f32" / "model.gguf",
             "base_f16": work / "base_f16" / "model.gguf"}
    base_type = job["base_type"]
    if job["base_file"]:
        files["base_file"] = Path(job["base_file"])
    runners = {}
    for _, key, with_lora, ref in ROWS:
        for k, adapter in ((key, with_lora), (ref.removesuffix("+lora"), ref.endswith("+lora"))):
            name = k + ("+lora" if adapter else "")
            if k in files and name not in runners:
                runners[name] = Runner(files[k], threads, lora=lora if adapter else None)
    rows = [(label.format(base_type=base_type), key + ("+lora" if with_lora else ""), ref)
            for label, key, with_lora, ref in ROWS if key + ("+lora" if with_lora else "") in runners]
    tok = runners["fused_f16"].llm
    seqs = [tok.tokenize(t, add_special=True)[:128] for t in job["texts"]]
    prompts = [tok.tokenize(p, add_special=True, parse_special=True) for p in job["prompts"]]
    acc = [{"kl": [], "same": [], "max_abs": 0.0} for _ in rows]
    for ids in seqs:  # every model on one text at a time: the logits of all texts would not fit in memory
        logits = {name: runner.logits(ids) for name, runner in runners.items()}
        for a, (_, name, ref) in zip(acc, rows):
            p, q = logits[ref], logits[name]
            lp, lq = _log_softmax(p), _log_softmax(q)
            a["kl"].append((np.exp(lp) * (lp - lq)).sum(axis=-1))
            a["same"].append(p.argmax(axis=-1) == q.argmax(axis=-1))
            a["max_abs"] = max(a["max_abs"], float(np.abs(p - q).max()))
    answers = {name: [runner.greedy(ids, N_NEW) for ids in prompts] for name, runner in runners.items()}
    out = []
    for a, (label, name, ref) in zip(acc, rows):
        kl = np.concatenate(a["kl"])
        pairs = list(zip(answers[name], answers[ref]))
        prefix = sum(next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
                     for got, want in pairs)
        out.append({"name": label, "against": LABELS[ref], "kl": float(kl.mean()), "kl_max": float(kl.max()),
                    "top1": float(np.concatenate(a["same"]).mean()), "max_abs": a["max_abs"],
                    "greedy_same": sum(got == want for got, want in pairs), "prefix": prefix,
                    "tokens": sum(len(want) for _, want in pairs)})
    results = {"llama_cpp": f"{llama_cpp_py_sync.__version__} ({llama_cpp_py_sync.__llama_cpp_commit__})",
               "positions": sum(map(len, seqs)), "n_prompts": len(prompts), "rows": out,
               "answers": {name: [tok.detokenize(a) for a in ans] for name, ans in answers.items()}}
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
