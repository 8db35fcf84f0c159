"""Bounding boxes as data: Tiny-ImageNet's two layouts and a box file, built with the real
build (through the CLI as a user types it), read back from the shards, bad lines rejected."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mcis_dist.cli.commands import HANDLERS
from mcis_dist.cli.parser import build_parser
from mcis_dist.formats.shards import BOXES_MEMBER, decode_boxes, iter_shard
from mcis_dist.shards.boxes import transpose_box
from mcis_dist.shards.build import BuildOptions, build_dataset
from mcis_dist.shards.sources import SourceError
from mcis_dist.storage import LocalStorage

from conftest import encode, jpeg_bytes, noise_image, write

# Not sorted on purpose: class indices must follow wnids.txt, not the folder order.
WNIDS = ["n01641577", "n01443537", "n01629819"]
BUILD = ["shards", "build", "--no-progress", "--workers", "1"]


def mcis(*argv: str) -> int:
    """``mcis ARGV`` as a user types it: the real parser and the handler ``mcis_dist.cli.main``
    dispatches to (main itself imports every stage's error class, Ray's included: seconds)."""
    args = build_parser().parse_args(list(argv))
    return HANDLERS[(args.command, args.shards_command)](args)


def make_tiny(root):
    """A Tiny-ImageNet tree (train/<wnid>/images + <wnid>_boxes.txt, val/images +
    val_annotations.txt), 64x64 JPEGs, inclusive coordinates, bad lines included.

    Returns (root, train truth, val truth, train bad lines, val bad lines): truth maps each
    image's source id to its half-open boxes [class, x0, y0, x1, y1]; bad lines map
    ``<file>:<line>`` to words of the reason."""
    write(root / "wnids.txt", ("\n".join(WNIDS) + "\n").encode())
    train, train_bad = {}, {}
    for k, wnid in enumerate(WNIDS):
        for n in range(3):
            write(
                root / "train" / wnid / "images" / f"{wnid}_{n}.JPEG",
                jpeg_bytes(64, 64, seed=10 * k + n),
            )
        lines = [
            f"{wnid}_0.JPEG\t0\t0\t63\t63",  # the whole image: inclusive 63 -> 64
            f"{wnid}_1.JPEG\t{k}\t5\t{20 + k}\t30",
            f"{wnid}_1.JPEG\t40\t41\t40\t41",  # a one-pixel box, a second box of the image
        ]
        train[f"{wnid}/images/{wnid}_0.JPEG"] = [[k, 0, 0, 64, 64]]
        train[f"{wnid}/images/{wnid}_1.JPEG"] = [[k, k, 5, 21 + k, 31], [k, 40, 41, 41, 42]]
        if k == 0:  # image 2 keeps its good box; each bad line is a rejection
            lines += [
                f"{wnid}_2.JPEG\t1\t2\t3",
                f"{wnid}_2.JPEG\tx\t2\t3\t4",
                f"{wnid}_2.JPEG\t30\t5\t10\t20",
                f"{wnid}_2.JPEG\t0\t0\t64\t63",
                f"{wnid}_2.JPEG\t2\t3\t4\t5",
                f"{wnid}_7.JPEG\t1\t1\t5\t5",
            ]
            where = f"{wnid}/{wnid}_boxes.txt"
            train_bad = {
                f"{where}:4": "4 fields, expected 5: 'file x0 y0 x1 y1'",
                f"{where}:5": "x0 = 'x' is not a whole number",
                f"{where}:6": "box (30, 5, 10, 20) is empty or reversed (expected x0 <= x1",
                f"{where}:7": "box (0, 0, 64, 63) is outside the 64x64 image "
                "(expected x1 <= 63 and y1 <= 63, inclusive",
                f"{where}:9": "box for a file not in the split (no such image in the split)",
            }
            train[f"{wnid}/images/{wnid}_2.JPEG"] = [[0, 2, 3, 5, 6]]
        write(root / "train" / wnid / f"{wnid}_boxes.txt", ("\n".join(lines) + "\n").encode())

    val, ann = {}, []
    for i in range(5):
        k = i % 3
        write(root / "val" / "images" / f"val_{i}.JPEG", jpeg_bytes(64, 64, seed=100 + i))
        ann.append(f"val_{i}.JPEG\t{WNIDS[k]}\t{i}\t{2 * i}\t{30 + i}\t63")
        val[f"val_{i}.JPEG"] = [[k, i, 2 * i, 31 + i, 64]]
    ann += [
        f"val_0.JPEG\t{WNIDS[0]}\t1\t2\t3",
        "val_1.JPEG\tn99999999\t1\t2\t3\t4",
        f"val_2.JPEG\t{WNIDS[2]}\t8\t9\t7\t1.5",
        f"val_3.JPEG\t{WNIDS[0]}\t-1\t0\t10\t10",
        f"val_4.JPEG\t{WNIDS[1]}\t5\t20\t6\t10",
        f"val_99.JPEG\t{WNIDS[1]}\t1\t1\t5\t5",
        f"val_0.JPEG\t{WNIDS[0]}\t0\t0\t10\t64",
    ]
    val_bad = {
        "val_annotations.txt:6": "5 fields, expected 6: 'file class x0 y0 x1 y1'",
        "val_annotations.txt:7": "box of unknown class 'n99999999' (expected one of the 3 names in "
        "wnids.txt or an index 0..2)",
        "val_annotations.txt:8": "y1 = '1.5' is not a whole number",
        "val_annotations.txt:9": "is outside the image (expected x0 >= 0 and y0 >= 0)",
        "val_annotations.txt:10": "box (5, 20, 6, 10) is empty or reversed",
        "val_annotations.txt:11": "box for a file not in the split (image file",
        "val_annotations.txt:12": "box (0, 0, 10, 64) is outside the 64x64 image",
    }
    write(root / "val" / "val_annotations.txt", ("\n".join(ann) + "\n").encode())
    return root, train, val, train_bad, val_bad


def read_split(split_dir) -> tuple[dict, dict[str, dict]]:
    """The manifest, and every sample read back with the project's shard reader, by source id
    (its JSON record, member names and decoded boxes)."""
    manifest = json.loads((split_dir / "manifest.json").read_text())
    out = {}
    for shard in manifest["shards"]:
        for raw in iter_shard(str(split_dir / shard["name"])):
            meta = json.loads(raw["json"])
            out[meta["source_id"]] = {"meta": meta, "raw": raw, "boxes": decode_boxes(raw)}
    return manifest, out


def box_reasons(manifest, files: set[str] | None = None) -> dict[str, tuple[str, str]]:
    """The rejections that name a line of a box file (of ``files``, if given):
    ``{"<file>:<line>": (source id, reason)}``."""
    out = {}
    for r in manifest["rejected"]:
        where, _, rest = r["reason"].partition(": ")
        file, _, line = where.rpartition(":")
        if line.isdigit() and (files is None or file in files):
            out[where] = (r["source_id"], rest)
    return out


def assert_rejected(manifest, expected: dict[str, str]) -> None:
    """Exactly the ``expected`` lines of their box files are rejected, each with its words."""
    got = box_reasons(manifest, {k.rpartition(":")[0] for k in expected})
    assert sorted(got) == sorted(expected), manifest["rejected"]
    for where, words in expected.items():
        assert words in got[where][1], (where, got[where])


def test_tiny_imagenet_train_per_class_boxes_from_the_cli(tmp_path, capsys):
    root, train, _, train_bad, _ = make_tiny(tmp_path / "tiny-imagenet-200")
    out = tmp_path / "shards"
    argv = ["--source", "folder", "--folder-root", str(root / "train")]
    argv += ["--classes", str(root / "wnids.txt"), "--boxes", "per-class", "--out", str(out)]
    assert mcis(*BUILD, *argv) == 0
    assert "boxes       10 on 7 samples" in capsys.readouterr().out  # `mcis shards info` text

    manifest, samples = read_split(out / "train")
    assert manifest["classes"] == WNIDS
    assert manifest["num_samples"] == 9  # every image kept, bad box lines or not
    assert manifest["with_boxes"] == 7 and manifest["num_boxes"] == 10
    assert manifest["build"]["options"]["boxes"] == "per-class"
    assert sorted(samples) == sorted(f"{w}/images/{w}_{n}.JPEG" for w in WNIDS for n in range(3))
    for sid, s in samples.items():
        label = WNIDS.index(sid.split("/")[0])
        assert s["meta"]["labels"] == [label]
        want = train.get(sid)
        if want is None:  # images 2 of the classes without bad lines have no box line at all
            assert s["boxes"] is None and BOXES_MEMBER not in s["raw"]
        else:
            assert s["boxes"].tolist() == want, sid
            assert json.loads(s["raw"][BOXES_MEMBER]) == want
    assert_rejected(manifest, train_bad)
    wnid = WNIDS[0]
    for where, (sid, _) in box_reasons(manifest).items():
        n = 7 if where.endswith(":9") else 2
        assert sid == f"{wnid}/images/{wnid}_{n}.JPEG"
    assert manifest["num_rejected"] == len(train_bad)  # the box files are not taken for images


def test_tiny_imagenet_val_annotations_as_the_list_from_the_cli(tmp_path):
    root, _, val, _, val_bad = make_tiny(tmp_path / "tiny-imagenet-200")
    out = tmp_path / "shards"
    argv = ["--source", "list", "--split", "val", "--image-root", str(root / "val" / "images")]
    argv += ["--classes", str(root / "wnids.txt")]
    argv += ["--boxes", str(root / "val" / "val_annotations.txt"), "--out", str(out)]
    assert mcis(*BUILD, *argv) == 0

    manifest, samples = read_split(out / "val")
    assert sorted(samples) == sorted(val)
    for sid, s in samples.items():
        assert s["boxes"].tolist() == val[sid]
        assert s["meta"]["labels"] == [val[sid][0][0]]  # labels from the wnid column
        assert s["meta"]["width"] == s["meta"]["height"] == 64
    assert manifest["with_boxes"] == 5 and manifest["num_boxes"] == 5
    assert_rejected(manifest, val_bad)
    assert box_reasons(manifest)["val_annotations.txt:11"][0] == "val_99.JPEG"
    assert manifest["num_rejected"] == len(val_bad)


def test_the_evaluation_reader_returns_boxes_or_none(tmp_path):
    from mcis_dist.train.validate import read_val_images  # lazy: imports torch

    root, _, val, *_ = make_tiny(tmp_path / "tiny-imagenet-200")
    args = {
        "image_root": str(root / "val" / "images"),
        "classes": str(root / "wnids.txt"),
        "boxes": str(root / "val" / "val_annotations.txt"),
    }
    out = LocalStorage(tmp_path / "shards")
    opts = BuildOptions(workers=1, progress=False)
    build_dataset("list", out, opts, ["val"], args, log=lambda *_: None)
    images, classes = read_val_images(
        str(tmp_path / "shards" / "val"), None, 0, 1, 3, need_mask=False
    )
    assert classes == WNIDS
    by_key = {im.key: im for im in images}
    assert sorted(by_key) == sorted(f"val_{i}" for i in range(5))
    for i in range(5):
        im = by_key[f"val_{i}"]
        assert im.mask is None and tuple(im.rgb.shape) == (3, 64, 64)
        assert im.boxes.dtype == np.int32 and im.boxes.tolist() == val[f"val_{i}.JPEG"]
    # The default (images with masks only) reads none of them: the split has no masks.
    assert read_val_images(str(tmp_path / "shards" / "val"), None, 0, 1, 3)[0] == []


def test_a_split_without_boxes_has_none(tmp_path):
    root, *_ = make_tiny(tmp_path / "tiny-imagenet-200")
    out = LocalStorage(tmp_path / "shards")
    args = {"folder_root": str(root / "train"), "classes": str(root / "wnids.txt")}
    opts = BuildOptions(workers=1, progress=False)
    manifest = build_dataset("folder", out, opts, ["train"], args, log=lambda *_: None)["train"]
    assert manifest["with_boxes"] == 0 and manifest["num_boxes"] == 0
    assert "boxes" not in manifest["build"]["options"]
    _, samples = read_split(tmp_path / "shards" / "train")
    assert len(samples) == 9
    assert all(s["boxes"] is None and BOXES_MEMBER not in s["raw"] for s in samples.values())
    # The per-class box files are not images: each is listed, saying how to use it.
    rejected = {r["source_id"]: r["reason"] for r in manifest["rejected"]}
    assert sorted(rejected) == sorted(f"{w}/{w}_boxes.txt" for w in WNIDS)
    assert all("--boxes per-class" in r for r in rejected.values())


def test_list_with_a_box_file_checks_boxes_against_the_list(tmp_path):
    """A list file gives the labels and the images; a box file adds boxes (half-open here), and
    a box of a class the image does not hold, or of an image the list does not name (or whose
    line is rejected), is rejected."""
    classes = ["cat", "dog", "bird"]
    write(tmp_path / "classes.txt", ("\n".join(classes) + "\n").encode())
    for name in ("a", "b", "c"):
        write(tmp_path / "img" / f"{name}.jpg", jpeg_bytes(40, 30, seed=ord(name)))
    write(tmp_path / "list.txt", b"a.jpg cat dog\nb.jpg 2\nc.jpg unicorn\n")
    boxes = [
        "a.jpg cat 0 0 40 30",  # half-open: the whole image
        "a.jpg 1 10 5 20 15",
        "a.jpg bird 1 1 2 2",  # not one of a's classes
        "b.jpg bird 3 3 3 9",  # empty in half-open coordinates
        "c.jpg cat 0 0 5 5",  # its list line is rejected
        "d.jpg cat 0 0 5 5",  # not listed
        "b.jpg bird 0 0 41 30",  # half-open: x1 <= 40
        "# a comment",
        "",
        "b.jpg\tbird\t4\t4\t8\t8",
    ]
    write(tmp_path / "boxes.txt", ("\n".join(boxes) + "\n").encode())
    args = {
        "list_file": str(tmp_path / "list.txt"),
        "image_root": str(tmp_path / "img"),
        "classes": str(tmp_path / "classes.txt"),
        "boxes": str(tmp_path / "boxes.txt"),
        "box_coords": "half-open",
    }
    out = LocalStorage(tmp_path / "shards")
    opts = BuildOptions(workers=1, progress=False)
    manifest = build_dataset("list", out, opts, ["train"], args, log=lambda *_: None)["train"]
    _, samples = read_split(tmp_path / "shards" / "train")
    assert sorted(samples) == ["a.jpg", "b.jpg"]
    assert samples["a.jpg"]["boxes"].tolist() == [[0, 0, 0, 40, 30], [1, 10, 5, 20, 15]]
    assert samples["b.jpg"]["boxes"].tolist() == [[2, 4, 4, 8, 8]]
    assert_rejected(
        manifest,
        {
            "boxes.txt:3": "box of class 2 (bird), but the image's labels are [0, 1] (cat, dog)",
            "boxes.txt:4": "box (3, 3, 3, 9) is empty or reversed (expected x0 < x1 and y0 < y1, "
            "half-open coordinates)",
            "boxes.txt:5": "not in the split (its line in the list is rejected)",
            "boxes.txt:6": "not in the split (no such image in the split)",
            "boxes.txt:7": "box (0, 0, 41, 30) is outside the 40x30 image "
            "(expected x1 <= 40 and y1 <= 30, half-open",
        },
    )
    assert any(
        r["reason"].startswith("list.txt:3: unknown class 'unicorn'") for r in manifest["rejected"]
    )


@pytest.mark.parametrize("op", list(Image.Transpose), ids=lambda op: op.name)
def test_transpose_box_matches_pillow(op):
    w, h = 7, 5
    arr = np.zeros((h, w), np.uint8)
    arr[1:4, 2:6] = 1  # the half-open box (2, 1, 6, 4)
    moved = np.asarray(Image.fromarray(arr).transpose(op))
    rows, cols = np.nonzero(moved)
    want = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert transpose_box((2, 1, 6, 4), op, w, h) == want


def test_boxes_of_an_exif_rotated_image_turn_with_it(tmp_path):
    """Boxes are in the file's pixel grid, like masks: an image stored EXIF-rotated has its
    boxes transposed the same way (and checked against the file's own size)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    raw = encode(Image.fromarray(noise_image(40, 20)), "JPEG", exif=exif.tobytes())
    write(tmp_path / "web" / "cat" / "r.jpg", raw)
    write(tmp_path / "boxes.txt", b"cat/r.jpg cat 2 3 9 7\ncat/r.jpg cat 0 0 39 20\n")
    args = {"folder_root": str(tmp_path / "web"), "boxes": str(tmp_path / "boxes.txt")}
    out = LocalStorage(tmp_path / "shards")
    opts = BuildOptions(workers=1, progress=False)
    manifest = build_dataset("folder", out, opts, ["train"], args, log=lambda *_: None)["train"]
    _, samples = read_split(tmp_path / "shards" / "train")
    s = samples["cat/r.jpg"]
    assert s["meta"]["normalised"] == "exif-rotated"
    assert (s["meta"]["width"], s["meta"]["height"]) == (20, 40)
    # inclusive (2, 3, 9, 7) = half-open (2, 3, 10, 8) of the 40x20 file, turned clockwise
    assert s["boxes"].tolist() == [[0, 20 - 8, 2, 20 - 3, 10]]
    assert_rejected(manifest, {"boxes.txt:2": "outside the 40x20 image (expected x1 <= 39"})


def test_box_options_errors_are_clear(tmp_path):
    root, *_ = make_tiny(tmp_path / "tiny-imagenet-200")
    wnids = str(root / "wnids.txt")
    cases = [
        (
            ["--source", "folder", "--folder-root", str(root / "val"), "--boxes", "per-class"],
            "no class folder of .* holds a <class>/<class>_boxes.txt",
        ),
        (
            ["--source", "list", "--image-root", str(root / "val"), "--classes", wnids],
            "--list is required for --source list \\(or --boxes FILE",
        ),
        (
            ["--source", "list", "--image-root", str(root), "--classes", wnids]
            + ["--boxes", "per-class"],
            "is for the folder source",
        ),
        (["--source", "synthetic", "--boxes", wnids], "--boxes is for the list and folder"),
        (
            ["--source", "list", "--image-root", str(root), "--classes", wnids]
            + ["--boxes", str(root / "nope.txt")],
            "box file .*nope.txt does not exist",
        ),
    ]
    for argv, words in cases:  # main prints these as "mcis: error: <message>", exit status 2
        with pytest.raises(SourceError, match=words):
            mcis(*BUILD, *argv, "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("manifest.json"))
