"""MkDocs hook: pages built from the code and the benchmarks at build time, so neither can drift from its source.

- ``cli.md``: every verb's ``--help``, walked from ``mmfuse.cli.build_parser`` (nested verbs such as ``cache prune``
  included).
- ``results.md``: ``bench/RESULTS.md`` as it stands, the one place measured figures live; other pages link into its
  sections, and ``mkdocs build --strict`` fails when a linked section no longer exists.
- ``architecture.md``: the repository's ``ARCHITECTURE.md``, one copy of the layout.

Nothing is written into ``docs/``: these pages exist only in the build.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
# The parser of this checkout, not of whatever mmfuse happens to be installed.
sys.path.insert(0, str(ROOT / "src"))

from mmfuse.cli import build_parser  # noqa: E402

WIDTH = "100"  # argparse wraps help to $COLUMNS; fixed, so the page does not depend on the terminal that built it

HEADER = """# CLI reference

Generated from `mmfuse.cli.build_parser()` when the site is built: what each verb's `--help` prints. Every command
also runs as `python -m mmfuse VERB ...`, and under `accelerate launch -m mmfuse VERB ...` (see
[Scaling](scaling.md)).

"""


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """(one-line help, parser) of each verb under ``parser``, in the order they were added."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            found += [(helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return found


def render(parser: argparse.ArgumentParser, depth: int = 2) -> list[str]:
    """One section per verb, each with its --help in a code block, recursing into nested verbs."""
    lines = []
    for summary, sub in subcommands(parser):
        lines += [f"{'#' * depth} `{sub.prog}`", ""]
        if summary:
            lines += [summary[0].upper() + summary[1:] + ".", ""]
        lines += ["```text", sub.format_help().rstrip(), "```", ""]
        lines += render(sub, depth + 1)
    return lines


def cli_markdown() -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        parser = build_parser()
        top = ["## `mmfuse`", "", "```text", parser.format_help().rstrip(), "```", ""]
        return HEADER + "\n".join(top + render(parser)) + "\n"
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def on_files(files, config):
    files.append(File.generated(config, "cli.md", content=cli_markdown()))
    files.append(File.generated(config, "results.md", abs_src_path=str(ROOT / "bench" / "RESULTS.md")))
    files.append(File.generated(config, "architecture.md", abs_src_path=str(ROOT / "ARCHITECTURE.md")))
    return files
