"""The joint image + label-map loader: augmentation keeps pixels and labels aligned and pads
correctly, every labelled image once per epoch across ranks and workers, skipped samples counted,
exact resume, label-folder errors, S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mcis_dist.config import JointDataConfig
from mcis_dist.data.join import open_label_folder
from mcis_dist.data.joint import JointLoader
from mcis_dist.data.joint_augment import JointAugmentSpec, augment_with_box, joint_augment
from mcis_dist.data.loader import LoaderError
from mcis_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD, decode_rgb, sample_seed
from mcis_dist.formats.labels import decode_label
from mcis_dist.formats.shards import iter_shard
from mcis_dist.shards.build import ShardWriter

from conftest import build_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["a", "b", "c"]
# label value -> image colour; far from each other and from the mean colour (124, 116, 104)
PALETTE = {
    0: (20, 20, 20),
    1: (230, 40, 40),
    2: (40, 220, 60),
    3: (40, 60, 230),
    255: (240, 240, 240),
}
LUT = torch.zeros(256, 3, dtype=torch.uint8)
for _v, _c in PALETTE.items():
    LUT[_v] = torch.tensor(_c, dtype=torch.uint8)


# ------------------------------------------------------------------------------------ helpers
def block_label(h: int, w: int, seed: int, block: int = 12, ignore: bool = False) -> np.ndarray:
    """(H, W) uint8 of random ``block``-pixel squares of classes 0..3 (and 255 if ``ignore``)."""
    rng = np.random.default_rng(seed)
    values = [0, 1, 2, 3, 255] if ignore else [0, 1, 2, 3]
    grid = rng.choice(values, size=(-(-h // block), -(-w // block)))
    return np.kron(grid, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)


def colour(label: np.ndarray) -> np.ndarray:
    """The image of a label map: each pixel the palette colour of its class, (H, W, 3)."""
    return LUT[torch.from_numpy(label).long()].numpy()


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def write_split(folder: Path, shards: list[list[tuple[str, bytes]]], classes=CLASSES) -> None:
    """An image split (``mcis-shards/1``) of PNG images, one list of (key, png) per shard."""
    folder.mkdir(parents=True)
    entries, first = [], 0
    for i, samples in enumerate(shards):
        writer = ShardWriter(folder / f"shard-{i:06d}.tar")
        for key, data in samples:
            writer.write({"__key__": key, "png": data, "json": b'{"labels": [0]}'})
        (folder / f"shard-{i:06d}.idx").write_text(writer.close())
        entries.append(
            {
                "name": f"shard-{i:06d}.tar",
                "index": f"shard-{i:06d}.idx",
                "first": first,
                "samples": len(samples),
                "bytes": writer.bytes,
                "sha256": writer.sha256,
                "keys": [k for k, _ in samples],
            }
        )
        first += len(samples)
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format": "mcis-shards/1",
                "split": "train",
                "classes": classes,
                "num_samples": first,
                "shards": entries,
            }
        )
    )


def write_labels(
    folder: Path, source: Path, shards: list[tuple[int, list[tuple[str, bytes]]]], classes=CLASSES
) -> None:
    """A label folder (``mcis-labels/1``): per shard (source image shard index, [(key, png)])."""
    folder.mkdir(parents=True)
    entries = []
    for i, (src, samples) in enumerate(shards):
        writer = ShardWriter(folder / f"labels-{i:06d}.tar")
        for key, data in samples:
            member = {"label.png": data} if data is not None else {}
            writer.write({"__key__": key, **member, "json": json.dumps({"key": key}).encode()})
        writer.close()
        entries.append(
            {
                "name": f"labels-{i:06d}.tar",
                "index": i,
                "source": f"shard-{src:06d}.tar",
                "samples": len(samples),
                "keys": [k for k, _ in samples],
                "bytes": writer.bytes,
            }
        )
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format": "mcis-labels/1",
                "classes": classes,
                "source": {"url": str(source)},
                "shards": entries,
            }
        )
    )


def cfg(**kw) -> JointDataConfig:
    base = dict(
        batch_size=2,
        num_workers=2,
        mp_context="fork",
        crop_size=48,
        scale=[0.7, 1.3],
        shuffle_buffer=3,
        seed=5,
    )
    return JointDataConfig(**{**base, **kw})


def loader(data, labels: str, rank=0, world_size=1, **kw) -> JointLoader:
    return JointLoader(
        str(data["images"]),
        str(data["root"] / labels),
        cfg(**kw),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        rank=rank,
        world_size=world_size,
    )


def run(ld, n=None) -> list[dict]:
    out = []
    for i, b in enumerate(ld):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def interior(label: torch.Tensor, r: int = 3) -> torch.Tensor:
    """(H, W) bool: pixels whose (2r+1)² neighbourhood holds one label value (not those within
    r of the edge: their neighbours outside the crop are unknown)."""
    x = label.float()[None, None]
    hi = F.max_pool2d(x, 2 * r + 1, 1, r)
    lo = -F.max_pool2d(-x, 2 * r + 1, 1, r)
    out = torch.zeros(label.shape, dtype=torch.bool)
    out[r:-r, r:-r] = (hi == lo)[0, 0, r:-r, r:-r]
    return out


def assert_aligned(img: torch.Tensor, label: torch.Tensor, tol: int = 2) -> int:
    """Every interior pixel of a non-ignored label has its class colour; returns their count."""
    keep = interior(label) & (label != 255)  # (S, S)
    want = LUT[label.long()].permute(2, 0, 1).int()  # (3, S, S)
    diff = (img.int() - want).abs().amax(0)  # (S, S)
    assert (diff[keep] <= tol).all(), f"image and label drifted apart by {diff[keep].max()}"
    return int(keep.sum())


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation of a (3, S, S) loader image."""
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    return (image * s + m).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------- the augmentation
@pytest.mark.parametrize("size", [(40, 90), (100, 64), (20, 24)])
def test_joint_augment_keeps_image_and_label_aligned_and_pads_right(size):
    h, w = size
    label = block_label(h, w, seed=h, ignore=True)
    img = torch.from_numpy(colour(label)).permute(2, 0, 1).contiguous()  # (3, H, W)
    lab = torch.from_numpy(label)
    spec = JointAugmentSpec(crop_size=64, scale=(0.5, 2.0), hflip=True, mean=IMAGENET_MEAN)
    checked = padded = 0
    for seed in range(12):
        out_img, out_lab, (y0, x0, y1, x1) = augment_with_box(
            img, lab, spec, np.random.default_rng(seed)
        )
        assert out_img.shape == (3, 64, 64) and out_img.dtype == torch.uint8
        assert out_lab.shape == (64, 64) and out_lab.dtype == torch.uint8
        assert set(out_lab.unique().tolist()) <= {0, 1, 2, 3, 255}  # nearest: no blends
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert (out_lab[~inside] == 255).all()
        assert (out_img[:, ~inside] == torch.tensor(spec.fill).view(3, 1)).all()
        padded += int((~inside).sum())
        # the 255 regions of the data are image too: they keep their own colour
        ign = interior(out_lab) & inside & (out_lab == 255)
        assert (out_img[:, ign] == torch.tensor(PALETTE[255]).view(3, 1)).all()
        checked += assert_aligned(out_img, out_lab)
        same = joint_augment(img, lab, spec, np.random.default_rng(seed))
        assert torch.equal(same[0], out_img) and torch.equal(same[1], out_lab)
    assert checked > 2000
    if h < 64:
        assert padded > 0


@pytest.mark.parametrize("axis", [0, 1])
def test_joint_augment_is_aligned_to_the_subpixel(axis):
    """Image channel = label = the source row (axis 0) or column: bilinear resampling of a ramp
    gives its value at the pixel's centre, nearest-exact the source pixel holding that centre,
    so the two agree (up to uint8 rounding); plain "nearest" drifts by up to a source pixel."""
    yy, xx = np.mgrid[0:120, 0:200]
    ramp = (yy, xx)[axis]
    img = torch.from_numpy(np.stack([ramp, ramp, ramp]).astype(np.uint8))  # (3, H, W)
    label = torch.from_numpy(ramp.astype(np.uint8))  # (H, W)
    spec = JointAugmentSpec(crop_size=256, scale=(0.5, 2.2), hflip=True)
    for seed in range(16):
        out_img, out_lab, (y0, x0, y1, x1) = augment_with_box(
            img, label, spec, np.random.default_rng(seed)
        )
        m = 3  # the resampling kernels meet the image's edge within a few pixels of it
        diff = (
            out_img[0, y0 + m : y1 - m, x0 + m : x1 - m].int()
            - out_lab[y0 + m : y1 - m, x0 + m : x1 - m].int()
        ).abs()
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.95, f"seed {seed}"


@pytest.mark.parametrize("hflip", [False, True])
def test_joint_augment_at_scale_one_embeds_the_image_flipped_or_not(hflip):
    label = torch.from_numpy(block_label(30, 40, seed=1))
    img = LUT[label.long()].permute(2, 0, 1).contiguous()
    spec = JointAugmentSpec(crop_size=48, scale=(1.0, 1.0), hflip=hflip, mean=IMAGENET_MEAN)
    flipped = set()
    for seed in range(8):
        out_img, out_lab, (y0, x0, y1, x1) = augment_with_box(
            img, label, spec, np.random.default_rng(seed)
        )
        assert (y1 - y0, x1 - x0) == (30, 40)
        flip = not torch.equal(out_lab[y0:y1, x0:x1], label)
        assert torch.equal(out_lab[y0:y1, x0:x1], label.flip(-1) if flip else label)
        assert torch.equal(out_img[:, y0:y1, x0:x1], img.flip(-1) if flip else img)
        flipped.add(flip)
    assert flipped == ({False, True} if hflip else {False})


# ---------------------------------------------------------------------------------- the loader
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """An image split of 4 shards x 6 PNG images (sizes 36-72 px) and label folders:
    ``even`` 4 labels per shard (16), ``uneven`` 5/3/6/1 (15), ``few`` 2 shards x 4 (8)."""
    root = tmp_path_factory.mktemp("joint")
    rng = np.random.default_rng(0)
    labels, shards = {}, []
    for s in range(4):
        shard = []
        for j in range(6):
            key = f"img_{s}_{j}"
            h, w = (int(v) for v in rng.integers(36, 73, size=2))
            labels[key] = block_label(h, w, seed=10 * s + j)
            shard.append((key, png(colour(labels[key]))))
        shards.append(shard)
    write_split(root / "images", shards)
    keys = [[k for k, _ in sh] for sh in shards]

    def folder(name, picks):
        write_labels(
            root / name,
            root / "images",
            [(s, [(k, png(labels[k])) for k in ks]) for s, ks in picks],
        )

    folder("even", [(s, keys[s][1:5]) for s in range(4)])
    folder("uneven", [(0, keys[0][:5]), (1, keys[1][::2]), (2, keys[2]), (3, keys[3][3:4])])
    folder("few", [(0, keys[0][2:]), (1, keys[1][:4])])
    return {"root": root, "images": root / "images", "labels": labels, "keys": keys}


def test_contract_alignment_padding_and_per_sample_seeds(data):
    ld = loader(data, "even", num_workers=0)
    batches = run(ld)
    assert len(batches) == len(ld) == 16 // 2
    checked = pad = 0
    for b in batches:
        assert b["image"].shape == (2, 3, 48, 48) and b["image"].dtype == torch.float32
        assert b["label"].shape == (2, 48, 48) and b["label"].dtype == torch.int64
        assert b["image"].device.type == "cpu" and len(b["keys"]) == 2
        for img, lab, key in zip(b["image"], b["label"], b["keys"], strict=True):
            assert set(lab.unique().tolist()) <= {0, 1, 2, 3, 255}
            assert (img[:, lab == 255] == 0).all()  # (no 255 in this data: all padding)
            pad += int((lab == 255).sum())
            checked += assert_aligned(to_uint8(img), lab)
            # the same pixels as augmenting the source with the sample's own seed (pass 0)
            src = data["labels"][key]
            rng = np.random.default_rng(sample_seed(5, 0, 0, key))
            want_img, want_lab = joint_augment(
                torch.from_numpy(colour(src)).permute(2, 0, 1),
                torch.from_numpy(src),
                ld.augment,
                rng,
            )
            assert torch.equal(lab, want_lab.long())
            assert torch.equal(to_uint8(img)[:, lab != 255], want_img[:, lab != 255])
    assert checked > 5000 and pad > 0
    s = ld.stats()
    assert s["samples"] == 16 and s["bad_decode"] == s["size_mismatch"] == 0
    assert (s["images"], s["labelled"], s["no_label"]) == (24, 16, 8)
    assert set(s["no_label_keys"]) == {k for ks in data["keys"] for k in (ks[0], ks[5])}


@pytest.mark.parametrize("labels", ["even", "few"])  # few: fewer shards than readers
def test_every_labelled_image_once_per_epoch_across_ranks_and_workers(data, labels):
    per_rank = [run(loader(data, labels, rank=r, world_size=2)) for r in range(2)]
    want = sorted(
        json.loads((data["root"] / labels / "manifest.json").read_text())["shards"][i]["keys"][j]
        for i in range(2 if labels == "few" else 4)
        for j in range(4)
    )
    assert len(per_rank[0]) == len(per_rank[1]) == len(want) // 4
    assert sorted(keys_of(per_rank[0]) + keys_of(per_rank[1])) == want
    # another epoch: the same images, another order and other crops
    ld = loader(data, labels, rank=0, world_size=2)
    ld.set_epoch(1)
    again = run(ld)
    assert keys_of(again) != keys_of(per_rank[0]) or not torch.equal(
        again[0]["label"], per_rank[0][0]["label"]
    )


def test_uneven_shards_give_every_rank_the_same_number_of_batches(data):
    counts = []
    for r in range(2):
        ld = loader(data, "uneven", rank=r, world_size=2)
        batches = run(ld)
        assert len(batches) == len(ld) == 15 // 4
        assert all(len(b["keys"]) == 2 for b in batches)
        counts.append(len(batches))
        assert not set(keys_of(batches)) & set(ld.stats()["no_label_keys"])
    assert counts[0] == counts[1]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    """A split of 2 shards x 6 with labels for 5 of each, among them a label of the wrong size,
    an undecodable image, a label with a value outside the classes, a label member missing."""
    root = tmp_path_factory.mktemp("joint_bad")
    labels, shards = {}, []
    for s in range(2):
        shard = []
        for j in range(6):
            key = f"b_{s}_{j}"
            labels[key] = block_label(40, 52, seed=100 + 6 * s + j)
            data = png(colour(labels[key]))
            shard.append((key, data[:60] + bytes(200) if key == "b_0_2" else data))
        shards.append(shard)
    write_split(root / "images", shards)

    def label_png(key):
        if key == "b_0_1":
            return png(labels[key][:-4])  # 36 x 52 against a 40 x 52 image
        if key == "b_1_1":
            return png(np.where(labels[key] == 3, 9, labels[key]).astype(np.uint8))
        return None if key == "b_1_3" else png(labels[key])

    write_labels(
        root / "labels",
        root / "images",
        [(s, [(f"b_{s}_{j}", label_png(f"b_{s}_{j}")) for j in range(5)]) for s in range(2)],
    )
    return {"root": root, "images": root / "images", "labels": labels}


def test_unlabelled_undecodable_mismatched_and_bad_labels_are_skipped_and_counted(bad):
    ld = loader(bad, "labels")
    batches = run(ld)
    assert len(batches) == len(ld) == 10 // 2  # counted from the labels: bad ones are topped up
    skipped = {"b_0_1", "b_0_2", "b_1_1", "b_1_3"}
    assert not set(keys_of(batches)) & (skipped | {"b_0_5", "b_1_5"})
    s = ld.stats()
    assert (s["no_label"], s["no_label_keys"]) == (2, ["b_0_5", "b_1_5"])
    assert (s["size_mismatch"], s["bad_decode"], s["bad_label"], s["bad_record"]) == (1, 1, 1, 1)
    assert set(s["bad_keys"]) == skipped and s["last_error"]
    for b in batches:
        for img, lab in zip(b["image"], b["label"], strict=True):
            assert_aligned(to_uint8(img), lab)


@pytest.mark.parametrize("case", ["even", "bad"])
def test_exact_resume_within_an_epoch(data, bad, case):
    source, labels = (data, "even") if case == "even" else (bad, "labels")
    full = loader(source, labels)
    want = run(full)
    first = loader(source, labels)
    run(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert state["batches"] == 3
    resumed = loader(source, labels)
    resumed.load_state_dict(state)
    got = run(resumed)
    assert len(got) == len(want) - 3
    for g, w in zip(got, want[3:], strict=True):
        assert g["keys"] == w["keys"]
        assert torch.equal(g["image"], w["image"]) and torch.equal(g["label"], w["label"])
    counts = ("samples", "bad_decode", "size_mismatch", "bad_label", "bad_record")
    assert {k: resumed.stats()[k] for k in counts} == {k: full.stats()[k] for k in counts}
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batches"] == 0
    with pytest.raises(LoaderError, match="num_workers=2.*exact resume"):
        loader(source, labels, num_workers=1).load_state_dict(state)


def test_synthetic_split_with_labels_from_its_masks(tmp_path):
    """Real `mcis shards build` output (JPEG images, a full manifest) joined with label shards
    cut from the samples' own exact masks, one in three left unlabelled."""
    out = tmp_path / "ds"
    build_synthetic(str(out), num_train=24, num_val=2, per_shard=6)
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    masks, picks = {}, []
    for i, shard in enumerate(manifest["shards"]):
        samples = []
        for raw in iter_shard(str(out / "train" / shard["name"])):
            masks[raw["__key__"]] = raw["mask.png"], raw["jpg"]
            if len(masks) % 3:
                samples.append((raw["__key__"], raw["mask.png"]))
        picks.append((i, samples))
    write_labels(tmp_path / "labels", out / "train", picks, classes=manifest["classes"])
    c = cfg(num_workers=0, crop_size=96, batch_size=4)
    ld = JointLoader(
        str(out / "train"),
        str(tmp_path / "labels"),
        c,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        rank=0,
        world_size=1,
    )
    batches = run(ld)
    labelled = sum(len(s) for _, s in picks)
    assert len(batches) == labelled // 4 and ld.stats()["no_label"] == 24 - labelled
    for b in batches:
        for lab, key in zip(b["label"], b["keys"], strict=True):
            mask, jpg = masks[key]
            rng = np.random.default_rng(sample_seed(c.seed, 0, 0, key))
            _, want = joint_augment(
                decode_rgb(jpg), torch.from_numpy(decode_label(mask)), ld.augment, rng
            )
            assert torch.equal(lab, want.long())
            assert lab.max() <= 8 or (lab == 255).any()


# ---------------------------------------------------------------------------------- the errors
def test_label_folder_errors_name_the_problem(data, tmp_path):
    with pytest.raises(LoaderError, match="manifest.json does not exist"):
        open_label_folder(str(tmp_path / "nothing"))
    with pytest.raises(LoaderError, match="format 'mcis-shards/1', expected 'mcis-labels/1'"):
        open_label_folder(str(data["images"]))
    labels = data["labels"]
    k = data["keys"]
    write_labels(
        tmp_path / "classes",
        data["images"],
        [(0, [(k[0][0], png(labels[k[0][0]]))])],
        classes=["a", "b", "x"],
    )
    with pytest.raises(LoaderError, match=r"classes \[a, b, x\].*has \[a, b, c\].*class 2 is 'x'"):
        loader({**data, "root": tmp_path}, "classes")
    write_labels(
        tmp_path / "order",
        data["images"],
        [(0, [(k[0][3], png(labels[k[0][3]])), (k[0][1], png(labels[k[0][1]]))])],
    )
    with pytest.raises(LoaderError, match="another order than shard-000000.tar"):
        loader({**data, "root": tmp_path}, "order")
    write_labels(tmp_path / "other", data["images"], [(1, [(k[0][0], png(labels[k[0][0]]))])])
    with pytest.raises(LoaderError, match=r"holds keys \[img_0_0\] that shard-000001.tar lacks"):
        loader({**data, "root": tmp_path}, "other")
    tar = tmp_path / "other" / "labels-000000.tar"
    tar.write_bytes(tar.read_bytes()[:1024])  # a cut-off upload
    with pytest.raises(LoaderError, match="labels-000000.tar has 1024 bytes, the manifest says"):
        loader({**data, "root": tmp_path}, "other")
    tar.unlink()
    with pytest.raises(LoaderError, match="labels-000000.tar is missing"):
        loader({**data, "root": tmp_path}, "other")
    with pytest.raises(LoaderError, match="cannot give every one of 2 ranks a batch of 8"):
        loader(data, "few", world_size=2, batch_size=8)
    with pytest.raises(LoaderError, match="rank 2 is outside a world of 2"):
        loader(data, "few", rank=2, world_size=2)


# ---------------------------------------------------------------------------------------- S3
def test_s3_folders_give_the_same_batches_as_local_ones(data, s3_bucket, s3_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for sub in ("images", "even"):
        for p in sorted((data["root"] / sub).iterdir()):
            client.put_object(Bucket=s3_bucket, Key=f"ds/{sub}/{p.name}", Body=p.read_bytes())
    c = cfg(num_workers=0)
    remote = JointLoader(
        f"s3://{s3_bucket}/ds/images",
        f"s3://{s3_bucket}/ds/even",
        c,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        rank=1,
        world_size=2,
        endpoint_url=s3_endpoint,
    )
    local = loader(data, "even", rank=1, world_size=2, num_workers=0)
    got, want = run(remote), run(local)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        assert g["keys"] == w["keys"] and torch.equal(g["image"], w["image"])
        assert torch.equal(g["label"], w["label"])


def test_rank_and_world_default_to_the_environment_outside_ray_train(data, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ld = JointLoader(
        str(data["images"]), str(data["root"] / "even"), cfg(), mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    assert (ld.rank, ld.world_size, len(ld)) == (1, 2, 16 // 4)
