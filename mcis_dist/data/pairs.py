"""The class-keyed pair pool: every image leaves paired with a partner that shares a class.

MCIS trains on pairs (I_m, I_n) sharing at least one class (paper §3.1; the authors' sampler:
pick a random positive class of image m, then a random image holding that class). A stream can
not look images up by class, so each loader worker keeps a bounded pool of recently seen samples
indexed by class:

* an arriving sample m picks one of its classes at random (then the others, in random order)
  and takes a random partner holding it from the pool, never a sample with the same source key;
* with no partner available it waits (a bounded queue) and is paired as soon as a sample sharing
  one of its classes arrives; if the queue overflows, the oldest waiting sample is dropped and
  counted;
* every sample enters the pool (evicting the oldest beyond ``pool_size``), so it can be a
  partner for later ones.

That is ``pairing="reuse"`` (the default): every sample is m of one pair and a partner of about
one more, so an epoch of N samples is N pairs, 2N image passes. ``pairing="disjoint"`` puts every
sample in exactly one pair: the pool holds only samples still without a partner, an arriving
sample takes one that shares a class out of it (or stays in it, waiting), and the oldest is
dropped beyond ``pool_size`` (``max_wait`` is unused). An epoch is then N / 2 pairs, N image
passes: each image seen once, at half the cost.

Per epoch the pool counts (``PairStats``; the trainer reports them at each epoch's end as
``pair_partner_share``, ``pair_mean_wait``, ``pair_dropped``, ``pair_unshared``): the samples
pushed, how many found a class-sharing partner (at once or after waiting), the wait of each in
samples pushed between its arrival and its pairing (0 when paired on arrival), the samples the
queue dropped, and pairs without a shared class (none by construction; counted so a change that
breaks it shows). With C classes drawn uniformly a new sample finds no class-mate among P pooled
ones with probability about (1 - 1/C)^P, and a waiting one meets its next after about C
arrivals: size ``pool_size`` and ``max_wait`` for the class count (experiments/pool_sizing.py).

Domains (target / single / web, paper §3.2) travel with the samples; a pair's type picks the
domain-specific W_P: 0 target–target, 1 extra–extra, 2 cross-domain. ``cross_domain_share``
steers how often a partner is taken from the other domain group when both are available.

The pool's choices depend only on sample metadata and its own generator, never on pixels, so the
same stream always gives the same pairs (what makes an exact resume possible).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DOMAIN_IDS = {"target": 0, "single": 1, "web": 2}
PAIR_TARGET, PAIR_EXTRA, PAIR_CROSS = 0, 1, 2


def pair_type(domain_m: int, domain_n: int) -> int:
    """0: both target; 1: both extra (single or web); 2: one of each."""
    extra_m, extra_n = domain_m != 0, domain_n != 0
    if extra_m and extra_n:
        return PAIR_EXTRA
    return PAIR_CROSS if extra_m != extra_n else PAIR_TARGET


@dataclass
class PoolItem:
    key: str
    labels: tuple[int, ...]
    domain: int
    payload: Any = None  # the image (or whatever the backend needs to produce it)


@dataclass
class PairStats:
    """The pool's counters (one epoch of one loader worker; ``merge`` adds workers)."""

    pairs: int = 0  # pairs formed
    partnered: int = 0  # samples that left in a pair as m (reuse) or as m or n (disjoint)
    immediate: int = 0  # partner found when the sample arrived
    after_wait: int = 0
    dropped: int = 0  # waited too long (queue overflow)
    shared_classes: int = 0  # sum over pairs of |l_m ∩ l_n|
    pair_types: list[int] = field(default_factory=lambda: [0, 0, 0])
    pushed: int = 0  # samples that entered the pool
    waited: int = 0  # sum over pairs of the samples pushed between m's arrival and its pairing
    unshared: int = 0  # pairs with l_m ∩ l_n empty: 0 by construction, counted to show it

    def merge(self, other: PairStats) -> PairStats:
        summed = {
            k: getattr(self, k) + getattr(other, k) for k in self.__dict__ if k != "pair_types"
        }
        types = [a + b for a, b in zip(self.pair_types, other.pair_types, strict=True)]
        return PairStats(**summed, pair_types=types)

    def summary(self) -> dict:
        """The loader's pairing figures: ``partner_share`` (pairs / samples pushed: a sample
        still waiting when the epoch's quota is met counts as unpaired), ``mean_wait``
        (samples pushed while a paired sample waited; 0 for one paired on arrival),
        ``dropped_unpaired``, ``unshared_pairs``, and the older share and type counts."""
        n = max(self.pairs, 1)
        return {
            "pairs": self.pairs,
            "samples_pushed": self.pushed,
            "partner_share": self.partnered / max(self.pushed, 1),
            "mean_wait": self.waited / n,
            "unshared_pairs": self.unshared,
            "share_without_waiting": self.immediate / n,
            "mean_shared_classes": self.shared_classes / n,
            "dropped_unpaired": self.dropped,
            "pair_types": {
                "target": self.pair_types[0],
                "extra": self.pair_types[1],
                "cross": self.pair_types[2],
            },
        }


def pair_metrics(summary: dict) -> dict:
    """The per-epoch metrics keys of a ``PairStats.summary()`` (metrics.jsonl, progress line)."""
    return {
        "pair_partner_share": summary["partner_share"],
        "pair_mean_wait": summary["mean_wait"],
        "pair_dropped": summary["dropped_unpaired"],
        "pair_unshared": summary["unshared_pairs"],
    }


PAIRINGS = ("reuse", "disjoint")


class PairPool:
    """Pairs a stream of samples; ``push`` returns the pairs (m, n) that became ready."""

    def __init__(
        self,
        pool_size: int = 256,
        max_wait: int = 64,
        cross_domain_share: float | None = None,
        rng: np.random.Generator | None = None,
        pairing: str = "reuse",
    ):
        if pool_size < 1 or max_wait < 0:
            raise ValueError(f"pool_size={pool_size}, max_wait={max_wait}: expected >= 1 and >= 0")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing={pairing!r}: expected one of {PAIRINGS}")
        self.disjoint = pairing == "disjoint"
        self._arrived: dict[int, int] = {}  # disjoint: pool id -> its arrival index
        if cross_domain_share is not None and not 0 <= cross_domain_share <= 1:
            raise ValueError(f"cross_domain_share={cross_domain_share}: expected 0..1 or None")
        self.pool_size, self.max_wait = pool_size, max_wait
        self.cross_domain_share = cross_domain_share
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self._pool: OrderedDict[int, PoolItem] = OrderedDict()  # arrival id → item, oldest first
        self._by_class: dict[int, dict[int, None]] = {}  # class → arrival ids (ordered set)
        self._waiting: deque[tuple[int, PoolItem]] = deque()  # (arrival index, sample)
        self._next_id = 0
        self.stats = PairStats()

    # -- the pool -------------------------------------------------------------------------------
    def _add(self, item: PoolItem) -> None:
        uid = self._next_id
        self._next_id += 1
        self._pool[uid] = item
        for k in item.labels:
            self._by_class.setdefault(k, {})[uid] = None
        if self.disjoint:
            self._arrived[uid] = self.stats.pushed - 1
        while len(self._pool) > self.pool_size:
            old_id, old = self._pool.popitem(last=False)
            for k in old.labels:
                del self._by_class[k][old_id]
            if self.disjoint:  # it leaves without a partner
                del self._arrived[old_id]
                self.stats.dropped += 1

    def _take(self, uid: int) -> tuple[PoolItem, int]:
        """Remove a waiting sample from the (disjoint) pool: (it, its arrival index)."""
        item = self._pool.pop(uid)
        for k in item.labels:
            del self._by_class[k][uid]
        return item, self._arrived.pop(uid)

    def _partner(self, m: PoolItem) -> PoolItem | None:
        uid = self._partner_id(m)
        return None if uid is None else self._pool[uid]

    def _partner_id(self, m: PoolItem) -> int | None:
        classes = list(m.labels)
        self.rng.shuffle(classes)
        for k in classes:
            ids = [u for u in self._by_class.get(k, ()) if self._pool[u].key != m.key]
            if not ids:
                continue
            if self.cross_domain_share is not None:
                m_extra = m.domain != 0
                other = [u for u in ids if (self._pool[u].domain != 0) != m_extra]
                same = [u for u in ids if (self._pool[u].domain != 0) == m_extra]
                want_other = self.rng.random() < self.cross_domain_share
                ids = (other or same) if want_other else (same or other)
            return ids[int(self.rng.integers(len(ids)))]
        return None

    def _emit(self, m: PoolItem, n: PoolItem, wait: int = 0) -> tuple[PoolItem, PoolItem]:
        """Count the pair (m, n); ``wait``: samples pushed since the one that waited arrived (m
        with reuse, n with disjoint; 0: on arrival)."""
        s = self.stats
        s.pairs += 1
        s.partnered += 2 if self.disjoint else 1
        s.after_wait += wait > 0
        s.immediate += wait == 0
        s.waited += wait
        shared = len(set(m.labels) & set(n.labels))
        s.shared_classes += shared
        s.unshared += shared == 0
        s.pair_types[pair_type(m.domain, n.domain)] += 1
        return m, n

    # -- public ---------------------------------------------------------------------------------
    def push(self, item: PoolItem) -> list[tuple[PoolItem, PoolItem]]:
        """Add one sample; return the pairs that are ready now (the sample's own first, if any)."""
        if not item.labels:
            raise ValueError(f"sample {item.key!r} has no labels: it can never be paired")
        ready = []
        now = self.stats.pushed  # this sample's arrival index
        self.stats.pushed += 1
        if self.disjoint:  # a waiting sample sharing a class leaves with it; else it waits
            uid = self._partner_id(item)
            if uid is None:
                self._add(item)
                return ready
            partner, arrived = self._take(uid)
            return [self._emit(item, partner, wait=now - arrived)]
        partner = self._partner(item)
        if partner is not None:
            ready.append(self._emit(item, partner))
        self._add(item)
        # Samples waiting for a class this one holds can be paired now (oldest first).
        if self._waiting:
            still = deque()
            for arrived, w in self._waiting:
                p = self._partner(w) if set(w.labels) & set(item.labels) else None
                if p is None:
                    still.append((arrived, w))
                else:
                    ready.append(self._emit(w, p, wait=now - arrived))
            self._waiting = still
        if partner is None:
            self._waiting.append((now, item))
            if len(self._waiting) > self.max_wait:
                self._waiting.popleft()
                self.stats.dropped += 1
        return ready

    def items(self):
        """Every item the pool or the waiting queue holds (to materialise after a replay)."""
        yield from self._pool.values()
        yield from (item for _, item in self._waiting)
