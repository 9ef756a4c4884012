"""`steadytune chat RUN`: chat with a tuned model in the terminal (the loop: serve.chat_loop)."""

from __future__ import annotations

import sys

from ..errors import UserError
from ..serve import chat_loop
from ..serve_request import temperature_problem


def add_model_arguments(p) -> None:
    p.add_argument("run", help="a run folder of steadytune train (or its adapters/ folder)")
    p.add_argument("--model", default=None, help="base model (default: the one the run was trained on)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system message to start the conversation with")


def command(args) -> int:
    from ..generation import load_tuned

    check_sampling(args)
    loaded = load_tuned(args.run, args.model, inference=True)
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("chatting with the tuned model; /reset forgets the conversation, /quit ends it",
              file=sys.stderr)
    chat_loop(loaded, sys.stdin, system=args.system, max_tokens=args.max_tokens,
              temperature=args.temperature, prompt="> " if tty else "")
    return 0


def check_sampling(args) -> None:
    """The sampling flags of chat, generate and serve, by the rule serve applies to requests."""
    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if problem := temperature_problem(args.temperature):
        raise UserError(f"--temperature {problem}")
