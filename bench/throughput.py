"""Training throughput: steadytune's step against mlx-lm's, same model, data and settings, one process.

    python bench/throughput.py synthetic            # GPU: Mistral-7B shape, batch 4x1024 (+ ckpt, 1x2048)
    python bench/throughput.py real                 # GPU: `steadytune train` vs mlx-lm's trainer on
                                                    #      ../shared/data (wikisql, alpaca)
    python bench/throughput.py cpu                  # CPU: 4 layers, hidden 256, vocab 32000, batch 2x128
    python bench/throughput.py cpulayout --steps 8  # CPU: the default model, default layout vs --pack false
                                                    #      on chatbot and alpaca chat, interleaved
    python bench/throughput.py kernels --attention  # GPU: dequantize / matmul / attention micro-timings
    python bench/throughput.py profile              # where a steadytune step's time goes (host and GPU)
    python bench/throughput.py synthetic --ab "..." # variants of the step timed in turns (parse_ab)
    python bench/throughput.py kernelmix            # one step for Nsight Compute (run_kernelmix)

Model: random init (weights don't change speed), base quantized 4-bit g64 (embedding and output layer
too, as in the anchor bench), LoRA rank 16, scale 2 on q,k,v,o,gate,up,down of every layer, AdamW.
mlx-lm's step is the anchor's (reference/anchor-bench/bench_mlx.py): mlx_lm.tuner.trainer's loss in
a step compiled like mlx_lm.tuner.train's. steadytune's step is the Trainer's own train_step (its
compiled grad/norm/update functions, pad_batch, clipping and token weighting) on the same base
weights. tokens/s = batch tokens / median step time of steps 3+; peak = mx.get_peak_memory() over
the timed steps (the base weights included, model construction excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import steadytune  # noqa: E402  (fast BLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

SIZES = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000),
}
RANK, SCALE, LR = 16, 2.0, 1e-5


def model_args(size: str) -> llama.ModelArgs:
    return llama.ModelArgs(model_type="mistral", rms_norm_eps=1e-5, rope_theta=1e6,
                           tie_word_embeddings=False, **SIZES[size])


def build_base(size: str, dtype) -> list:
    """Random base weights, quantized 4-bit g64 like the anchor (every Linear and the embedding)."""
    mx.random.seed(0)
    model = llama.Model(model_args(size))
    model.set_dtype(dtype)
    nn.quantize(model, group_size=64, bits=4)
    for layer in model.layers:  # layer by layer: never the whole float model at once
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return tree_flatten(model.parameters())


def fresh_model(size: str, weights: list) -> nn.Module:
    """A model sharing `weights` (no copy): the random init of the skeleton is never evaluated."""
    model = llama.Model(model_args(size))
    nn.quantize(model, group_size=64, bits=4)
    model.load_weights(weights)
    model.freeze()
    return model


def reset_memory():
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()


def summary(name, times, tokens, extra=None) -> dict:
    steady = times[2:] if len(times) > 3 else times
    med = statistics.median(steady)
    row = {"run": name, "median_s": round(med, 4), "tok_s": round(tokens / med, 1),
           "peak_gb": round(mx.get_peak_memory() / 1e9, 2), "steps": len(times)}
    row.update(extra or {})
    print(json.dumps(row), flush=True)
    return row


# --- one step of each trainer on a fixed batch ----------------------------------------------


def mlx_lm_steps(size, weights, batch, seq, ckpt, steps, seed=0) -> dict:
    """The anchor's mlx-lm step (bench_mlx.py), on the shared base weights."""
    from functools import partial

    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = fresh_model(size, weights)
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": SCALE, "dropout": 0.0})
    block_call = type(model.layers[0]).__call__
    if ckpt:
        grad_checkpoint(model.layers[0])  # patches the block class: undone below
    opt = optim.AdamW(learning_rate=LR)
    lvg = nn.value_and_grad(model, default_loss)
    state = [model.state, opt.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(b, lengths):
        (loss, ntok), g = lvg(model, b, lengths)
        opt.update(model, g)
        return loss, ntok

    model.train()
    vocab = SIZES[size]["vocab_size"]
    tokens = mx.array(np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)), dtype=mx.int32)
    lengths = mx.array([[0, seq + 1]] * batch)
    reset_memory()
    times = []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            loss, ntok = step(tokens, lengths)
            mx.eval(state, loss, ntok)
            times.append(time.perf_counter() - t)
    finally:
        type(model.layers[0]).__call__ = block_call
    return summary(f"mlx-lm {batch}x{seq}{' ckpt' if ckpt else ''}", times, batch * seq,
                   {"loss": round(loss.item(), 4)})


def steadytune_trainer(size, weights, batch, ckpt, compute="auto", kernel=None, flat=True, fused_lora=True,
                       fused_swiglu=True, **training):
    """A steadytune Step on the shared base weights, set up as setup.setup() does (LoRA, compute
    options, optimizer), without a model folder or data files: set `.examples` (a data.Tokenized)
    before stepping. The A/B options (flat update, fused adapter, fused SwiGLU, kernel) are its
    arguments. Returns the Step, with `.compute` (qlora.apply_compute's answer) attached."""
    from steadytune.config import Config
    from steadytune.data import Tokenized
    from steadytune.model import apply_lora
    from steadytune.setup import apply_compute_options
    from steadytune.step import Step

    cfg = Config()
    cfg.lora.rank, cfg.lora.alpha = RANK, SCALE * RANK
    cfg.model.compute = compute
    cfg.training.batch_size, cfg.training.grad_checkpoint = batch, ckpt
    cfg.training.learning_rate = LR
    for k, v in training.items():
        setattr(cfg.training, k, v)
    cfg.validate()
    model = fresh_model(size, weights)
    apply_lora(model, cfg.lora, 0)
    c, mask_dtype, _ = apply_compute_options(model, cfg, kernel=kernel, fused_lora=fused_lora,
                                          fused_swiglu=fused_swiglu)
    opt = optim.AdamW(learning_rate=LR, weight_decay=cfg.training.weight_decay)
    opt.init(model.trainable_parameters())
    step = Step(model, opt, Tokenized([], []), max_grad_norm=cfg.training.max_grad_norm,
                ce_chunk=c["ce_chunk"], mask_dtype=mask_dtype, flat=flat)
    step.compute = c
    return step


def steadytune_steps(size, weights, batch, seq, ckpt, steps, compute="auto", kernel=None, seed=0,
                     packed=False, lora_unfused=False) -> dict:
    """`steps` optimizer steps of steadytune's Step on `batch` rows of `seq` random tokens;
    `packed`: each row holds examples of random lengths (16 to seq / 2 tokens) that fill it
    exactly. lora_unfused: the A/B option fused_lora=False."""
    from steadytune.data import Tokenized

    tr = steadytune_trainer(size, weights, batch, ckpt, compute, kernel, fused_lora=not lora_unfused,
                            pack=packed)
    vocab = SIZES[size]["vocab_size"]
    rng = np.random.default_rng(seed)
    if packed:
        ids, rows = [], []
        for _ in range(batch):
            rows.append([])
            for n in filling(rng, seq, 16):
                rows[-1].append(len(ids))
                ids.append(rng.integers(0, vocab, n + 1).tolist())  # n + 1 tokens: n inputs
        tr.pack_target, micro = seq, [i for row in rows for i in row]  # laid out in rows of ~seq
    else:
        ids, micro = rng.integers(0, vocab, (batch, seq + 1)).tolist(), list(range(batch))
    tr.examples = Tokenized(ids, [[True] * len(x) for x in ids])
    reset_memory()
    times = []
    for i in range(steps):
        t = time.perf_counter()
        loss = tr([micro], LR, i).loss
        times.append(time.perf_counter() - t)
    c = tr.compute
    return summary(f"steadytune {batch}x{seq}{' packed' if packed else ''}{' ckpt' if ckpt else ''}"
                   f"{' lora unfused' if lora_unfused else ''} ({c['mode']}"
                   f"{'/' + c['kernel'] if c.get('kernel') else ''})", times, batch * seq,
                   {"loss": round(loss, 4)})


FLAG_TOKENS = {"swiglu": "fused_swiglu", "fusedlora": "fused_lora", "flat": "flat"}


def parse_ab(spec: str) -> list[dict]:
    """"base=cuda:1,-swiglu,-flat;new=cuda" -> [{"name", "kernel", "flags"}]: +/-swiglu,
    +/-fusedlora and +/-flat turn the Step's options fused_swiglu, fused_lora and flat on or off;
    other tokens name the dequantization kernel ("cuda:N": N packed words per thread)."""
    out = []
    for item in filter(None, spec.split(";")):
        name, _, toks = item.partition("=")
        v = {"name": name, "kernel": None, "flags": {}}
        for t in filter(None, toks.split(",")):
            if t[0] in "+-" and t[1:] in FLAG_TOKENS:
                v["flags"][FLAG_TOKENS[t[1:]]] = t[0] == "+"
            else:
                v["kernel"] = t
        out.append(v)
    return out


def interleaved(size, weights, batch, seq, ckpt, steps, variants, pipelined=0) -> list:
    """Variants of steadytune's step (parse_ab) timed in turns, one step of each per round, in one
    process: a slow phase of the card (clocks, other tenants) then hits every variant alike, where
    runs one after another measured up to 10% apart on one card. Median of rounds 3+. With
    `pipelined`, each variant then also runs that many steps without waiting for each (no .item()
    between steps: the host queues step k+1 while the GPU runs step k)."""
    from steadytune.data import Tokenized

    vocab = SIZES[size]["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, (batch, seq + 1)).tolist()
    micro = list(range(batch))
    runs = []
    for v in variants:
        tr = steadytune_trainer(size, weights, batch, ckpt, "auto", v["kernel"], **v["flags"])
        tr.examples = Tokenized(ids, [[True] * len(x) for x in ids])
        runs.append({"v": v, "tr": tr, "times": [], "peak": 0.0})
    for i in range(steps):
        for r in runs:
            reset_memory()
            t = time.perf_counter()
            r["loss"] = r["tr"]([micro], LR, i).loss
            r["times"].append(time.perf_counter() - t)
            r["peak"] = max(r["peak"], mx.get_peak_memory() / 1e9)
    rows = []
    for r in runs:
        med = statistics.median(r["times"][2:])
        c = r["tr"].compute
        row = {"run": f"steadytune {batch}x{seq}{' ckpt' if ckpt else ''} [{r['v']['name']}] "
                      f"({c['mode']}/{c.get('kernel')})",
               "median_s": round(med, 4), "tok_s": round(batch * seq / med, 1),
               "peak_gb": round(r["peak"], 2), "steps": steps, "loss": round(r["loss"], 4),
               "times": [round(x, 4) for x in r["times"]]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    for r, row in zip(runs, rows) if pipelined else []:  # last: it may run out of memory
        try:
            row.update(pipelined_rate(r["tr"], micro, pipelined))
            row["pipelined_tok_s"] = round(batch * seq / row["pipelined_s"], 1)
        except Exception as e:  # noqa: BLE001  (a benchmark reports and goes on)
            row["pipelined"] = f"failed: {e!r}"
        reset_memory()
        print(json.dumps({k: row[k] for k in row if k.startswith(("run", "pipelined", "host"))}), flush=True)
    return rows


def pipelined_rate(step, micro, steps) -> dict:
    """Steps of the Step's fused compiled call queued back to back (mx.async_eval, one wait at
    the end), against its host time: how long queuing one step keeps Python and MLX busy."""
    scale, _ = step.begin_group([micro])
    b = step.batches([micro])[0]
    lr, max_norm = mx.array(LR, dtype=mx.float32), mx.array(1.0, dtype=mx.float32)
    mx.synchronize()
    reset_memory()
    host, outs = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        h = time.perf_counter()
        total, norm = step.grad_apply(b.inputs, b.targets, b.mask, b.segments, scale, None, mx.array(0.0),
                                      lr, max_norm)
        mx.async_eval(step.state, total, norm)
        host.append(time.perf_counter() - h)
        outs.append(total)
    mx.eval(outs)
    mx.synchronize()
    return {"pipelined_s": round((time.perf_counter() - t0) / steps, 4),
            "host_queue_s": round(statistics.median(host), 4),
            "pipelined_peak_gb": round(mx.get_peak_memory() / 1e9, 2)}


def filling(rng, width: int, shortest: int) -> list[int]:
    """Random lengths from `shortest` to width / 2 that add up to `width` (the examples of a full
    packed row)."""
    lengths, left = [], width
    while left:
        lengths.append(min(left, int(rng.integers(shortest, width // 2 + 1))))
        left -= lengths[-1]
    return lengths


def compare(size, weights, settings, steps, variants, variants_on=None, skip_mlx_lm=False,
            ab_lora=False) -> list:
    """Rows for each (batch, seq, ckpt): steadytune (auto, then `variants` where `variants_on`
    allows) and mlx-lm, with steadytune/mlx-lm throughput ratios. A failing run prints its error
    and the others go on."""
    rows = []
    for batch, seq, ckpt, *packed in settings:
        ours = []
        extra = variants if variants_on is None or (batch, seq, ckpt) in variants_on else []
        runs = ([("auto", None, {"lora_unfused": True})] if ab_lora else []) + [("auto", None, {})] \
            + [(c, k, {}) for c, k in extra]
        for compute, kernel, switch in runs:
            try:
                ours.append(steadytune_steps(size, weights, batch, seq, ckpt, steps, compute, kernel,
                                             packed=bool(packed), **switch))
            except Exception as e:  # noqa: BLE001  (a benchmark reports and goes on)
                print(f"steadytune {batch}x{seq} {compute}/{kernel} failed: {e!r}", flush=True)
            reset_memory()
        if skip_mlx_lm or packed:
            rows += ours
            continue
        ref = mlx_lm_steps(size, weights, batch, seq, ckpt, steps)
        reset_memory()
        for r in ours:
            r["ratio"] = round(r["tok_s"] / ref["tok_s"], 2)
        rows += ours + [ref]
    return rows


def table(rows, cols=("run", "tok_s", "peak_gb", "ratio", "median_s", "loss")) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def environment() -> str:
    import platform

    import mlx_lm

    from steadytune.backend import device_kind, fast_blas

    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = info.get("device_name") or info.get("architecture") or platform.processor()
    return (f"{time.strftime('%Y-%m-%d')}, {device_kind()} ({name}), mlx {mx.__version__}, "
            f"mlx-lm {mlx_lm.__version__}, python {platform.python_version()}, "
            f"fast BLAS: {fast_blas() or 'none'}")


# --- settings -------------------------------------------------------------------------------


def run_synthetic(a):
    weights = build_base(a.size, mx.bfloat16)
    if a.ab:
        rows = []
        for name in a.only.split(","):
            b, rest = name.split("x")
            rows += interleaved(a.size, weights, int(b), int(rest.rstrip("c")), rest.endswith("c"),
                                a.steps, parse_ab(a.ab), a.pipelined)
            reset_memory()
        return rows
    settings = [(4, 1024, False), (4, 1024, True), (1, 2048, False)]
    if a.only:
        # only on request: a step of fixed costs, and packed rows (4 x 1024 of several examples each)
        settings += [(1, 128, False), (4, 1024, False, True), (16, 256, False, True)]
        settings = [s for s in settings if f"{s[0]}x{s[1]}{'c' if s[2] else ''}{'p' if s[3:] else ''}"
                    in a.only.split(",")]
    variants = [("dequant", k) for k in a.kernels.split(",") if k]
    return compare(a.size, weights, settings, a.steps, variants, [settings[0]], a.skip_mlx_lm, a.ab_lora)


def run_cpu(a):
    weights = build_base("tiny", mx.float32)
    return compare("tiny", weights, [(2, 128, False)], a.steps, [("native", None)])


LAYOUT_DATA = {"alpaca": None, "chatbot": ROOT / "steadytune" / "data" / "chatbot"}  # None: the alpaca split


def run_cpulayout(a):
    """CPU: the default model's training call on the same steps' examples laid out as the
    default lays them out (batching.call_layout), as `--pack false` does (one example a row) and,
    with `--layouts ...,packed`, every call packed, interleaved in one process so all see the
    same load. Each step's examples (plan_epoch: the default composition, 4 mixed examples) run
    as gradients through steadytune's own Step, twice per layout, the layouts' order reversed
    every step: the first call includes the compile of a shape new to that layout (as in
    training), the second is warm (steady). Nothing is updated, so every call sees the same
    weights. MLX's cache is limited from the memory plan, as `steadytune train` does."""
    from functools import partial

    from time_to_result import chat_split

    from steadytune.batching import plan_epoch
    from steadytune.config import Config
    from steadytune.model import apply_lora, load_base, resolve_source
    from steadytune.objectives import objective_of
    from steadytune.setup import apply_compute_options
    from steadytune.step import Step

    rows = []
    for name in a.layout_data.split(","):
        folder = LAYOUT_DATA[name] or chat_split(Path(a.data) / "alpaca_en_demo.json",
                                                 Path(tempfile.mkdtemp()) / "alpaca")
        cfg = Config()
        cfg.data.path = str(folder)
        cfg.validate()
        obj, source = objective_of("sft"), resolve_source(cfg.model.path)
        loaded = load_base(cfg.model, source)
        train = obj.tokenize(cfg, obj.read(cfg), loaded.tokenizer)[0]
        obj.check_memory(cfg, source, train.lengths().tolist())  # the plan's cache limit, as training sets it
        apply_lora(loaded.model, cfg.lora, 0)
        c, mask_dtype, pack_target = apply_compute_options(loaded.model, cfg, obj)
        opt = optim.AdamW(learning_rate=LR)
        opt.init(loaded.model.trainable_parameters())
        make = partial(Step, loaded.model, opt, train, ce_chunk=c["ce_chunk"], mask_dtype=mask_dtype)
        layouts = {"default": make(pack_target=pack_target), "nopack": make(pack_target=0),
                   "packed": make(pack_target=pack_target, pair=0.0)}  # every call packed (the GPU's rule)
        layouts = {k: layouts[k] for k in a.layouts.split(",")}
        if a.calibrate:
            rows.append(pair_fit(layouts["nopack"], train))
        t = cfg.training
        steps = plan_epoch(train.lengths(), t.batch_size, t.batch_tokens, t.grad_accumulation, t.seed, 0,
                           cfg.data.group_by_length)[:a.steps]
        calls = {k: [] for k in layouts}  # (first s, warm s, real tokens, rows, width)
        for i, micro in enumerate(steps):
            order = list(layouts) if i % 2 == 0 else list(layouts)[::-1]
            times = {k: [] for k in layouts}
            for _ in range(2):
                for k in order:
                    tic = time.perf_counter()
                    real = layouts[k].gradients(micro, i)[3]
                    times[k].append(time.perf_counter() - tic)
            for k, step in layouts.items():
                (b, w), = {tuple(x.inputs.shape) for x in step.batches(micro)}  # one call a step
                calls[k].append((*times[k], real, b, w))
            print(f"{name} step {i}: " + ", ".join(f"{k} {calls[k][-1][3]}x{calls[k][-1][4]} "
                                                  f"{times[k][0]:.2f}/{times[k][1]:.2f} s"
                                                  for k in layouts), flush=True)
        rows += layout_rows(name, calls) if steps else []
        del layouts, loaded
        reset_memory()
    return rows


def pair_fit(step, data, rounds: int = 4, shapes=((4, 128), (2, 256), (1, 512), (2, 128), (1, 256), (1, 384))) -> dict:
    """A query-key pair's cost in positions, from warm calls of fixed shapes one example a row
    (the CPU's unfused attention scores every row's width^2, causal or not): rows x width of the
    data's own tokens, each shape compiled, then timed once a round for `rounds` rounds (a load
    spike hits one round, not one shape), the fastest kept, fitted as
    seconds = k + c x positions + a x rows x width^2; returns a / c (batching.pair_cost's
    measured counterpart) with the times."""
    from steadytune.data import Tokenized

    tokens = [t for x in data.ids for t in x]
    sets = {(b, w): Tokenized([tokens[i * (w + 1):(i + 1) * (w + 1)] for i in range(b)], [[True] * (w + 1)] * b)
            for b, w in shapes}
    best = dict.fromkeys(sets, float("inf"))
    for r in range(rounds + 1):  # round 0 compiles
        for (b, w), examples in sets.items():
            step.examples = examples
            tic = time.perf_counter()
            step.gradients([list(range(b))])
            if r:
                best[(b, w)] = min(best[(b, w)], time.perf_counter() - tic)
    step.examples = data
    k, c, att = np.linalg.lstsq(np.array([[1, b * w, b * w * w] for b, w in best], dtype=float),
                                np.array(list(best.values())), rcond=None)[0]
    return {"run": "pair cost fit: " + ", ".join(f"{b}x{w} {t:.2f} s" for (b, w), t in best.items()),
            "pair_cost": f"{att / c:.2e}"}


def layout_rows(name: str, calls: dict) -> list[dict]:
    """Table rows of run_cpulayout: per layout, all calls (compiles included) and warm calls, as
    seconds and real tokens/s, with the speed ratio to `nopack`; plus the positions computed and
    the attention work (rows x width^2) against nopack's, and a least-squares fit of the warm
    calls' seconds to positions and attention work (the cost of a query-key pair in positions).
    ratio_median: the median over steps of the step's warm speed ratio (robust to a load spike
    that hits one call)."""
    out, base = [], calls["nopack"]
    tokens = sum(x[2] for x in base)
    for k, cs in calls.items():
        cold, warm = sum(x[0] for x in cs), sum(x[1] for x in cs)
        out.append({"run": f"{name}: {k}", "steps": len(cs), "all_s": round(cold, 2),
                    "tok_s_all": round(tokens / cold, 1), "steady_s": round(warm, 2),
                    "tok_s_steady": round(tokens / warm, 1),
                    "ratio_all": round(sum(x[0] for x in base) / cold, 3),
                    "ratio_steady": round(sum(x[1] for x in base) / warm, 3),
                    "ratio_median": round(statistics.median(b[1] / x[1] for b, x in zip(base, cs)), 3),
                    "positions": round(sum(x[3] * x[4] for x in cs) / tokens, 3),
                    "attention": round(sum(x[3] * x[4] ** 2 for x in cs) / sum(x[3] * x[4] ** 2 for x in base), 2),
                    "shapes": len({x[3:5] for x in cs})})
    every = [x for cs in calls.values() for x in cs]
    fit = np.linalg.lstsq(np.array([[1, x[3] * x[4], x[3] * x[4] ** 2] for x in every], dtype=float),
                          np.array([x[1] for x in every]), rcond=None)[0]
    out[0]["pair_cost"] = f"{fit[2] / fit[1]:.2e}" if fit[1] > 0 else "n/a"  # warm s ~ k + c pos + a pairs: a / c
    return out


def run_profile(a):
    """Where a step's time goes: the backward alone (steadytune's compiled grad), the update alone
    (compiled norm + clip + AdamW), and the fused step train_step runs (both in one compiled call);
    host CPU time per step (close to the wall time = bound by dispatching kernels, not by the GPU);
    a tiny batch whose step is all overhead. Environment variables such as
    MLX_MAX_OPS_PER_BUFFER can be compared by running this once per setting."""
    from steadytune.batching import pad_batch

    weights = build_base(a.size, mx.bfloat16)
    vocab = SIZES[a.size]["vocab_size"]
    rows = []
    runs = [(4, 1024, "off"), (4, 1024, "on"), (1, 128, "off")]
    for batch, seq, chunk in runs[::2] if a.quick else runs:
        tr = steadytune_trainer(a.size, weights, batch, False, chunked_ce=chunk)
        ids = np.random.default_rng(0).integers(0, vocab, (batch, seq + 1)).tolist()
        inputs, targets, mask = (mx.array(x) for x in pad_batch(ids, [[True] * (seq + 1)] * batch))
        scale, lr, max_norm = mx.array(1.0 / (batch * seq)), mx.array(LR), mx.array(1.0)
        reset_memory()
        parts = {"grad": [], "update": [], "fused": [], "cpu": [], "wall": [], "grad_host": [],
                 "update_host": [], "fused_host": []}

        def host(f):
            """(host seconds to queue f's outputs, wall seconds until they are computed)"""
            mx.synchronize()
            t0 = time.perf_counter()
            out = f()
            mx.async_eval(out)
            t1 = time.perf_counter()
            mx.eval(out)
            mx.synchronize()
            return t1 - t0, time.perf_counter() - t0, out

        for _ in range(a.steps):
            h, w, (total, acc) = host(lambda: tr.grad(inputs, targets, mask, None, scale, None))
            parts["grad_host"].append(h)
            parts["grad"].append(w)
            h, w, _ = host(lambda: [tr.update(acc, total, lr, max_norm), tr.state])
            parts["update_host"].append(h)
            parts["update"].append(w)
            del acc
            c0 = time.process_time()
            h, w, _ = host(lambda: [tr.grad_apply(inputs, targets, mask, None, scale, None, mx.array(0.0),
                                                  lr, max_norm), tr.state])
            parts["fused_host"].append(h)
            parts["fused"].append(w)
            parts["cpu"].append(time.process_time() - c0)
            parts["wall"].append(w)
        row = {"run": f"steadytune parts {batch}x{seq} chunked_ce={chunk}",
               "peak_gb": round(mx.get_peak_memory() / 1e9, 2)}
        row.update({k: round(statistics.median(v[2:]) * 1e3, 1) for k, v in parts.items()})
        row["tok_s"] = round(batch * seq / statistics.median(parts["wall"][2:]), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del tr
        reset_memory()
    if a.with_mlx_lm:
        rows.append(mlx_lm_steps(a.size, weights, 1, 128, False, a.steps))
    print(table(rows, ("run", "wall", "cpu", "grad", "grad_host", "update", "update_host", "fused",
                       "fused_host", "tok_s", "peak_gb")))
    return rows


def run_kernelmix(a):
    """One steadytune step (4x1024, or 4x1024 checkpointed with --only 4x1024c) between
    cuProfilerStart/Stop, after warm-up steps, for Nsight Compute:

        ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
            --csv --page raw --log-file mix.csv python3 bench/throughput.py kernelmix
        python3 bench/throughput.py kernelmix --summarize mix.csv

    ncu runs the kernels one at a time: the sum is the GPU's busy time without overlap."""
    import ctypes

    if a.summarize:
        return summarize_kernelmix(Path(a.summarize))
    ckpt = a.only == "4x1024c"
    weights = build_base(a.size, mx.bfloat16)
    from steadytune.data import Tokenized

    tr = steadytune_trainer(a.size, weights, 4, ckpt)
    ids = np.random.default_rng(0).integers(0, SIZES[a.size]["vocab_size"], (4, 1025)).tolist()
    tr.examples = Tokenized(ids, [[True] * len(x) for x in ids])
    for i in range(3):
        tr([list(range(4))], LR, i)
    mx.synchronize()
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuProfilerStart()
    tr([list(range(4))], LR, 3)
    mx.synchronize()
    cuda.cuProfilerStop()
    return []


def kernel_group(name: str) -> str:
    low = name.lower()
    for key, words in [("matmul (cuBLAS)", ("gemm", "nvjet", "xmma", "cutlass")),
                       ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa", "attention")),
                       ("dequantize", ("steadytune_dequantize",)),
                       ("rms_norm", ("rms",)), ("rope", ("rope",)),
                       ("cross-entropy / softmax / logsumexp", ("cross_entropy", "softmax", "logsumexp")),
                       ("reductions", ("reduce", "all_reduce", "row_reduce", "col_reduce")),
                       ("fused elementwise (compiled)", ("compiled", "fused")),
                       ("copies", ("copy",)), ("binary / unary", ("binary", "unary", "ternary"))]:
        if any(w in low for w in words):
            return key
    return "other"


def summarize_kernelmix(path: Path) -> list:
    import csv

    lines = path.read_text().splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith('"ID"'))
    reader = csv.DictReader(lines[start:])
    col = next(c for c in reader.fieldnames if c.startswith("gpu__time_duration"))
    per_name, units = {}, None
    for r in reader:
        v = r[col].replace(",", "")
        try:
            t = float(v)
        except ValueError:
            units = units or v
            continue
        n, total = per_name.get(r["Kernel Name"], (0, 0.0))
        per_name[r["Kernel Name"]] = (n + 1, total + t)
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(units, 1e-6)
    groups = {}
    for name, (n, t) in per_name.items():
        g = groups.setdefault(kernel_group(name), [0, 0.0])
        g[0] += n
        g[1] += t * scale
    total = sum(t for _, t in groups.values())
    rows = [{"run": k, "launches": n, "ms": round(t, 2), "share": f"{100 * t / total:.1f}%"}
            for k, (n, t) in sorted(groups.items(), key=lambda kv: -kv[1][1])]
    rows.append({"run": "total (GPU busy, no overlap)", "launches": sum(n for n, _ in groups.values()),
                 "ms": round(total, 2)})
    print(table(rows, ("run", "launches", "ms", "share")))
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:40]
    print(table([{"run": name[:110], "launches": n, "ms": round(t * scale, 3)} for name, (n, t) in top],
                ("run", "launches", "ms")))
    return rows


def bench(f, n=10):
    mx.eval(f())
    mx.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(f())
    mx.synchronize()
    return (time.perf_counter() - t) / n


def run_kernels(a):
    """Micro-timings behind the choices in qlora.py and batching.py (M=4096 tokens, 7B shapes)."""
    from steadytune.qlora import dequantize_elementwise

    rows = []
    M, K, N = (4096 if a.size == "7b" else 256), SIZES[a.size]["hidden_size"], SIZES[a.size]["intermediate_size"]
    x = mx.random.normal((M, K)).astype(mx.bfloat16)
    w = (mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    mx.eval(x, w, wq, s, b)
    ew = mx.compile(lambda wq, s, b: dequantize_elementwise(wq, s, b, 64, 4))
    ew_mm = mx.compile(lambda x, wq, s, b: x @ dequantize_elementwise(wq, s, b, 64, 4).T)
    ref = mx.dequantize(wq, s, b, 64, 4)
    cases = [
        ("bf16 x @ W.T", lambda: x @ w.T, 2 * M * K * N),
        ("quantized_matmul", lambda: mx.quantized_matmul(x, wq, s, b, True, 64, 4), 2 * M * K * N),
        ("mx.dequantize", lambda: mx.dequantize(wq, s, b, 64, 4), 0),
        ("elementwise dequantize (compiled)", lambda: ew(wq, s, b), 0),
        ("mx.dequantize + matmul", lambda: x @ mx.dequantize(wq, s, b, 64, 4).T, 2 * M * K * N),
        ("elementwise dequantize + matmul", lambda: ew_mm(x, wq, s, b), 2 * M * K * N),
    ]
    if mx.default_device() == mx.gpu and sys.platform != "darwin":
        from steadytune.qlora import dequantize_cuda

        try:
            err = mx.abs(dequantize_cuda(wq, s, b, 64, 4).astype(mx.float32) - ref.astype(mx.float32)).max()
            print(f"cuda dequantize: max |difference| to mx.dequantize = {err.item()}", flush=True)
            cases += [("cuda dequantize", lambda: dequantize_cuda(wq, s, b, 64, 4), 0),
                      ("cuda dequantize + matmul", lambda: x @ dequantize_cuda(wq, s, b, 64, 4).T,
                       2 * M * K * N)]
        except Exception as e:  # noqa: BLE001
            print(f"cuda dequantize failed: {e!r}", flush=True)
    for name, f, flops in cases:
        t = bench(f)
        gbps = (wq.nbytes + s.nbytes + b.nbytes + w.nbytes) / t / 1e9
        rows.append({"run": name, "ms": round(t * 1e3, 3),
                     "TFLOP/s": round(flops / t / 1e12, 1) if flops else "",
                     "GB/s": "" if flops else round(gbps)})
    if mx.default_device() == mx.gpu and sys.platform != "darwin":
        rows += dequant_variant_rows(M, K, N)
        rows += swiglu_rows(M, N)
        rows += torch_matmul_rows(M, K, N)
    for B, T in [(4, 480), (4, 512), (4, 992), (4, 1024), (2, 2016), (2, 2048)] if a.attention else []:
        q = mx.random.normal((B, 32, T, 128)).astype(mx.bfloat16)
        k = mx.random.normal((B, 8, T, 128)).astype(mx.bfloat16)
        v = mx.random.normal((B, 8, T, 128)).astype(mx.bfloat16)
        mx.eval(q, k, v)

        def loss(q, k, v):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088, mask="causal").astype(
                mx.float32).sum()

        g = mx.compile(mx.grad(loss, argnums=(0, 1, 2)))
        t = bench(lambda: g(q, k, v), 5)
        rows.append({"run": f"attention fwd+bwd B={B} T={T} (per layer)", "ms": round(t * 1e3, 3)})
    for B, T in [(32, 128), (16, 256), (8, 512), (4, 1024)] if a.attention else []:
        rows += attention_packed_rows(B, T)
    print(table(rows, ("run", "ms", "TFLOP/s", "GB/s", "max_err", "peak_gb")))
    return rows


def dequant_variant_rows(M, K, N, reps=24) -> list:
    """The CUDA dequantization kernel with 1 to 8 words per thread (qlora.dequantize_cuda), each
    checked bit for bit against mx.dequantize on fresh random weights and timed as `reps` launches
    on `reps` different weights per evaluation (the step's situation: each weight read once; one launch
    per evaluation would time MLX's dispatch, not the kernel)."""
    from steadytune.qlora import dequantize_cuda

    ws = [mx.quantize((mx.random.normal((N, K)) * 0.02).astype(mx.bfloat16), group_size=64, bits=4)
          for _ in range(reps)]
    mx.eval(ws)
    nbytes = sum(q.nbytes + s.nbytes + b.nbytes for q, s, b in ws) + reps * N * K * 2
    rows = []
    for wpt in (1, 2, 4, 8):
        q, s, b = ws[-1]
        try:
            same = mx.array_equal(dequantize_cuda(q, s, b, 64, 4, wpt), mx.dequantize(q, s, b, 64, 4)).item()
            t = bench(lambda: [dequantize_cuda(q, s, b, 64, 4, wpt) for q, s, b in ws], 5) / reps
        except Exception as e:  # noqa: BLE001  (a benchmark reports and goes on)
            print(f"cuda dequantize, {wpt} words per thread, failed: {e!r}", flush=True)
            continue
        rows.append({"run": f"cuda dequantize, {wpt} words per thread ({reps} per eval)",
                     "ms": round(t * 1e3, 4), "GB/s": round(nbytes / reps / t / 1e9),
                     "max_err": "exact" if same else "DIFFERS"})
        print(json.dumps(rows[-1]), flush=True)
    t = bench(lambda: [mx.dequantize(q, s, b, 64, 4) for q, s, b in ws], 5) / reps
    rows.append({"run": f"mx.dequantize ({reps} per eval)", "ms": round(t * 1e3, 4),
                 "GB/s": round(nbytes / reps / t / 1e9)})
    return rows


def swiglu_rows(M, N) -> list:
    """The MLP's silu(gate) * x, forward and backward, at M tokens x N (bfloat16): autodiff of
    mlx-lm's swiglu (what compile makes of it) against qlora.swiglu (the recomputing backward, one
    CUDA kernel); the kernel's gradients against a float32 computation of the same formula."""
    import mlx.nn as nn

    from steadytune.qlora import swiglu

    g, x, d = (mx.random.normal((M, N)).astype(mx.bfloat16) for _ in range(3))
    mx.eval(g, x, d)
    ref32 = mx.vjp(lambda g, x: nn.silu(g) * x, [g.astype(mx.float32), x.astype(mx.float32)],
                   [d.astype(mx.float32)])[1]
    got = mx.vjp(swiglu, [g, x], [d])[1]
    err = max((mx.abs(a.astype(mx.float32) - b).max() / mx.abs(b).max()).item() for a, b in zip(got, ref32))
    rows = []
    from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

    for name, f in [("autodiff of mlx-lm's swiglu", mlx_lm_swiglu), ("qlora.swiglu", swiglu)]:
        step = mx.compile(lambda g, x, d, f=f: mx.vjp(f, [g, x], [d]))
        t = bench(lambda: step(g, x, d), 10)
        rows.append({"run": f"swiglu fwd+bwd {name} ({M}x{N})", "ms": round(t * 1e3, 3),
                     "max_err": round(err, 5) if f is swiglu else ""})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def torch_matmul_rows(M, K, N) -> list:
    """The 7B step's matmul shapes in MLX and, where PyTorch is installed, in PyTorch (its
    cuBLAS call, timed with CUDA events): is MLX's matmul the floor it seems?"""
    shapes = [("x @ W.T  M,K,N", M, K, N), ("dy @ W   M,N,K", M, N, K), ("q proj   M,K,K", M, K, K),
              ("kv proj  M,K,K/4", M, K, K // 4), ("lm head  M,K,32000", M, K, 32000)]
    rows = []
    for name, m, k, n in shapes:
        xs = [mx.random.normal((m, k)).astype(mx.bfloat16) for _ in range(4)]
        w = mx.random.normal((n, k)).astype(mx.bfloat16)
        mx.eval(xs, w)
        t = bench(lambda: [x @ w.T for x in xs], 10) / len(xs)
        rows.append({"run": f"mlx matmul {name} ({m}x{k}x{n})", "ms": round(t * 1e3, 3),
                     "TFLOP/s": round(2 * m * k * n / t / 1e12, 1)})
        print(json.dumps(rows[-1]), flush=True)
    try:
        import torch
    except ImportError:
        return rows
    for name, m, k, n in shapes:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        for x in xs:
            x @ w.T
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10):
            start.record()
            for x in xs:
                x @ w.T
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / len(xs))
        t = statistics.median(times)
        rows.append({"run": f"torch matmul {name} ({m}x{k}x{n})", "ms": round(t * 1e3, 3),
                     "TFLOP/s": round(2 * m * k * n / t / 1e12, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def attention_packed_rows(B, T, heads=32, kv_heads=8, dim=128) -> list:
    """Attention forward + backward of one layer, causal against packed rows (several examples
    per row, an additive block-diagonal causal mask), and the packed result against attention
    run on each example alone."""
    from steadytune.packing import attention_bias

    rng = np.random.default_rng(0)
    q = mx.random.normal((B, heads, T, dim)).astype(mx.bfloat16)
    k = mx.random.normal((B, kv_heads, T, dim)).astype(mx.bfloat16)
    v = mx.random.normal((B, kv_heads, T, dim)).astype(mx.bfloat16)
    seg = np.zeros((B, T), np.int32)
    for r in range(B):  # examples of random lengths filling each row
        lengths = filling(rng, T, T // 8)
        seg[r] = np.repeat(np.arange(len(lengths)), lengths)
    bias = attention_bias(mx.array(seg), mx.bfloat16)
    mx.eval(q, k, v, bias)
    rows = []
    for name, mask in [("causal", "causal"), ("packed bias", bias)]:
        def loss(q, k, v, mask=mask):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088, mask=mask).astype(
                mx.float32).sum()

        g = mx.compile(mx.grad(loss, argnums=(0, 1, 2)))
        reset_memory()
        t = bench(lambda: g(q, k, v), 5)
        rows.append({"run": f"attention fwd+bwd {name} B={B} T={T}", "ms": round(t * 1e3, 3),
                     "peak_gb": round(mx.get_peak_memory() / 1e9, 3)})
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088, mask=bias)
    err = 0.0
    for r in range(min(B, 2)):
        for j in np.unique(seg[r]):
            idx = np.nonzero(seg[r] == j)[0]
            a, b = int(idx[0]), int(idx[-1]) + 1
            ref = mx.fast.scaled_dot_product_attention(q[r:r + 1, :, a:b], k[r:r + 1, :, a:b],
                                                       v[r:r + 1, :, a:b], scale=0.088, mask="causal")
            err = max(err, mx.abs(out[r:r + 1, :, a:b].astype(mx.float32) - ref.astype(mx.float32)).max().item())
    rows[-1]["max_err"] = err
    return rows


# --- real data: the whole `steadytune train` path against mlx-lm's trainer ------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def corpus(data_dir: Path) -> list[str]:
    texts = [json.loads(x)["text"] for x in (data_dir / "wikisql" / "train.jsonl").read_text().splitlines()]
    for r in json.loads((data_dir / "alpaca_en_demo.json").read_text()):
        texts.append(f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}")
    return texts


def write_model_folder(folder: Path, size: str, weights: list, texts: list[str]) -> Path:
    """A quantized MLX model folder: the random base weights, and a byte-level BPE tokenizer
    (vocabulary up to 32000) trained offline on the data itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=SIZES[size]["vocab_size"], special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None,
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": CHATML}))
    config = dict(SIZES[size], model_type="mistral", rms_norm_eps=1e-5, rope_theta=1e6,
                  tie_word_embeddings=False, eos_token_id=2,
                  quantization={"group_size": 64, "bits": 4})
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(weights))
    return folder


def steadytune_real(folder: Path, data: Path, out: Path, batch: int, max_steps: int, max_len: int,
                    batch_tokens: int | None = None, pack: bool = False):
    """`steadytune train` through the Python API, timing each optimizer step."""
    from steadytune.trainer import Trainer, as_config

    cfg = as_config({
        "model": {"path": str(folder)},
        "data": {"path": str(data), "max_seq_length": max_len},
        "lora": {"rank": RANK, "alpha": SCALE * RANK},
        "training": {"batch_size": batch, "batch_tokens": batch_tokens, "pack": pack,
                     "max_steps": max_steps, "learning_rate": LR,
                     "force": True,  # measure speed even where the planner would refuse
                     "eval_every": 0, "save_every": 0, "log_every": 10},
        "output": {"dir": str(out), "progress": "none"}})
    steps, shapes = [], []

    class TimedTrainer(Trainer):
        def prepare(self):
            run = super().prepare()

            def recording(f):
                def g(inputs, *rest):
                    shapes.append(tuple(inputs.shape))
                    return f(inputs, *rest)
                return g

            self.step.grad, self.step.grad_apply = recording(self.step.grad), recording(self.step.grad_apply)
            return run

        def train_step(self, micro_batches, lr):
            shapes.clear()
            t = time.perf_counter()
            out = super().train_step(micro_batches, lr)
            steps.append((time.perf_counter() - t, out.real, tuple(shapes)))
            return out

    reset_memory()
    tr = TimedTrainer(cfg)
    tr.fit()
    return tr, steps, mx.get_peak_memory() / 1e9


def steady_rate(steps) -> tuple[float, float]:
    """Real (non-padding) tokens/s over (all steps, the steps whose batch shapes were all seen
    before, i.e. that ran already-compiled step functions)."""
    seen, tot_t, tot_n, st_t, st_n = set(), 0.0, 0, 0.0, 0
    for t, n, shapes in steps:
        tot_t, tot_n = tot_t + t, tot_n + n
        if seen.issuperset(shapes):
            st_t, st_n = st_t + t, st_n + n
        seen.update(shapes)
    return tot_n / tot_t, (st_n / st_t if st_t else float("nan"))


def mlx_lm_real(size, weights, train_set, batch, iters, max_len):
    """mlx-lm's own trainer (mlx_lm.tuner.train with its iterate_batches) on the same tokens and
    loss masks (as mlx-lm's (tokens, offset) examples). Times come from its reports."""
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = fresh_model(size, weights)
    linear_to_lora_layers(model, len(model.layers), {"rank": RANK, "scale": SCALE, "dropout": 0.0})
    dataset = [(ids, next((j for j in range(1, len(m)) if m[j]), 1))
               for ids, m in zip(train_set.ids, train_set.masks)]
    shapes = []

    def batches(*args, **kwargs):
        for b, lengths in iterate_batches(*args, **kwargs):
            real = int((np.minimum(np.array(lengths)[:, 1], b.shape[1]) - 1).sum())
            shapes.append((real, b.shape))
            yield b, lengths

    reports = []

    class Timer(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append(info)

    report_every = 1  # per-step times, so steps that compiled a new shape can be told apart
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(batch_size=batch, iters=iters, max_seq_length=max_len,
                            steps_per_report=report_every, steps_per_eval=10 ** 9,
                            steps_per_save=10 ** 9, adapter_file=str(Path(tmp) / "a.safetensors"))
        reset_memory()
        train(model, optim.AdamW(learning_rate=LR), dataset, None, args, iterate_batches=batches,
              training_callback=Timer())
    peak = mx.get_peak_memory() / 1e9
    # each report covers `report_every` steps; its time = its target tokens / its tokens per second
    steps, prev = [], 0
    for i, r in enumerate(reports):
        window = shapes[i * report_every:(i + 1) * report_every]
        tokens = r["trained_tokens"] - prev
        prev = r["trained_tokens"]
        steps.append((tokens / r["tokens_per_second"], sum(n for n, _ in window),
                      tuple(sorted({tuple(s) for _, s in window}))))
    return steps, peak


def run_real(a):
    data_dir = Path(a.data)
    weights = build_base(a.size, mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model_folder(Path(tmp) / "model", a.size, weights, corpus(data_dir))
        sets = [("wikisql", data_dir / "wikisql" / "train.jsonl", a.batch_wikisql),
                ("alpaca", data_dir / "alpaca_en_demo.json", a.batch_alpaca)]
        for name, path, batch in [x for x in sets if x[0] in a.datasets.split(",")]:
            tr, steps, peak = steadytune_real(folder, path, Path(tmp) / f"run-{name}", batch,
                                              a.real_steps, a.max_len, a.batch_tokens or None, a.pack)
            total, steady = steady_rate(steps)
            padded = sum(b * w for _, _, sh in steps for b, w in sh)
            how = f"batch_tokens {a.batch_tokens}" if a.batch_tokens else f"batch {batch}"
            how += f", packed into rows of up to {tr.run.pack_target}" if a.pack else ""
            how += f", pad {a.cuda_pad} above 256" if a.cuda_pad else ""
            rows.append({"run": f"steadytune train {name} ({how})", "tok_s": round(steady, 1),
                         "tok_s_incl_compiles": round(total, 1), "peak_gb": round(peak, 2),
                         "steps": len(steps),
                         "padding": round(1 - sum(n for _, n, _ in steps) / padded, 3)})
            print(json.dumps(rows[-1]), flush=True)
            train_set = tr.run.train_set
            del tr
            reset_memory()
            if a.skip_mlx_lm:
                continue
            msteps, mpeak = mlx_lm_real(a.size, weights, train_set, batch, a.mlx_steps, a.max_len)
            mtotal, msteady = steady_rate(msteps)
            rows.append({"run": f"mlx-lm trainer {name} (batch {batch})", "tok_s": round(msteady, 1),
                         "tok_s_incl_compiles": round(mtotal, 1), "peak_gb": round(mpeak, 2),
                         "steps": len(msteps)})
            rows[-2]["ratio"] = round(steady / msteady, 2) if msteady == msteady else ""
            print(json.dumps(rows[-1]), flush=True)
            reset_memory()
    # the fixed-length figure the real-data target is a share of, from this same process
    fixed = steadytune_steps(a.size, weights, 4, 1024, False, a.steps)
    for r in rows:
        if r["run"].startswith("steadytune"):
            r["vs_fixed"] = round(r["tok_s"] / fixed["tok_s"], 3)
    return rows + [fixed]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("setting", choices=["synthetic", "real", "cpu", "cpulayout", "kernels", "profile",
                                              "kernelmix"])
    p.add_argument("--steps", type=int, default=8, help="timed steps per run (median of steps 3+)")
    p.add_argument("--only", default="", help="synthetic: subset of 4x1024,4x1024c,1x2048,1x128")
    p.add_argument("--skip-mlx-lm", action="store_true", help="synthetic/real: steadytune rows only")
    p.add_argument("--datasets", default="wikisql,alpaca", help="real: which data sets")
    p.add_argument("--cuda-pad", type=int, default=0, help="real/synthetic: an experiment: pad widths "
                   "above 256 to multiples of this on CUDA instead of batching.pad_multiple's 128")
    p.add_argument("--batch-tokens", type=int, default=4096, help="real: steadytune's token budget per "
                   "micro-batch (0 = batches of --batch-wikisql / --batch-alpaca examples)")
    p.add_argument("--ab-lora", action="store_true", help="synthetic: also run each setting with the "
                   "adapter added by separate passes (apply_compute's fused_lora=False) first")
    p.add_argument("--pack", action="store_true", help="real: steadytune packs examples into rows "
                   "(training.pack)")
    p.add_argument("--kernels", default="", help="synthetic: also run dequant with these kernels "
                   "(mlx,elementwise,cuda:N)")
    p.add_argument("--ab", default="", help="synthetic: variants timed in turns in one process, "
                   "e.g. 'base=cuda:1,-swiglu,-flat;new=cuda' (see parse_ab); --only lists the "
                   "settings (4x1024,4x1024c,...)")
    p.add_argument("--pipelined", type=int, default=0, help="synthetic --ab: also queue this many "
                   "steps without waiting for each")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--batch-wikisql", type=int, default=24)
    p.add_argument("--batch-alpaca", type=int, default=8)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--real-steps", type=int, default=120)
    p.add_argument("--mlx-steps", type=int, default=60)
    p.add_argument("--with-mlx-lm", action="store_true", help="profile: also time mlx-lm's step")
    p.add_argument("--quick", action="store_true", help="profile: only 4x1024 and 1x128")
    p.add_argument("--attention", action="store_true", help="kernels: also time attention at "
                   "sequence lengths that are / are not multiples of 128")
    p.add_argument("--size", default="7b", choices=sorted(SIZES), help="synthetic/real: model shape")
    p.add_argument("--layout-data", default="chatbot,alpaca", help="cpulayout: which data sets "
                   "(chatbot: steadytune/data/chatbot; alpaca: the alpaca demo as chat, 949 examples)")
    p.add_argument("--layouts", default="default,nopack", help="cpulayout: default (as training lays a "
                   "call out), nopack (--pack false), packed (every call packed, the rule before the CPU's)")
    p.add_argument("--calibrate", action="store_true", help="cpulayout: also fit a query-key pair's cost "
                   "from warm calls of fixed shapes (pair_fit: the fastest of 4 rounds)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--summarize", help="kernelmix: group the kernels of an ncu --csv --page raw log")
    a = p.parse_args(argv)
    if a.cuda_pad:
        import steadytune.batching as batching

        rule = batching.pad_multiple
        batching.pad_multiple = lambda width, device: a.cuda_pad if width > 256 else rule(width, device)
    print(environment(), flush=True)
    rows = {"synthetic": run_synthetic, "real": run_real, "cpu": run_cpu, "cpulayout": run_cpulayout,
            "kernels": run_kernels,
            "profile": run_profile, "kernelmix": run_kernelmix}[a.setting](a)
    if a.setting == "cpulayout":
        print(table(rows, ("run", "steps", "all_s", "tok_s_all", "ratio_all", "steady_s", "tok_s_steady",
                           "ratio_steady", "ratio_median", "positions", "attention", "shapes", "pair_cost")))
    elif a.setting not in ("kernels", "profile", "kernelmix"):
        print(table(rows, ("run", "tok_s", "peak_gb", "ratio", "median_s", "loss", "tok_s_incl_compiles",
                           "padding", "vs_fixed")))
    if a.json:
        Path(a.json).write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
