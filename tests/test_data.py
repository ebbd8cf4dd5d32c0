"""slq_hf.data: one record type and one reader table, read the same way by training, evaluation and karr-build.

The rule under test everywhere: in every JSONL form a plain string is a text, even when it names a file that exists
or reads like a camera file name (``IMG_0042.JPG``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from slq_hf.data import FORMATS, READERS, DataFormatError, DatasetImage, Item, read_records
from slq_hf.data.karr_build import read_pairs
from slq_hf.evaluation import load_retrieval_dataset, read_jsonl
from slq_hf.training import HFPairDataset, SLQDataCollator, example_roles, load_item, load_training_data


def _png(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def files(tmp_path):
    """Two images, and captions that name one of them or look like camera file names."""
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", (30, 30, 200))
    return tmp_path


# ------------------------------------------------------------------------------------------------ reader table
def test_the_table_has_one_reader_per_format():
    assert FORMATS == tuple(READERS) and set(READERS) == {"jsonl", "karpathy", "karr", "hf"}


def test_every_format_reads_to_records(files):
    root = files
    jsonl = _jsonl(root / "pairs.jsonl", [{"image": "img/a.png", "texts": ["a red square", "red"]}])
    karr = _jsonl(root / "karr.jsonl", [{"image": "img/b.png", "knowledge": "the sky's colour", "caption": "blue"}])
    karpathy = root / "dataset_toy.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "a.png", "filepath": "img", "split": "train",
                                                "sentences": [{"raw": "a red square"}]}]}))
    records = {name: read_records(path) for name, path in (("jsonl", jsonl), ("karr", karr), ("karpathy", karpathy))}
    assert records["jsonl"][0].query == Item(root / "img" / "a.png", name="img/a.png")
    assert [p.text for p in records["jsonl"][0].positives] == ["a red square", "red"]
    assert records["jsonl"][0].source == f"{jsonl}:1" and records["jsonl"][0].line == 1
    assert [p.text for p in records["karr"][0].positives] == ["the sky's colour"]
    assert records["karr"][0].fields["caption"] == "blue"
    assert [p.text for p in read_records(karr, text_field="caption")[0].positives] == ["blue"]
    assert records["karpathy"][0].query.image == root / "img" / "a.png"
    assert records["karpathy"][0].split == "train"


def test_hf_reader_keeps_images_undecoded_until_used(tmp_path):
    datasets = pytest.importorskip("datasets")
    import io

    red = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(red, format="PNG")
    table = datasets.Dataset.from_dict({"image": [{"bytes": red.getvalue(), "path": "r.png"},
                                                  {"bytes": b"not an image", "path": "bad.png"},
                                                  {"bytes": red.getvalue(), "path": "r2.png"}],
                                        "caption": [["r0", "r1"], ["broken"], ["again"]]})
    table = table.cast_column("image", datasets.Image())
    records = read_records(table, "hf")  # the corrupt row does not fail the read: nothing is decoded here
    assert [len(r.positives) for r in records] == [2, 1, 1]
    images = [r.query.image for r in records]
    assert all(isinstance(image, DatasetImage) for image in images)
    assert images[0].key == images[2].key != images[1].key  # same bytes, same image
    assert images[0].load().getpixel((0, 0)) == (255, 0, 0)


# ---------------------------------------------------------------------------- plain strings are texts everywhere
CAPTIONS = ["img/b.png", "IMG_0042.JPG", "a red square"]  # an existing file, a camera name, a plain caption


def test_jsonl_captions_that_name_files_are_texts_in_training(files, tiny_backbone_path):
    from transformers import AutoProcessor

    path = _jsonl(files / "pairs.jsonl", [
        *[{"image": "img/a.png", "text": caption} for caption in CAPTIONS],
        {"query": "img/b.png", "positive": {"image": "img/a.png"}},
        {"query": {"image": "img/a.png", "text": "IMG_0042.JPG"}, "positive": "img/b.png"},
    ])
    data = load_training_data(path)
    assert len(data) == 5
    assert [data[i]["text"] for i in range(3)] == CAPTIONS
    assert data[3]["query"] == {"text": "img/b.png"}
    assert data[4]["query"]["text"] == "IMG_0042.JPG" and data[4]["positive"] == {"text": "img/b.png"}
    # What the collator does with them: every caption loads as a text, none as an image (or a missing one).
    for index in range(3):
        item = load_item(example_roles(data[index])["positive"])
        assert item.image is None and item.text == CAPTIONS[index]
    # In a real batch the text side has no pixels at all: a caption taken for an image would add some.
    processor = AutoProcessor.from_pretrained(tiny_backbone_path("qwen3_vl"))
    batch = SLQDataCollator(processor, strict=True)([data[i] for i in range(3)])
    assert batch["positive_input_ids"].shape[0] == 3 and "positive_pixel_values" not in batch
    assert batch["input_ids"].shape[0] == 3 and "pixel_values" in batch


def test_jsonl_captions_that_name_files_are_texts_in_evaluation_and_karr_build(files):
    path = _jsonl(files / "pairs.jsonl", [{"image": "img/a.png", "text": caption} for caption in CAPTIONS])
    data = read_jsonl(path, split=None)
    assert data.texts == CAPTIONS and data.text_to_image == [0, 0, 0]
    assert data.images == [files / "img" / "a.png"]  # img/b.png is a caption here, not a second image
    (pair,) = read_pairs(path)
    assert pair.captions == CAPTIONS


def test_training_and_evaluation_read_the_same_pairs(files):
    path = _jsonl(files / "pairs.jsonl", [
        {"image": "img/a.png", "captions": ["a red square", "IMG_0042.JPG"], "split": "test"},
        {"image": "img/b.png", "text": "a blue square", "split": "test"},
    ])
    train = load_training_data(path)
    evaluation = load_retrieval_dataset(path, split="test")
    pairs_train = [(Path(train[i]["image"]), train[i]["text"]) for i in range(len(train))]
    pairs_eval = [(evaluation.images[o], t) for t, o in zip(evaluation.texts, evaluation.text_to_image)]
    assert pairs_train == pairs_eval


def test_training_reads_every_format_of_the_table(files):
    karr = _jsonl(files / "karr.jsonl", [{"image": "img/a.png", "knowledge": "the colour of blood"}])
    assert [load_training_data(karr)[0][k] for k in ("image", "text")] == [str(files / "img" / "a.png"),
                                                                           "the colour of blood"]
    karpathy = files / "dataset_toy.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": "a.png", "filepath": "img", "split": "train", "sentences": [{"raw": "red"}, {"raw": "rouge"}]},
        {"filename": "b.png", "filepath": "img", "split": "test", "sentences": [{"raw": "blue"}]}]}))
    data = load_training_data(karpathy, split="train")
    assert [data[i]["text"] for i in range(len(data))] == ["red", "rouge"]
    assert data[1]["_source"].endswith("images[0][1]")


def test_training_data_is_never_empty(files):
    """`slq-hf train` relies on this: every reader refuses a source without examples, naming it."""
    empty = _jsonl(files / "empty.jsonl", ["", "  "])
    with pytest.raises(DataFormatError, match=re.escape(f"{empty}: the file holds no records")):
        load_training_data(empty)
    karpathy = files / "dataset_empty.json"
    karpathy.write_text(json.dumps({"images": []}))
    with pytest.raises(DataFormatError, match=re.escape(f"{karpathy}: no image has split")):
        load_training_data(karpathy)
    datasets = pytest.importorskip("datasets")
    empty_table = datasets.Dataset.from_dict({"image": [], "text": []})
    with pytest.raises(ValueError, match="dataset: the dataset is empty"):
        load_training_data(empty_table, format="hf")
    empty_table.save_to_disk(files / "saved_empty")  # datasets itself raises IndexError loading this folder
    saved = re.escape(f"{files / 'saved_empty'}: ")
    with pytest.raises(DataFormatError, match=saved + ".*IndexError.*empty or neither"):
        load_training_data(files / "saved_empty", format="hf")
    (files / "not_a_dataset").mkdir()
    (files / "not_a_dataset" / "notes.md").write_text("hello")
    with pytest.raises(DataFormatError, match=re.escape(f"{files / 'not_a_dataset'}: ")):
        load_training_data(files / "not_a_dataset", format="hf")


# --------------------------------------------------------------------------------------- errors name file + line
@pytest.mark.parametrize("line, message", [
    ('{"image": "img/a.png", "text": "ok"', "invalid JSON at column"),
    ('"just a string"', "expected a JSON object, got str"),
    ('{"image": "img/a.png"}', "needs exactly one of ['text', 'texts', 'caption', 'captions']"),
    ('{"image": "img/a.png", "text": "x", "caption": "y"}', "this line has ['text', 'caption']"),
    ('{"image": "img/a.png", "texts": []}', "'texts' must be a non-empty caption or a list"),
    ('{"image": 3, "text": "x"}', "'image' must be a non-empty path string"),
    ('{"image": "img/none.png", "text": "x"}', "image file 'img/none.png' not found"),
    ('{"query": "a"}', "needs \"query\" and \"positive\""),
    ('{"query": "a", "positive": 3}', "'positive' is int"),
    ('{"query": "a", "positive": {"img": "a.png"}}', "'positive' is ['img']"),
    ('{"reference": "img/a.png", "target": "img/b.png"}', "missing ['text']"),
    ('{"caption": "x"}', "got keys ['caption']"),
    # An empty query or positive is an empty caption in any form of line, not only on {"image", "text"} lines.
    ('{"query": "", "positive": {"image": "img/a.png"}}', "'query' has an empty text ''"),
    ('{"query": {"image": "img/a.png"}, "positive": "  "}', "'positive' has an empty text '  '"),
    ('{"query": {"image": "img/a.png", "text": ""}, "positive": {"image": "img/b.png"}}', "'query' has an empty"),
    # A role key of another form of line was dropped without a word (a hard negative lost).
    ('{"image": "img/a.png", "text": "x", "negative": "y"}', "an image line cannot also have ['negative']"),
    ('{"reference": "img/a.png", "text": "x", "target": "img/b.png", "negative": "y"}',
     "a composed line cannot also have ['negative']"),
    ('{"query": "x", "positive": {"image": "img/a.png"}, "image": "img/b.png"}',
     "a pair line cannot also have ['image']"),
])
def test_jsonl_errors_name_the_file_and_line(files, line, message):
    path = _jsonl(files / "d.jsonl", ['{"image": "img/a.png", "text": "fine"}', "", line])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        read_records(path)


def test_pair_lines_keep_their_hard_negative_and_equal_the_image_line_form(files):
    """The pair form of an image and its caption reads as the {"image", "text"} line does; its hard negative is
    kept, and an empty hard negative is left for the collator to skip (as documented)."""
    path = _jsonl(files / "d.jsonl", [{"image": "img/a.png", "text": "red"},
                                      {"query": {"image": "img/a.png"}, "positive": "red", "negative": "blue"},
                                      {"query": {"image": "img/a.png"}, "positive": "red", "negative": ""}])
    plain, paired, empty = read_records(path)
    assert (paired.query.image, paired.positives) == (plain.query.image, plain.positives)
    assert paired.negative == Item(text="blue") and empty.negative == Item(text="")


def test_a_split_field_is_matched_as_text(files):
    path = _jsonl(files / "d.jsonl", [{"image": "img/a.png", "text": "x", "split": 1},
                                      {"image": "img/b.png", "text": "y", "split": 2}])
    assert [r.positives[0].text for r in read_records(path, split="1")] == ["x"]  # was: "no line has split '1'"


def test_other_errors_name_what_to_do(files):
    path = _jsonl(files / "d.jsonl", [{"image": "img/a.png", "text": "x"}])
    with pytest.raises(ValueError, match=r"--image-root does not apply to the jsonl format"):
        read_records(path, image_root=files)
    with pytest.raises(ValueError, match=r"format='csv' \(--format\) is not supported"):
        read_records(path, "csv")
    with pytest.raises(DataFormatError, match=re.escape(f"{files / 'missing.jsonl'}: data file not found")):
        read_records(files / "missing.jsonl", "jsonl")
    with pytest.raises(DataFormatError, match="cannot tell the format from the suffix '.csv'"):
        read_records(_jsonl(files / "d.csv", ["x"]))
    karr = _jsonl(files / "k.jsonl", [{"image": "img/a.png", "knowledge": "a"}, {"image": "img/a.png",
                                                                                "knowledge": "b"}])
    with pytest.raises(DataFormatError, match=re.escape(f"{karr}:2: ") + ".*already appeared on line 1"):
        read_records(karr)
    pairs = _jsonl(files / "p.jsonl", [{"image": "img/a.png", "text": "a cat", "object": 3}])
    with pytest.raises(DataFormatError, match=re.escape(f"{pairs}:1: ") + "\"object\" must be a word"):
        read_pairs(pairs)
    composed = _jsonl(files / "c.jsonl", [{"reference": "img/a.png", "text": "same", "target": "img/a.png"}])
    with pytest.raises(DataFormatError, match=re.escape(f"{composed}:1: reference and target are the same image")):
        read_jsonl(composed)


# ------------------------------------------------------------------------------- encodings, line ends, detection
def test_jsonl_and_karpathy_files_with_a_byte_order_mark_read(files):
    line = json.dumps({"image": "img/a.png", "text": "a red square"}).encode()
    jsonl = files / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + line + b"\n")
    assert [p.text for p in read_records(jsonl)[0].positives] == ["a red square"]
    karpathy = files / "dataset_bom.json"
    karpathy.write_bytes(b"\xef\xbb\xbf" + json.dumps({"images": [{"filename": "a.png", "filepath": "img",
                                                                   "split": "test", "sentences": [{"raw": "r"}]}]}
                                                      ).encode())
    assert read_records(karpathy)[0].query.image == files / "img" / "a.png"


def test_jsonl_strings_may_hold_unicode_line_separators(files):
    """JSON allows U+2028, U+0085 and form feeds unescaped in strings (json.dumps(ensure_ascii=False) writes them,
    as karr-build does); only "\\n" ends a JSONL line."""
    texts = ["a\u2028b", "c\x85d", "e\x0cf"]
    path = files / "seps.jsonl"
    path.write_text("".join(json.dumps({"image": "img/a.png", "text": t}, ensure_ascii=False) + "\r\n"
                            for t in texts), encoding="utf-8")
    records = read_records(path)
    assert [r.positives[0].text for r in records] == texts and [r.line for r in records] == [1, 2, 3]


def test_non_utf8_and_empty_files_name_the_line_and_what_to_do(files):
    path = files / "latin1.jsonl"
    path.write_bytes(b'{"image": "img/a.png", "text": "ok"}\n{"image": "img/a.png", "text": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2: not UTF-8 text") + ".*save the file as UTF-8"):
        read_records(path)
    empty = files / "dataset_empty.json"
    empty.write_text("")
    with pytest.raises(DataFormatError, match=re.escape(f"{empty}: the file is empty")):
        read_records(empty)


def test_an_image_that_is_a_folder_is_named_as_one(files):
    (files / "img" / "dir.png").mkdir()
    path = _jsonl(files / "d.jsonl", [{"image": "img/dir.png", "text": "x"}])
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:1: image file 'img/dir.png' is a folder")):
        read_records(path)
    karpathy = files / "dataset_dir.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "dir.png", "filepath": "img", "split": "test",
                                                "sentences": [{"raw": "r"}]}]}))
    with pytest.raises(DataFormatError, match=r"images\[0\] \('dir.png'\): image file is a folder"):
        read_records(karpathy)


def test_format_detection_json_lines_named_json_and_upper_case_suffixes(files):
    from slq_hf.data import detect_format

    lines = [{"image": "img/a.png", "text": "red"}, {"image": "img/b.png", "text": "blue"}]
    assert detect_format(_jsonl(files / "pairs.json", lines)) == "jsonl"
    assert [r.positives[0].text for r in read_records(files / "pairs.json")] == ["red", "blue"]
    assert detect_format(_jsonl(files / "k.json", [{"image": "img/a.png", "knowledge": "k"},
                                                   {"image": "img/b.png", "knowledge": "l"}])) == "karr"
    assert detect_format(_jsonl(files / "UPPER.JSONL", lines)) == "jsonl"
    karpathy = files / "dataset_toy.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "a.png", "filepath": "img", "split": "test",
                                                "sentences": [{"raw": "r"}]}]}, indent=1))
    assert detect_format(karpathy) == "karpathy"
    one = _jsonl(files / "one.json", lines[:1])  # one line: cannot tell, but the error says what to do
    with pytest.raises(DataFormatError, match=r"pass --format jsonl"):
        read_records(one)


def test_format_detection_of_a_jsonl_file_reads_its_first_record_only(files):
    """Detection looked at one record but parsed the whole file first (a fifth of the reading time, twice the
    peak memory on a large file); a bad later line is the reader's to report, with its line."""
    from slq_hf.data import detect_format

    path = _jsonl(files / "k.jsonl", [{"image": "img/a.png", "knowledge": "k"}, '{"image": "img/b.png", "kn'])
    assert detect_format(path) == "karr"
    with pytest.raises(DataFormatError, match=re.escape(f"{path}:2: invalid JSON")):
        read_records(path)
    path.write_bytes(b"\xef\xbb\xbf\n" + path.read_bytes())  # a byte-order mark on a blank first line
    assert detect_format(path) == "karr"
    with pytest.raises(DataFormatError, match=re.escape(f"{files / 'none.jsonl'}: data file not found")):
        detect_format(files / "none.jsonl")


def test_karpathy_images_resolve_like_the_other_readers(files, monkeypatch):
    """Default root: the JSON's own folder, through a symbolic link to it as for jsonl; "~" in image_root works."""
    real = files / "real"
    _png(real / "img" / "a.png")
    doc = {"images": [{"filename": "a.png", "filepath": "img", "split": "test", "sentences": [{"raw": "r"}]}]}
    (real / "dataset_r.json").write_text(json.dumps(doc))
    _jsonl(real / "p.jsonl", [{"image": "img/a.png", "text": "r"}])
    (files / "links").mkdir()
    for name in ("dataset_r.json", "p.jsonl"):
        (files / "links" / name).symlink_to(real / name)
    assert read_records(files / "links" / "p.jsonl")[0].query.image == real / "img" / "a.png"
    assert read_records(files / "links" / "dataset_r.json")[0].query.image == real / "img" / "a.png"
    monkeypatch.setenv("HOME", str(real))
    (files / "elsewhere").mkdir()
    (files / "elsewhere" / "dataset_r.json").write_text(json.dumps(doc))
    assert read_records(files / "elsewhere" / "dataset_r.json", image_root="~")[0].query.image == (
        real / "img" / "a.png")


def test_hf_captions_as_lists_of_dicts_and_sequence_features(files):
    datasets = pytest.importorskip("datasets")
    images = [str(files / "img" / "a.png"), str(files / "img" / "b.png")]
    as_list = datasets.Dataset.from_dict({"image": images, "sentences": [[{"raw": "r1"}, {"raw": "r2"}],
                                                                          [{"raw": "b1"}]]})
    features = datasets.Features({"image": datasets.Value("string"),
                                  "sentences": datasets.Sequence({"raw": datasets.Value("string")})})
    as_sequence = datasets.Dataset.from_dict({"image": images, "sentences": [{"raw": ["r1", "r2"]},
                                                                              {"raw": ["b1"]}]}, features=features)
    other_key = datasets.Dataset.from_dict({"image": images, "captions": [[{"caption": "r1"}, {"caption": "r2"}],
                                                                           [{"caption": "b1"}]]})
    for table in (as_list, as_sequence, other_key):
        records = read_records(table, "hf")
        assert [[p.text for p in r.positives] for r in records] == [["r1", "r2"], ["b1"]]
        assert [r.query.image for r in records] == [Path(images[0]), Path(images[1])]


def test_hf_image_cells_holding_relative_paths_resolve_against_image_root(files, monkeypatch, tiny_backbone_path):
    """An Image column of path-only cells resolves like a column of path strings (image_root, --image-root), in
    evaluation and in training; a cell that cannot be read names its row and column."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(files)
    table = datasets.Dataset.from_dict({"image": ["img/a.png", "img/b.png"], "text": ["red", "blue"]}).cast_column(
        "image", datasets.Image())
    elsewhere = files / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the relative paths no longer name the files from the working directory
    dataset = load_retrieval_dataset(table, "hf", split=None, image_root=files)
    assert [image.load().size for image in dataset.images] == [(32, 32), (32, 32)]
    examples = HFPairDataset(table, image_root=files)
    assert examples[1]["image"]["path"] == str(files / "img" / "b.png")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_backbone_path("qwen3_vl"))
    SLQDataCollator(processor, strict=True)([examples[0], examples[1]])  # strict: raises on an unreadable image
    with pytest.raises(ValueError, match=r"Image file not found \(row 0 of column 'image', file '.*img/a.png'\)"):
        load_retrieval_dataset(table, "hf", split=None).images[0].load()


def test_hf_image_cells_are_opened_with_the_image_checks(files, fake_ghostscript):
    """A cell's bytes open only as one of the allowed formats (an EPS never reaches Ghostscript), and errors name
    the row and column instead of PIL's "cannot identify image file <_io.BytesIO ...>"."""
    datasets = pytest.importorskip("datasets")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nshowpage\n%%EOF\n"
    png = (files / "img" / "a.png").read_bytes()
    table = datasets.Dataset.from_dict({"image": [{"bytes": png, "path": None}, {"bytes": eps, "path": "x.png"},
                                                  {"bytes": b"not an image", "path": None}],
                                        "text": ["a", "b", "c"]}).cast_column("image", datasets.Image())
    images = load_retrieval_dataset(table, "hf", split=None).images
    assert images[0].load().size == (32, 32)
    for row in (1, 2):
        with pytest.raises(ValueError, match=rf"Cannot read image \(row {row} of column 'image'.*not an image"):
            images[row].load()
    assert not fake_ghostscript.exists()


def test_a_dataset_dict_of_one_split_needs_no_split(files):
    """load_dataset reads a folder of data files as a DatasetDict with one "train" split: training (which names no
    split) reads it instead of asking for a --split that slq-hf train does not have."""
    pytest.importorskip("datasets")
    folder = files / "hf_files"
    folder.mkdir()
    _jsonl(folder / "data.jsonl", [{"image": "../img/a.png", "text": "red"},
                                   {"image": "../img/b.png", "text": "blue"}])
    examples = load_training_data(folder)
    assert [(e["image"], e["text"]) for e in examples] == [(str(folder / "../img/a.png"), "red"),
                                                          (str(folder / "../img/b.png"), "blue")]
    assert read_records(folder, "hf")[0].split == "train"
