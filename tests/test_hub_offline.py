"""A Hugging Face tower named while the hub cannot be reached fails in seconds, with a hint that holds a valid hub id
and names the packaged towers (``models.towers.hf.hub_offline`` and ``_hf_load``).

    HF_HUB_OFFLINE=1 pytest -q tests/test_hub_offline.py

The suite runs with HF_HUB_OFFLINE=1; these tests turn it off in-process and point huggingface_hub at a local port
that refuses connections, or at one that never answers, so nothing leaves the machine.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from huggingface_hub import constants
from transformers import AutoConfig

from mmfuse.config import PACKAGED_TOWERS
from mmfuse.errors import MmfuseError
from mmfuse.models.towers import hf


@pytest.fixture
def online(monkeypatch, tmp_path):
    """huggingface_hub as without HF_HUB_OFFLINE, with an empty hub cache; the probe's answer forgotten before and
    after, and the offline switch it may throw put back."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # restored after, though the probe sets it for children
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_ETAG_TIMEOUT", raising=False)
    hf.hub_offline.cache_clear()
    yield monkeypatch
    hf.hub_offline.cache_clear()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once closed: connections are refused at once


def test_unreachable_hub_fails_fast_with_a_valid_hint(online):
    online.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(MmfuseError) as e:
        hf._hf_load(AutoConfig, "resnet50", "vision tower", "--vision")
    took = time.monotonic() - start
    # Without the probe, huggingface_hub retries each file with back-off: about a minute before the error.
    assert took < 8, f"took {took:.1f} s to fail"
    msg = str(e.value)
    assert "could not be reached within 3 s" in msg and "the local hub cache did not provide it" in msg
    assert "owner/name (e.g. microsoft/resnet-50" in msg
    assert "download resnet50" not in msg and "hf download OWNER/NAME --local-dir DIR" in msg
    assert f"Packaged models that always work offline: {', '.join(sorted(PACKAGED_TOWERS))}." in msg
    # The rest of the process (and its children) is offline: no second probe, no retries.
    assert constants.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_hub_id_keeps_its_name_in_the_hint(online):
    online.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(MmfuseError) as e:
        hf._hf_load(AutoConfig, "someone/some-vit", "vision tower", "--vision")
    msg = str(e.value)
    assert "hf download someone/some-vit --local-dir DIR" in msg
    assert "A hub id looks like" not in msg  # it already is one


@pytest.fixture
def silent_hub(online):
    """A hub that accepts the connection and never answers (a stuck proxy)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()  # the kernel completes the handshake; no one ever reads or writes
        online.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        yield online


def test_silent_hub_times_out(silent_hub):
    silent_hub.setattr(hf, "HUB_PROBE_SECONDS", 0.5)
    start = time.monotonic()
    reason = hf.hub_offline()
    took = time.monotonic() - start
    assert reason and "could not be reached within 0.5 s" in reason and "HF_HUB_ETAG_TIMEOUT" in reason
    assert took < 3, f"took {took:.1f} s"
    start = time.monotonic()
    assert hf.hub_offline() == reason and time.monotonic() - start < 0.1  # asked once per process


def test_a_set_etag_timeout_is_the_probes(silent_hub):
    """A slow network's user waits longer with huggingface_hub's own setting."""
    silent_hub.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    silent_hub.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 2)
    start = time.monotonic()
    reason = hf.hub_offline()
    assert reason and "could not be reached within 2 s" in reason and time.monotonic() - start >= 1.9


def test_offline_env_is_named(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hf.hub_offline.cache_clear()
    try:
        with pytest.raises(MmfuseError, match=r"HF_HUB_OFFLINE is set, and the local hub cache did not provide it"):
            hf._hf_load(AutoConfig, "nobody/nothing-here", "text tower", "--text")
    finally:
        hf.hub_offline.cache_clear()
