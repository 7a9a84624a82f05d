"""Texts the input check must catch before a tokenizer sees them (lone surrogates, texts of only invisible
characters), texts it must let through (NUL or a combining mark among words), and texts too long for csv or for the
tokenizer to hold (cut by characters, with one warning)."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import read_csv
from PIL import Image

from mmfuse.data.checks import CHARS_PER_TOKEN, MAX_TEXT_CHARS, clip_text, load_checked
from mmfuse.errors import DataError


@pytest.fixture
def images(tmp_path):
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    return tmp_path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from mmfuse.models.towers import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def write_jsonl(path, texts):
    path.write_text("\n".join(json.dumps({"image": "a.png", "text": t, "label": "x"}) for t in texts) + "\n")


def test_lone_surrogates_in_jsonl_are_bad_rows_for_training_and_prediction(images, tokenizer):
    texts = ["a grinning face", "scraped \ud83d text", "a tail \udc00 only", "a pair \ud83d\ude00 is fine"]
    with pytest.raises(TypeError):  # what train and predict died of, past --skip-bad
        tokenizer([texts[1]])
    write_jsonl(images / "m.jsonl", texts)
    with pytest.raises(DataError) as e:
        load_checked(images / "m.jsonl")  # as train loads
    assert "2 bad row(s)" in str(e.value)
    assert "row 2: a.png: text holds a lone surrogate (\\ud83d at character 8)" in str(e.value)
    assert "row 3: a.png: text holds a lone surrogate (\\udc00" in str(e.value)

    skipped = images / "preds.skipped.csv"
    records = load_checked(  # as predict loads, with --skip-bad
        images / "m.jsonl", labels=["x"], need_label=False, skip_bad=True, skipped_csv=skipped
    )
    assert [r.row for r in records] == [1, 4]
    tokenizer([r.text for r in records])  # what is left tokenizes
    assert [(r["row"], "lone surrogate" in r["reason"]) for r in read_csv(skipped)] == [("2", True), ("3", True)]


def test_texts_the_tokenizer_reads_as_nothing_are_bad_rows_and_nul_among_words_is_read(images, tokenizer):
    empty = ["\x00\x01", "\u0301", "\u200b\u200e", "\x7f\x85"]  # controls, a lone combining mark, format characters
    kept = ["a\x00b apple", "\u0301red train", "tab\tand\nnewline"]
    for text in empty:  # the tokenizer gives nothing but [CLS] [SEP]: the model would see no text
        assert len(tokenizer(text)["input_ids"]) == 2, repr(text)
    for text in kept:
        assert len(tokenizer(text)["input_ids"]) > 2, repr(text)
    rows = ["image,text,label", *(f'a.png,"{t}",x' for t in kept + empty)]
    (images / "m.csv").write_bytes(("\n".join(rows) + "\n").encode("utf-8") + b"b.png,caf\xed\xa0\xbd,x\n")
    with pytest.raises(DataError) as e:
        load_checked(images / "m.csv")
    message = str(e.value)
    assert "5 bad row(s)" in message
    for row in range(4, 8):
        assert f"row {row}: a.png: no text (its text holds only control, format or combining characters" in message
    assert "row 8: b.png: text is not valid UTF-8" in message  # a surrogate written out as bytes

    # A model that needs no text (modality dropout) would read such a row as text that is there but says nothing.
    records = load_checked(images / "m.csv", labels=["x"], need_label=False, need_text=False, skip_bad=True)
    assert [r.text for r in records] == kept
    with pytest.raises(DataError, match="leave it empty instead"):
        load_checked(images / "m.csv", labels=["x"], need_label=False, need_text=False)


def test_a_csv_cell_over_128_kb_loads_and_long_texts_are_cut_with_one_warning(images, caplog):
    long = "a very long product description " * 6_500  # 208 KB, over csv's default field limit of 128 KB
    huge = "x" * 5_000_000
    (images / "m.csv").write_text(f"image,text,label\na.png,{long},x\nb.png,short,y\na.png,{huge},y\n")
    with caplog.at_level(logging.WARNING):
        records = load_checked(images / "m.csv")
    assert [len(r.text) for r in records] == [MAX_TEXT_CHARS, 5, MAX_TEXT_CHARS]
    assert records[0].text == long[:MAX_TEXT_CHARS]
    cuts = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert cuts == [f"cut 2 text(s) of {images / 'm.csv'} to their first {MAX_TEXT_CHARS} characters before "
                    "tokenizing (the text tower reads far fewer)"]  # fmt: skip

    caplog.clear()
    write_jsonl(images / "m.jsonl", ["short", huge])
    with caplog.at_level(logging.WARNING):
        records = load_checked(images / "m.jsonl", max_chars=128 * CHARS_PER_TOKEN)
    assert [len(r.text) for r in records] == [5, 2048]
    assert sum("cut 1 text(s)" in r.getMessage() and "2048 characters" in r.getMessage() for r in caplog.records) == 1


def test_clip_text():
    assert clip_text("abcdef", 4) == "abcd"
    assert clip_text("abc", 4) == "abc"
    assert clip_text("", 4) == ""
