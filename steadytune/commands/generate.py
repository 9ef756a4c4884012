"""`steadytune generate`: answer a prompt with a model and, optionally, a run's adapters."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .chat import check_sampling


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="base model (default: the run's, else smollm2-135m)")
    p.add_argument("--adapter", default=None, help="a run folder (or its adapters/ folder)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="a user message (goes through the chat template)")
    g.add_argument("--messages", help="a JSON file with a list of {role, content} messages")
    p.add_argument("--system", default=None, help="a system message to put first")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")


def load_messages(path: str) -> list[dict]:
    p = Path(path)
    try:
        msgs = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror}); check the path") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: not valid JSON ({e}); give a list of {{role, content}} objects") from None
    if isinstance(msgs, dict) and "messages" in msgs:
        msgs = msgs["messages"]
    if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                    and m.get("role") for m in msgs)):
        raise UserError(f"{p}: expected a list of {{\"role\", \"content\"}} messages")
    return msgs


def command(args) -> int:
    from ..generation import generate, load_tuned, to_messages

    check_sampling(args)
    msgs = load_messages(args.messages) if args.messages else to_messages(args.prompt, args.system)
    loaded = load_tuned(args.adapter, args.model, inference=True)
    if getattr(loaded.tokenizer, "chat_template", None):  # a failing template: a UserError, not a traceback
        from ..data import render_chat

        render_chat(loaded.tokenizer, msgs, add_generation_prompt=True, where=args.messages or "--prompt")
    for piece in generate(loaded, msgs, args.max_tokens, args.temperature, stream=True):
        print(piece, end="", flush=True)
    print()
    return 0
