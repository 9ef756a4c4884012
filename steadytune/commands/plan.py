"""`steadytune plan [CONFIG] [flags]`: predict the peak memory of a training configuration and
say what to change if it does not fit (the planner: steadytune/plan.py; docs/plan-memory.md)."""

from __future__ import annotations

import json

from ..config import add_config_flags, from_args
from ..objectives import objective_of
from ..plan import data_lengths, make_plan, render
from ..setup import merged_calls, merged_config


def add_arguments(parser) -> None:
    add_config_flags(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--device", dest="plan_device", choices=["cpu", "cuda", "metal"],
                        help="plan for this backend instead of this machine's")
    parser.add_argument("--memory-gb", dest="plan_memory_gb", type=float,
                        help="memory the run may use (default: what the device reports)")


def command(args) -> int:
    cfg = from_args(args)
    objective = objective_of(cfg.training.method)  # pairs are two rows each, GRPO rows prompt + completion
    lengths = data_lengths(cfg) if objective.name == "sft" else objective.data_lengths(cfg)
    plan_config = objective.plan_config
    plan = make_plan(plan_config(cfg), lengths=lengths, device=args.plan_device, memory_gb=args.plan_memory_gb)
    merge = merged_calls(cfg, plan, lambda c: make_plan(plan_config(c), lengths=lengths, device=args.plan_device,
                                                        memory_gb=args.plan_memory_gb))
    if merge > 1:  # plan what `train` runs: the step's micro-batches packed as one call
        plan = make_plan(plan_config(merged_config(cfg, merge)), lengths=lengths, device=args.plan_device,
                         memory_gb=args.plan_memory_gb)
    if args.json:
        print(json.dumps(dict(plan.as_json(), merged_calls=merge), indent=2))
    else:
        print(render(plan, cfg))
        if merge > 1:
            print(f"the {merge} micro-batches of a step run as one call of {plan.run.batch} rows "
                  "(they fit; --merge-micro-batches off keeps one call each): planned as such")
    return 0 if plan.fits else 1
