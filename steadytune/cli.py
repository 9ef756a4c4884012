"""The `steadytune` command. Each subcommand lives in its own module in steadytune/commands/
(`check-data` in commands/check_data.py), which provides `add_arguments(parser)` and
`command(args) -> int`; this file only wires them together and turns a UserError into a one-line
message with exit status 2 (no traceback)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help. A command's module is imported only when it runs.
COMMANDS = {
    "train": "fine-tune a model on your data (QLoRA by default)",
    "check-data": "validate a dataset and print its statistics",
    "generate": "answer a prompt with a model (+ adapters)",
    "plan": "predict peak memory of a training configuration",
    "doctor": "check the installation, device, model and data",
    "export": "fuse adapters into the base; write MLX, HF or GGUF",
    "report": "plot a run's metrics to PNG and HTML",
    "chat": "chat with a tuned model in the terminal",
    "serve": "serve a tuned model over an OpenAI-compatible HTTP API",
    "demo": "fine-tune the default model on the bundled chatbot data",
    "eval-pairs": "reward accuracy of a tuned model on preference pairs",
}


def command_module(name: str):
    return importlib.import_module(f"steadytune.commands.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steadytune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    for name, help_ in COMMANDS.items():
        if only and name != only:
            sub.add_parser(name, help=help_, add_help=False)
            continue
        p = sub.add_parser(name, help=help_, description=help_)
        command_module(name).add_arguments(p)
        p.set_defaults(_name=name)
    return parser


def hide_torch() -> None:
    """Make PyTorch invisible to this process, unless something imported it already.

    transformers (mlx-lm's tokenizers) imports torch whenever it is installed, as it is on most
    rented GPU machines: on an H200 machine that import took 16.2-16.7 s against 3.5 s without torch,
    most of a run's start-up (bench/RESULTS.md). steadytune never needs torch: MLX computes and the
    tokenizers come from the `tokenizers` package. A None entry in sys.modules is how Python spells
    "not installed" (importlib.util.find_spec returns None, import raises ImportError). Only the
    `steadytune` program does this; importing steadytune in a notebook leaves torch alone."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the program, not a caller in Python
        hide_torch()
    import steadytune  # noqa: F401  (loads the fast BLAS before mlx)
    from .errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    only = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "_name", None):
        parser.print_help()
        return 2
    try:
        return int(command_module(args._name).command(args) or 0)
    except UserError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
