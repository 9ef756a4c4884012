"""`steadytune report RUN`: plot a run's metrics to PNG and HTML (steadytune/report.py)."""

from __future__ import annotations

from ..errors import UserError
from ..report import write_report


def add_arguments(p) -> None:
    p.add_argument("run", help="a run folder of steadytune train (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write report.html and the PNGs "
                   "(default: the run folder)")


def command(args) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("steadytune report needs matplotlib; run: pip install 'steadytune[report]'") from None
    page = write_report(args.run, args.out)
    print(f"report written to {page} (PNGs beside it)")
    return 0
