"""The pair loader (webdataset backend): contract, rank sharding, equal batches, exact resume,
corrupt samples, manifest checks, S3."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcis_dist.config import DataConfig
from mcis_dist.data.loader import LoaderError, PairLoader
from mcis_dist.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mcis_dist.shards.build import BuildOptions, ShardWriter, build_dataset
from mcis_dist.shards.synthetic import SyntheticSpec
from mcis_dist.storage import LocalStorage, S3Storage

from conftest import small_data_config

SPEC = SyntheticSpec(num_train=90, num_val=6)


def build(out: Path, storage=None) -> dict:
    opts = BuildOptions(shard_size_mb=0.06, workers=1, progress=False)
    return build_dataset(
        "synthetic",
        storage or LocalStorage(out),
        opts,
        ["train"],
        {"spec": SPEC},
        log=lambda *_: None,
    )["train"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loader") / "ds"
    m = build(out)
    assert m["num_shards"] >= 6
    return out / "train"


def cfg(url, **kw) -> DataConfig:
    return small_data_config(url, **{"num_workers": 2, "mp_context": "fork", **kw})


def epoch(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


BACKENDS = ["webdataset", "dali"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_contract_shapes_labels_and_normalisation(shards, backend):
    loader = PairLoader(cfg(shards, backend=backend), rank=0, world_size=1, device="cpu")
    assert loader.backend == backend
    batches = epoch(loader)
    assert len(batches) == len(loader) == 90 // 4
    for b in batches:
        assert b["image_m"].shape == b["image_n"].shape == (4, 3, 48, 48)
        assert b["image_m"].dtype == torch.float32
        assert b["labels_m"].shape == (4, 8) and b["domain_m"].dtype == torch.int64
        assert ((b["labels_m"] * b["labels_n"]).sum(1) > 0).all()  # every pair shares a class
        assert all(m != n for m, n in zip(b["key_m"], b["key_n"], strict=True))
        assert (b["pair_type"] == 0).all()
    # normalised with ImageNet statistics: the mean-colour padding maps to exactly 0
    x = torch.cat([b["image_m"] for b in batches])
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (x.amin(dim=(0, 2, 3)) >= lo - 1e-5).all() and (x.amax(dim=(0, 2, 3)) <= hi + 1e-5).all()
    s = loader.stats
    assert s["bad_decode"] == s["bad_record"] == 0 and s["pairs"] >= 88
    assert 0 < s["share_without_waiting"] <= 1 and s["mean_shared_classes"] >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_match_the_manifest(shards, backend):
    manifest = json.loads((shards / "manifest.json").read_text())
    keys = [k for s in manifest["shards"] for k in s["keys"]]
    truth = {k: set() for k in keys}
    for c, members in enumerate(manifest["class_index"]):
        for g in members:
            truth[keys[g]].add(c)
    c = cfg(shards, num_workers=0, backend=backend)
    for b in epoch(PairLoader(c, rank=0, world_size=1, device="cpu")):
        for i, k in enumerate(b["key_m"]):
            assert set(torch.nonzero(b["labels_m"][i]).flatten().tolist()) == truth[k]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_equal(shards, world, backend):
    per_rank = []
    for rank in range(world):
        loader = PairLoader(cfg(shards, backend=backend), rank=rank, world_size=world, device="cpu")
        batches = epoch(loader)
        assert len(batches) == len(loader) == 90 // (world * 4)
        per_rank.append({k for b in batches for k in b["key_m"]})
    for a in range(world):
        for b in range(a + 1, world):
            assert not per_rank[a] & per_rank[b], "two ranks trained on the same image as m"


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_pairing_uses_every_image_once(shards, backend):
    """data.pairing=disjoint: an epoch is half as many batches, every pair shares a class, and
    across both ranks an image is in one pair per pass over the data. (The last pairs of a
    reader may come from a second pass: a reader ends its pass with a few samples still
    waiting for a class-mate, and fills its quota of batches from the next, as every epoch
    does; at 90 images that tail is a visible share, at 100,000 it is not.)"""
    seen, total = [], 0
    for rank in range(2):
        c = cfg(shards, backend=backend, pairing="disjoint")
        loader = PairLoader(c, rank=rank, world_size=2, device="cpu")
        batches = epoch(loader)
        assert len(batches) == len(loader) == 90 // (2 * 2 * 4)
        for b in batches:
            seen += [*b["key_m"], *b["key_n"]]
            assert ((b["labels_m"] * b["labels_n"]).sum(dim=1) > 0).all()
        total += len(batches) * 4 * 2
    counts = Counter(seen)
    assert len(seen) == total and max(counts.values()) <= 2  # at most one pair a pass
    assert len(counts) >= 0.85 * total  # the second pass only tops up the tail


def test_fewer_shards_than_readers_still_splits_disjointly(tmp_path, shards):
    one = tmp_path / "one"
    m = build(tmp_path / "big", LocalStorage(tmp_path / "big"))
    assert m["num_shards"] > 1
    opts = BuildOptions(shard_size_mb=50, workers=1, progress=False)
    m1 = build_dataset(
        "synthetic", LocalStorage(one), opts, ["train"], {"spec": SPEC}, log=lambda *_: None
    )["train"]
    assert m1["num_shards"] == 1
    seen = [
        {
            k
            for b in epoch(PairLoader(cfg(one / "train"), rank=r, world_size=2, device="cpu"))
            for k in b["key_m"]
        }
        for r in range(2)
    ]
    assert not seen[0] & seen[1]


def test_epochs_reshuffle_and_are_reproducible(shards):
    keys = lambda loader: [k for b in epoch(loader) for k in b["key_m"]]  # noqa: E731
    a = PairLoader(cfg(shards), rank=0, world_size=1, device="cpu")
    e0, e1 = keys(a), keys(a)  # iterating twice runs epochs 0 and 1
    assert a.epoch == 2 and e0 != e1
    b = PairLoader(cfg(shards), rank=0, world_size=1, device="cpu")
    assert keys(b) == e0


@pytest.mark.slow
@pytest.mark.parametrize(
    "workers, context, backend",
    [(2, "forkserver", "webdataset"), (0, "fork", "webdataset"), (1, "fork", "dali")],
)
def test_resume_continues_exactly_where_it_stopped(shards, workers, context, backend):
    c = cfg(shards, num_workers=workers, mp_context=context, backend=backend)
    full = epoch(PairLoader(c, rank=1, world_size=2, device="cpu"))
    first = PairLoader(c, rank=1, world_size=2, device="cpu")
    head = epoch(first, n=3)
    state = json.loads(json.dumps(first.state_dict()))  # it goes into a checkpoint
    assert state["epoch"] == 0 and state["batches"] == 3
    resumed = PairLoader(c, rank=1, world_size=2, device="cpu")
    resumed.load_state_dict(state)
    tail = epoch(resumed)
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full, strict=True):
        assert got["key_m"] == want["key_m"] and got["key_n"] == want["key_n"]
        assert torch.equal(got["image_m"], want["image_m"])
        assert torch.equal(got["image_n"], want["image_n"])
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batches"] == 0


def corrupt_copy(src: Path, dst: Path) -> dict:
    """A copy of a split whose first shard has an undecodable image and a malformed record."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    shard = manifest["shards"][0]
    import tarfile

    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with tarfile.open(dst / shard["name"]) as _, open(dst / shard["name"], "rb") as f:
        samples = list(group_by_keys({**x, "__url__": "x"} for x in tar_file_iterator(f)))
    samples[0]["jpg"] = samples[0]["jpg"][:300] + bytes(2000) + b"\xff\xd9"  # corrupt inside
    samples[1]["json"] = b'{"labels": "oops"'
    writer = ShardWriter(dst / shard["name"])
    for s in samples:
        writer.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    (dst / shard["index"]).write_text(writer.close())
    shard["bytes"] = writer.bytes
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return {"bad": [samples[0]["__key__"], samples[1]["__key__"]]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_samples_are_skipped_counted_and_batches_stay_equal(shards, tmp_path, backend):
    info = corrupt_copy(shards, tmp_path / "bad")
    totals = {"bad_decode": 0, "bad_record": 0, "bad_keys": set()}
    for rank in range(2):
        c = cfg(tmp_path / "bad", num_workers=1, backend=backend, dali_guard="full")
        loader = PairLoader(c, rank=rank, world_size=2, device="cpu")
        batches = epoch(loader)
        assert len(batches) == len(loader)  # equal batches on every rank all the same
        seen = {k for b in batches for k in b["key_m"] + b["key_n"]}
        assert not seen & set(info["bad"])
        for k in ("bad_decode", "bad_record"):
            totals[k] += loader.stats[k]
        totals["bad_keys"] |= set(loader.stats["bad_keys"])
    assert totals["bad_decode"] >= 1 and totals["bad_record"] >= 1
    assert set(info["bad"]) <= totals["bad_keys"]


def test_dali_header_guard_names_the_fix_when_corruption_hides_inside_an_image(shards, tmp_path):
    corrupt_copy(shards, tmp_path / "bad")
    c = cfg(tmp_path / "bad", backend="dali", dali_guard="header")
    with pytest.raises(RuntimeError, match="--verify full.*dali_guard=full"):
        for r in range(2):
            epoch(PairLoader(c, rank=r, world_size=2, device="cpu"))


def test_a_manifest_that_does_not_match_its_shards_fails_at_start(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "shard-000002.tar").write_bytes(b"short")
    (copy / "shard-000003.idx").unlink()
    with pytest.raises(
        LoaderError, match=r"shard-000002.tar has 5 bytes.*shard-000003.idx is missing"
    ):
        PairLoader(cfg(copy), rank=0, world_size=1, device="cpu")
    (copy / "manifest.json").unlink()
    with pytest.raises(LoaderError, match="unfinished"):
        PairLoader(cfg(copy), rank=0, world_size=1, device="cpu")


def test_bad_loader_options(shards):
    with pytest.raises(LoaderError, match="rank 2 is outside a world of 2"):
        PairLoader(cfg(shards), rank=2, world_size=2)
    with pytest.raises(LoaderError, match="lower batch_size"):
        PairLoader(cfg(shards, batch_size=64), rank=0, world_size=2)
    loader = PairLoader(cfg(shards), rank=0, world_size=2)
    with pytest.raises(LoaderError, match="for 3 ranks"):
        loader.load_state_dict({"epoch": 0, "batches": 1, "world_size": 3})


@pytest.mark.slow
def test_streams_from_s3(s3_endpoint, s3_bucket, shards):
    url = f"s3://{s3_bucket}/ds"
    build(None, S3Storage(url, endpoint_url=s3_endpoint))
    c = cfg(f"{url}/train", endpoint_url=s3_endpoint, num_workers=2)
    remote = epoch(PairLoader(c, rank=0, world_size=2, device="cpu"))
    local = epoch(PairLoader(cfg(shards), rank=0, world_size=2, device="cpu"))
    assert [b["key_m"] for b in remote] == [b["key_m"] for b in local]
    assert all(torch.equal(a["image_m"], b["image_m"]) for a, b in zip(remote, local, strict=True))


def test_images_are_the_stored_ones_augmented(shards):
    """With no jitter and no flip, a long side fixed at the crop size, the output is exactly the
    stored image, resized, placed somewhere on a mean-colour canvas."""
    from torchvision.transforms.v2 import functional as TF

    from mcis_dist.data.transforms import decode_rgb
    from mcis_dist.formats.shards import iter_shard

    c = cfg(
        shards,
        num_workers=0,
        color_jitter=[0, 0, 0, 0],
        hflip=False,
        resize_long=[176, 176],
        crop_size=176,
    )
    b = next(iter(PairLoader(c, rank=0, world_size=1, device="cpu")))
    manifest = json.loads((shards / "manifest.json").read_text())
    for i in range(2):
        key = b["key_m"][i]
        shard = next(s for s in manifest["shards"] if key in s["keys"])
        raw = next(r for r in iter_shard(str(shards / shard["name"])) if r["__key__"] == key)
        img = decode_rgb(raw["jpg"])
        _, h, w = img.shape
        nh, nw = round(h * 176 / max(h, w)), round(w * 176 / max(h, w))
        want = TF.resize(img, [nh, nw], antialias=True).int()
        std, mean = (
            torch.tensor(IMAGENET_STD).view(3, 1, 1),
            torch.tensor(IMAGENET_MEAN).view(3, 1, 1),
        )
        got = ((b["image_m"][i] * std + mean) * 255).round().int()
        errors = [
            (got[:, dy : dy + nh, dx : dx + nw] - want).abs().max().item()
            for dy in range(176 - nh + 1)
            for dx in range(176 - nw + 1)
        ]
        assert min(errors) <= 1


def test_rank_and_world_come_from_the_environment_outside_ray(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    loader = PairLoader(cfg(shards), device="cpu")
    assert (loader.rank, loader.world_size) == (1, 3)
    assert len(loader) == 90 // (3 * 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_step_consumes_pair_batches(shards, backend, one_thread):
    """Pair batches drive a real optimisation: a small two-stream classifier (a stand-in for the
    co-attention model) trained on them for two epochs lowers its multilabel loss."""
    _train_on_pairs(shards, backend)


def _train_on_pairs(shards, backend):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 8),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    loader = PairLoader(
        cfg(shards, backend=backend, num_workers=0), rank=0, world_size=1, device="cpu"
    )
    losses = []
    for _ in range(3):
        for b in loader:
            x = torch.cat([b["image_m"], b["image_n"]])  # (2B, 3, S, S)
            y = torch.cat([b["labels_m"], b["labels_n"]])  # (2B, K)
            loss = torch.nn.functional.multilabel_soft_margin_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    n = len(loader)
    assert np.mean(losses[-n:]) < np.mean(losses[:n]) - 0.02, (losses[:n], losses[-n:])


@pytest.mark.parametrize("workers", [0, 1])
def test_iterating_never_draws_from_the_global_rng(shards, workers):
    """A run resumed mid-epoch creates its loader iterator at another point of the training than
    an uninterrupted run; if that drew from torch's global RNG, dropout masks would differ."""
    loader = PairLoader(cfg(shards, num_workers=workers), rank=0, world_size=1, device="cpu")
    before = torch.get_rng_state()
    epoch(loader, n=2)
    assert torch.equal(before, torch.get_rng_state())


@pytest.fixture(scope="module")
def web_split(tmp_path_factory):
    """Extra data in another domain: single-label class folders of synthetic images, built with
    the folder source as `web` and the same class list as the target shards."""
    from mcis_dist.shards.synthetic import class_names, synthetic_sample

    root = tmp_path_factory.mktemp("web")
    names = class_names(SPEC)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    for i in range(40):
        s = synthetic_sample(SyntheticSpec(num_train=40, num_val=1, seed=7), "train", i)
        folder = root / "web" / names[s.labels[0]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(s.image).save(folder / f"{i}.jpg", quality=90)
    opts = BuildOptions(shard_size_mb=0.05, workers=1, progress=False)
    build_dataset(
        "folder",
        LocalStorage(root / "shards"),
        opts,
        ["train"],
        {"folder_root": str(root / "web"), "classes": str(root / "classes.txt"), "domain": "web"},
        log=lambda *_: None,
    )
    return root / "shards" / "train"


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_domains_mix_into_the_stream_with_pair_types(shards, web_split, backend):
    mixed = cfg(shards, extra_urls=[str(web_split)], backend=backend, num_workers=1)
    loader = PairLoader(mixed, rank=0, world_size=1, device="cpu")
    assert len(loader) == (90 + 40) // 4
    batches = epoch(loader)
    kinds = torch.cat([b["pair_type"] for b in batches]).bincount(minlength=3)
    assert kinds[0] > 0 and kinds[2] > 0  # target–target and cross-domain pairs
    for b in batches:
        both_extra = (b["domain_m"] > 0) & (b["domain_n"] > 0)
        one_extra = (b["domain_m"] > 0) ^ (b["domain_n"] > 0)
        assert torch.equal(b["pair_type"] == 1, both_extra)
        assert torch.equal(b["pair_type"] == 2, one_extra)
        assert ((b["labels_m"] * b["labels_n"]).sum(1) > 0).all()
    steered = cfg(
        shards, extra_urls=[str(web_split)], backend=backend, num_workers=1, cross_domain_share=1.0
    )
    cross = epoch(PairLoader(steered, rank=0, world_size=1, device="cpu"))
    share = torch.cat([b["pair_type"] == 2 for b in cross]).float().mean()
    assert share > kinds[2] / kinds.sum()  # steering raises the share of cross-domain pairs


def test_extra_data_with_another_class_list_is_refused(shards, tmp_path):
    other = tmp_path / "other"
    build_dataset(
        "synthetic",
        LocalStorage(other),
        BuildOptions(shard_size_mb=1, workers=1, progress=False),
        ["train"],
        {"spec": SyntheticSpec(num_train=8, num_val=1, num_classes=5)},
        log=lambda *_: None,
    )
    with pytest.raises(LoaderError, match=r"has classes .*\(5\), but .*\(8\)"):
        PairLoader(cfg(shards, extra_urls=[str(other / "train")]), rank=0, world_size=1)
