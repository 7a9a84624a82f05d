"""``mmfuse quickstart``: the emoji data, the default offline towers, and the modality ablation on its test split."""

from __future__ import annotations

from pathlib import Path

from .ablate import ablate
from .config import RunConfig
from .datasets.emoji import emoji_dataset


def quickstart_config(data: Path) -> RunConfig:
    cfg = RunConfig()
    cfg.data.train = str(data / "train.csv")
    cfg.data.val = str(data / "val.csv")
    return cfg


def quickstart(out: str | Path, rebuild_data: bool = False) -> dict[str, dict]:
    """Builds (or reuses) the emoji dataset, trains image-only, text-only and fusion heads, scores them on test."""
    data = emoji_dataset(rebuild=rebuild_data)
    out = Path(out)
    return ablate(quickstart_config(data), out, test=data / "test.csv", fusion_dir=out)
