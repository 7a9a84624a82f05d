"""The ``mmfuse`` command: one subcommand per verb, each a plain function over the library.

    mmfuse --help                    # the verbs
    mmfuse VERB --help               # a verb's flags
    python -m mmfuse VERB ...        # the same, without the console script

Each verb lives in its own module here, which registers its subparser (``register``) and runs it (``cmd_<verb>``).
Flags of the verbs that train are generated from the config dataclasses (flags.py), so ``--help`` always matches
them. A verb imports its library only when it runs, so --help, --version and ``mmfuse cache`` never import torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mmfuse import __version__
from mmfuse.cli import ablate, cache, caption, datasets, evaluate, export, predict, quickstart, search, serve, train
from mmfuse.cli.flags import run_config
from mmfuse.errors import MmfuseError

__all__ = ["build_parser", "main", "run_config"]

log = logging.getLogger("mmfuse")

# In the order --help lists them.
VERBS = (train, search, evaluate, predict, export, ablate, quickstart, datasets, caption, serve, cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfuse", description="Image+text classifiers from fused pretrained towers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"mmfuse {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.register(sub)
    return parser


def quiet_libraries() -> None:
    # Through the environment rather than transformers' own setters: importing transformers costs 1 s, and many
    # commands (a warm quickstart among them) never load a Hugging Face model.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars follow this
    # matplotlib's font scan logs at INFO each font it cannot read ("Failed to extract font properties from
    # .../NotoColorEmoji.ttf": a bitmap font, which it never needs) and "generated new fontManager": not mmfuse's news.
    logging.getLogger("matplotlib.font_manager").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # An empty path is the current directory to pathlib: --out "" would write a run into it, DATA "" read it.
    empty = [name for name, value in vars(args).items() if isinstance(value, str) and not value.strip()]
    if empty:
        names = [name.upper() if name in ("data", "run") else "--" + name.replace("_", "-") for name in empty]
        print(f"error: {', '.join(names)} is empty; give a path or value.", file=sys.stderr)
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the messages that say how to continue a verb
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    quiet_libraries()
    try:
        return args.fn(args)
    except MmfuseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A file that cannot be read or written (no permission, a full disk, a read-only place): the user's to fix,
        # so a line that names the file, not a traceback (-v shows it).
        log.debug("details", exc_info=True)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        # torch.OutOfMemoryError on a GPU; on a CPU a RuntimeError from its allocator (e.g. --hidden 100000000).
        if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "allocate memory" in str(e)):
            raise
        log.debug("details", exc_info=True)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        print(
            f"error: out of memory ({first[:200]}). Lower --batch-size, --image-size, --max-length or --hidden, "
            "or use a machine with more memory.",
            file=sys.stderr,
        )
        return 2
