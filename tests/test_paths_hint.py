"""A mistyped data path is answered with the close names that do exist ("did you mean data/icons/train.csv?"), or with
the first part of the path that does not."""

from __future__ import annotations

import pytest

from mmfuse.cli import main
from mmfuse.data.checks import load_checked
from mmfuse.data.read import missing_hint, read_captions, read_data
from mmfuse.errors import MmfuseError


@pytest.fixture
def data(tmp_path, monkeypatch):
    icons = tmp_path / "data" / "icons"
    icons.mkdir(parents=True)
    for name in ("train.csv", "val.csv", "test.csv", "captions.csv"):
        (icons / name).write_text("image,text,label\n", encoding="utf-8")
    (icons / "images").mkdir()
    monkeypatch.chdir(tmp_path)  # the paths as a user types them, relative to where they are
    return icons


def test_a_misspelt_file_name_suggests_close_names_in_its_folder(data):
    with pytest.raises(MmfuseError) as e:
        read_data("data/icons/trian.csv")
    assert str(e.value).startswith("Data not found: data/icons/trian.csv; did you mean data/icons/train.csv")
    assert missing_hint(data / "tset.csv").startswith(f"; did you mean {data / 'test.csv'}")
    # at most 3, and none where nothing is close
    assert missing_hint(data / "x.csv") == ""
    assert str(e.value).count("data/icons/") <= 1 + 3


def test_a_missing_folder_is_named_with_the_folders_that_hold_the_rest(data):
    with pytest.raises(MmfuseError) as e:
        read_data("data/icosn/train.csv")
    assert "(data/icosn does not exist; did you mean data/icons/train.csv?)" in str(e.value)
    with pytest.raises(MmfuseError) as e:
        read_data("dta/icons/val.csv")
    assert "(dta does not exist; did you mean data/icons/val.csv?)" in str(e.value)
    with pytest.raises(MmfuseError) as e:
        read_data("elsewhere/zzz/train.csv")
    assert str(e.value) == "Data not found: elsewhere/zzz/train.csv (elsewhere does not exist)"
    assert missing_hint(data / "train.csv" / "x") == f" ({data / 'train.csv'} is a file, not a folder)"


def test_captions_and_the_cli_flags_say_it_too(data, capsys):
    with pytest.raises(MmfuseError, match=r"Captions file not found: data/icons/captons.csv; did you mean .*captions"):
        read_captions("data/icons/captons.csv")
    with pytest.raises(MmfuseError, match=r"Data not found: data/icons/vla.csv; did you mean data/icons/val.csv\?"):
        load_checked("data/icons/vla.csv")  # as --val and --test are read
    assert main(["train", "data/icons/trian.csv", "--out", "runs/x", "--tune", "head"]) != 0
    assert "data/icons/trian.csv; did you mean data/icons/train.csv?" in capsys.readouterr().err
