"""The shards as DALI sees them: our .idx equals DALI's own indexer, and readers.webdataset
reads every sample (CPU pipeline) with labels and masks intact."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types
from PIL import Image
from wds2idx import IndexCreator

from mcis_dist.shards.build import BuildOptions, build_dataset
from mcis_dist.shards.synthetic import SyntheticSpec, synthetic_sample
from mcis_dist.storage import LocalStorage

from conftest import encode

SPEC = SyntheticSpec(num_train=24, num_val=6)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dali") / "shards"
    opts = BuildOptions(shard_size_mb=0.12, workers=1, progress=False)
    manifests = build_dataset(
        "synthetic", LocalStorage(out), opts, None, {"spec": SPEC}, log=lambda *_: None
    )
    return out, manifests


def test_index_files_equal_dalis_own_indexer(built, tmp_path):
    out, manifests = built
    for shard in manifests["train"]["shards"]:
        ours = (out / "train" / shard["index"]).read_text()
        ref = tmp_path / shard["index"]
        with IndexCreator(str(out / "train" / shard["name"]), str(ref), verbose=False) as creator:
            creator.create_index()
        assert ours == ref.read_text()


def dali_read_all(tars: list[str], idxs: list[str], n: int):
    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=0)
    def pipe():
        img, mask, meta = fn.readers.webdataset(
            paths=tars,
            index_paths=idxs,
            ext=["jpg;png", "mask.png", "json"],
            missing_component_behavior="error",
            random_shuffle=False,
            name="reader",
        )
        img = fn.decoders.image(img, device="cpu", output_type=types.RGB)
        mask = fn.decoders.image(mask, device="cpu", output_type=types.GRAY)
        return img, mask, meta

    p = pipe()
    p.build()
    assert p.reader_meta("reader")["epoch_size"] == n
    seen = {}
    while len(seen) < n:
        imgs, masks, metas = p.run()
        for i in range(len(imgs)):
            meta = json.loads(bytes(np.asarray(metas.at(i))).decode())
            seen[meta["key"]] = (np.asarray(imgs.at(i)), np.asarray(masks.at(i))[..., 0], meta)
    return seen


def test_dali_cpu_pipeline_reads_every_sample(built):
    out, manifests = built
    m = manifests["train"]
    tars = [str(out / "train" / s["name"]) for s in m["shards"]]
    idxs = [str(out / "train" / s["index"]) for s in m["shards"]]
    seen = dali_read_all(tars, idxs, m["num_samples"])
    assert sorted(seen) == sorted(k for s in m["shards"] for k in s["keys"])
    for key, (img, mask, meta) in seen.items():
        truth = synthetic_sample(SPEC, "train", int(key.rsplit("_", 1)[1]))
        assert img.shape == truth.image.shape
        stored = Image.open(io.BytesIO(encode(Image.fromarray(truth.image), "JPEG", quality=90)))
        # DALI's decoder against Pillow's on the same bytes (IDCT rounding differs slightly)
        assert np.abs(img.astype(int) - np.asarray(stored).astype(int)).mean() < 1.0
        np.testing.assert_array_equal(mask, truth.mask)  # masks are lossless
        assert meta["labels"] == truth.labels
