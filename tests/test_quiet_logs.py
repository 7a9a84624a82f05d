"""Lines from other libraries that alarm a user without telling them anything: matplotlib's font scan
(``cli.quiet_libraries``) and torch's ONNX exporter's torchvision notice (``export.exporter.quiet_exporter``). The
mpnet unpack's one INFO line is checked in test_mpnet.py.

    HF_HUB_OFFLINE=1 pytest -q tests/test_quiet_logs.py
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

FONT_SCAN = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")  # as mmfuse.cli.main does
if sys.argv[1] == "quiet":
    from mmfuse.cli import quiet_libraries
    quiet_libraries()
import matplotlib.font_manager  # builds the font list: a fresh MPLCONFIGDIR has none cached
"""


def _font_scan(tmp_path: Path, mode: str) -> str:
    """stderr of a fresh font scan that meets an unreadable font (as NotoColorEmoji.ttf is to matplotlib)."""
    fonts = tmp_path / "data" / "fonts"
    fonts.mkdir(parents=True, exist_ok=True)
    (fonts / "broken.ttf").write_bytes(b"not a font" * 100)
    env = {
        **os.environ,
        "XDG_DATA_HOME": str(tmp_path / "data"),  # one of the folders matplotlib scans for fonts
        "MPLCONFIGDIR": str(tmp_path / f"mpl-{mode}"),
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-c", FONT_SCAN, mode]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True).stderr


def test_matplotlib_font_scan_is_quiet(tmp_path):
    loud = _font_scan(tmp_path, "loud")
    assert "Failed to extract font properties from" in loud and "broken.ttf" in loud  # what the user saw
    quiet = _font_scan(tmp_path, "quiet")
    assert "matplotlib" not in quiet and "broken.ttf" not in quiet, quiet


@pytest.fixture
def registration_logger(caplog):
    """torch's logger that emits the notice, captured by ``caplog`` (torch.onnx's loggers print through their own
    stderr handler and do not propagate to the root), with the filters it had put back afterwards."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    filters, level = list(logger.filters), logger.level
    logger.setLevel(logging.NOTSET)  # the CPU engine's export (models.towers.onnx_engine) raises it to ERROR
    logger.addHandler(caplog.handler)
    yield logger
    logger.removeHandler(caplog.handler)
    logger.filters[:] = filters
    logger.setLevel(level)


def test_torchvision_skip_notice_is_filtered_precisely(registration_logger, caplog):
    from torch.onnx._internal.exporter import _registration

    from mmfuse.inference.export.exporter import quiet_exporter

    if _registration.importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: torch has nothing to skip")
    registration_logger.filters.clear()
    with caplog.at_level(logging.WARNING):
        _registration._get_overload("torchvision::nms")  # where torch says it, once per torchvision op
    assert "torchvision is not installed. Skipping torchvision::nms" in caplog.text  # the test can fail
    caplog.clear()
    quiet_exporter()
    quiet_exporter()  # the export runs it each time: one filter, not one per export
    assert len(registration_logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        for op in ("nms", "roi_align", "roi_pool"):
            _registration._get_overload(f"torchvision::{op}")
        registration_logger.warning("torchvision is not installed. Skipping %s", "aten::something")  # not ours
        registration_logger.warning("some other exporter warning %s", "x")
    assert "torchvision::" not in caplog.text
    assert "Skipping aten::something" in caplog.text and "some other exporter warning x" in caplog.text
