"""ZONE's test set: the conversion of the download (annotation keys of the paper's Table 4) into
the ``zone`` format, the loader's fields and rules, and the same samples through the generic loader."""
from __future__ import annotations

import hashlib

import builtins
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from harness.data import open_dataset
from harness.data.generic import GenericDataset
from harness.data.zone import ACTIONS, ZoneDataset, convert_zone, main as zone_main, read_annotations
from harness.types import CATEGORIES, DatasetError, SampleError

from .conftest import REPO, textured

H = W = 32  # ZONE's images are 512 x 512; the loader takes any size, so tests stay small

# Three records as the paper's Table 4 prints them (keys and "N/A"), one per action.
TABLE4 = [
    {"image": "car.png", "action": "Change", "input caption": "A blue car in front of a forest",
     "output caption": "A red car in front of a forest", "instruction": "paint the car red",
     "source object": "blue car", "target object": "red car"},
    {"image": "tie.png", "action": "Remove", "input caption": "A man in black with a tie",
     "output caption": "A man in black", "instruction": "get off his tie",
     "source object": "a tie", "target object": "N/A"},
    {"image": "musk.png", "action": "Add", "input caption": "A photo of Elon Musk",
     "output caption": "A photo of Elon Musk with glasses", "instruction": "give him glasses",
     "source object": "N/A", "target object": "glasses"},
]
EXPECTED = {  # id -> (category, instruction, source_caption, target_caption, source_object, target_object)
    "car": ("change", "paint the car red", "A blue car in front of a forest", "A red car in front of a forest",
            "blue car", "red car"),
    "tie": ("remove", "get off his tie", "A man in black with a tie", "A man in black", "a tie", None),
    "musk": ("add", "give him glasses", "A photo of Elon Musk", "A photo of Elon Musk with glasses", None, "glasses"),
}


class ZoneDownload:
    """A tiny ZONE download: an images folder and an annotation file with the paper's keys."""

    def __init__(self, root: Path, records: list[dict] | None = None):
        self.root = root
        self.images = root / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.arrays: dict[str, np.ndarray] = {}
        self.records = [dict(r) for r in (records if records is not None else TABLE4)]
        for i, r in enumerate(self.records):
            self.image(r["image"], seed=i)

    def image(self, name: str, seed: int = 0) -> None:
        arr = textured(H, W, seed)
        Image.fromarray(arr).save(self.images / name)
        self.arrays[Path(name).stem] = arr

    def write_json(self, name: str = "annotations.json", data=None) -> Path:
        p = self.root / name
        p.write_text(json.dumps(self.records if data is None else data), encoding="utf-8")
        return p


def card(root: Path) -> dict:
    """conf/dataset/zone.yaml read as plain YAML, pointed at ``root``."""
    cfg = yaml.safe_load((REPO / "conf" / "dataset" / "zone.yaml").read_text())
    return {**cfg, "root": str(root)}


def samples(ds) -> dict:
    return {r.id: ds.load(r) for r in ds.refs()}


@pytest.fixture
def converted(tmp_path):
    dl = ZoneDownload(tmp_path / "download")
    conv = convert_zone(dl.write_json(), dl.images, tmp_path / "zone")
    return dl, conv


def test_change_is_not_a_harness_category_so_the_format_declares_it():
    assert "add" in CATEGORIES and "remove" in CATEGORIES and "change" not in CATEGORIES
    assert ACTIONS == ("add", "change", "remove")


def test_conversion_then_the_zone_loader_gives_every_field(converted):
    dl, conv = converted
    assert conv.problems == [] and conv.counts() == {"add": 1, "change": 1, "remove": 1}
    out = conv.out
    assert sorted(p.name for p in (out / "images").iterdir()) == ["car.png", "musk.png", "tie.png"]
    for name in ("car.png", "musk.png", "tie.png"):  # copied, bytes unchanged
        assert (out / "images" / name).read_bytes() == (dl.images / name).read_bytes()
    written = yaml.safe_load((out / "card.yaml").read_text())
    assert written["format"] == "zone" and written["extra_categories"] == ["change"]
    assert written["converted_from"]["records"] == 3 and written["converted_from"]["refused"] == 0
    assert written["categories"] == {"add": 1, "change": 1, "remove": 1}

    ds = open_dataset(card(out))
    assert isinstance(ds, ZoneDataset) and ds.name == "zone"
    assert [r.id for r in ds.refs()] == ["car", "tie", "musk"]  # the annotation file's order
    assert [r.category for r in ds.refs()] == ["change", "remove", "add"]
    got = samples(ds)
    for sid, (cat, instr, src_cap, tgt_cap, src_obj, tgt_obj) in EXPECTED.items():
        s = got[sid]
        assert s.dataset == "zone" and s.category == cat and s.instruction == instr
        assert s.source_caption == src_cap and s.target_caption == tgt_cap
        assert s.meta == {"source_object": src_obj, "target_object": tgt_obj, "zone_image": f"{sid}.png"}
        assert s.source.dtype == np.uint8 and np.array_equal(s.source, dl.arrays[sid])
        assert s.mask is None and s.target is None and s.reference is None and s.source_points is None
    assert ds.validate() == []  # no warnings either: every sample has a category


def test_validate_command_on_the_converted_folder(converted, capsys):
    from harness.cli import main

    _, conv = converted
    assert main(["validate", str(conv.out)]) == 0
    assert capsys.readouterr().out == ("dataset 'zone' v1: 3 samples, 0 error(s), 0 warning(s); "
                                       "categories: add=1, change=1, remove=1\n")
    # the folder's card says format: zone, so validate applies that format's own checks: an entry
    # with a category that is no ZONE action is an error (the generic format would accept it)
    manifest = conv.out / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    first = json.loads(lines[0])
    first["category"] = "change_color"
    manifest.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    assert main(["validate", str(conv.out)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR sample '{first['id']}', field 'category': 'change_color'; a ZONE action is one of add, change, " \
           "remove" in out


def test_the_converted_folder_gives_identical_samples_through_the_generic_loader(converted):
    _, conv = converted
    zone, generic = open_dataset(card(conv.out)), GenericDataset(conv.out)  # generic: the card's name and categories
    assert type(generic) is GenericDataset and generic.name == "zone"
    a, b = samples(zone), samples(generic)
    assert list(a) == list(b) == ["car", "tie", "musk"]
    for sid in a:
        da, db = dataclasses.asdict(a[sid]), dataclasses.asdict(b[sid])
        assert da.keys() == db.keys()
        for k in da:
            if isinstance(da[k], np.ndarray):
                assert np.array_equal(da[k], db[k]), (sid, k)
            else:
                assert da[k] == db[k], (sid, k)
    # same manifest entries, so the same cache fingerprints
    assert [zone.fingerprint(r) for r in zone.refs()] == [generic.fingerprint(r) for r in generic.refs()]


def test_other_annotation_files_and_key_spellings(tmp_path):
    dl = ZoneDownload(tmp_path / "download")
    want = {r["id"]: r for r in convert_zone(dl.write_json(), dl.images, tmp_path / "ref").records}
    # an object keyed by image file name; JSON lines; CSV with snake_case keys and numeric labels
    keyed = {r["image"]: {k: v for k, v in r.items() if k != "image"} for r in dl.records}
    p_keyed = dl.write_json("keyed.json", keyed)
    p_jsonl = dl.root / "a.jsonl"
    p_jsonl.write_text("".join(json.dumps(r) + "\n" for r in dl.records), encoding="utf-8")
    labels = {"Change": "0", "Add": "1", "Remove": "2"}  # the official classifier's label order
    rows = ["image_name,action,input_caption,output_caption,instruction,source_object,target_object"]
    for r in dl.records:
        rows.append(",".join([r["image"], labels[r["action"]], f'"{r["input caption"]}"', f'"{r["output caption"]}"',
                              r["instruction"], r["source object"], r["target object"]]))
    p_csv = dl.root / "a.csv"
    p_csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    for i, p in enumerate((p_keyed, p_jsonl, p_csv)):
        conv = convert_zone(p, dl.images, tmp_path / f"out{i}")
        assert conv.problems == [] and {r["id"]: r for r in conv.records} == want, p.name
    # keys the aliases do not know are named with columns=
    odd = [{"pic": r["image"], "todo": r["action"], "before": r["input caption"], "after": r["output caption"],
            "instruction": r["instruction"], "source object": r["source object"], "target object": r["target object"]}
           for r in dl.records]
    p_odd = dl.write_json("odd.json", odd)
    with pytest.raises(ValueError, match=r"no annotation of odd.json could be converted; first problem: sample "
                                         r"'record 0', field 'image': no image file name"):
        convert_zone(p_odd, dl.images, tmp_path / "odd")
    assert not (tmp_path / "odd" / "manifest.jsonl").exists()
    columns = {"image": "pic", "action": "todo", "input_caption": "before", "output_caption": "after"}
    conv = convert_zone(p_odd, dl.images, tmp_path / "odd", columns=columns)
    assert conv.problems == [] and {r["id"]: r for r in conv.records} == want
    with pytest.raises(ValueError, match="unknown field.*caption_in"):
        convert_zone(p_odd, dl.images, tmp_path / "odd", columns={"caption_in": "before"})


def test_records_that_cannot_convert_are_named_and_the_others_written(tmp_path):
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    Image.fromarray(textured(8, 8)).save(secret)
    records = [dict(r) for r in TABLE4]
    records += [
        {**TABLE4[0], "image": "noinstr.png", "instruction": "  "},           # empty instruction
        {**TABLE4[0], "image": "move.png", "action": "Move"},                 # not a ZONE action
        {**TABLE4[0], "image": "ghost.png"},                                  # no such file
        {**TABLE4[0], "image": "../outside/secret.png"},                      # leaves the images folder
        {**TABLE4[0], "image": str(secret)},                                  # absolute
        {**TABLE4[0], "image": "car.jpg"},                                    # same id as car.png
        {**TABLE4[0], "output caption": None, "image": "nocap.png"},          # null output caption
        {**TABLE4[0], "image": "num.png", "target object": 3.5},              # not text
        ["not", "an", "object"],
    ]
    dl = ZoneDownload(tmp_path / "download", records=[])
    for i, r in enumerate(TABLE4):
        dl.image(r["image"], seed=i)
    for name in ("noinstr.png", "move.png", "car.jpg", "nocap.png", "num.png"):
        dl.image(name)
    dl.records = records
    seen: list[Path] = []
    real_open = builtins.open

    def spy(file, *a, **kw):
        if isinstance(file, (str, os.PathLike)):
            seen.append(Path(file).resolve())
        return real_open(file, *a, **kw)

    builtins.open = spy
    try:
        conv = convert_zone(dl.write_json(), dl.images, tmp_path / "zone")
    finally:
        builtins.open = real_open
    assert [r["id"] for r in conv.records] == ["car", "tie", "musk"]
    assert [(p.sample_id, p.field) for p in conv.problems] == [
        ("noinstr", "instruction"), ("move", "action"), ("ghost", "image"), ("secret", "image"),
        ("secret", "image"), ("car", "image"), ("nocap", "output caption"), ("record 10", "target object"),
        ("record 11", "record")]
    msgs = [str(p) for p in conv.problems]
    assert "unknown action 'Move'; ZONE's actions: add, change, remove" in msgs[1]
    assert "file not found in the images folder: ghost.png" in msgs[2]
    assert "has a '..' component" in msgs[3] and "is absolute" in msgs[4]
    assert "gives the same id as 'car.png'" in msgs[5]
    assert secret.resolve() not in seen  # refused before any file is opened
    assert not (tmp_path / "zone" / "images" / "secret.png").exists()
    ds = open_dataset(card(tmp_path / "zone"))
    assert [r.id for r in ds.refs()] == ["car", "tie", "musk"] and ds.validate() == []


def test_the_converter_command(tmp_path, capsys):
    dl = ZoneDownload(tmp_path / "download")
    ann = dl.write_json()
    assert zone_main([str(ann), "--images", str(dl.images), "--out", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out == f"wrote 3 sample(s) (add=1, change=1, remove=1) to {tmp_path / 'a'}; 0 refused\n"
    dl.records.append({**TABLE4[1], "image": "ghost.png"})
    ann = dl.write_json()
    assert zone_main([str(ann), "--images", str(dl.images), "--out", str(tmp_path / "b")]) == 1
    out = capsys.readouterr()
    assert out.err == "REFUSED sample 'ghost', field 'image': file not found in the images folder: ghost.png\n"
    assert "wrote 3 sample(s)" in out.out and "1 refused" in out.out
    assert zone_main([str(ann), "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")]) == 2
    assert "ZONE images folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        zone_main([str(ann), "--images", str(dl.images), "--out", str(tmp_path / "d"), "--column", "nokey"])


def test_annotation_files_that_cannot_be_read_are_one_dataset_error(tmp_path):
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(DatasetError, match=r"bad.json: not readable as JSON \(UTF-8\)"):
        read_annotations(tmp_path / "bad.json")
    (tmp_path / "a.xlsx").write_bytes(b"PK")
    with pytest.raises(DatasetError, match=r"a.xlsx: unsupported annotation file type .xlsx; read: .json, .jsonl"):
        read_annotations(tmp_path / "a.xlsx")
    (tmp_path / "s.json").write_text('"just text"')
    with pytest.raises(DatasetError, match="expected a list of annotation records"):
        read_annotations(tmp_path / "s.json")
    with pytest.raises(FileNotFoundError, match="ZONE annotation file not found"):
        read_annotations(tmp_path / "none.json")


def _entry(sid: str, **over) -> dict:
    rec = {"id": sid, "source": f"images/{sid}.png", "instruction": "give him glasses",
           "source_caption": "a man", "target_caption": "a man with glasses", "category": "add",
           "meta": {"source_object": None, "target_object": "glasses", "zone_image": f"{sid}.png"}}
    rec.update(over)
    return rec


def test_the_zone_loader_names_the_sample_and_field_of_each_bad_entry(tmp_path):
    root = tmp_path / "zone"
    (root / "images").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    Image.fromarray(textured(8, 8)).save(secret)
    entries = [
        _entry("good"),
        _entry("chg", category="change", meta={"source_object": "blue car", "target_object": "red car"}),
        _entry("nocat", category=None),
        _entry("colour", category="change_color"),       # a harness category, not a ZONE action
        _entry("nocap", target_caption=""),
        _entry("noobj", meta={"source_object": None}),
        _entry("badobj", meta={"source_object": 3, "target_object": None}),
        _entry("nometa", meta=None),
        _entry("withmask", mask="images/withmask.png"),   # ZONE's set has no masks
        _entry("outside", source="../secret.png"),
        _entry("unknown", bogus=1),
    ]
    for e in entries:
        if not e["source"].startswith(".."):
            Image.fromarray(textured(H, W, len(e["id"]))).save(root / e["source"])
    (root / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (root / "card.yaml").write_text("name: zone\nformat: zone\n")  # no extra_categories: the format adds change
    ds = open_dataset({"format": "zone", "root": str(root)})
    refs = {r.id: r for r in ds.refs()}
    assert refs["good"].error is None and refs["chg"].error is None
    got = {sid: (r.error.field, r.error.message) for sid, r in refs.items() if r.error is not None}
    assert got == {
        "nocat": ("category", "missing; a ZONE action is one of add, change, remove"),
        "colour": ("category", "'change_color'; a ZONE action is one of add, change, remove"),
        "nocap": ("target_caption", "missing or not a non-empty string: ''"),
        "noobj": ("meta.target_object", "missing (text, or null where the paper prints N/A)"),
        "badobj": ("meta.source_object", "must be non-empty text or null, got 3"),
        "nometa": ("meta", "must be an object with source_object and target_object, got None"),
        "withmask": ("mask", "ZONE's test set has no mask (keys of this format: id, source, instruction, "
                             "source_caption, target_caption, category, meta; use format generic for a set "
                             "that has them)"),
        "outside": ("source", "path '../secret.png' has a '..' component; dataset paths must stay inside the "
                              "dataset folder"),
        "unknown": ("bogus", got["unknown"][1]),
    }
    assert got["unknown"][1].startswith("unknown manifest key(s) ['bogus']")
    # the good entries load; a bad one raises its error, naming sample and field
    assert ds.load(refs["chg"]).category == "change"
    with pytest.raises(SampleError, match=r"sample 'colour', field 'category'"):
        ds.load(refs["colour"])
    problems = ds.validate()
    assert sorted((p.sample_id, p.field) for p in problems) == sorted((k, v[0]) for k, v in got.items())
    # the generic loader without the card's extra category refuses ZONE's "change" by name
    plain = GenericDataset(root)
    err = {r.id: r.error for r in plain.refs()}["chg"]
    assert err.field == "category" and "unknown category 'change'" in err.message
    with pytest.raises(ValueError, match="extra_categories must be a list"):
        ZoneDataset(root, extra_categories="change")


def test_missing_root_says_how_to_obtain_and_convert(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        open_dataset(card(tmp_path / "nowhere"))
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "set dataset.root=PATH" in msg
    assert "https://github.com/lsl001006/ZONE" in msg and "1lAwpENoDcO1QyFuwz3iKJJ7DmDTFMvIU" in msg
    assert "python -m harness.data.zone ANNOTATION_FILE --images IMAGES_FOLDER --out data/zone" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        open_dataset(card(tmp_path / "empty"))


def test_the_cli_knows_the_zone_formats_keys():
    from harness.cli import _dataset_keys

    keys = _dataset_keys("zone", [])
    for k in ("root", "name", "manifest", "version", "limit", "shard", "ids", "max_pixels", "extra_categories"):
        assert k in keys, k


def test_subsets_and_version_pass_through(converted):
    _, conv = converted
    ds = open_dataset({**card(conv.out), "limit": 2, "version": 7})
    assert [r.id for r in ds.refs()] == ["car", "tie"] and ds.version == "7"
    ds = open_dataset({**card(conv.out), "ids": ["musk"], "shard": None})
    assert [r.id for r in ds.refs()] == ["musk"]
    every = [r.id for r in open_dataset(card(conv.out)).refs()]
    for i in range(2):  # shard i of n: the ids whose sha1 is i mod n
        ds = open_dataset({**card(conv.out), "shard": f"{i}/2"})
        assert [r.id for r in ds.refs()] == [x for x in every if int(hashlib.sha1(x.encode()).hexdigest(), 16) % 2 == i]


def test_the_documented_module_command_runs_cleanly(tmp_path):
    """`python -m harness.data.zone`, as the card says: the package has already imported (and
    registered) the module, so the command must neither register it twice nor warn about it."""
    import subprocess
    import sys

    dl = ZoneDownload(tmp_path / "download")
    out = subprocess.run([sys.executable, "-m", "harness.data.zone", str(dl.write_json()), "--images", str(dl.images),
                          "--out", str(tmp_path / "zone")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout == f"wrote 3 sample(s) (add=1, change=1, remove=1) to {tmp_path / 'zone'}; 0 refused\n"
    assert [r.id for r in open_dataset(card(tmp_path / "zone")).refs()] == ["car", "tie", "musk"]


def test_validate_refuses_a_card_naming_an_unknown_format(tmp_path, capsys):
    from harness.cli import main

    (tmp_path / "manifest.jsonl").write_text("")
    (tmp_path / "card.yaml").write_text("format: zoen\n")
    assert main(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "card.yaml: format 'zoen' is not a dataset format (" in err and "zone" in err
