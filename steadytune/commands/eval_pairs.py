"""`steadytune eval-pairs RUN --data FILE [--json]`: how often a tuned model prefers the chosen
answer of held-out preference pairs.

Reward accuracy is the share of pairs whose implicit reward margin is positive: for DPO (and SFT
runs) beta * ((log pi - log pi_base)(chosen) - (log pi - log pi_base)(rejected)), for ORPO beta *
(mean token log p(chosen) - mean token log p(rejected)). The baseline is the share of pairs where
the base model alone gives the chosen answer the higher mean token log-probability. The base is
the same loaded model with its adapters switched off (no second copy of the weights).
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("run", help="a run folder of steadytune train (its adapters and config.yaml)")
    p.add_argument("--data", required=True,
                   help="a pair file (JSONL/JSON), or a folder: its valid file, else its train file")
    p.add_argument("--json", action="store_true", help='print one line {"pairs", "accuracy", "mean_margin", '
                   '"base_accuracy"}')
    p.add_argument("--batch-size", type=int, default=4, help="pairs per forward pass")


def command(args) -> int:
    from ..config import Config, apply_overrides, load_yaml
    from ..data import find_files
    from ..generation import adapter_dir, load_tuned
    from ..preference import all_logps, preference_scores, read_pairs, reference_logps, tokenize_pairs
    from ..qlora import apply_compute

    run = Path(args.run)
    adapter_dir(run)  # a clear error before anything loads
    cfg = Config()
    if (run / "config.yaml").is_file():
        tree = load_yaml(run / "config.yaml")
        apply_overrides(cfg, {k: v for k, v in tree.items() if k in ("model", "data", "training")},
                        str(run / "config.yaml"))
    files = find_files(args.data)
    path = files.get("valid", files["train"])
    pairs = read_pairs(path)
    loaded = load_tuned(run)
    apply_compute(loaded.model, cfg.model.compute)  # the training's fast quantized matmuls (the CPU's are slow otherwise)
    tp = tokenize_pairs(pairs, loaded.tokenizer, cfg.data.max_seq_length, "truncate")
    ref = reference_logps(loaded.model, tp, args.batch_size)
    policy = all_logps(loaded.model, tp, args.batch_size)
    method = "orpo" if cfg.training.method == "orpo" else "dpo"
    scores = preference_scores(policy, ref, tp.answer_tokens(), method, cfg.training.beta)
    if args.json:
        print(json.dumps(scores))
    else:
        print(f"{path}: {scores['pairs']} pairs ({method} reward, beta {cfg.training.beta})")
        print(f"  reward accuracy: {scores['accuracy']:.1%}  mean margin: {scores['mean_margin']:.4f}")
        print(f"  base model prefers the chosen answer (mean token log-prob): {scores['base_accuracy']:.1%}")
    return 0
