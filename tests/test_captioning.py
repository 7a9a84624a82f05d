"""Captioning: tiny random Hugging Face captioners saved to disk, the packaged imagenet-tags, resume after kill -9,
and a labelled folder with no text trained end to end."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: the hub is never reachable here

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfuse.captioning import pipeline
from mmfuse.captioning.captioners import Captioner, HFCaptioner, build_captioner, imagenet_names
from mmfuse.captioning.decoder import GreedyGPT2Decoder
from mmfuse.captioning.pipeline import COLUMNS, caption_file, fill_missing_captions
from mmfuse.cli import main
from mmfuse.data.read import read_data
from mmfuse.data.records import Record
from mmfuse.errors import DataError, MmfuseError

WORDS = [
    "<|endoftext|>",
    "[UNK]",
    "[DEC]",
    "a",
    "an",
    "photo",
    "of",
    "cat",
    "dog",
    "red",
    "blue",
    "green",
    "square",
    "circle",
    "on",
    "the",
    "table",
    "in",
    "park",
    "with",
    "small",
    "big",
    "two",
    "sitting",
    "next",
    "to",
    "bowl",
    "fruit",
    "man",
    "riding",
    "horse",
    "street",
    "sign",
]


def word_tokenizer(bos: str, eos: str, pad: str, **special):
    """A word-level tokenizer: every token is a word, so any generated token decodes to visible text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token=bos, eos_token=eos, pad_token=pad, **special
    )


def tiny_vit_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTModel

    torch.manual_seed(seed)
    # A wide initialisation makes the random model's greedy tokens vary by image and by step.
    encoder = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            initializer_range=0.5,
        )
    )
    decoder = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(WORDS),
            n_positions=64,
            n_embd=48,
            n_layer=2,
            n_head=2,
            add_cross_attention=True,
            is_decoder=True,
            bos_token_id=0,
            eos_token_id=0,
            initializer_range=0.5,
        )
    )
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    model.config.decoder_start_token_id = model.config.pad_token_id = 0
    gen = model.generation_config
    gen.decoder_start_token_id, gen.pad_token_id, gen.eos_token_id = 0, 0, 0
    return model


def save_captioner(model, directory: Path) -> str:
    from transformers import ViTImageProcessor

    model.save_pretrained(directory)
    word_tokenizer("<|endoftext|>", "<|endoftext|>", "<|endoftext|>").save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Two local ViT-GPT2 checkpoints: one that always says something, one that always stops at once."""
    root = tmp_path_factory.mktemp("captioners")
    talkative = tiny_vit_gpt2()
    talkative.generation_config.min_new_tokens = 2
    mute = tiny_vit_gpt2()
    mute.generation_config.suppress_tokens = list(range(1, len(WORDS)))  # only EOS is left
    return {"talkative": save_captioner(talkative, root / "talkative"), "mute": save_captioner(mute, root / "mute")}


def write_images(root: Path, n: int, seed: int = 0, size: int = 40) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = root / f"sub{i % 3}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, whose barriers stall badly when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_new_tokens", [None, 3])
def test_greedy_decoder_matches_generate(min_new_tokens):
    model = tiny_vit_gpt2(seed=1)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.min_new_tokens = 1, [0, 2], min_new_tokens  # two EOS ids, distinct pad
    decoder = GreedyGPT2Decoder(model)
    pixels = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.generate(pixel_values=pixels, max_new_tokens=12, do_sample=False)[:, 1:]
    ref = torch.nn.functional.pad(ref, (0, 12 - ref.shape[1]), value=1)  # generate stops once all rows finished
    fast = decoder.generate(pixels, 12)
    assert torch.equal(fast, ref)
    with torch.inference_mode():  # the graph-safe form that CUDA captures: positions and masks read on device
        state = decoder.new_state(decoder.cross_kv(decoder.encode(pixels)), 12)
        for _ in range(12):
            decoder.step(state)
    assert torch.equal(state["out"], ref)
    assert len(fast.unique()) > 5  # a meaningful comparison: varied tokens, not one repeated id
    if min_new_tokens is None:
        assert (fast == 1).any() and not (fast == 1).all()  # some rows stopped early and were padded


def test_greedy_decoder_declines_what_it_cannot_reproduce():
    model = tiny_vit_gpt2()
    assert GreedyGPT2Decoder.supports(model)
    model.generation_config.no_repeat_ngram_size = 2
    assert not GreedyGPT2Decoder.supports(model)


def test_caption_folder_from_local_dir_works_as_captions(tiny_dirs, tmp_path):
    paths = write_images(tmp_path / "imgs", 7)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    out = tmp_path / "captions.csv"
    assert (
        main(
            [
                "caption",
                str(tmp_path / "imgs"),
                "--out",
                str(out),
                "--model",
                tiny_dirs["talkative"],
                "--batch-size",
                "3",
                "--max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    rows = read_rows(out)
    assert list(rows[0]) == COLUMNS
    assert sorted(r["image"] for r in rows) == sorted(p.relative_to(tmp_path / "imgs").as_posix() for p in paths)
    assert all(r["text"].strip() and set(r["text"].split()) <= set(WORDS) for r in rows)
    assert {r["model"] for r in rows} == {tiny_dirs["talkative"]}
    # the same captions as the library call, and the CSV is a valid --captions for the folder
    by_image = {r["image"]: r["text"] for r in rows}
    captioner = build_captioner(tiny_dirs["talkative"], max_new_tokens=6)
    assert captioner([captioner.load(p) for p in paths[:2]]) == [
        by_image[p.relative_to(tmp_path / "imgs").as_posix()] for p in paths[:2]
    ]
    records, _ = read_data(tmp_path / "imgs", captions=out, need_label=False)
    assert len(records) == 7 and all(r.text == by_image[r.source] for r in records)


def test_rerun_skips_done_images_and_redoes_changed_ones(tiny_dirs, tmp_path, monkeypatch):
    paths = write_images(tmp_path / "imgs", 5)
    out = tmp_path / "captions.csv"
    caption_file(tmp_path / "imgs", out, model=tiny_dirs["talkative"], batch_size=2, max_new_tokens=6, show=False)
    first = read_rows(out)

    def no_model(*a, **k):
        raise AssertionError("nothing is left to caption: no model should load")

    monkeypatch.setattr(pipeline, "build_captioner", no_model)
    caption_file(tmp_path / "imgs", out, model=tiny_dirs["talkative"], show=False)
    assert read_rows(out) == first
    monkeypatch.undo()

    Image.new("RGB", (40, 40), (0, 200, 0)).save(paths[1])  # same path, new content: captioned again
    with open(out, "a", encoding="utf-8") as f:
        f.write(f"{paths[3].relative_to(tmp_path / 'imgs').as_posix()},half a ro")  # a kill mid-write
    caption_file(tmp_path / "imgs", out, model=tiny_dirs["talkative"], max_new_tokens=6, show=False)
    rows = read_rows(out)
    assert len(rows) == 5 and len({r["image"] for r in rows}) == 5
    changed = paths[1].relative_to(tmp_path / "imgs").as_posix()
    assert [r["hash"] for r in rows if r["image"] == changed] != [r["hash"] for r in first if r["image"] == changed]

    with pytest.raises(MmfuseError, match="holds captions by"):
        caption_file(tmp_path / "imgs", out, model="imagenet-tags", show=False)


def test_empty_captions_are_reported_never_written(tiny_dirs, tmp_path, capsys):
    write_images(tmp_path / "imgs", 3)
    out = tmp_path / "captions.csv"
    assert main(["caption", str(tmp_path / "imgs"), "--out", str(out), "--model", tiny_dirs["mute"]]) == 2
    assert "3 image(s) got no caption" in capsys.readouterr().err
    assert read_rows(out) == []
    skipped = read_rows(tmp_path / "captions.skipped.csv")
    assert len(skipped) == 3 and all("returned no text" in r["reason"] for r in skipped)
    assert main(["caption", str(tmp_path / "imgs"), "--out", str(out), "--model", tiny_dirs["mute"], "--skip-bad"]) == 0


def test_bad_images_stop_or_are_skipped_and_recorded(tiny_dirs, tmp_path):
    write_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (40, 40)).save(tmp_path / "imgs" / "cut.jpg")
    data = (tmp_path / "imgs" / "cut.jpg").read_bytes()
    (tmp_path / "imgs" / "cut.jpg").write_bytes(data[: len(data) // 2])
    out = tmp_path / "captions.csv"
    with pytest.raises(DataError) as err:
        caption_file(tmp_path / "imgs", out, model=tiny_dirs["talkative"], show=False)
    assert len(err.value.problems) == 2 and not out.exists()

    caption_file(tmp_path / "imgs", out, model=tiny_dirs["talkative"], max_new_tokens=6, skip_bad=True, show=False)
    assert len(read_rows(out)) == 4
    assert sorted(r["image"] for r in read_rows(tmp_path / "captions.skipped.csv")) == ["broken.png", "cut.jpg"]


def test_manifest_images_are_captioned_once(tiny_dirs, tmp_path):
    paths = write_images(tmp_path, 3)
    manifest = tmp_path / "data.csv"
    rel = [p.relative_to(tmp_path).as_posix() for p in paths]
    manifest.write_text("image,text\n" + "".join(f"{r},\n" for r in rel + rel[:1]))
    out = caption_file(manifest, tmp_path / "captions.csv", model=tiny_dirs["talkative"], max_new_tokens=6, show=False)
    assert sorted(r["image"] for r in read_rows(out)) == sorted(rel)


def test_hub_id_offline_gives_clear_error():
    with pytest.raises(MmfuseError) as err:
        HFCaptioner("nlpconnect/vit-gpt2-image-captioning")
    assert "local directory" in str(err.value) and "imagenet-tags" in str(err.value)


def test_blip_loads_through_the_auto_classes(tmp_path):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor

    torch.manual_seed(0)
    text = {
        "vocab_size": len(WORDS),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "bos_token_id": 2,
        "sep_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "initializer_range": 0.5,
    }
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
    }
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    model.generation_config.min_new_tokens = 2
    model.save_pretrained(tmp_path)
    word_tokenizer("[DEC]", "<|endoftext|>", "<|endoftext|>").save_pretrained(tmp_path)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    captioner = HFCaptioner(str(tmp_path), max_new_tokens=6)
    assert captioner.fast is None  # BLIP's decoder is BERT: it goes through generate
    texts = captioner([Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (50, 30), (0, 0, 255))])
    assert len(texts) == 2 and all(t.strip() for t in texts)


def test_imagenet_tags_names_a_cat_for_chelsea():
    skimage_data = pytest.importorskip("skimage.data")
    names = imagenet_names()
    assert len(names) == 1000 and names[281] == "tabby" and names[285] == "Egyptian cat"
    captioner = build_captioner("imagenet-tags")
    chelsea = Image.fromarray(skimage_data.chelsea())
    top = captioner.top_classes([chelsea])[0].tolist()
    assert 281 <= top[0] <= 285
    caption = captioner([chelsea])[0]
    assert caption.startswith("a photo of ") and names[top[0]] in caption and "cat" in caption


def test_fill_missing_captions_keeps_order_and_caches(tmp_path, monkeypatch):
    paths = write_images(tmp_path, 4, size=64)
    records = [Record(p, "given text" if i == 1 else "", "x", i + 1, p.name) for i, p in enumerate(paths)]
    records.append(Record(paths[0], "", "x", 5, "copy-of-first.png"))  # the same image again: one caption
    calls = []

    class Fake(Captioner):
        def __call__(self, images):
            calls.append(len(images))
            return [f"colour {int(np.asarray(im).mean())}" for im in images]

    monkeypatch.setattr(pipeline, "build_captioner", lambda *a, **k: Fake())
    cache = tmp_path / "run" / "captions.csv"
    filled = fill_missing_captions(records, "fake", cache)
    assert [r.row for r in filled] == [1, 2, 3, 4, 5] and filled[1].text == "given text"
    assert all(r.text.startswith("colour") for i, r in enumerate(filled) if i != 1)
    assert filled[4].text == filled[0].text and sum(calls) == 3
    assert fill_missing_captions(records, "fake", cache) == filled and sum(calls) == 3  # all from the cache

    monkeypatch.setattr(Fake, "__call__", lambda self, images: [""] * len(images))
    with pytest.raises(MmfuseError, match="gave no caption for 3 row"):
        fill_missing_captions(records, "another", cache)


@pytest.mark.slow  # a subprocess, killed
def test_resume_after_sigkill(tiny_dirs, tmp_path):
    n = 60
    write_images(tmp_path / "imgs", n)
    out = tmp_path / "captions.csv"
    cmd = [
        sys.executable,
        "-m",
        "mmfuse",
        "caption",
        str(tmp_path / "imgs"),
        "--out",
        str(out),
        "--model",
        tiny_dirs["talkative"],
        "--batch-size",
        "2",
        "--max-new-tokens",
        "5",
    ]
    # One thread: the tiny model gains nothing from more, and it keeps the run steady when other jobs share the cores.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 7:  # the header and at least three batches
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_bytes()
    done = before[: before.rfind(b"\n") + 1].count(b"\n") - 1
    assert 6 <= done < n, "the first run should be killed mid-way"

    rerun = subprocess.run([*cmd, "--resume"], env=env, check=True, capture_output=True, text=True)
    assert f"{done} of {n} image(s) already captioned" in rerun.stderr  # only the batch in flight is redone
    rows = read_rows(out)
    assert len(rows) == n and len({r["image"] for r in rows}) == n
    assert all(r["text"].strip() for r in rows)
    assert out.read_bytes().startswith(before[: before.rfind(b"\n") + 1])  # nothing written before the kill is lost


@pytest.fixture(scope="module")
def captioned_run(tmp_path_factory) -> tuple[Path, Path]:
    """A labelled folder with no text at all (2 colours x 8 images), trained with --caption-missing imagenet-tags."""
    tmp = tmp_path_factory.mktemp("caption_missing")
    rng = np.random.default_rng(0)
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (tmp / "data" / label).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp / "data" / label / f"{i}.png")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(tmp / "home"))
        code = main(
            [
                "train",
                str(tmp / "data"),
                "--out",
                str(tmp / "run"),
                "--caption-missing",
                "imagenet-tags",
                "--tune",
                "head",  # the captions are what is tested: MiniLM need not be fine-tuned on them
                "--epochs",
                "2",
            ]
        )
    assert code == 0
    return tmp / "data", tmp / "run"


def test_train_caption_missing_end_to_end(captioned_run):
    _, run = captioned_run
    rows = read_rows(run / "captions.csv")
    assert len(rows) == 16 and all(r["text"].startswith("a photo of") for r in rows)
    assert (run / "metrics.json").exists()


def test_predict_captions_from_the_runs_config(captioned_run, tmp_path, monkeypatch):
    data, run = captioned_run
    monkeypatch.setenv("MMFUSE_HOME", str(tmp_path / "home"))
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "preds.csv")]) == 0
    assert len(read_rows(tmp_path / "preds.csv")) == 16
    assert len(read_rows(run / "captions.csv")) == 16  # the run's cache held every image already
