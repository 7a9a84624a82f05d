"""Fast start-up (issue 23): --help, every VERB --help, --version and ``mmfuse cache`` never import torch or
transformers. Each verb imports its library only when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

from mmfuse.cli import build_parser
from mmfuse.config import DEFAULT_CAPTIONER, PACKAGED_CAPTIONERS

HEAVY = ("torch", "transformers")

# Run one after another in a single process; the first command that imports a heavy module is the one named.
SCRIPT = """
import contextlib, io, json, sys
from mmfuse.cli import main

seen = {}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    seen[" ".join(argv)] = [code, [m for m in json.loads(sys.argv[2]) if m in sys.modules]]
print(json.dumps(seen))
"""


def commands() -> list[list[str]]:
    verbs = build_parser()._subparsers._group_actions[0].choices
    cache = [["cache", action] for action in ("info", "verify", "clear")] + [["cache", "prune", "--max-size", "1GB"]]
    helps = [[verb, "--help"] for verb in verbs] + [["cache", action, "--help"] for action in ("info", "prune")]
    return [["--help"], ["--version"], *helps, ["cache", "info", "--json"], *cache]


def test_help_version_and_cache_do_not_import_torch():
    argvs = commands()
    assert len(argvs) > 15  # every verb is listed
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(argvs), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # MMFUSE_HOME is this test's own (conftest), so the cache commands see an empty cache
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout)
    first = next(((cmd, mods) for cmd, (_, mods) in seen.items() if mods), None)
    assert first is None, f"mmfuse {first[0]} imported {', '.join(first[1])}"
    assert {cmd: code for cmd, (code, _) in seen.items() if code not in (0, None)} == {}


def test_the_captioners_the_help_names_are_the_registered_ones():
    from mmfuse.captioning import captioners  # imports torch, which the help avoids

    assert captioners.packaged_captioners() == sorted(PACKAGED_CAPTIONERS)
    assert captioners.DEFAULT_CAPTIONER == DEFAULT_CAPTIONER
