"""`mcis eval cams` / `mcis eval compare` on a split with bounding boxes (Choe et al. 2020's
box-scored localization): a real split built with the shard builder (a bright square per
image, its box around it), CAM folders written with the real CAM writer from maps whose scores
are known (exactly the object square: every box found; a patch away from it: none), the CAM
stage's top-1 class, and old CAM folders without it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mcis_dist.cams.evaluate import compare_cams, evaluate_cams
from mcis_dist.cams.infer import CamEngine, CamSettings
from mcis_dist.cams.stage import CamActor, assemble_manifest
from mcis_dist.cli.commands import HANDLERS
from mcis_dist.cli.parser import build_parser
from mcis_dist.config import load_config
from mcis_dist.data.loader import open_manifest
from mcis_dist.data.transforms import decode_rgb, decode_rgb_array, normalize
from mcis_dist.evaluation.overlay import PREDICTED_BOX_COLOUR, TRUE_BOX_COLOUR
from mcis_dist.formats.cams import FORMAT, cam_shard_name, encode_cam, iter_cam_shard
from mcis_dist.formats.manifest import shard_entries, write_manifest
from mcis_dist.formats.shards import decode_boxes, iter_shard
from mcis_dist.models.build import build_model
from mcis_dist.shards.build import BuildOptions, ShardWriter, build_dataset
from mcis_dist.storage import LocalStorage, open_storage

from conftest import write

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")
CLASSES = ["cat", "dog"]
SIZE = 48
FIXED = 0.33  # off the 0.05 grid: the box sweep must add it
QUIET = {"log": lambda *_: None}
pytestmark = pytest.mark.usefixtures("one_thread")


def squares() -> dict[str, list[tuple[int, int, int, int, int]]]:
    """image file -> its objects (class, x0, y0, x1, y1), half-open; all in the top-left part
    of the 48x48 image but one second object of the last image, none reaching [38, 48)^2."""
    out = {}
    for i in range(8):
        s = 12 + 2 * (i % 3)
        x0, y0 = 2 + 2 * i, 3 + i
        out[f"img{i}.jpg"] = [(i % 2, x0, y0, x0 + s, y0 + s)]
    out["img7.jpg"].append((0, 32, 2, 46, 16))  # a cat too: two classes, two boxes
    return out


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """The split, built by the real shard builder from a list file and a box file (half-open)."""
    root = tmp_path_factory.mktemp("cams_boxes")
    write(root / "classes.txt", ("\n".join(CLASSES) + "\n").encode())
    rng = np.random.default_rng(0)
    lines, boxes = [], []
    for name, objects in squares().items():
        img = rng.integers(10, 50, size=(SIZE, SIZE, 3)).astype(np.uint8)
        for c, x0, y0, x1, y1 in objects:
            img[y0:y1, x0:x1] = 230
            boxes.append(f"{name} {CLASSES[c]} {x0} {y0} {x1} {y1}")
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
        write(root / "img" / name, buf.getvalue())
        lines.append(f"{name} " + " ".join(sorted({CLASSES[o[0]] for o in objects})))
    write(root / "list.txt", ("\n".join(lines) + "\n").encode())
    write(root / "boxes.txt", ("\n".join(boxes) + "\n").encode())
    args = {
        "list_file": str(root / "list.txt"),
        "image_root": str(root / "img"),
        "classes": str(root / "classes.txt"),
        "boxes": str(root / "boxes.txt"),
        "box_coords": "half-open",
    }
    opts = BuildOptions(workers=1, progress=False, max_samples_per_shard=4)
    manifest = build_dataset("list", LocalStorage(root / "shards"), opts, ["train"], args, **QUIET)
    assert manifest["train"]["with_boxes"] == 8 and manifest["train"]["num_boxes"] == 9
    assert len(manifest["train"]["shards"]) == 2
    return root / "shards" / "train"


def samples(split: Path):
    """(raw sample, labels, boxes (n, 5), (H, W)) of every image of the split, shard by shard."""
    manifest = json.loads((split / "manifest.json").read_text())
    for shard in manifest["shards"]:
        out = []
        for raw in iter_shard(str(split / shard["name"])):
            labels = sorted(json.loads(raw["json"])["labels"])
            size = decode_rgb_array(raw["jpg"]).shape[:2]
            out.append((raw, labels, decode_boxes(raw), size))
        yield shard, out


def hit(labels, boxes, size, i):
    """Per class, exactly its object squares; every other image's maps at half height (not
    max-normalised: the evaluation must normalise them, once)."""
    maps = np.zeros((len(labels), *size), np.float32)
    for c, x0, y0, x1, y1 in boxes.tolist():
        maps[labels.index(c), y0:y1, x0:x1] = 1.0
    return maps * (0.5 if i % 2 else 1.0)


def miss(labels, boxes, size, i):
    """Per class, a patch in the bottom-right corner, away from every object: IoU 0."""
    maps = np.zeros((len(labels), *size), np.float32)
    maps[:, 38:46, 38:46] = 1.0
    return maps


def write_cams(split: Path, out: Path, make_maps, top1=lambda labels, i: labels[0]) -> Path:
    """A CAM folder of the split as `mcis cams` lays it out (stride-1 maps of ``make_maps``,
    meta with ``top1`` unless ``top1`` is None), written with the CAM format's own pieces."""
    out.mkdir(parents=True)
    records, i = [], 0
    for index, (shard, items) in enumerate(samples(split)):
        name, keys = cam_shard_name(index), []
        writer = ShardWriter(out / name)
        for raw, labels, boxes, size in items:
            meta = {"key": raw["__key__"], "labels": labels, "size": list(size), "stride": 1}
            meta["fallback"] = []
            if top1 is not None:
                meta["top1"] = top1(labels, i)
            maps = make_maps(labels, boxes, size, i)
            writer.write(
                {
                    "__key__": raw["__key__"],
                    "cam.npy": encode_cam(maps),
                    "json": json.dumps(meta).encode(),
                }
            )
            keys.append(raw["__key__"])
            i += 1
        idx = name.replace(".tar", ".idx")
        (out / idx).write_text(writer.close())
        records.append(
            {"name": name, "index": index, "source": shard["name"], "samples": len(keys)}
        )
        records[-1].update(keys=keys, bytes=writer.bytes, sha256=writer.sha256, index_name=idx)
    manifest = {
        "format": FORMAT,
        "classes": CLASSES,
        "samples": i,
        "source": {"url": str(split), "samples": i},
        "settings": {"mode": "single"},
        "shards": shard_entries(records),
    }
    write_manifest(open_storage(out), manifest)
    return out


def config(*extra: str):
    return load_config(
        CONFIG,
        [f"cams.bg_threshold={FIXED}", "cams.eval_grid=3", "cams.eval_attention_pairs=0", *extra],
    )


@pytest.fixture(scope="module")
def folders(split, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cam_folders")
    half = lambda labels, boxes, size, i: (hit if i % 4 else miss)(labels, boxes, size, i)  # noqa: E731
    return {
        "hit": write_cams(split, root / "hit", hit),
        "miss": write_cams(split, root / "miss", miss, top1=lambda labels, i: 1 - labels[-1]),
        "half": write_cams(split, root / "half", half),
        "old": write_cams(split, root / "old", hit, top1=None),
    }


KEYS = {"gt_known_loc", "max_box_acc_v2", "top1_loc", "top1_cls"}


def label_order(split: Path) -> list[list[int]]:
    """The labels of the images in the order ``write_cams`` numbers them."""
    return [labels for _, items in samples(split) for _, labels, _, _ in items]


def test_boxes_are_scored_at_three_kinds_of_threshold_with_intervals(split, folders):
    result = evaluate_cams(config(), cams_url=str(folders["hit"]), **QUIET)
    saved = json.loads((folders["hit"] / "eval" / "eval.json").read_text())
    assert "miou_heldout" not in saved and saved["images"] == 0 and saved["box_images"] == 8
    boxes = saved["boxes"]
    assert boxes == json.loads(json.dumps(result["boxes"]))
    assert boxes["images"] == 8 and boxes["boxes"] == 9 and boxes["pairs"] == 9
    halved = sum(len(labels) for i, labels in enumerate(label_order(split)) if i % 2)
    assert boxes["maps_normalised"] == halved  # the half-height maps, once
    assert boxes["top1_images"] == 8 and "top1_note" not in boxes
    assert FIXED in boxes["thresholds"] and 0.95 in boxes["thresholds"]
    assert boxes["fixed"]["threshold"] == FIXED
    assert set(boxes["heldout"]["thresholds"]) == {"iou_0.3", "iou_0.5", "iou_0.7"}
    for kind in ("heldout", "fixed", "oracle"):
        for metric in KEYS:
            assert boxes[kind][metric] == pytest.approx(1.0), (kind, metric)
            assert boxes[kind][f"{metric}_interval"] == pytest.approx([1.0, 1.0])
    assert boxes["gt_known_loc_curve"] == pytest.approx([1.0] * len(boxes["thresholds"]))

    missed = evaluate_cams(config(), cams_url=str(folders["miss"]), **QUIET)["boxes"]
    for kind in ("heldout", "fixed", "oracle"):
        assert {m: missed[kind][m] for m in KEYS - {"top1_cls"}} == dict.fromkeys(
            KEYS - {"top1_cls"}, 0.0
        )
        assert missed[kind]["top1_cls"] == 1 / 8  # a cat-and-dog image has no wrong class
        assert missed[kind]["gt_known_loc_interval"] == [0.0, 0.0]


def test_overlays_draw_the_predicted_and_the_true_boxes(folders):
    evaluate_cams(config(), cams_url=str(folders["hit"]), **QUIET)
    grid = np.asarray(Image.open(folders["hit"] / "eval" / "overlays.png").convert("RGB"))
    colours = {tuple(c) for c in grid.reshape(-1, 3)}
    assert TRUE_BOX_COLOUR in colours or PREDICTED_BOX_COLOUR in colours
    # the predicted box is drawn over the true one where they coincide: both appear on a miss
    evaluate_cams(config(), cams_url=str(folders["miss"]), **QUIET)
    grid = np.asarray(Image.open(folders["miss"] / "eval" / "overlays.png").convert("RGB"))
    colours = {tuple(c) for c in grid.reshape(-1, 3)}
    assert TRUE_BOX_COLOUR in colours and PREDICTED_BOX_COLOUR in colours


def test_old_cam_meta_without_top1_gives_none_not_a_crash(folders):
    boxes = evaluate_cams(config(), cams_url=str(folders["old"]), **QUIET)["boxes"]
    assert boxes["top1_images"] == 0 and "no top-1 class" in boxes["top1_note"]
    for kind in ("heldout", "fixed", "oracle"):
        assert boxes[kind]["top1_loc"] is None and boxes[kind]["top1_cls"] is None
        assert boxes[kind]["top1_loc_interval"] is None
        assert boxes[kind]["gt_known_loc"] == pytest.approx(1.0)


def half_missed(split: Path) -> float:
    """The share of (image, class) pairs the "half" set misses: images i % 4 == 0."""
    order = label_order(split)
    return sum(len(x) for i, x in enumerate(order) if i % 4 == 0) / sum(len(x) for x in order)


def test_compare_gives_paired_box_differences(split, folders, tmp_path):
    cfg = config()
    result = compare_cams(
        cfg,
        [str(folders["hit"])],
        [str(folders["miss"])],
        n_boot=500,
        out_url=str(tmp_path),
        **QUIET,
    )
    assert "heldout" not in result  # no masks: no mIoU difference
    for kind in ("heldout", "fixed", "oracle"):
        for metric in ("max_box_acc_v2", "gt_known_loc"):
            r = result["boxes"][kind][metric]
            assert r["diff"] == pytest.approx(1.0) and r["low"] > 0, (kind, metric)
            assert r["images"] == 8 and r["seeds"] == 1
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["boxes"]["heldout"]["gt_known_loc"]["diff"] == pytest.approx(1.0)
    # the images i % 4 == 0 are missed in "half"
    r = compare_cams(cfg, [str(folders["hit"])], [str(folders["half"])], n_boot=500, **QUIET)
    fixed = r["boxes"]["fixed"]["gt_known_loc"]
    # 2 of 8 images missed: a resample draws none of them 10% of the time, so low is 0
    assert fixed["diff"] == pytest.approx(half_missed(split))
    assert fixed["low"] == 0.0 and fixed["diff"] < fixed["high"] <= 1


def test_the_cli_prints_the_box_figures_labelled(split, folders, capsys):
    argv = ["eval", "cams", "--config", CONFIG, "--cams", str(folders["half"])]
    argv += [f"cams.bg_threshold={FIXED}", "cams.eval_attention_pairs=0"]
    args = build_parser().parse_args(argv)
    assert HANDLERS[(args.command, args.eval_command)](args) == 0
    out = capsys.readouterr().out
    assert "8 images with 9 boxes" in out
    assert "at held-out thresholds (each half at the best of the other half" in out
    assert (
        f"at the fixed cams.bg_threshold={FIXED:.2f}: GT-known loc {100 * (1 - half_missed(split)):.1f} ["
        in out
    )
    assert "best (oracle: chosen on these boxes, an upper bound" in out
    assert "MaxBoxAccV2" in out and "top-1 loc" in out and "top-1 cls 100.0" in out


def rewrite(split: Path, dest: Path, change) -> Path:
    """A copy of the split whose samples are ``change(raw)`` (same keys and shards)."""
    dest.mkdir()
    for p in split.iterdir():
        if p.suffix == ".tar":
            w = ShardWriter(dest / p.name)
            for raw in iter_shard(str(p)):
                w.write(change({k: v for k, v in raw.items() if not k.startswith("__url")}))
            (dest / p.with_suffix(".idx").name).write_text(w.close())
    manifest = json.loads((split / "manifest.json").read_text())
    for s in manifest["shards"]:
        s["bytes"], s["sha256"] = (dest / s["name"]).stat().st_size, None
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_a_split_with_neither_masks_nor_boxes_says_so(split, tmp_path):
    from mcis_dist.runtime.sharded import StageError

    keep = ("__key__", "jpg", "json")
    bare = rewrite(split, tmp_path / "bare", lambda raw: {k: raw[k] for k in keep})
    cams = write_cams(bare, tmp_path / "cams", miss)
    with pytest.raises(StageError, match="has a mask or boxes"):
        evaluate_cams(config(), cams_url=str(cams), **QUIET)


def with_mask(raw: dict) -> dict:
    """The sample plus a mask: its boxes filled with class + 1 on background 0."""
    mask = np.zeros(decode_rgb_array(raw["jpg"]).shape[:2], np.uint8)
    for c, x0, y0, x1, y1 in decode_boxes(raw).tolist():
        mask[y0:y1, x0:x1] = c + 1
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG")
    return {**raw, "mask.png": buf.getvalue()}


def test_a_split_with_masks_and_boxes_gets_both(split, tmp_path):
    both = rewrite(split, tmp_path / "both", with_mask)
    hit_cams = write_cams(both, tmp_path / "hit", hit)
    miss_cams = write_cams(both, tmp_path / "miss", miss)
    result = evaluate_cams(config(), cams_url=str(hit_cams), thresholds=[0.0, 0.3], **QUIET)
    assert result["images"] == 8 and result["box_images"] == 8
    # the mask path scores the maps as stored (half-height ones too): 0.5 > FIXED
    assert result["at_threshold"]["miou"] == pytest.approx(1.0)
    assert result["boxes"]["heldout"]["gt_known_loc"] == pytest.approx(1.0)
    r = compare_cams(config(), [str(hit_cams)], [str(miss_cams)], n_boot=200, **QUIET)
    assert r["fixed"]["diff"] > 0 and r["boxes"]["fixed"]["gt_known_loc"]["diff"] == 1.0


# --------------------------------------------------------------- the CAM stage's top-1 class
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(config(), num_classes=2).eval()


def direct_scores(model, rgb, scale: float = 1.0) -> torch.Tensor:
    """The classifier's single-image class scores s_n (Eq. 1) through its own forward, on the
    image resized by ``scale`` (bilinear, as the engine's test scales)."""
    x = normalize(rgb.unsqueeze(0), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    if scale != 1.0:
        size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        return model(x, x).single_m[0]


@pytest.mark.parametrize(
    ("scales", "scored_at"), [((1.0,), 1.0), ((0.5, 1.0), 1.0), ((1.5, 0.5), 1.5)]
)
def test_engine_class_scores_are_eq1_at_scale_one_or_the_first(split, model, scales, scored_at):
    """Scale 1 when listed, else the first listed scale (no backbone pass of its own)."""
    raw, labels, _boxes, _size = next(samples(split))[1][0]
    rgb = decode_rgb(raw["jpg"])
    settings = CamSettings(mode="single", scales=scales, flip=True)
    engine = CamEngine(model, settings, class_scores=True)
    passes = []
    hook = model.backbone.register_forward_hook(lambda *_: passes.append(1))
    try:
        engine.cams(rgb, labels)
    finally:
        hook.remove()
    assert len(passes) == len(scales)  # one batched pass (image + mirror image) a scale
    want = direct_scores(model, rgb, scored_at)
    torch.testing.assert_close(engine.last_scores, want, atol=1e-4, rtol=0)
    plain = CamEngine(model, settings)
    plain.cams(rgb, labels)
    assert plain.last_scores is None


def test_cam_stage_stores_top1_and_eval_reports_top1(split, model, tmp_path):
    """The stage's actor, run in this process (no Ray), writes top1 / top5 equal to the argmax
    of the classifier's own scores; the evaluation then reports top-1 figures from them."""
    out = tmp_path / "cams"
    cfg = config(
        f"cams.split_url={split}", f"cams.out_url={out}", "cams.mode=single", "cams.scales=[1.0]"
    )
    actor = CamActor(json.loads(cfg.model_dump_json()), model.state_dict(), num_classes=2)
    source, _ = open_manifest(str(split))
    records = [
        actor.run({"name": cam_shard_name(i), "index": i, "source": s["name"], "fingerprint": "x"})
        for i, s in enumerate(source["shards"])
    ]
    write_manifest(open_storage(out), assemble_manifest(cfg, records, source, "x", "model", 0.0))
    by_key = {raw["__key__"]: raw for _, items in samples(split) for raw, *_ in items}
    metas = [m for r in records for m, _ in iter_cam_shard(open_storage(out), r["name"])]
    assert len(metas) == 8
    for meta in metas:
        scores = direct_scores(model, decode_rgb(by_key[meta["key"]]["jpg"]))
        assert meta["top1"] == int(scores.argmax()) and meta["top5"][0] == meta["top1"]
        assert sorted(meta["top5"]) == [0, 1]
    boxes = evaluate_cams(cfg, cams_url=str(out), **QUIET)["boxes"]
    assert boxes["top1_images"] == 8 and boxes["images"] == 8
    right = sum(m["top1"] in m["labels"] for m in metas) / 8
    assert boxes["heldout"]["top1_cls"] == pytest.approx(right)
    assert boxes["heldout"]["top1_loc"] is not None
