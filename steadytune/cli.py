"""The `steadytune` command. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `command(args) -> int`; this file only wires them together and turns
a UserError into a one-line message with exit status 2 (no traceback)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "train": ("steadytune.commands.train", "fine-tune a model on your data (QLoRA by default)"),
    "check-data": ("steadytune.commands.check_data", "validate a dataset and print its statistics"),
    "generate": ("steadytune.commands.generate", "answer a prompt with a model (+ adapters)"),
    "plan": ("steadytune.plan", "predict peak memory of a training configuration"),
    "doctor": ("steadytune.doctor", "check the installation, device, model and data"),
    "export": ("steadytune.export", "fuse adapters into the base; write MLX, HF or GGUF"),
    "report": ("steadytune.report", "plot a run's metrics to PNG and HTML"),
    "chat": ("steadytune.serve", "chat with a tuned model in the terminal"),
    "serve": ("steadytune.serve", "serve a tuned model over an OpenAI-compatible HTTP API"),
    "demo": ("steadytune.demo", "fine-tune the default model on the bundled chatbot data"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steadytune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        if only and name != only:
            sub.add_parser(name, help=help_, add_help=False)
            continue
        p = sub.add_parser(name, help=help_, description=help_)
        module = importlib.import_module(mod)
        getattr(module, f"add_{name.replace('-', '_')}_arguments", getattr(module, "add_arguments", None))(p)
        p.set_defaults(_module=mod, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    import steadytune  # noqa: F401  (loads the fast BLAS before mlx)
    from .errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    only = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    fn = getattr(module, f"{args._name.replace('-', '_')}_command", getattr(module, "command", None))
    try:
        return int(fn(args) or 0)
    except UserError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
