"""What the training loop reads: cached frozen-tower features, or raw images and texts for fine-tuning.

Frozen towers make the same features every epoch, so each image and each text is embedded once and kept on disk,
keyed by the tower's fingerprint (weights + preprocessing) and the item's content hash. A changed file, tower or
preprocessing misses only what changed. Every entry is written to a temporary name and renamed into place, so
concurrent or interrupted runs never leave a partial file behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .data import Record
from .filestats import file_index
from .images import load_image
from .model import MultimodalClassifier, normalise_tokens
from .paths import mmfuse_home
from .towers import TokenizedTexts

log = logging.getLogger(__name__)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_keys(records: list[Record], modality: str) -> list[str]:
    """What a feature depends on besides the tower: the text, or the image file's bytes (hashes of unchanged
    files are remembered across runs)."""
    if modality == "text":
        return [hashlib.sha256(r.text.encode("utf-8")).hexdigest() for r in records]
    return file_index().values("sha256", [str(r.image) for r in records], _sha256_file, workers=4)


class FeatureCache:
    """One .npy file per (tower, item), under ``root/<tower fingerprint>/<key[:2]>/<key>.npy``.

    With ``memory``, entries read or written are also kept in this process (and in processes forked from it):
    runs that share a cache object, like the ablation's three, then read each file once.
    """

    suffix = ".npy"

    def __init__(self, root: Path | None = None, memory: bool = False):
        self.root = Path(root) if root else mmfuse_home() / "features"
        self.hits = self.misses = 0
        self.memory: dict[tuple[str, str], np.ndarray] | None = {} if memory else None

    def _path(self, fingerprint: str, key: str) -> Path:
        return self.root / fingerprint / key[:2] / f"{key}{self.suffix}"

    def _read(self, path: Path) -> np.ndarray:
        return np.load(path)

    def _write(self, f, value: np.ndarray) -> None:
        np.save(f, value)

    def get(self, fingerprint: str, key: str) -> np.ndarray | None:
        if self.memory is not None and (fingerprint, key) in self.memory:
            return self.memory[fingerprint, key]
        try:
            value = self._read(self._path(fingerprint, key))
        except (OSError, ValueError):  # absent, or unreadable for any reason: recompute rather than fail
            return None
        if self.memory is not None:
            self.memory[fingerprint, key] = value
        return value

    def put(self, fingerprint: str, key: str, value: np.ndarray) -> None:
        if self.memory is not None:
            self.memory[fingerprint, key] = value
        path = self._path(fingerprint, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                self._write(f, value)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _load_inputs(records: list[Record], modality: str) -> list:
    if modality == "text":
        return [r.text for r in records]
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda r: load_image(r.image), records))


@torch.inference_mode()
def embed(
    model: MultimodalClassifier,
    modality: str,
    records: list[Record],
    cache: FeatureCache | None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show: bool = True,
) -> torch.Tensor:
    """Features of one modality for every record, from the cache where possible.

    Returns:
        (N, dim) float32, or for towers that give token states (``tower.sequence``) a list of N (tokens, dim)
        float16 tensors, padding dropped.
    """
    tower = model.towers[modality]
    fp = tower.fingerprint
    keys = content_keys(records, modality)
    seq = tower.sequence
    out: list | np.ndarray = [None] * len(records) if seq else np.zeros((len(records), tower.dim), dtype=np.float32)
    todo = []
    for i, key in enumerate(keys):
        hit = cache.get(fp, key) if cache else None
        if hit is not None and (hit.shape[-1:] == (tower.dim,) and hit.ndim == (2 if seq else 1)):
            out[i] = hit
        else:
            todo.append(i)
    if cache:
        cache.hits += len(records) - len(todo)
        cache.misses += len(todo)
    tower.eval()
    bar = tqdm(total=len(todo), desc=f"embedding {modality}s", unit=modality, disable=not show or not todo)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        inputs = tower.preprocess(_load_inputs([records[i] for i in idx], modality))
        feats = tower(**{k: v.to(device) for k, v in inputs.items()}).float().cpu().numpy()
        if seq:  # keep only real tokens, in half precision: token states are 10-100x a pooled vector
            lengths = inputs["attention_mask"].sum(1).tolist()
            feats = [f[: int(n)].astype(np.float16) for f, n in zip(feats, lengths)]
        for i, f in zip(idx, feats):
            out[i] = f
            if cache:
                cache.put(fp, keys[i], f)
        bar.update(len(idx))
    bar.close()
    return [torch.from_numpy(f) for f in out] if seq else torch.from_numpy(out)


def present_mask(records: list[Record], modalities: list[str]) -> torch.Tensor:
    """Which modalities each record has: images always, text only when non-empty."""
    cols = [[True] * len(records) if m == "image" else [bool(r.text.strip()) for r in records] for m in modalities]
    return torch.tensor(cols, dtype=torch.bool).T.contiguous()


class TokenStates:
    """Variable-length token states of N items, stored flat ((total tokens, dim), float16) with offsets.

    A batch is gathered in a few tensor operations and padded only to its own longest item; padding every item to
    the longest overall would cost memory in proportion to the largest text.

    The states are stored layer-normalised (without an affine), once: ``model.AttentionPool`` starts with exactly
    that, and doing it per batch was a tenth of a head's training step.
    """

    def __init__(self, items: list[torch.Tensor], dim: int):
        lengths = torch.tensor([len(t) for t in items], dtype=torch.long)
        # One zero row last, which padding positions point at: a batch is then one gather, with no masking pass.
        self.flat = torch.cat([*(t.to(torch.float16) for t in items), torch.zeros(1, dim, dtype=torch.float16)])
        for rows in self.flat[:-1].split(1 << 16):  # views, in chunks: float32 copies of all tokens can be large
            rows.copy_(normalise_tokens(rows.float()))
        self.offsets = torch.cumsum(lengths, 0) - lengths
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, dim) float32 normalised states and (B, T) mask for items ``idx``; T: their longest (at least 1)."""
        lengths = self.lengths[idx]
        steps = torch.arange(max(1, int(lengths.max())))
        mask = steps[None, :] < lengths[:, None]
        positions = torch.where(mask, self.offsets[idx][:, None] + steps[None, :], len(self.flat) - 1)
        return self.flat[positions].float(), mask.long()


class FeatureDataset(Dataset):
    """Precomputed features: the head trains from these in milliseconds per epoch.

    A modality's features are an (N, dim) tensor, or ``TokenStates``. Batches are gathered whole
    (``__getitems__``): per-item indexing and collation cost more than the head's own step here.
    """

    def __init__(self, feats: dict[str, torch.Tensor | TokenStates], present: torch.Tensor, labels):
        self.feats, self.present, self.labels = feats, present, labels

    def __len__(self) -> int:
        return len(self.present)

    def __getitems__(self, indices: list[int]) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {}
        for m, f in self.feats.items():
            if isinstance(f, TokenStates):
                batch[f"{m}_feats"], batch[f"{m}_mask"] = f.batch(idx)
            else:
                batch[f"{m}_feats"] = f[idx]
        batch["present"] = self.present[idx]
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])


class RawDataset(Dataset):
    """Decoded images and raw texts, for fine-tuning towers; ``collate`` runs the towers' preprocessing."""

    def __init__(self, records: list[Record], modalities: list[str], labels: torch.Tensor | None):
        self.records, self.modalities, self.labels = records, modalities, labels
        self.present = present_mask(records, modalities)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        item = {"present": self.present[i]}
        if "image" in self.modalities:
            item["image"] = load_image(rec.image)
        if "text" in self.modalities:
            item["text"] = rec.text
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def raw_collate(
    model: MultimodalClassifier, modalities: Collection[str] | None = None, texts: Sequence[str] = (), pad_to: int = 1
) -> Callable[[list[dict]], dict]:
    """Runs the towers' preprocessing on a batch; each distinct text is tokenized once (``texts`` up front)."""
    towers = {m: t for m, t in model.towers.items() if modalities is None or m in modalities}
    tokens = TokenizedTexts(towers["text"], texts, pad_to) if "text" in towers else None

    def collate(items: list[dict]) -> dict:
        batch = {"present": torch.stack([it["present"] for it in items])}
        for m, tower in towers.items():
            batch[m] = tokens([it[m] for it in items]) if m == "text" else tower.preprocess([it[m] for it in items])
        if "labels" in items[0]:
            batch["labels"] = torch.stack([it["labels"] for it in items])
        return batch

    return collate


class PartlyTunedDataset(Dataset):
    """Cached features of the frozen towers beside raw inputs for the tuned ones (``--tune text``, ``--tune image``).

    Batches are gathered whole, like ``FeatureDataset``'s; the raw part is collated by ``collate``.
    """

    def __init__(self, features: FeatureDataset, raw: Dataset, collate: Callable[[list[dict]], dict]):
        self.features, self.raw, self.collate = features, raw, collate

    def __len__(self) -> int:
        return len(self.features)

    def __getitems__(self, indices: list[int]) -> dict:
        batch = self.collate([self.raw[i] for i in indices])
        batch.update(self.features.__getitems__(indices))  # its presence mask covers every modality
        return batch

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])


def feature_collate(batch: dict) -> dict:
    """``FeatureDataset.__getitems__`` already returns whole batches."""
    return batch


def make_dataset(
    model: MultimodalClassifier,
    records: list[Record],
    labels: torch.Tensor | None,
    tuned: Collection[str],
    cache: FeatureCache | None,
    device="cpu",
    show: bool = True,
    pixel_cache: bool = False,
):
    """The dataset and collate function for the ``tuned`` modalities' towers on raw inputs, the others' on features
    cached once (all frozen: the head's fast path).

    With ``pixel_cache``, a tuned vision tower reads images decoded once to uint8 (``mmfuse.fastdata``) where its
    preprocessing allows it; the tower normalises them on the device.
    """
    tuned = [m for m in model.modalities if m in tuned]
    frozen = [m for m in model.modalities if m not in tuned]
    raw = None
    if tuned:
        raw, collate = _raw_dataset(model, records, labels, tuned, pixel_cache, device)
        if not frozen:
            return raw, collate
    present = present_mask(records, model.modalities)
    feats = {}
    for m in frozen:
        # Rows missing a modality are not embedded (an empty string is not a caption): they get zeros (no tokens),
        # and the model swaps in its learned placeholder.
        have = [i for i in range(len(records)) if present[i, model.modalities.index(m)]]
        dim = model.towers[m].dim
        got = embed(model, m, [records[i] for i in have], cache, device=device, show=show) if have else []
        if model.towers[m].sequence:
            items = [torch.zeros(0, dim, dtype=torch.float16)] * len(records)
            for i, f in zip(have, got):
                items[i] = f
            full = TokenStates(items, dim)
        else:
            full = torch.zeros(len(records), dim)
            if have:
                full[have] = got
        feats[m] = full
    features = FeatureDataset(feats, present, labels)
    if raw is None:
        return features, feature_collate
    return PartlyTunedDataset(features, raw, collate), feature_collate


def _raw_dataset(
    model: MultimodalClassifier, records: list[Record], labels, tuned: list[str], pixel_cache: bool, device
):
    texts = [r.text for r in records] if "text" in tuned else ()
    pad_to = 8 if torch.device(device).type == "cuda" else 1  # on a CPU, padding is only more work
    if pixel_cache and "image" in tuned:
        from . import fastdata
        from .errors import MmfuseError

        try:
            spec = fastdata.PixelSpec.from_tower(model.towers["image"])
        except MmfuseError as e:
            log.info("decoding images every epoch: %s", e)
        else:
            # The decoded images are held in memory whole: a dataset too large for that decodes every epoch instead.
            need, free = len(records) * 3 * spec.height * spec.width, fastdata.available_memory()
            if free is None or need <= free // 2:
                pixels = fastdata.load_pixels([r.image for r in records], spec)
                ds = fastdata.PixelDataset(records, tuned, labels, pixels)
                return ds, fastdata.pixel_collate(model, tuned, texts, pad_to)
            log.warning(
                "decoding images every epoch: %d decoded images would take %.1f GB, over half of the %.1f GB of memory "
                "available (--num-workers N decodes in N processes)",
                len(records),
                need / 1e9,
                free / 1e9,
            )
    return RawDataset(records, tuned, labels), raw_collate(model, tuned, texts, pad_to)
