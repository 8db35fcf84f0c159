"""Related images for inference: for a class k, K other samples that hold k, read by random access.

Co-attentive localization maps (paper §3.2) average the query's co-attention with |R| related
images of each of its labelled classes. The manifest's ``class_index`` lists the samples holding
each class; the shard's ``.idx`` gives each member's byte offset, so one ranged read (a seek
locally, an HTTP Range GET on S3) fetches a sample without streaming its shard.
"""

from __future__ import annotations

import json
import zlib

import numpy as np

from mcis_dist.data.stream import IMAGE_EXTS

__all__ = ["RelatedSampler"]


class RelatedSampler:
    """Draws and reads related samples of one split (its manifest and storage)."""

    def __init__(self, manifest: dict, storage, seed: int = 0, pool: int = 0):
        """``pool`` > 0: related images of class k come from a fixed, seeded set of ``pool``
        samples of k (so their features can be cached and reused); 0: from all of them."""
        self.manifest, self.storage, self.seed, self.pool = manifest, storage, seed, pool
        self._pools: dict[int, list[int]] = {}  # class -> its fixed pool (pool > 0)
        self._pooled: set[int] | None = None
        self.keys = [k for s in manifest["shards"] for k in s["keys"]]
        self._global = {k: g for g, k in enumerate(self.keys)}
        self._firsts = np.array([s["first"] for s in manifest["shards"]])
        self._index_rows: dict[int, list[dict[str, tuple[int, int]]]] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def global_index(self, key: str) -> int:
        try:
            return self._global[key]
        except KeyError:
            raise KeyError(f"sample {key!r} is not in {self.storage.describe()}") from None

    def draw(
        self, k: int, n: int, exclude_key: str | None = None, *, replace: bool = False
    ) -> list[int]:
        """Up to ``n`` distinct samples holding class ``k``, never ``exclude_key`` itself; seeded
        by (seed, query key, class), so a re-run draws the same ones. Empty when no other sample
        holds ``k`` (the caller falls back to single-round maps).

        ``replace=True`` is the authors' test-time draw: exactly ``n`` samples of ``k`` with
        replacement, the query itself allowed (``exclude_key`` only seeds the draw)."""
        if not 0 <= k < len(self.manifest["classes"]):
            raise ValueError(f"class {k} is outside 0..{len(self.manifest['classes']) - 1}")
        members = self._members(k)
        skip = self._global.get(exclude_key) if exclude_key is not None and not replace else None
        candidates = [g for g in members if g != skip]
        if not candidates:
            return []
        query = zlib.crc32((exclude_key or "").encode("utf-8"))
        rng = np.random.default_rng([self.seed, query, k])
        if replace:
            return [candidates[int(i)] for i in rng.integers(0, len(candidates), size=n)]
        picked = rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)
        return [candidates[int(i)] for i in picked]

    def _members(self, k: int) -> list[int]:
        members = self.manifest["class_index"][k]
        if not self.pool or len(members) <= self.pool:
            return members
        if k not in self._pools:  # the class's fixed pool, drawn once
            rng = np.random.default_rng([self.seed, k, 1])
            picked = rng.choice(len(members), self.pool, replace=False)
            self._pools[k] = sorted(members[int(i)] for i in picked)
        return self._pools[k]

    def _all_pooled(self) -> set[int]:
        """Every class's pool together (``pool`` > 0), computed once."""
        if self._pooled is None:
            n = len(self.manifest["classes"])
            self._pooled = {g for c in range(n) for g in self._members(c)}
        return self._pooled

    def draw_without(self, k: int, n: int, exclude_key: str | None = None) -> list[int]:
        """Up to ``n`` distinct samples that do *not* hold class ``k`` (for contrastive maps),
        seeded like :meth:`draw`; with ``pool``, from the other classes' pools."""
        return self._draw_lacking([k], n, exclude_key, (k, 2))

    def draw_unrelated(self, labels, n: int, exclude_key: str | None = None, salt: int = 0):
        """Up to ``n`` distinct samples holding *none* of ``labels`` (the wrong-class control of
        co-attentive maps), seeded by (seed, query key, salt) like :meth:`draw`; with ``pool``,
        from the pools of the other classes (the images ``draw`` reads, so the control differs
        from the co-attentive maps in class only, and hits the same feature cache)."""
        return self._draw_lacking(list(labels), n, exclude_key, (salt, 3))

    def _draw_lacking(self, classes: list[int], n: int, exclude_key, stream: tuple) -> list[int]:
        holding: set[int] = set()
        for k in classes:
            if not 0 <= k < len(self.manifest["classes"]):
                raise ValueError(f"class {k} is outside 0..{len(self.manifest['classes']) - 1}")
            holding.update(self.manifest["class_index"][k])
        skip = self._global.get(exclude_key) if exclude_key is not None else None
        query = zlib.crc32((exclude_key or "").encode("utf-8"))
        rng = np.random.default_rng([self.seed, query, *stream])
        if self.pool:  # from the other classes' fixed pools, as draw() keeps to k's
            pooled = sorted(self._all_pooled() - holding - {skip})
            order = rng.permutation(len(pooled))[:n]
            return [pooled[int(i)] for i in order]
        picked: list[int] = []
        # Rejection sampling: cheap when most samples lack the classes (the usual case), exact
        # otherwise.
        for g in rng.permutation(len(self.keys)).tolist():
            if g not in holding and g != skip:
                picked.append(g)
                if len(picked) == n:
                    break
        return picked

    def _rows(self, shard: int) -> list[dict[str, tuple[int, int]]]:
        """Per sample of a shard: member extension → (offset, size), from its ``.idx``."""
        if shard not in self._index_rows:
            text = self.storage.read_bytes(self.manifest["shards"][shard]["index"]).decode()
            lines = text.splitlines()[1:]
            rows = []
            for line in lines:
                f = line.split()
                rows.append({f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)})
            self._index_rows[shard] = rows
        return self._index_rows[shard]

    def read(self, g: int) -> dict[str, bytes]:
        """The members of sample ``g`` (``{"jpg": ..., "json": ..., ...}``) in one ranged read."""
        if not 0 <= g < len(self.keys):
            raise IndexError(f"sample {g} is outside 0..{len(self.keys) - 1}")
        shard = int(np.searchsorted(self._firsts, g, side="right") - 1)
        row = self._rows(shard)[g - self._firsts[shard]]
        start = min(off for off, _ in row.values())
        end = max(off + size for off, size in row.values())
        blob = self.storage.read_range(self.manifest["shards"][shard]["name"], start, end - start)
        out = {ext: blob[off - start : off - start + size] for ext, (off, size) in row.items()}
        out["__key__"] = self.keys[g]
        return out

    def read_image(self, g: int) -> tuple[str, list[int], bytes]:
        """(key, labels, encoded image) of sample ``g``."""
        sample = self.read(g)
        labels = json.loads(sample["json"])["labels"]
        data = next(sample[e] for e in IMAGE_EXTS if e in sample)
        return sample["__key__"], labels, data
