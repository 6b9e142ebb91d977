"""The IMBA format (format imba): the generic manifest plus IMBA's fields (source mask, target
prompt, edit type as the category, meta.object_prompt), on folders written here."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.data import open_dataset
from harness.data.imba import EDIT_TYPES, IMBADataset
from harness.types import CATEGORIES

from .conftest import REPO, DatasetBuilder, disc_mask, textured

H, W = 48, 64


def card(root: Path, **over) -> dict:
    cfg = yaml.safe_load((REPO / "conf" / "dataset" / "imba.yaml").read_text())
    cfg.update(root=str(root), **over)
    return cfg


def entry(b: DatasetBuilder, sid: str, edit_type: str, seed: int = 0, soft: bool = False, **over) -> dict:
    src = b.image(f"images/{sid}.png", textured(H, W, seed))
    m = disc_mask(H, W, H / 2, W / 2, 10)
    levels = m.astype(np.uint8) * 255
    if soft:  # an anti-aliased rim, as drawn or SAM masks have
        levels = np.where(disc_mask(H, W, H / 2, W / 2, 11) & ~m, 100, levels).astype(np.uint8)
    mask = b.image(f"masks/{sid}.png", levels)
    rec = dict(id=sid, source=src, mask=mask, category=edit_type, target_caption=f"a photo of {sid}",
               meta={"object_prompt": "dog"})
    rec.update(over)
    return b.add(**rec)


@pytest.fixture()
def imba(tmp_path) -> Path:
    """One sample per IMBA edit type, in IMBA's names."""
    b = DatasetBuilder(tmp_path / "imba", name="my_imba")
    for i, t in enumerate(EDIT_TYPES):
        entry(b, f"s_{t}", t, seed=i, meta={"object_prompt": "dog", "retain_object": t == "pose_view"})
    return b.root


def test_every_edit_type_is_read_as_its_harness_category(imba):
    ds = open_dataset(card(imba))
    assert isinstance(ds, IMBADataset) and ds.name == "imba"  # the config's name wins over the folder card's
    refs = ds.refs()
    assert [(r.id, r.category, r.error) for r in refs] == [
        ("s_replace", "change_object", None), ("s_pose_view", "change_pose", None),
        ("s_background", "change_background", None), ("s_remove", "remove", None), ("s_add", "add", None)]
    assert set(EDIT_TYPES.values()) <= set(CATEGORIES)
    for i, ref in enumerate(refs):
        s = ds.load(ref)
        t = list(EDIT_TYPES)[i]
        assert s.category == EDIT_TYPES[t] and s.meta["edit_type"] == t
        assert s.meta["object_prompt"] == "dog" and s.meta["retain_object"] is (t == "pose_view")
        assert s.target_caption == f"a photo of s_{t}"
        np.testing.assert_array_equal(s.source, textured(H, W, i))
        np.testing.assert_array_equal(s.mask, disc_mask(H, W, H / 2, W / 2, 10))
        assert int(s.mask.sum()) == int(disc_mask(H, W, H / 2, W / 2, 10).sum())
    assert ds.validate() == []


def test_harness_category_names_are_accepted_and_soft_masks_thresholded(tmp_path):
    b = DatasetBuilder(tmp_path / "d")
    entry(b, "a", "change_pose", soft=True)
    ds = open_dataset(card(b.root))
    (ref,) = ds.refs()
    s = ds.load(ref)
    assert ref.category == s.category == "change_pose" and s.meta["edit_type"] == "pose_view"  # IMBA's name
    # levels 100 on the rim are below the card's threshold (127): the mask is the hard disc
    np.testing.assert_array_equal(s.mask, disc_mask(H, W, H / 2, W / 2, 10))
    (warning,) = ds.validate()
    assert warning.level == "warning" and warning.field == "mask"
    with pytest.raises(Exception, match=r"sample 'a', field 'mask'"):
        open_dataset(card(b.root, mask_rule="binary")).load(ref)


@pytest.mark.parametrize("over, field, why", [
    ({"category": "recolor"}, "category", r"'recolor': an IMBA sample's edit type is one of replace, pose_view, "
                                          r"background, remove, add"),
    ({"category": None}, "category", r"missing: an IMBA sample's edit type"),
    ({"mask": None}, "mask", r"missing: an IMBA sample needs its source mask"),
    ({"target_caption": " "}, "target_caption", r"missing or empty: an IMBA sample needs its target prompt"),
    ({"meta": None}, "meta", r"missing: an IMBA sample needs meta.object_prompt"),
    ({"meta": {"object_prompt": ""}}, "meta.object_prompt", r"missing or empty: the name of the object"),
    ({"meta": {"object_prompt": "dog", "retain_object": "yes"}}, "meta.retain_object", r"must be true or false"),
    ({"mask": "../x.png"}, "mask", r"\.\."),
])
def test_a_bad_entry_fails_alone_naming_sample_and_field(tmp_path, over, field, why):
    b = DatasetBuilder(tmp_path / "d")
    entry(b, "good", "replace")
    entry(b, "bad", "remove", seed=1, **over)
    ds = open_dataset(card(b.root))
    good, bad = ds.refs()
    assert good.error is None and ds.load(good).category == "change_object"
    assert bad.error is not None and bad.error.sample_id == "bad" and bad.error.field == field
    assert bad.error.level == "error"
    assert re.search(why, str(bad.error)), str(bad.error)
    assert [e.sample_id for e in ds.validate()] == ["bad"]


def test_an_empty_mask_fails_the_sample(tmp_path):
    b = DatasetBuilder(tmp_path / "d")
    entry(b, "e", "add")
    b.image("masks/e.png", np.zeros((H, W), np.uint8))
    ds = open_dataset(card(b.root))
    (err,) = ds.validate()
    assert err.sample_id == "e" and err.field == "mask" and "masks/e.png is empty" in str(err)


def test_missing_folder_says_imba_is_not_public(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset folder not found: .*how to obtain dataset 'imba'.*IMBA is "
                                                r"not released"):
        open_dataset(card(tmp_path / "nowhere"))


def test_a_card_mask_rule_in_the_folder_is_kept(tmp_path):
    """Without a mask_rule in the config, the folder's card.yaml decides (as in the generic format);
    without either, this format's default is threshold."""
    b = DatasetBuilder(tmp_path / "d")
    entry(b, "a", "add", soft=True)
    (b.root / "card.yaml").write_text("name: d\nformat: imba\nmask_rule: binary\n")
    cfg = {"format": "imba", "root": str(b.root)}
    ds = open_dataset(cfg)
    assert ds.name == "d" and ds.mask_rule == "binary"
    (b.root / "card.yaml").write_text("name: d\nformat: imba\n")
    assert open_dataset(cfg).mask_rule == "threshold"
