"""`steadytune doctor [CONFIG] [flags]`: check the installation, the device, the model and the data
(the checks and the bench: steadytune/doctor.py). Exit status 0 when nothing failed, 1 otherwise."""

from __future__ import annotations

import json

from ..config import add_config_flags, from_args
from ..doctor import BENCH_STEPS, bench_lines, run_bench, run_checks


def add_arguments(parser) -> None:
    add_config_flags(parser)
    parser.add_argument("--bench", action="store_true",
                        help="also train briefly and report speed, memory against the plan, versions (JSON last)")
    parser.add_argument("--bench-steps", type=int, default=BENCH_STEPS, help="optimizer steps of --bench")


def command(args) -> int:
    cfg = from_args(args)
    checks = run_checks(cfg)
    for c in checks:
        print(c.line())
    failed = [c for c in checks if not c.ok]
    print(f"\n{len(failed)} problem{'s' if len(failed) != 1 else ''} found" if failed else "\nall checks passed")
    if args.bench and not failed:
        print(f"\nbench: {args.bench_steps} optimizer steps of {cfg.model.path} on "
              f"{cfg.data.path or 'the bundled chatbot data'} ...", flush=True)
        result = run_bench(cfg, args.bench_steps)
        for line in bench_lines(result):
            print(line)
        print(json.dumps(result, sort_keys=True))
    return 1 if failed else 0
