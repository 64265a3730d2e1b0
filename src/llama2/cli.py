"""The `llama2` command: chat, generate, tokenize, info, models, conversion, speed, serving, training.

Each group of subcommands registers itself and holds its handlers in `llama2.commands`
(`run`, `models`, `training`), `llama2.eval.cli` and `llama2.align.cli`; this module
assembles the parser and runs the chosen handler.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .align.cli import add_align_parser
from .commands.models import add_model_file_parsers
from .commands.run import add_run_parsers
from .commands.training import add_training_parsers
from .errors import Llama2Error
from .eval.cli import add_eval_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The `llama2` parser with every subcommand; each sets `handler` to the function that runs it."""
    parser = argparse.ArgumentParser(prog="llama2", description="Run Llama 2 and Llama-architecture models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run_parsers(commands)
    add_model_file_parsers(commands)
    add_eval_parser(commands)
    add_training_parsers(commands)
    add_align_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input prints one line on stderr and exits non-zero."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except Llama2Error as err:
        print(f"llama2: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except MemoryError:
        print(
            "llama2: error: out of memory; try a smaller model, --dtype bfloat16 or a shorter --max-seq-len",
            file=sys.stderr,
        )
        return 1
    except OSError as err:
        print(f"llama2: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
