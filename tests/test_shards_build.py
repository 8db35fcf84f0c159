"""Building shards from every source, locally: contents, rejections, determinism, resume."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mcis_dist.formats.shards import ManifestError, read_manifest, verify_split
from mcis_dist.shards import build as build_mod
from mcis_dist.shards.build import BuildError, BuildOptions, build_dataset, cut_shards
from mcis_dist.shards.sources import PlannedSample, SourceError, sample_key
from mcis_dist.shards.synthetic import SyntheticSpec
from mcis_dist.storage import LocalStorage

from fixtures_data import BAD_IMAGE_REASONS, make_folder_dataset, make_list_dataset, make_voc

QUIET = dict(progress=False)


def read_samples(split_dir) -> dict[str, dict]:
    """Every sample of a split folder, read back with webdataset, by source id."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    urls = [str(split_dir / s["name"]) for s in manifest["shards"]]
    out = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        out[meta["source_id"]] = {**sample, "meta": meta}
    return out


def reasons(manifest) -> dict[str, str]:
    return {r["source_id"]: r["reason"] for r in manifest["rejected"]}


def test_voc_source_labels_masks_saliency_and_rejections(tmp_path):
    root, expected, train, _ = make_voc(tmp_path / "data")
    out = LocalStorage(tmp_path / "shards")
    args = {"voc_root": str(root), "saliency": str(root / "VOC2012" / "saliency")}
    manifest = build_dataset(
        "voc", out, BuildOptions(**QUIET), ["train"], args, log=lambda *_: None
    )["train"]
    good = [v for v in train if v in expected]
    assert manifest["num_samples"] == len(good)
    rej = reasons(manifest)
    for kind, words in BAD_IMAGE_REASONS.items():
        assert words in rej[f"2008_{kind}"]
    assert "unknown class 'unicorn'" in rej["2008_unknown"]
    assert "value 77" in rej["2008_badmask"]
    assert "not found" in rej["2008_missing"]
    assert manifest["num_rejected"] == len(rej) == 6

    samples = read_samples(tmp_path / "shards" / "train")
    assert sorted(samples) == sorted(good)
    voc = root / "VOC2012"
    for vid in good:
        s = samples[vid]
        assert s["meta"]["labels"] == expected[vid]
        assert s["meta"]["domain"] == "target"
        assert s["jpg"] == (voc / "JPEGImages" / f"{vid}.jpg").read_bytes()  # not re-encoded
        mask_file = voc / "SegmentationClass" / f"{vid}.png"
        if mask_file.exists():
            stored = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
            np.testing.assert_array_equal(stored, np.asarray(Image.open(mask_file)))
        else:
            assert "mask.png" not in s
        assert s["sal.png"] == (voc / "saliency" / f"{vid}.png").read_bytes()
    assert manifest["with_saliency"] == len(good)
    # The class index points at exactly the samples holding each class.
    keys = [k for sh in manifest["shards"] for k in sh["keys"]]
    for k, members in enumerate(manifest["class_index"]):
        want = sorted(keys.index(sample_key(v)) for v in good if k in expected[v])
        assert members == want
        assert manifest["class_histogram"][k] == len(want)


def test_voc_segmentation_class_aug_masks_take_precedence(tmp_path):
    root, expected, train, _ = make_voc(tmp_path / "data", n_good=6, with_saliency=False)
    vid = next(v for v in train if v in expected)  # an image with labels [a, b]
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    m = np.zeros((40, 48 + int(vid[-1])), np.uint8)
    m[5:20, 5:20] = 15  # only 'person' (class 14) in the augmented mask
    Image.fromarray(m).save(aug / f"{vid}.png")
    args = {"voc_root": str(root), "seg_aug": str(aug)}
    build_dataset(
        "voc",
        LocalStorage(tmp_path / "s"),
        BuildOptions(**QUIET),
        ["train"],
        args,
        log=lambda *_: None,
    )
    samples = read_samples(tmp_path / "s" / "train")
    assert samples[vid]["meta"]["labels"] == [14]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(samples[vid]["mask.png"]))), m)


def test_voc_bad_split_and_missing_root_fail_before_any_work(tmp_path):
    root, *_ = make_voc(tmp_path / "data", n_good=2, with_saliency=False)
    out = LocalStorage(tmp_path / "shards")
    with pytest.raises(
        SourceError, match=r"split 'trainaug' not found.*available splits: train, val"
    ):
        build_dataset(
            "voc", out, BuildOptions(**QUIET), ["train", "trainaug"], {"voc_root": str(root)}
        )
    with pytest.raises(SourceError, match="VOC root .*nowhere does not exist"):
        build_dataset(
            "voc", out, BuildOptions(**QUIET), ["train"], {"voc_root": str(tmp_path / "nowhere")}
        )
    assert not (tmp_path / "shards" / "train").exists()  # planning failed: nothing written


def test_list_source_names_indices_masks_and_bad_lines(tmp_path):
    lf, images, classes, masks, expected = make_list_dataset(tmp_path / "lid")
    out = LocalStorage(tmp_path / "shards")
    args = {
        "list_file": str(lf),
        "image_root": str(images),
        "classes": str(classes),
        "mask_root": str(masks),
    }
    manifest = build_dataset("list", out, BuildOptions(**QUIET), None, args, log=lambda *_: None)[
        "train"
    ]
    rej = reasons(manifest)
    assert "empty file" in rej["bad/zero.JPEG"]
    assert (
        "unknown class 'n99999999'" in rej["bad/unknown.JPEG"]
        and "train.txt:" in rej["bad/unknown.JPEG"]
    )
    assert "empty label list" in rej["bad/nolabels.JPEG"]
    assert "not found" in rej["bad/missing.JPEG"]
    dup = [r for r in manifest["rejected"] if "duplicate key" in r["reason"]]
    assert len(dup) == 1
    samples = read_samples(tmp_path / "shards" / "train")
    assert sorted(samples) == sorted(expected)
    for rel, cls in expected.items():
        assert samples[rel]["meta"]["labels"] == cls
        assert ("mask.png" in samples[rel]) == (masks / rel.replace(".JPEG", ".png")).exists()
    assert manifest["with_mask"] == 4


def test_folder_source_maps_names_and_normalises(tmp_path):
    root, classes = make_folder_dataset(tmp_path / "web")
    out = LocalStorage(tmp_path / "shards")
    args = {"folder_root": str(root), "classes": str(classes)}
    manifest = build_dataset("folder", out, BuildOptions(**QUIET), None, args, log=lambda *_: None)[
        "train"
    ]
    samples = read_samples(tmp_path / "shards" / "train")
    assert {s["meta"]["labels"][0] for k, s in samples.items() if k.startswith("Dining")} == {0}
    assert samples["MotorBike/alpha.png"]["meta"]["labels"] == [1]
    assert samples["MotorBike/alpha.png"]["meta"]["normalised"] == "alpha"
    assert "normalised" not in samples["cat/grey.jpg"]["meta"]  # greyscale JPEG kept as is
    assert {s["meta"]["domain"] for s in samples.values()} == {"web"}
    rej = reasons(manifest)
    assert "not a readable image" in rej["cat/notes.txt"]
    assert "matches no class" in rej["giraffe/g.jpg"]
    assert manifest["normalised"] == {"16-bit": 1, "alpha": 1, "cmyk": 1, "exif-rotated": 1}
    rotated = samples["cat/rotated.jpg"]
    assert (rotated["meta"]["width"], rotated["meta"]["height"]) == (20, 40)
    assert Image.open(io.BytesIO(rotated["jpg"])).size == (20, 40)
    assert Image.open(io.BytesIO(samples["cat/deep.png"]["png"])).mode == "L"
    single = build_dataset(
        "folder",
        LocalStorage(tmp_path / "s2"),
        BuildOptions(**QUIET),
        None,
        {**args, "domain": "single"},
        log=lambda *_: None,
    )["train"]
    assert single["domains"] == {"single": manifest["num_samples"]}


def test_cut_shards_respects_size_and_is_seeded():
    samples = [
        PlannedSample(key=f"k{i:03d}", source_id=str(i), domain="target", est_bytes=100_000 + i)
        for i in range(50)
    ]
    shards = cut_shards(samples, BuildOptions(shard_size_mb=0.35))
    assert all(sum(s.est_bytes for s in sh) <= 350_000 for sh in shards)
    assert sorted(s.key for sh in shards for s in sh) == sorted(s.key for s in samples)
    again = cut_shards(list(reversed(samples)), BuildOptions(shard_size_mb=0.35))
    assert [[s.key for s in sh] for sh in shards] == [[s.key for s in sh] for sh in again]
    other = cut_shards(samples, BuildOptions(shard_size_mb=0.35, seed=1))
    assert [[s.key for s in sh] for sh in shards] != [[s.key for s in sh] for sh in other]
    capped = cut_shards(samples, BuildOptions(shard_size_mb=100, max_samples_per_shard=7))
    assert [len(sh) for sh in capped] == [7] * 7 + [1]


def test_sample_keys_are_tar_and_dali_safe():
    assert sample_key("n01440764/n01440764_10026.JPEG") == "n01440764_n01440764_10026"
    assert sample_key("a b/c.d.e.jpg") == "a_b_c_d_e"
    long = sample_key("x" * 300 + ".jpg")
    assert len(long) <= 88 and long != sample_key("x" * 299 + "y.jpg")


SMALL = SyntheticSpec(num_train=40, num_val=10)


def synthetic(out_dir, **opts) -> dict:
    o = BuildOptions(shard_size_mb=0.15, **{**QUIET, **opts})
    return build_dataset(
        "synthetic", LocalStorage(out_dir), o, None, {"spec": SMALL}, log=lambda *_: None
    )


def shard_hashes(manifest) -> list[str]:
    return [s["sha256"] for s in manifest["shards"]]


def test_same_inputs_give_identical_shards_sequential_or_parallel(tmp_path):
    a = synthetic(tmp_path / "a", workers=1)
    b = synthetic(tmp_path / "b", workers=2)
    for split in ("train", "val"):
        assert a[split]["num_shards"] >= (3 if split == "train" else 1)
        assert shard_hashes(a[split]) == shard_hashes(b[split])
        assert a[split]["class_index"] == b[split]["class_index"]
    c = synthetic(tmp_path / "c", workers=1, seed=5)
    assert shard_hashes(c["train"]) != shard_hashes(a["train"])
    assert sorted(k for s in c["train"]["shards"] for k in s["keys"]) == sorted(
        k for s in a["train"]["shards"] for k in s["keys"]
    )


class FlakyStorage(LocalStorage):
    """Local storage that fails writing one file, like a dropped S3 connection mid-shard."""

    def __init__(self, root, fail_on: str):
        super().__init__(root)
        self.fail_on = fail_on

    def child(self, name):
        return FlakyStorage(self._path(name), self.fail_on)

    def write_bytes(self, name, data):
        if name == self.fail_on:
            raise OSError(f"connection reset while uploading {name}")
        super().write_bytes(name, data)


def test_interrupted_build_has_no_manifest_and_resume_finishes_only_the_rest(tmp_path, monkeypatch):
    reference = synthetic(tmp_path / "ref")["train"]
    assert reference["num_shards"] >= 3
    out_dir = tmp_path / "out"
    opts = BuildOptions(shard_size_mb=0.15, workers=1, progress=False)
    flaky = FlakyStorage(out_dir, fail_on="shard-000002.idx")  # its tar is already in place
    with pytest.raises(OSError, match="connection reset"):
        build_dataset("synthetic", flaky, opts, ["train"], {"spec": SMALL}, log=lambda *_: None)
    with pytest.raises(ManifestError, match="unfinished .*2 shards done"):
        read_manifest(LocalStorage(out_dir / "train"))

    written = []
    real = build_mod.write_shard
    monkeypatch.setattr(
        build_mod, "write_shard", lambda t, **kw: written.append(t.index) or real(t, **kw)
    )
    logs = []
    manifest = build_dataset(
        "synthetic", LocalStorage(out_dir), opts, ["train"], {"spec": SMALL}, log=logs.append
    )["train"]
    assert written == list(range(2, reference["num_shards"]))
    assert any("resuming, 2/" in line for line in logs)
    assert shard_hashes(manifest) == shard_hashes(reference)
    assert manifest["class_index"] == reference["class_index"]
    assert verify_split(LocalStorage(out_dir / "train"), manifest) == []
    # A third run has nothing to do.
    written.clear()
    build_dataset(
        "synthetic", LocalStorage(out_dir), opts, ["train"], {"spec": SMALL}, log=logs.append
    )
    assert written == [] and "already complete" in logs[-1]


def test_a_different_build_needs_overwrite_and_leaves_no_orphans(tmp_path):
    synthetic(tmp_path / "out", workers=1)
    with pytest.raises(BuildError, match="different inputs or options; pass --overwrite"):
        synthetic(tmp_path / "out", workers=1, seed=3)
    bigger = BuildOptions(shard_size_mb=10, workers=1, overwrite=True, progress=False)
    m = build_dataset(
        "synthetic",
        LocalStorage(tmp_path / "out"),
        bigger,
        ["train"],
        {"spec": SMALL},
        log=lambda *_: None,
    )["train"]
    assert m["num_shards"] == 1
    files = sorted(p.name for p in (tmp_path / "out" / "train").iterdir() if p.is_file())
    assert files == ["manifest.json", "shard-000000.idx", "shard-000000.tar"]
    assert sorted(p.name for p in (tmp_path / "out" / "train" / "_parts").iterdir()) == [
        "shard-000000.json"
    ]


def test_verify_detects_a_tampered_shard(tmp_path):
    m = synthetic(tmp_path / "out")["val"]
    storage = LocalStorage(tmp_path / "out" / "val")
    assert verify_split(storage, m) == []
    tar = tmp_path / "out" / "val" / m["shards"][0]["name"]
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    problems = verify_split(storage, m)
    assert any("sha256 differs" in p for p in problems)


def test_tar_members_are_reproducible_and_ordered(tmp_path):
    m = synthetic(tmp_path / "out")["val"]
    tar_path = tmp_path / "out" / "val" / m["shards"][0]["name"]
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    assert {mem.mtime for mem in members} == {build_mod.SHARD_MTIME}
    names = [mem.name for mem in members]
    assert names[:3] == [
        f"{m['shards'][0]['keys'][0]}.{ext}" for ext in ("jpg", "json", "mask.png")
    ]
    assert hashlib.sha256(tar_path.read_bytes()).hexdigest() == m["shards"][0]["sha256"]
