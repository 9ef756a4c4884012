"""`export --format hf` checked in a real transformers: each family's tiny random 4-bit model
(tests/arch_models.py) with nonzero adapters, exported as an HF folder in float32, loaded by
transformers' AutoModelForCausalLM (or the class config.json names, where that maps none: mistral4)
in a separate Python that has torch (this project's own environment does not), and its logits on a
few prompts compared with the MLX model's (base + adapters, float32; with a prompt cache for CACHED).

    python3 -m venv TORCHENV && TORCHENV/bin/pip install torch "transformers==5.25.0" safetensors numpy
    .venv/bin/python bench/hf_export.py --torch-python TORCHENV/bin/python

Prints a table: max |logit difference| and the largest logit, per family; exit status 1 if any
family is off by more than 1e-4 of its largest logit (float32 on both sides: a wrong layout or
setting is off by the logits' own size) or fails to load, or loads with a tensor transformers
does not read or leaves out (its weight would stay random). Float tensors the fresh model holds as
zeros (routers, score biases, sinks) are filled with random values first, so no tie between experts
decides the comparison. `--tied`: the same models with tied embeddings (the output layer dropped),
where mlx-lm's model can tie.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import steadytune  # noqa: E402,F401  (fast BLAS before mlx)

# Settings the tiny models (tests/arch_models.py) leave out, each run as a model of its own with
# `--variants` (or named in --families): label -> (model type, keys over its tiny config).
VARIANTS = {
    "granitemoehybrid-dense": ("granitemoehybrid", {"num_local_experts": 0}),  # Granite 4.0-H Micro
    "gemma4_text-moe": ("gemma4_text", {"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                                        "moe_intermediate_size": 32}),  # Gemma 4 26B-A4B's MoE block
    # YaRN as the released models have it (its scaled frequencies apply at every position)
    "gpt_oss-yarn": ("gpt_oss", {"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                  "beta_slow": 1.0, "truncate": False,
                                                  "original_max_position_embeddings": 16}}),
    "deepseek_v3-yarn": ("deepseek_v3", {"rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": 32,
                                                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                                          "original_max_position_embeddings": 128}}),
    # Mistral Small 4's rope_parameters (YaRN x128 with Llama 4's attention scaling)
    "mistral4-yarn": ("mistral4", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0, "original_max_position_embeddings": 8192,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}}),
}
# Families whose mlx-lm model computes otherwise without a cache than mlx_lm.generate runs it: gemma3n's
# last num_kv_shared_layers reuse an earlier layer's keys and values only through the cache (without
# one they compute their own, which the released model and transformers never do). Their reference
# is run with a prompt cache, as generation runs.
CACHED = ("gemma3n",)
PROMPTS = [[1, 5, 9, 12, 40, 7, 3, 100, 77, 23], [2, 8, 64, 31, 19, 200, 11, 4]]
TOLERANCE = 1e-4

_TRANSFORMERS = r"""
import json, sys, numpy as np, torch, transformers
out = {}
for folder in sys.argv[2:]:
    try:
        # the class config.json names where AutoModelForCausalLM maps none to its type (mistral4 in 5.25)
        arch = json.load(open(folder + "/config.json"))["architectures"][0]
        auto = transformers.AutoModelForCausalLM
        mapped = type(transformers.AutoConfig.from_pretrained(folder)) in auto._model_mapping
        cls = auto if mapped else getattr(transformers, arch)
        model, info = cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
        bad = {k: sorted(v)[:4] for k, v in info.items() if v and k != "error_msgs"}
        if bad:  # a name or shape transformers does not read: its weight would be left random
            out[folder] = f"loading info {bad}"
            continue
        model.eval()
        with torch.no_grad():
            out[folder] = [model(torch.tensor([p])).logits[0].numpy().tolist() for p in json.loads(sys.argv[1])]
    except Exception as e:
        out[folder] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
print("JSON" + json.dumps(out))
"""


def _fill_zeros(path: Path, seed: int = 0, tie: bool = False) -> None:
    """Random values in the float tensors a fresh mlx-lm model holds as zeros (routers, their score
    biases, attention sinks, ...): a zero router rates every expert the same, and which of the tied
    experts each side picks is then arbitrary, not a property of the export. `tie`: the output layer
    dropped and tie_word_embeddings set, as most small released models are."""
    import mlx.core as mx

    weights = mx.load(str(path))
    mx.random.seed(seed)
    for name, value in weights.items():
        if mx.issubdtype(value.dtype, mx.floating) and not mx.any(value).item():
            weights[name] = (0.5 * mx.random.normal(value.shape)).astype(value.dtype)
    if tie:
        weights = {k: v for k, v in weights.items() if "lm_head." not in k}
        config = json.loads((path.parent / "config.json").read_text())
        for c in (config, config.get("text_config") or {}):
            c["tie_word_embeddings"] = True
        (path.parent / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path), weights)


def _build(folder: Path, label: str) -> Path:
    """arch_models.build of a family or of a VARIANTS label (arch_models builds by model type only, so
    its config table holds the variant's keys while it builds)."""
    import arch_models

    family, settings = VARIANTS.get(label, (label, {}))
    tiny = arch_models._CONFIGS[family]
    arch_models._CONFIGS[family] = {**tiny, **settings}
    try:
        return arch_models.build(folder, family)
    finally:
        arch_models._CONFIGS[family] = tiny


def main() -> int:
    import mlx.core as mx
    import numpy as np

    import arch_models
    from mlx_lm.models.cache import make_prompt_cache
    from steadytune.errors import UserError
    from steadytune.export import HF_NAMED, export
    from steadytune.generation import load_tuned
    from test_export import make_run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch-python", required=True, help="a Python with torch and transformers")
    p.add_argument("--families", default=",".join(t for t in HF_NAMED if t in arch_models._CONFIGS))
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--tied", action="store_true", help="the same models with tied embeddings (no lm_head)")
    p.add_argument("--variants", action="store_true", help="the VARIANTS models too")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-hf-"))
    folders, reference = {}, {}
    for family in a.families.split(",") + (list(VARIANTS) if a.variants else []):
        base = _build(work / f"{family}-model", family)
        _fill_zeros(base / "model.safetensors", tie=a.tied)
        try:
            run = make_run(work, str(base), family)
        except UserError:
            if not a.tied:
                raise
            print(f"{family}: mlx-lm's model always has an output layer; skipped", flush=True)
            continue
        out = work / f"{family}-hf"
        export(run, fmt="hf", out=out, dtype="float32")
        tuned = load_tuned(run, dtype="float32")
        def cache():
            return make_prompt_cache(tuned.model) if VARIANTS.get(family, (family,))[0] in CACHED else None
        reference[family] = [np.array(tuned.model(mx.array([ids]), cache=cache())[0].astype(mx.float32))
                             for ids in PROMPTS]
        folders[family] = str(out)
        print(f"{family}: exported", flush=True)
    r = subprocess.run([a.torch_python, "-c", _TRANSFORMERS, json.dumps(PROMPTS), *folders.values()],
                       capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("JSON")), None)
    if line is None:
        raise SystemExit(f"transformers side failed: {r.stderr[-2000:]}")
    theirs = json.loads(line[4:])
    import mlx_lm

    version = subprocess.run([a.torch_python, "-c", "import torch, transformers; print(torch.__version__, "
                              "transformers.__version__)"], capture_output=True, text=True).stdout.strip()
    print(f"\nmlx-lm {mlx_lm.__version__}; torch, transformers {version}\n")
    print("| family | HF class | max abs logit diff | largest logit | relative | result |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for family, folder in folders.items():
        cls = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
        got = theirs[folder]
        if isinstance(got, str):
            print(f"| {family} | {cls} | | | | failed to load: {got} |")
            bad += 1
            continue
        diff = max(float(np.abs(np.array(g) - r).max()) for g, r in zip(got, reference[family]))
        top = max(float(np.abs(r).max()) for r in reference[family])
        ok = diff <= TOLERANCE * top
        bad += not ok
        print(f"| {family} | {cls} | {diff:.2e} | {top:.3f} | {diff / top:.1e} | {'pass' if ok else 'FAIL'} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
