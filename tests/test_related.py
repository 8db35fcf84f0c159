"""Related images by class, read with random access through the .idx offsets (local and S3)."""

from __future__ import annotations

import json

import pytest

from mcis_dist.data.related import RelatedSampler
from mcis_dist.formats.shards import iter_shard
from mcis_dist.shards.build import BuildOptions, build_dataset
from mcis_dist.shards.synthetic import SyntheticSpec
from mcis_dist.storage import LocalStorage, S3Storage

SPEC = SyntheticSpec(num_train=40, num_val=4)
OPTS = BuildOptions(shard_size_mb=0.08, workers=1, progress=False)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("related")
    m = build_dataset(
        "synthetic", LocalStorage(out), OPTS, ["train"], {"spec": SPEC}, log=lambda *_: None
    )["train"]
    assert m["num_shards"] >= 3
    return m, LocalStorage(out / "train")


def all_samples(manifest, storage):
    out = {}
    for s in manifest["shards"]:
        for raw in iter_shard(storage.describe(s["name"])):
            out[raw["__key__"]] = raw
    return out


def test_draws_hold_the_class_exclude_the_query_and_are_seeded(split):
    manifest, storage = split
    sampler = RelatedSampler(manifest, storage, seed=0)
    truth = {k: set(members) for k, members in enumerate(manifest["class_index"])}
    for g, key in enumerate(sampler.keys[:15]):
        labels = json.loads(sampler.read(g)["json"])["labels"]
        for k in labels:
            drawn = sampler.draw(k, 3, exclude_key=key)
            assert len(drawn) == min(3, len(truth[k]) - 1) and len(set(drawn)) == len(drawn)
            assert g not in drawn and set(drawn) <= truth[k]
            assert drawn == sampler.draw(k, 3, exclude_key=key)
    other = RelatedSampler(manifest, storage, seed=1)
    queries = [
        (key, json.loads(sampler.read(g)["json"])["labels"][0])
        for g, key in enumerate(sampler.keys[:10])
    ]
    assert any(sampler.draw(k, 3, key) != other.draw(k, 3, key) for key, k in queries)
    with pytest.raises(ValueError, match="class 99"):
        sampler.draw(99, 3)


def test_unrelated_draws_share_no_class_with_the_query_and_are_seeded(split):
    """The wrong-class control: related images holding none of the query's classes."""
    manifest, storage = split
    sampler = RelatedSampler(manifest, storage, seed=0)
    labels_of = {g: set(json.loads(sampler.read(g)["json"])["labels"]) for g in range(len(sampler))}
    for g, key in enumerate(sampler.keys[:10]):
        mine = sorted(labels_of[g])
        drawn = sampler.draw_unrelated(mine, 3, exclude_key=key, salt=mine[0])
        free = [h for h in range(len(sampler)) if not labels_of[h] & set(mine)]
        assert len(drawn) == min(3, len(free)) and len(set(drawn)) == len(drawn)
        assert all(not labels_of[h] & set(mine) for h in drawn) and g not in drawn
        assert drawn == sampler.draw_unrelated(mine, 3, exclude_key=key, salt=mine[0])
    every = list(range(len(manifest["classes"])))
    assert sampler.draw_unrelated(every, 3, exclude_key=sampler.keys[0]) == []
    with pytest.raises(ValueError, match="class 99"):
        sampler.draw_unrelated([99], 3)


def test_with_a_pool_unrelated_draws_come_from_the_other_classes_pools(split):
    """related_pool: the wrong-class control reads the images the co-attentive maps read
    (other classes' fixed pools), so the two differ in class only."""
    manifest, storage = split
    sampler = RelatedSampler(manifest, storage, seed=0, pool=2)
    labels_of = {g: set(json.loads(sampler.read(g)["json"])["labels"]) for g in range(len(sampler))}
    pooled = {g for c in range(len(manifest["classes"])) for g in sampler._members(c)}
    assert len(pooled) < len(sampler)  # the pools are a strict subset here
    seen = set()
    for g, key in enumerate(sampler.keys[:10]):
        mine = sorted(labels_of[g])
        drawn = sampler.draw_unrelated(mine, 3, exclude_key=key, salt=mine[0])
        free = [h for h in pooled if not labels_of[h] & set(mine) and h != g]
        assert len(drawn) == min(3, len(free)) and len(set(drawn)) == len(drawn)
        assert set(drawn) <= set(free)
        assert drawn == sampler.draw_unrelated(mine, 3, exclude_key=key, salt=mine[0])
        assert set(sampler.draw_without(mine[0], 2, key)) <= pooled
        seen |= set(drawn)
    assert len(seen) > 3  # seeded by the query: not the same three every time


def test_a_class_held_by_the_query_alone_gives_no_related_images(split):
    manifest, storage = split
    lonely = {**manifest, "class_index": [[0]] + manifest["class_index"][1:]}
    sampler = RelatedSampler(lonely, storage)
    assert sampler.draw(0, 3, exclude_key=sampler.keys[0]) == []


def test_random_access_reads_the_exact_members(split):
    manifest, storage = split
    sampler = RelatedSampler(manifest, storage)
    truth = all_samples(manifest, storage)
    for g in range(len(sampler)):
        got = sampler.read(g)
        want = truth[sampler.keys[g]]
        for ext in ("jpg", "json", "mask.png"):
            assert got[ext] == want[ext]
    key, labels, data = sampler.read_image(5)
    assert key == sampler.keys[5] and data == truth[key]["jpg"]
    assert labels == json.loads(truth[key]["json"])["labels"]
    with pytest.raises(IndexError):
        sampler.read(len(sampler))


def test_random_access_on_s3(s3_endpoint, s3_bucket, split):
    manifest, local = split
    remote = S3Storage(f"s3://{s3_bucket}/ds", endpoint_url=s3_endpoint)
    m = build_dataset("synthetic", remote, OPTS, ["train"], {"spec": SPEC}, log=lambda *_: None)
    sampler = RelatedSampler(m["train"], remote.child("train"))
    truth = all_samples(manifest, local)
    for g in (0, len(sampler) // 2, len(sampler) - 1):
        assert sampler.read(g)["jpg"] == truth[sampler.keys[g]]["jpg"]
