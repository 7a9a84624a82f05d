"""The data path: what one batch of training or prediction is made of, modality by modality.

Each modality of a model reads from one source, and the tune mode only chooses which:

- image, tower frozen: ``FeatureSource``, pooled features embedded once;
- image, tower tuned: ``PixelSource``, uint8 images decoded once and normalised on the device by the tower, or
  ``ImageFileSource``, decoded and preprocessed every epoch (a processor that crops or pads, too little memory,
  ``--decode-each-epoch``);
- text, tower frozen: ``FeatureSource``, or ``TokenStateSource`` for a pooling learned with the head;
- text, tower tuned: ``TokenSource``, each text tokenized once and padded per batch.

``MultimodalDataset`` holds ``{input: source}`` (an input is a modality, or with named columns one column of it, and
the tabular columns: ``MultimodalClassifier.slots``) with the presence mask and the labels, and gathers a whole batch
per call (``__getitems__``): each source fills its part of the model's keyword arguments. ``build_dataset`` makes one
for a model, records and the tuned modalities; the DataLoader's collate is the identity (``batch_collate``).

Two caches under ``$MMFUSE_HOME`` feed the sources, both keyed by what produced an entry and by the content hash of
the item, stored in shards with an index and checked on every read (``cache.py``), each batch asked for at once:

- ``FeatureCache`` (``features/<tower fingerprint>/``): a frozen tower makes the same features every epoch and every
  run, so each image and text is embedded once (``embed``);
- ``PixelCache`` (``pixels/<PixelSpec fingerprint>/``): fine-tuning sees every image once an epoch at the same size,
  so each is decoded and resized once, by the one function every other path uses too (``towers.image_pixels``: the
  same pixels in training and in serving), and kept as uint8 (3 x H x W, 150 kB at 224 px; a quarter of float32's
  bytes on the way to the GPU). At 2,000+ samples/s, PIL in a few CPU processes cannot keep a GPU busy.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmfuse.data.columns import Slot, column_records, has_cell
from mmfuse.data.filestats import file_index
from mmfuse.data.images import load_image
from mmfuse.data.records import Record
from mmfuse.distributed import gather_lists, launch_state, share
from mmfuse.features.cache import FeatureCache, PixelCache
from mmfuse.features.cache_admin import describe_tower
from mmfuse.models.pooling import TokenStates
from mmfuse.models.towers.base import PixelSpec, Tower, image_pixels
from mmfuse.models.towers.onnx_engine import engine
from mmfuse.paths import mmfuse_home
from mmfuse.progress import Progress

if TYPE_CHECKING:
    from mmfuse.models.classifier import MultimodalClassifier

log = logging.getLogger(__name__)
# PIL releases the GIL while decoding and resizing, so threads scale on the cores there are.
DECODE_WORKERS = max(1, min(32, os.cpu_count() or 1))
PIXEL_CHUNK = 512  # images asked of the pixel cache at once (77 MB at 224 px)


# ---------------------------------------------------------------------------------------------------------------------
# Caches


def sha256_file(path: str | Path) -> str:
    """The content hash both caches key files by, so a changed file misses and a moved one hits."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_keys(records: list[Record], modality: str) -> list[str]:
    """What a feature depends on besides the tower: the text, or the image file's bytes (hashes of unchanged
    files are remembered across runs)."""
    if modality == "text":
        return [hashlib.sha256(r.text.encode("utf-8")).hexdigest() for r in records]
    return file_index().values("sha256", [str(r.image) for r in records], sha256_file, workers=4)


def pixel_cache() -> PixelCache:
    return PixelCache(mmfuse_home() / "pixels")


# ---------------------------------------------------------------------------------------------------------------------
# Filling them


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
    shard: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Features of one modality's frozen tower for every record, from the cache where possible; the tower is built
    only when some record misses it.

    Args:
        shard: under a multi-process ``accelerate launch``, where every process passes the same records: each embeds
            a contiguous share of what the cache misses, every distinct item once across processes, and all return
            every feature (read back from the cache, or gathered when there is none). A collective call.

    Returns:
        (N, dim) float32, or for towers that give token states (``sequence``) a list of N (tokens, dim) float16
        tensors, padding dropped.
    """
    card = model.cards[modality]
    fp, seq = card.fingerprint, card.sequence
    keys = content_keys(records, modality)
    out: list | np.ndarray = [None] * len(records) if seq else np.zeros((len(records), card.dim), dtype=np.float32)
    todo = []
    for i, hit in enumerate(cache.get_many(fp, keys) if cache else [None] * len(keys)):
        if hit is not None and (hit.shape[-1:] == (card.dim,) and hit.ndim == (2 if seq else 1)):
            out[i] = hit
        else:
            todo.append(i)
    if cache:
        cache.hits += len(records) - len(todo)
        cache.misses += len(todo)
    state = launch_state() if shard else None
    if state is not None and state.num_processes > 1:
        _embed_shared(model, modality, records, keys, out, todo, cache, state, batch_size, device, show)
    else:
        for idx, feats in _embedded(model, modality, records, todo, batch_size, device, show):
            for i, f in zip(idx, feats):
                out[i] = f
            if cache:
                cache.put_many(fp, [(keys[i], f) for i, f in zip(idx, feats)], name=describe_tower(modality, card.spec))
    return [torch.from_numpy(f) for f in out] if seq else torch.from_numpy(out)


def _embedded(model, modality: str, records: list[Record], todo: list[int], batch_size: int, device, show: bool):
    """(rows, their features) for each batch of the rows ``todo``, embedded by the modality's tower (built only if
    needed), where ``model.cfg.backend`` says (``onnx_engine.engine``).

    Texts go in order of length, so each batch, padded to its longest, pads little (the rows say where each feature
    goes). The next batch is decoded and preprocessed in a thread while the tower runs this one: PIL, the tokenizer
    and onnxruntime all release the GIL."""
    if not todo:
        return
    tower = model.build_tower(modality)
    tower.eval()
    run = engine(tower, model.cfg.backend, device, len(todo))  # the tower itself, or its ONNX export on a CPU
    if modality == "text":
        todo = sorted(todo, key=lambda i: len(records[i].text))
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]

    def prepare(idx: list[int]) -> dict:
        return tower.preprocess(_load_inputs([records[i] for i in idx], modality))

    with Progress(len(todo), f"embedding {modality}s", unit=modality, show=show) as bar, ThreadPoolExecutor(1) as ahead:
        pending = ahead.submit(prepare, batches[0])
        for n, idx in enumerate(batches):
            inputs = pending.result()
            if n + 1 < len(batches):
                pending = ahead.submit(prepare, batches[n + 1])
            feats = run(**{k: v.to(device) for k, v in inputs.items()}).float().cpu().numpy()
            if model.cards[modality].sequence:  # keep only real tokens, in half precision: token states are 10-100x
                lengths = inputs["attention_mask"].sum(1).tolist()
                feats = [f[: int(n)].astype(np.float16) for f, n in zip(feats, lengths)]
            yield idx, feats
            bar.update(len(idx))


def _embed_shared(model, modality, records, keys, out, todo, cache, state, batch_size, device, show) -> None:
    """``embed``'s misses split over the processes of a launch; fills ``out`` at the rows ``todo``."""
    card = model.cards[modality]
    fp = card.fingerprint
    # The union of every process's misses, each distinct item once: an item one process found cached and another
    # did not (the cache filled in between) is embedded once more, never skipped.
    first: dict[str, int] = {}
    for i in sorted(set().union(*gather_lists(todo))):
        first.setdefault(keys[i], i)
    unique = list(first.values())
    # Whole batches, as one process would make them: the same rows through the same batch shapes give the same
    # floats, where a row's last bit can change with its batch.
    mine = [unique[j] for j in share(len(unique), state.process_index, state.num_processes, batch_size)]
    made: dict[str, np.ndarray] = {}
    for idx, feats in _embedded(model, modality, records, mine, batch_size, device, show and state.is_main_process):
        made.update((keys[i], f) for i, f in zip(idx, feats))
        if cache:
            cache.put_many(fp, [(keys[i], f) for i, f in zip(idx, feats)], name=describe_tower(modality, card.spec))
    log.log(
        logging.INFO if unique else logging.DEBUG,
        "process %d of %d embedded %d of the %d %s(s) missing from the cache",
        state.process_index,
        state.num_processes,
        len(mine),
        len(unique),
        modality,
    )
    if cache is None:
        for part in gather_lists(list(made.items())):
            made.update(part)
    else:
        state.wait_for_everyone()  # every share is in the cache
    others = [i for i in todo if keys[i] not in made]
    if cache and others:
        made.update(
            (keys[i], f) for i, f in zip(others, cache.get_many(fp, [keys[i] for i in others])) if f is not None
        )
    lost = []
    for i in todo:
        f = made.get(keys[i])
        if f is None:
            lost.append(i)
        else:
            out[i] = f
    if lost:  # another process's entry could not be read back (a full disk, say): embed it here instead
        log.warning(
            "%d %s feature(s) written by other processes could not be read back: embedding them", len(lost), modality
        )
        for idx, feats in _embedded(model, modality, records, lost, batch_size, device, show=False):
            for i, f in zip(idx, feats):
                out[i] = f


decode_resized = image_pixels
"""One image as (3, height, width) uint8 (``towers.image_pixels``; the name the captioners import)."""


def cached_pixels(path: str | Path, spec: PixelSpec, cache: FeatureCache | None) -> np.ndarray:
    """One image as (3, height, width) uint8, from ``cache`` when it holds this file's content at this spec."""
    if cache is None:
        return image_pixels(path, spec)
    return _cached_pixels([path], [sha256_file(path)], spec, cache, 1)[0]


def _cached_pixels(paths: Sequence, keys: list[str], spec: PixelSpec, cache: FeatureCache, workers: int) -> list:
    """The images of ``paths`` (content hashes ``keys``) from ``cache``, the others decoded by ``workers`` threads
    and stored."""
    shape = (3, spec.height, spec.width)
    out = cache.get_many(spec.fingerprint, keys)
    for i, hit in enumerate(out):
        if hit is not None and (hit.dtype != np.uint8 or hit.size != math.prod(shape)):  # foreign to this spec
            out[i] = None
    todo = [i for i, hit in enumerate(out) if hit is None]
    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(min(workers, len(todo))) as pool:
            decoded = list(pool.map(lambda i: image_pixels(paths[i], spec), todo))
    else:
        decoded = [image_pixels(paths[i], spec) for i in todo]
    for i, img in zip(todo, decoded):
        out[i] = img
    if todo:
        name = f"pixels {spec.height}x{spec.width}"
        cache.put_many(spec.fingerprint, [(keys[i], out[i]) for i in todo], name=name)
    cache.hits += len(out) - len(todo)
    cache.misses += len(todo)
    return [hit.reshape(shape) for hit in out]


def available_memory() -> int | None:
    """Bytes of memory the system can still give without swapping (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load_pixels(
    paths: Sequence[str | Path],
    spec: PixelSpec,
    cache: FeatureCache | None = None,
    workers: int = DECODE_WORKERS,
    use_cache: bool = True,
) -> torch.Tensor:
    """Every image as uint8, stacked to (N, 3, height, width), from the on-disk cache where possible.

    Args:
        paths: image files.
        spec: the tower's preprocessing (``Tower.pixel_spec``).
        cache: where decoded images live (default ``$MMFUSE_HOME/pixels``).
        workers: decoding threads for images not cached yet.
        use_cache: False decodes everything and writes nothing (for timing the decode itself).
    """
    cache = (cache or pixel_cache()) if use_cache else None
    out = torch.empty((len(paths), 3, spec.height, spec.width), dtype=torch.uint8)
    workers = max(1, workers)
    if cache is None:
        with ThreadPoolExecutor(workers) as pool:
            for i, img in enumerate(pool.map(lambda p: image_pixels(p, spec), paths)):
                out[i] = torch.from_numpy(img)
        return out
    # Content hashes of unchanged files are remembered (filestats), then the cache is asked a chunk at a time.
    keys = file_index().values("sha256", [str(p) for p in paths], sha256_file, workers=workers)
    for start in range(0, len(paths), PIXEL_CHUNK):
        part = slice(start, start + PIXEL_CHUNK)
        for i, img in enumerate(_cached_pixels(paths[part], keys[part], spec, cache, workers), start):
            out[i] = torch.from_numpy(img)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Sources: each gives its modality's part of a batch for the rows ``idx``


class FeatureSource:
    """Pooled features of a frozen tower, (N, dim)."""

    def __init__(self, modality: str, feats: torch.Tensor):
        self.key, self.feats = f"{modality}_feats", feats

    def batch(self, idx: torch.Tensor) -> dict:
        return {self.key: self.feats[idx]}


class TokenStateSource:
    """Token states of a frozen text tower, stored normalised (``pooling.TokenStates``)."""

    def __init__(self, states: TokenStates, key: str = "text"):
        self.states, self.key = states, f"{key}_feats"

    def batch(self, idx: torch.Tensor) -> dict:
        return {self.key: self.states.batch(idx)}


class TabularSource:
    """Tabular columns encoded with the training statistics (``data.tabular.TabularSpec.encode``)."""

    def __init__(self, numeric, codes):
        self.numeric, self.codes = torch.from_numpy(numeric), torch.from_numpy(codes)

    def batch(self, idx: torch.Tensor) -> dict:
        return {"tabular": {"numeric": self.numeric[idx], "codes": self.codes[idx]}}


class PixelSource:
    """uint8 images decoded once, (N, 3, H, W): the tuned tower normalises them on the device (``float_pixels``)."""

    def __init__(self, pixels: torch.Tensor, key: str = "image"):
        self.pixels, self.key = pixels, key

    def batch(self, idx: torch.Tensor) -> dict:
        return {self.key: {"pixel_values": self.pixels[idx]}}  # one gather, not one view per row stacked


_BLANK = Image.new("RGB", (32, 32))


def _load(image: str | Path, i: int) -> Image.Image:
    return load_image(image)


class ImageFileSource:
    """Image files decoded and preprocessed by the tower for every batch (in DataLoader workers, if any).

    ``open_image(image, row)`` opens one; the Python API passes one that also takes PIL images and names bad ones.
    """

    def __init__(
        self,
        paths: Sequence,
        tower: Tower,
        open_image: Callable[[object, int], Image.Image] = _load,
        key: str = "image",
    ):
        self.paths, self.tower, self.open_image, self.key = list(paths), tower, open_image, key

    def batch(self, idx: torch.Tensor) -> dict:
        # An empty image cell (a column's, None) still fills its place in the batch: the model masks its features.
        images = [self.open_image(self.paths[i], i) if self.paths[i] is not None else _BLANK for i in idx.tolist()]
        return {self.key: self.tower.preprocess(images)}


class TokenizedTexts:
    """A text tower's batch inputs for texts seen again and again (each epoch of fine-tuning): every distinct text is
    tokenized once, and a batch only pads. Tokenizing per batch took 37 ms of the main process for 128 texts (a
    profiled seed job on an H200 machine), half the GPU time of the reference model's training step."""

    def __init__(self, tower: Tower, texts: Sequence[str] = (), multiple: int = 1):
        self.tower, self.multiple = tower, multiple
        self.ids: dict[str, np.ndarray] = {}
        self.add(texts)

    def add(self, texts: Sequence[str]) -> None:
        new = list(dict.fromkeys(t for t in texts if t not in self.ids))
        if new and hasattr(self.tower, "tokenize"):
            # int32 arrays: 100,000 texts of 40 tokens took 28 MB so, 166 MB as lists of Python ints.
            self.ids.update((t, np.asarray(ids, dtype=np.int32)) for t, ids in zip(new, self.tower.tokenize(new)))

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if not hasattr(self.tower, "tokenize"):  # a text tower without a tokenizer of its own
            return self.tower.preprocess(texts)
        self.add(texts)
        return self.tower.pad([self.ids[t] for t in texts], self.multiple)


class TokenSource:
    """Texts for a tuned text tower: each distinct text tokenized once, a batch only padded."""

    def __init__(self, texts: Sequence[str], tokens: TokenizedTexts, key: str = "text"):
        self.texts, self.tokens, self.key = list(texts), tokens, key

    def batch(self, idx: torch.Tensor) -> dict:
        return {self.key: self.tokens([self.texts[i] for i in idx.tolist()])}


class MultimodalDataset(Dataset):
    """``{modality: source}``, with which modalities each row has and its label; batches are gathered whole."""

    def __init__(self, sources: dict, present: torch.Tensor, labels: torch.Tensor | None):
        self.sources, self.present, self.labels = sources, present, labels

    @property
    def decodes(self) -> bool:
        """Whether batches decode image files, the one source that DataLoader workers speed up."""
        return any(isinstance(s, ImageFileSource) for s in self.sources.values())

    def __len__(self) -> int:
        return len(self.present)

    def __getitems__(self, indices: list[int]) -> dict:
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = {}
        for source in self.sources.values():
            batch.update(source.batch(idx))
        batch["present"] = self.present[idx]
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])


def batch_collate(batch: dict) -> dict:
    """``MultimodalDataset.__getitems__`` already returns whole batches."""
    return batch


def present_mask(records: list[Record], slots: Sequence[str | Slot]) -> torch.Tensor:
    """Which inputs each record has (a modality name stands for its one slot): an image always (with named columns,
    when its cell is not empty), a text only when non-empty, the tabular columns always (each cell's absence is an
    input of their own)."""
    slots = [Slot(s, s, s) if isinstance(s, str) else s for s in slots]
    cols = [[s.modality == "tabular" or has_cell(r, s.modality, s.column) for r in records] for s in slots]
    return torch.tensor(cols, dtype=torch.bool).reshape(len(slots), len(records)).T.contiguous()


def build_dataset(
    model: MultimodalClassifier,
    records: list[Record],
    labels: torch.Tensor | None,
    tuned: Collection[str],
    cache: FeatureCache | None,
    device: torch.device | str = "cpu",
    show: bool = True,
    pixel_cache: bool | PixelCache = False,
    open_image: Callable[[object, int], Image.Image] = _load,
) -> MultimodalDataset:
    """A dataset with one source per modality of ``model``: features cached once for frozen towers, raw inputs for
    the ``tuned`` ones (all of them, for inputs seen once: the Python API's).

    With ``pixel_cache``, a tuned vision tower whose preprocessing is a plain resize (``Tower.pixel_spec``) reads
    images decoded once to uint8, unless they would take over half the free memory (from this ``PixelCache``, if one
    is given, else ``$MMFUSE_HOME/pixels``). ``open_image`` opens images read raw.
    """
    present = present_mask(records, model.slots)
    pad_to = 8 if torch.device(device).type == "cuda" else 1  # on a CPU, padding is only more work
    sources, tokens = {}, None
    for col, s in enumerate(model.slots):
        if s.modality == "tabular":
            sources[s.name] = TabularSource(*model.tabular_spec.encode(records))
            continue
        rows = column_records(records, s.modality, s.column)  # one column's cells, keyed by content as any row's
        if s.modality not in tuned:
            sources[s.name] = _feature_source(model, s.modality, rows, present[:, col], cache, device, show, s.name)
        elif s.modality == "text":
            texts = [r.text for r in rows]
            tokens = tokens or TokenizedTexts(model.build_tower("text"), (), pad_to)  # one for every text column
            tokens.add(texts)
            sources[s.name] = TokenSource(texts, tokens, s.name)
        else:
            sources[s.name] = _image_source(model.build_tower("image"), rows, pixel_cache, open_image, s.name)
    return MultimodalDataset(sources, present, labels)


def _feature_source(model, modality: str, records, present: torch.Tensor, cache, device, show, key: str = ""):
    # Rows missing a modality are not embedded (an empty string is not a caption): they get zeros (no tokens), and
    # the model swaps in its learned placeholder.
    have = present.nonzero().flatten().tolist()
    card = model.cards[modality]
    got = embed(model, modality, [records[i] for i in have], cache, device=device, show=show) if have else []
    if card.sequence:
        items = [torch.zeros(0, card.dim, dtype=torch.float16)] * len(records)
        for i, f in zip(have, got):
            items[i] = f
        return TokenStateSource(TokenStates(items, card.dim), key or modality)
    full = torch.zeros(len(records), card.dim)
    if have:
        full[have] = got
    return FeatureSource(key or modality, full)


def _image_source(tower: Tower, records: list[Record], pixel_cache: bool | PixelCache, open_image, key: str = "image"):
    paths = [r.image for r in records]
    if not pixel_cache:
        return ImageFileSource(paths, tower, open_image, key)
    spec = tower.pixel_spec
    if spec is None:
        log.info("decoding images every epoch: %s", getattr(tower, "pixel_spec_problem", "no pixel spec"))
        return ImageFileSource(paths, tower, key=key)
    # The decoded images are held in memory whole: a dataset too large for that decodes every epoch instead.
    need, free = len(records) * 3 * spec.height * spec.width, available_memory()
    if free is not None and need > free // 2:
        log.warning(
            "decoding images every epoch: %d decoded images would take %.1f GB, over half of the %.1f GB of memory "
            "available (--num-workers N decodes in N processes)",
            len(records),
            need / 1e9,
            free / 1e9,
        )
        return ImageFileSource(paths, tower, key=key)
    return PixelSource(load_pixels(paths, spec, pixel_cache if isinstance(pixel_cache, PixelCache) else None), key)
