"""The class-keyed pair pool and the shard/rank arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from mcis_dist.data.pairs import PAIR_CROSS, PAIR_EXTRA, PAIR_TARGET, PairPool, PoolItem, pair_type
from mcis_dist.data.sharding import (
    Unit,
    assign,
    batches_per_rank,
    consumed_by_worker,
    worker_quota,
)


def random_items(n, num_classes=6, seed=0, domains=(0,)):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        k = int(rng.integers(1, 3))
        labels = tuple(sorted(rng.choice(num_classes, size=k, replace=False).tolist()))
        items.append(PoolItem(f"s{i}", labels, int(rng.choice(domains))))
    return items


def run(pool, items):
    out = []
    for it in items:
        out.extend(pool.push(it))
    return out


def test_every_pair_shares_a_class_and_never_pairs_an_image_with_itself():
    items = random_items(400)
    items += [PoolItem("s3", items[3].labels, 0)]  # the same source image again (a later pass)
    pairs = run(PairPool(pool_size=32, max_wait=16, rng=np.random.default_rng(1)), items)
    assert len(pairs) > 350
    for m, n in pairs:
        assert set(m.labels) & set(n.labels)
        assert m.key != n.key


def test_each_sample_is_emitted_once_as_m_unless_dropped():
    items = random_items(300, num_classes=20)
    pool = PairPool(pool_size=8, max_wait=4, rng=np.random.default_rng(0))
    pairs = run(pool, items)
    ms = [m.key for m, _ in pairs]
    assert len(ms) == len(set(ms))
    waiting = len(pool._waiting)
    assert len(ms) + pool.stats.dropped + waiting == len(items)
    assert pool.stats.dropped > 0  # 20 classes, a pool of 8: some must give up
    s = pool.stats.summary()
    assert s["pairs"] == len(pairs)
    assert s["share_without_waiting"] == pytest.approx(pool.stats.immediate / len(pairs))
    shared = np.mean([len(set(m.labels) & set(n.labels)) for m, n in pairs])
    assert s["mean_shared_classes"] == pytest.approx(shared)


def test_a_waiting_sample_is_paired_when_its_class_arrives():
    pool = PairPool(pool_size=4, max_wait=4, rng=np.random.default_rng(0))
    assert pool.push(PoolItem("a", (5,), 0)) == []
    assert pool.push(PoolItem("b", (1,), 0)) == []
    pairs = pool.push(PoolItem("c", (5, 1), 0))
    keys = {(m.key, n.key) for m, n in pairs}
    assert ("c", "a") in keys or ("c", "b") in keys  # c pairs immediately ...
    assert {m for m, _ in keys} == {"a", "b", "c"}  # ... and both waiters get c or each other
    assert pool.stats.after_wait == 2 and pool.stats.immediate == 1


def test_pool_is_bounded_and_forgets_the_oldest():
    pool = PairPool(pool_size=3, max_wait=0, rng=np.random.default_rng(0))
    for i in range(10):
        pool.push(PoolItem(f"x{i}", (i % 2,), 0))
    assert len(pool._pool) == 3
    assert [it.key for it in pool._pool.values()] == ["x7", "x8", "x9"]
    assert sum(len(v) for v in pool._by_class.values()) == 3


def test_pair_types_and_cross_domain_steering():
    assert pair_type(0, 0) == PAIR_TARGET
    assert pair_type(1, 2) == PAIR_EXTRA
    assert pair_type(0, 2) == pair_type(1, 0) == PAIR_CROSS
    items = random_items(600, num_classes=3, seed=4, domains=(0, 2))
    cross = run(PairPool(64, 16, cross_domain_share=1.0, rng=np.random.default_rng(0)), items)
    same = run(PairPool(64, 16, cross_domain_share=0.0, rng=np.random.default_rng(0)), items)
    share = lambda pairs: np.mean([pair_type(m.domain, n.domain) == PAIR_CROSS for m, n in pairs])  # noqa: E731
    assert share(cross) > 0.95 and share(same) < 0.05


def test_same_seed_same_pairs():
    items = random_items(200)
    a = run(PairPool(16, 8, rng=np.random.default_rng(7)), items)
    b = run(PairPool(16, 8, rng=np.random.default_rng(7)), items)
    c = run(PairPool(16, 8, rng=np.random.default_rng(8)), items)
    key = lambda pairs: [(m.key, n.key) for m, n in pairs]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)


def test_bad_arguments():
    with pytest.raises(ValueError, match="pool_size=0"):
        PairPool(pool_size=0)
    with pytest.raises(ValueError, match="cross_domain_share=2"):
        PairPool(cross_domain_share=2)
    with pytest.raises(ValueError, match="no labels"):
        PairPool().push(PoolItem("k", (), 0))


@pytest.mark.parametrize(
    "num_shards, world, workers", [(12, 2, 2), (12, 3, 2), (5, 3, 2), (1, 2, 1)]
)
def test_units_split_shards_or_samples_disjointly(num_shards, world, workers):
    seen = {}
    samples_per_shard = 7
    for r in range(world):
        for w in range(workers):
            a = assign(num_shards, Unit(r, world, w, workers), seed=0, epoch=3)
            mine = [(s, i) for s in a.shards for i in range(samples_per_shard)]
            mine = [x for p, x in enumerate(mine) if p % a.stride == a.offset]
            for x in mine:
                assert x not in seen, f"{x} read by two units"
                seen[x] = (r, w)
    assert len(seen) == num_shards * samples_per_shard or num_shards < world * workers
    if num_shards < world * workers:  # sample striding still covers everything exactly once
        assert len(seen) == num_shards * samples_per_shard


def test_quotas_add_up_and_resume_positions_follow_round_robin():
    assert batches_per_rank(100, 3, 8) == 4
    with pytest.raises(ValueError, match="lower batch_size"):
        batches_per_rank(10, 2, 8)
    for total in range(0, 12):
        assert sum(worker_quota(total, w, 3) for w in range(3)) == total
    order = [j % 3 for j in range(10)]  # worker of each rank batch
    for n in range(11):
        assert [consumed_by_worker(n, w, 3) for w in range(3)] == [
            order[:n].count(w) for w in range(3)
        ]
