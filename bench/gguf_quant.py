"""Quantized GGUF export against llama.cpp's own quantizer, measured in a real llama.cpp.

    .venv/bin/python bench/gguf_quant.py RUN --llama-venv VENV [--work DIR] [--types q8_0,q4_k_m]
    .venv/bin/python bench/gguf_quant.py --golden --llama-venv VENV   # rewrite the test's golden bytes

VENV is a Python environment with llama.cpp's C API (`bash ../shared/tools/llama-cpp-ref.sh VENV`
builds one: the prebuilt llama-cpp-py-sync wheel and a glibc shim; a bench dependency only).

For each type, `steadytune export RUN --format gguf --quant TYPE` (ours) and llama.cpp's
`llama_model_quantize` of our float16 export (theirs) are both run by llama.cpp on held-out text:
KL divergence of each position's next-token distribution from the float16 export's, and how often
the most likely token is the same; file sizes side by side. Then the greedy answers of the Q8_0
exports to the demo prompts against the float16 export's. (The LoRA GGUF, `--format gguf-lora`, is
measured by bench/gguf_lora.py.) The llama.cpp half runs in VENV (this file again, with --llama-side);
a table is printed and the numbers written to WORK/results.json.

--split (with q8_0 among --types) separates where the Q8_0 file's error comes from: llama.cpp's CPU
matmul of a Q8_0 weight also rounds the activations to 8-bit blocks of 32 (a q8_0 x q8_0 dot), so
besides the Q8_0 file it runs float32 files of (a) the float16 export's weights, where the only
difference from the reference is that llama.cpp no longer rounds activations to float16 in the
matmuls, (b) the Q8_0 blocks' values, the weight rounding alone; and a Q8_0 file whose block scales
are searched for the least squared error (`q8_0_least_squares`, the same format) with its float32
twin. Same KL, top-1 and greedy answers for each, and each one's weight RMSE.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
FTYPE = {"q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q4_0": 2}  # LLAMA_FTYPE_MOSTLY_*
GGML_TYPE = {"Q4_0": 2, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


# --------------------------------------------------------------------------- steadytune side

def held_out_texts(n_sql: int = 24) -> list[str]:
    """Text no run here trained on (shared/data, SOURCES.md): wikisql's valid split and the preference
    set's valid questions with their chosen answers, cut to a few hundred characters each."""
    data = ROOT.parent / "shared" / "data"
    sql = [json.loads(line)["text"] for line in (data / "wikisql" / "valid.jsonl").read_text().splitlines()]
    pairs = json.loads((data / "dpo_en_demo" / "valid.json").read_text())
    chat = [p["conversations"][-1]["value"] + "\n" + p["chosen"]["value"] for p in pairs]
    return [t[:600] for t in sql[:n_sql] + chat]


def demo_prompts(run: Path) -> list[str]:
    """The demo's held-out questions with its system prompt, in the model's chat template."""
    from steadytune.generation import load_tuned

    prompts = json.loads((ROOT / "steadytune" / "data" / "chatbot" / "prompts.json").read_text())
    tok = load_tuned(run, inference=True).tokenizer
    return [tok.apply_chat_template([{"role": "system", "content": prompts["system"]},
                                     {"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            for q in prompts["held_out"]]


def export_all(run: Path, work: Path, types) -> dict:
    from steadytune.export import export

    seconds = {}
    for quant in ("f16", *types):
        out = work / f"ours-{quant}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        export(run, "gguf", out, quant=quant)
        seconds[quant] = time.perf_counter() - t0
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", help="a run folder of steadytune train")
    p.add_argument("--llama-venv", required=True, help="a venv made by shared/tools/llama-cpp-ref.sh")
    p.add_argument("--work", default=None, help="folder for the exports (default: RUN/bench-gguf-quant)")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--texts", type=int, default=49, help="held-out texts to measure on, spread over the 49 "
                   "(fewer for a larger model on a small machine)")
    p.add_argument("--golden", action="store_true", help="write tests/data/ggml_quants_llama_cpp.npz")
    p.add_argument("--reuse", action="store_true", help="measure the exports already in --work again")
    p.add_argument("--split", action="store_true", help="also run the float32 and least-squares Q8_0 "
                   "files that split the Q8_0 error into weight and activation rounding (needs q8_0)")
    p.add_argument("--llama-side", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.llama_side:
        return llama_side(Path(args.llama_side))
    python = str(Path(args.llama_venv) / "bin" / "python")
    if args.golden:
        return golden(python)
    run = Path(args.run)
    work = Path(args.work) if args.work else run / "bench-gguf-quant"
    work.mkdir(parents=True, exist_ok=True)
    types = [t for t in args.types.split(",") if t]
    if args.split and "q8_0" not in types:
        p.error("--split measures the Q8_0 export: add q8_0 to --types")
    if not args.reuse:
        seconds = export_all(run, work, types)
        texts = held_out_texts()
        texts = [texts[i * len(texts) // args.texts] for i in range(min(args.texts, len(texts)))]
        job = {"types": types, "texts": texts, "prompts": demo_prompts(run), "threads": args.threads,
               "export_seconds": seconds}
        (work / "job.json").write_text(json.dumps(job))
    if args.split:
        job = json.loads((work / "job.json").read_text())
        job["split"] = write_split(work)
        (work / "job.json").write_text(json.dumps(job))
    subprocess.run([python, __file__, "--llama-venv", args.llama_venv, "--llama-side", str(work)], check=True)
    results = json.loads((work / "results.json").read_text())
    for t, row in results["types"].items():
        row.update(same_tensors(work / f"ours-{t}" / "model.gguf", work / f"llama-{t}.gguf"))
    (work / "results.json").write_text(json.dumps(results, indent=1))
    report(results, run)


def q8_0_least_squares(x, steps: int = 16):
    """Q8_0 blocks of x (n, 32) whose scale is searched for the least squared error: from each of
    `steps` trial scales amax/127.4 .. amax/124.4 the codes are rounded, the scale refitted by least
    squares and stored as float16, the codes rounded again against the stored scale; llama.cpp's
    block (d = amax/127, codes rounded against the unrounded d) is the first candidate, so no block
    is worse than llama.cpp's. Returns (blocks (n, 34) uint8, squared error per block)."""
    import numpy as np

    from steadytune.gguf_quantize import quantize

    f32 = np.float32
    blocks = quantize(x, "Q8_0")

    def error(d, q):
        return (((d[:, None] * q.astype(f32)) - x) ** 2).sum(axis=1)

    d = blocks[:, :2].copy().view(np.float16)[:, 0].astype(f32)
    q = blocks[:, 2:].view(np.int8)
    best = error(d, q)
    amax = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(steps):
            trial = np.clip(np.rint(x * ((f32(127.4) - f32(0.2) * f32(k)) / amax)[:, None]), -127, 127)
            fit = ((x * trial).sum(axis=1) / (trial * trial).sum(axis=1)).astype(np.float16).astype(f32)
            again = np.clip(np.rint(x / fit[:, None]), -127, 127).astype(np.int8)
            err = error(fit, again)
            take = (err < best) & (fit > 0) & np.isfinite(fit)
            best = np.where(take, err, best)
            blocks[take, :2] = fit[take].astype(np.float16).reshape(-1, 1).view(np.uint8)
            blocks[take, 2:] = again[take].view(np.uint8)
    return blocks, best


def rewrite_gguf(src: Path, dst: Path, tensors: dict) -> None:
    """src with the tensors named in `tensors` (name -> (numpy array, GGML type name)) replaced:
    the same metadata, tensor order and names (gguf's gguf_new_metadata copy)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    all_f32 = all(t == "F32" for _, t in tensors.values())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.name == "general.file_type" and all_f32 and len(tensors) == len(reader.tensors):
            value = int(gguf.LlamaFileType.ALL_F32)
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    data = []
    for t in reader.tensors:
        array, type_name = tensors.get(t.name, (t.data, t.tensor_type.name))
        raw = gguf.GGMLQuantizationType[type_name]
        writer.add_tensor_info(t.name, array.shape, array.dtype, array.nbytes, raw)
        data.append(array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for array in data:
        writer.write_tensor_data(array)
    writer.close()


def write_split(work: Path) -> dict:
    """--split's files (see the module's docstring) next to the exports; returns {label: [path,
    weight RMSE against the float16 export over the Q8_0 file's Q8_0 tensors]}."""
    import gguf
    import numpy as np

    from steadytune.gguf_quants import dequantize

    def values(t):
        return dequantize(t.data, t.tensor_type.name, tuple(int(n) for n in reversed(t.shape)))

    f16 = {t.name: t for t in gguf.GGUFReader(str(work / "ours-f16" / "model.gguf")).tensors}
    q8 = gguf.GGUFReader(str(work / "ours-q8_0" / "model.gguf")).tensors
    float32 = {t.name: (values(t), "F32") for t in f16.values()}
    deq, lsq, lsq_deq, sq = {}, {}, {}, {"deq-q8_0": 0.0, "lsq-q8_0": 0.0}
    count = 0
    for t in q8:
        if t.tensor_type.name != "Q8_0":
            deq[t.name] = lsq_deq[t.name] = float32[t.name]
            continue
        ref = float32[t.name][0]
        mine = values(t)
        blocks, _ = q8_0_least_squares(ref.reshape(-1, 32))
        again = dequantize(blocks, "Q8_0", ref.shape)
        deq[t.name] = (mine, "F32")
        lsq[t.name] = (blocks.reshape(*ref.shape[:-1], -1), "Q8_0")
        lsq_deq[t.name] = (again, "F32")
        sq["deq-q8_0"] += float(((mine.astype(np.float64) - ref) ** 2).sum())
        sq["lsq-q8_0"] += float(((again.astype(np.float64) - ref) ** 2).sum())
        count += ref.size
    rmse = {k: (v / count) ** 0.5 for k, v in sq.items()}
    out = {}
    for label, tensors, err in (("f32", float32, 0.0), ("deq-q8_0", deq, rmse["deq-q8_0"]),
                                ("lsq-q8_0", lsq, rmse["lsq-q8_0"]), ("deq-lsq-q8_0", lsq_deq, rmse["lsq-q8_0"])):
        path = work / f"split-{label}.gguf"
        src = work / ("ours-f16" if label == "f32" else "ours-q8_0") / "model.gguf"
        rewrite_gguf(src, path, tensors)
        out[label] = [str(path), err]
    out["q8_0"] = [str(work / "ours-q8_0" / "model.gguf"), rmse["deq-q8_0"]]
    return out


def same_tensors(ours: Path, theirs: Path) -> dict:
    """How many of llama.cpp's tensors ours has with the same type, and with the same bytes."""
    import gguf
    import numpy as np

    mine = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    other = gguf.GGUFReader(str(theirs)).tensors
    types = sum(mine[t.name].tensor_type == t.tensor_type for t in other)
    data = sum(np.array_equal(np.asarray(mine[t.name].data).view(np.uint8), np.asarray(t.data).view(np.uint8))
               for t in other)
    return {"same_types": f"{types}/{len(other)}", "same_bytes": f"{data}/{len(other)}"}


def report(r: dict, run: Path) -> None:
    print(f"\n{run}: {r['positions']} positions of held-out text, llama.cpp {r['llama_cpp']}")
    print("| type | KL ours | KL llama.cpp | top-1 ours | top-1 llama.cpp | MB ours | MB llama.cpp "
          "| tensors: same type / same bytes | export s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t, m in r["types"].items():
        print(f"| {t} | {m['kl_ours']:.5f} | {m['kl_llama']:.5f} | {m['top1_ours']:.4f} | {m['top1_llama']:.4f} | "
              f"{m['mb_ours']:.2f} | {m['mb_llama']:.2f} | {m['same_types']} / {m['same_bytes']} | "
              f"{m['export_s']:.1f} |")
    g = r["greedy"]
    print(f"greedy answers, Q8_0 export vs float16 export: {g['q8_0_same']}/{g['n']} prompts token for token "
          f"(llama.cpp's Q8_0: {g['q8_0_llama_same']}/{g['n']}), {g['tokens']} tokens each")
    if "split" in r:
        print("\n--split: | file | weight RMSE | KL | top-1 | greedy same | first different token "
              "(float16 answer's top-2 logit gap there) |")
        print("|---|---|---|---|---|---|")
        for label, m in r["split"].items():
            where = ", ".join("-" if gap is None else f"{i} ({gap})" for i, gap in zip(m["prefix"], m["ref_gap"]))
            print(f"| {label} | {m['rmse']:.3e} | {m['kl']:.5f} | {m['top1']:.4f} | {m['same']}/{g['n']} | {where} |")
        print(f"smallest top-2 logit gap along each float16 answer: {r['ref_smallest_gap']}")


def golden(python: str) -> None:
    """Bytes of llama.cpp's ggml_quantize_chunk for tests/test_export_quant.py's awkward weights."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from test_export_quant import GOLDEN, awkward_weights

    x = awkward_weights(32, 512, seed=1)
    tmp = GOLDEN.with_suffix(".input.npy")
    np.save(tmp, x)
    try:
        out = subprocess.run([python, "-c", _GOLDEN_CODE, str(tmp)], check=True, capture_output=True)
        blocks = {k: np.frombuffer(bytes.fromhex(v), np.uint8).reshape(32, -1)
                  for k, v in json.loads(out.stdout).items()}
    finally:
        tmp.unlink()
    np.savez_compressed(GOLDEN, x=x, **blocks)
    print(f"wrote {GOLDEN}: {', '.join(blocks)}")


_GOLDEN_CODE = f"""
import ctypes, json, os, sys, numpy as np, llama_cpp_py_sync
lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp_py_sync.__file__), "libggml-base.so.0"))
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_row_size.restype = ctypes.c_size_t
x = np.ascontiguousarray(np.load(sys.argv[1]), dtype=np.float32)
out = {{}}
for name, t in {GGML_TYPE!r}.items():
    buf = np.zeros(x.shape[0] * lib.ggml_row_size(t, ctypes.c_int64(x.shape[1])), np.uint8)
    lib.ggml_quantize_chunk(t, x.ctypes.data_as(ctypes.c_void_p), buf.ctypes.data_as(ctypes.c_void_p),
                            ctypes.c_int64(0), ctypes.c_int64(x.shape[0]), ctypes.c_int64(x.shape[1]), None)
    out[name] = buf.tobytes().hex()
print(json.dumps(out))
"""


# --------------------------------------------------------------------------- llama.cpp side (in VENV)

class Runner:
    """One llama.cpp model (optionally with a LoRA adapter): every position's logits, greedy answers."""

    def __init__(self, path: Path, threads: int, lora: Path | None = None):
        from llama_cpp_py_sync import Llama

        self.llm = Llama(str(path), n_ctx=512, n_batch=512, n_threads=threads, verbose=False)
        self.lib, self.ffi = self.llm._lib, self.llm._ffi
        self.n_vocab = self.llm.n_vocab
        if lora is not None:
            adapter = self.lib.llama_adapter_lora_init(self.llm._model, str(lora).encode())
            assert adapter != self.ffi.NULL, f"llama.cpp did not load {lora}"
            adapters = self.ffi.new("struct llama_adapter_lora *[1]", [adapter])
            assert self.lib.llama_set_adapters_lora(self.llm._ctx, adapters, 1, self.ffi.new("float[1]", [1.0])) == 0

    def logits(self, ids: list[int]):
        import numpy as np

        self.llm._clear_context_state()
        batch = self.lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
                batch.seq_id[i][0] = 0
            assert self.lib.llama_decode(self.llm._ctx, batch) == 0
            rows = [np.frombuffer(self.ffi.buffer(self.lib.llama_get_logits_ith(self.llm._ctx, i), 4 * self.n_vocab),
                                  dtype=np.float32).copy() for i in range(len(ids))]
        finally:
            self.lib.llama_batch_free(batch)
        return np.stack(rows)

    def greedy(self, ids: list[int], n: int, gaps: list | None = None) -> list[int]:
        """Up to n tokens, each the most likely, stopping at an end-of-generation token (KV cache);
        each step's lead of the top logit over the runner-up is appended to `gaps` if given."""
        import numpy as np

        self.llm._clear_context_state()
        n_past, out, feed = 0, [], ids
        for _ in range(n):
            n_past = self.llm._eval_tokens(feed, n_past)
            row = np.frombuffer(self.ffi.buffer(self.lib.llama_get_logits_ith(self.llm._ctx, -1), 4 * self.n_vocab),
                                dtype=np.float32)
            nxt = int(row.argmax())
            if gaps is not None:
                top2 = np.partition(row, -2)[-2:]
                gaps.append(float(top2[1] - top2[0]))
            out.append(nxt)
            if self.lib.llama_vocab_is_eog(self.llm._vocab, nxt):
                break
            feed = [nxt]
        return out


def _log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref_logits: list, runner: Runner, seqs: list) -> tuple[float, float]:
    """Mean KL(reference || model) over all positions, and the share of positions with the same argmax."""
    import numpy as np

    kls, same = [], []
    for ref, ids in zip(ref_logits, seqs):
        got = runner.logits(ids)
        lp, lq = _log_softmax(ref), _log_softmax(got)
        kls.append((np.exp(lp) * (lp - lq)).sum(axis=-1))
        same.append(ref.argmax(axis=-1) == got.argmax(axis=-1))
    return float(np.concatenate(kls).mean()), float(np.concatenate(same).mean())


def reference_logits(ref: Runner, seqs: list, path: Path) -> list:
    """The float16 export's logits of every text, kept in a file (5,296 positions of a 152k vocabulary,
    Qwen's, are 3.2 GB) and read back a text at a time by compare()."""
    import numpy as np

    ends = np.cumsum([0] + [len(ids) for ids in seqs])
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(int(ends[-1]), ref.n_vocab))
    for ids, i, j in zip(seqs, ends[:-1], ends[1:]):
        table[i:j] = ref.logits(ids)
    table.flush()
    return [table[i:j] for i, j in zip(ends[:-1], ends[1:])]


def llama_side(work: Path) -> None:
    import llama_cpp_py_sync

    job = json.loads((work / "job.json").read_text())
    threads = job["threads"]
    f16 = work / "ours-f16" / "model.gguf"
    ref = Runner(f16, threads)
    seqs = [ref.llm.tokenize(t, add_special=True)[:128] for t in job["texts"]]
    ref_logits = reference_logits(ref, seqs, work / "ref-logits.npy")
    prompts = [ref.llm.tokenize(p, add_special=True, parse_special=True) for p in job["prompts"]]
    n_new = 48
    ref_gaps = [[] for _ in prompts]
    ref_answers = [ref.greedy(ids, n_new, gaps) for ids, gaps in zip(prompts, ref_gaps)]
    lib, ffi = ref.lib, ref.ffi
    results = {"positions": sum(map(len, seqs)), "types": {}, "llama_cpp": llama_cpp_py_sync.__version__}
    answers = {}
    for t in job["types"]:
        theirs = work / f"llama-{t}.gguf"
        params = lib.llama_model_quantize_default_params()
        params.ftype, params.nthread = FTYPE[t], threads
        pp = ffi.new("llama_model_quantize_params *", params)
        assert lib.llama_model_quantize(str(f16).encode(), str(theirs).encode(), pp) == 0
        ours = work / f"ours-{t}" / "model.gguf"
        row = {"export_s": job["export_seconds"][t]}
        for who, path in (("ours", ours), ("llama", theirs)):
            runner = Runner(path, threads)
            if t not in job.get("greedy_only", ()):  # --reuse of a run cut short: only what is missing
                row[f"kl_{who}"], row[f"top1_{who}"] = compare(ref_logits, runner, seqs)
            row[f"mb_{who}"] = path.stat().st_size / 1e6
            if t == "q8_0":
                answers[who] = [runner.greedy(ids, n_new) for ids in prompts]
            del runner
        results["types"][t] = row
        print(t, row, flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=1))
    print("greedy", [a == b for a, b in zip(answers.get("ours", []), ref_answers)], flush=True)
    results["greedy"] = {"n": len(prompts), "tokens": n_new,
                         "q8_0_same": sum(a == b for a, b in zip(answers.get("ours", []), ref_answers)),
                         "q8_0_llama_same": sum(a == b for a, b in zip(answers.get("llama", []), ref_answers))}
    (work / "results.json").write_text(json.dumps(results, indent=1))
    if job.get("split"):
        results["split"] = {}
        results["ref_smallest_gap"] = [round(min(g), 3) for g in ref_gaps]
    for label, (path, rmse) in job.get("split", {}).items():
        runner = Runner(Path(path), threads)
        kl, top1 = compare(ref_logits, runner, seqs)
        got = [runner.greedy(ids, n_new) for ids in prompts]
        del runner
        prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                  for x, y in zip(got, ref_answers)]
        # how close the float16 answer was to a tie where this one left it (None: same answer)
        gap = [None if a == b else round(g[i], 3) if i < len(g) else None
               for a, b, g, i in zip(got, ref_answers, ref_gaps, prefix)]
        results["split"][label] = {"rmse": rmse, "kl": kl, "top1": top1, "prefix": prefix, "ref_gap": gap,
                                   "same": sum(a == b for a, b in zip(got, ref_answers))}
        print(label, results["split"][label], flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=1))
    (work / "ref-logits.npy").unlink()  # 1-3 GB, made again by the next measurement


if __name__ == "__main__":
    main()
