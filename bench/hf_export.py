"""`export --format hf` checked in a real transformers: each family's tiny random 4-bit model
(tests/arch_models.py) with nonzero adapters, exported as an HF folder in float32, loaded by
transformers' AutoModelForCausalLM in a separate Python that has torch (this project's own
environment does not), and its logits on a few prompts compared with the MLX model's (base +
adapters, float32).

    python3 -m venv TORCHENV && TORCHENV/bin/pip install torch "transformers==5.25.0" safetensors numpy
    .venv/bin/python bench/hf_export.py --torch-python TORCHENV/bin/python

Prints a table: max |logit difference| and the largest logit, per family; exit status 1 if any
family is off by more than 1e-3 of its largest logit (float32 on both sides: a wrong layout or
setting is off by the logits' own size) or fails to load.
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

PROMPTS = [[1, 5, 9, 12, 40, 7, 3, 100, 77, 23], [2, 8, 64, 31, 19, 200, 11, 4]]
TOLERANCE = 1e-3

_TRANSFORMERS = r"""
import json, sys, numpy as np, torch
from transformers import AutoModelForCausalLM
out = {}
for folder in sys.argv[2:]:
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            out[folder] = [model(torch.tensor([p])).logits[0].numpy().tolist() for p in json.loads(sys.argv[1])]
    except Exception as e:
        out[folder] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
print("JSON" + json.dumps(out))
"""


def main() -> int:
    import mlx.core as mx
    import numpy as np

    import arch_models
    from steadytune.export import HF_NAMED, export
    from steadytune.generation import load_tuned
    from test_export import make_run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--torch-python", required=True, help="a Python with torch and transformers")
    p.add_argument("--families", default=",".join(t for t in HF_NAMED if t in arch_models._CONFIGS))
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-hf-"))
    folders, reference = {}, {}
    for family in a.families.split(","):
        run = make_run(work, str(arch_models.build(work / f"{family}-model", family)), family)
        out = work / f"{family}-hf"
        export(run, fmt="hf", out=out, dtype="float32")
        tuned = load_tuned(run, dtype="float32")
        reference[family] = [np.array(tuned.model(mx.array([ids]))[0].astype(mx.float32)) for ids in PROMPTS]
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
