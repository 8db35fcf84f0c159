"""Sources: turn raw data on disk into a plan of samples, without decoding anything.

A plan lists, for every sample, where its bytes are, its key, domain and (where known without
decoding) its labels. Planning is cheap (``stat`` and text parsing only), deterministic, and
catches everything that can be caught early: configuration problems (a missing root, an empty
class list) raise :class:`SourceError` before any work starts; per-sample problems (an unknown
class name, an empty label list, a duplicate key, a missing file) become :class:`Rejection`
entries that the build lists in its manifest.

Sources and their domains (the trainer picks a domain-specific W_P from it, paper §3.2):

* ``list``      - ``relative/path.jpg label [label ...]`` files (LID / ImageNet style); target
* ``voc``       - a PASCAL VOC2012 devkit folder (+ SegmentationClassAug, saliency maps); target
* ``folder``    - one sub-folder per class (web-crawled or single-label data); web or single
* ``synthetic`` - the built-in generated dataset (``mcis_dist.shards.synthetic``); target

The list and folder sources take optional bounding boxes (``boxes``: a box file, or
``per-class`` files for the folder source, as Tiny-ImageNet has them); box files are read by
:mod:`mcis_dist.shards.boxes`, whose docstring gives their formats and the rejection rules.

Over 400 lines because the four planners share the rejection bookkeeping and are short each.
"""

from __future__ import annotations

import hashlib
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path

from mcis_dist.shards.boxes import BOX_COORDS, PER_CLASS, BoxLine, per_class_box_file, read_box_file
from mcis_dist.shards.synthetic import SyntheticSpec, class_names

__all__ = [
    "DOMAINS",
    "VOC_CLASSES",
    "PlannedSample",
    "Rejection",
    "SourcePlan",
    "SourceError",
    "read_class_list",
    "plan_list",
    "plan_voc",
    "plan_folder",
    "plan_synthetic",
    "sample_key",
]

DOMAINS = ("target", "single", "web")
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_PER_SAMPLE_OVERHEAD = 3 * 512 + 512  # tar headers + JSON, for shard size planning


class SourceError(ValueError):
    """The source is unusable as configured (a missing root or list file, bad class list...)."""


@dataclass(frozen=True)
class PlannedSample:
    key: str
    source_id: str  # where it came from, as the user would name it (relative path, VOC id)
    domain: str
    est_bytes: int
    image: str | None = None  # local path of the encoded image
    mask: str | None = None
    saliency: str | None = None
    labels: tuple[int, ...] | None = None  # None: derive from the mask while encoding
    synthetic_index: int | None = None
    boxes: tuple[BoxLine, ...] | None = None  # None: the source has no boxes for this image


@dataclass(frozen=True)
class Rejection:
    source_id: str
    reason: str


@dataclass
class SourcePlan:
    source: str
    split: str
    classes: list[str]
    samples: list[PlannedSample]
    rejected: list[Rejection] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # recorded in the manifest: no secrets here
    synthetic: SyntheticSpec | None = None


_MAX_KEY = 88
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(source_id: str) -> str:
    """A WebDataset key from a source id: no dots (they separate key and extension in a tar),
    no slashes or spaces (DALI's index format is space-separated)."""
    stem = source_id.rsplit(".", 1)[0] if "." in Path(source_id).name else source_id
    key = _KEY_UNSAFE.sub("_", stem).strip("_") or "sample"
    if len(key) > _MAX_KEY:  # a tar (ustar) member name holds at most 100 characters
        digest = hashlib.sha1(source_id.encode("utf-8")).hexdigest()[:10]
        key = f"{key[: _MAX_KEY - 11]}_{digest}"
    return key


def _dedupe(samples: list[PlannedSample], rejected: list[Rejection]) -> list[PlannedSample]:
    first: dict[str, str] = {}
    kept = []
    for s in samples:
        if s.key in first:
            rejected.append(
                Rejection(s.source_id, f"duplicate key '{s.key}' (first used by {first[s.key]})")
            )
            continue
        first[s.key] = s.source_id
        kept.append(s)
    return kept


def _normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def read_class_list(path: str | os.PathLike) -> list[str]:
    """One class name per line; blank lines and ``#`` comments ignored; no duplicates."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"class list {p} does not exist")
    names = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    if not names:
        raise SourceError(f"class list {p} is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SourceError(f"class list {p} names a class twice: {', '.join(dupes)}")
    return names


def _require_dir(path: str | os.PathLike | None, what: str) -> Path:
    if path is None:
        raise SourceError(f"{what} is required for this source")
    p = Path(path)
    if not p.is_dir():
        raise SourceError(f"{what} {p} does not exist or is not a folder")
    return p


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _parse_label(token: str, classes: list[str], lookup: dict[str, int]) -> int:
    if token in lookup:
        return lookup[token]
    if token.isdigit() and int(token) < len(classes):
        return int(token)
    raise KeyError(token)


def _classes_hint(classes: list[str], classes_file: str | os.PathLike | None) -> str:
    where = Path(classes_file).name if classes_file else "the class folder names"
    return f"one of the {len(classes)} names in {where} or an index 0..{len(classes) - 1}"


def _check_box_coords(box_coords: str) -> None:
    if box_coords not in BOX_COORDS:
        raise SourceError(f"box_coords={box_coords!r}: expected one of {', '.join(BOX_COORDS)}")


def _box_file(path: str | os.PathLike) -> Path:
    bf = Path(path)
    if not bf.is_file():
        raise SourceError(f"box file {bf} does not exist")
    return bf


def _attach_boxes(
    classes: list[str],
    samples: list[PlannedSample],
    found: list[tuple[str, BoxLine]],
    rejected: list[Rejection],
    absent: dict[str, str] | None = None,
) -> list[PlannedSample]:
    """Give each sample its boxes (``found``: ``(source id, box)`` in file order). A box of a
    source id that is not a sample, or of a class the sample's labels do not hold, is a
    rejection; ``absent`` says why an id is not a sample where that is known (its image is
    missing, or was rejected)."""
    by_sid = {s.source_id: s for s in samples}
    boxes: dict[str, list[BoxLine]] = {}
    for sid, box in found:
        s = by_sid.get(sid)
        if s is None:
            why = (absent or {}).get(sid, "no such image in the split")
            rejected.append(
                Rejection(sid, f"{box.origin}: box for a file not in the split ({why})")
            )
        elif s.labels is not None and box.cls not in s.labels:
            names = ", ".join(classes[k] for k in s.labels)
            rejected.append(
                Rejection(
                    sid,
                    f"{box.origin}: box of class {box.cls} ({classes[box.cls]}), but the image's "
                    f"labels are {list(s.labels)} ({names}); expected a box of one of its classes",
                )
            )
        else:
            boxes.setdefault(sid, []).append(box)
    return [
        replace(s, boxes=tuple(boxes[s.source_id])) if s.source_id in boxes else s for s in samples
    ]


def plan_list(
    list_file: str | os.PathLike | None,
    image_root: str | os.PathLike,
    classes_file: str | os.PathLike,
    mask_root: str | os.PathLike | None = None,
    split: str = "train",
    domain: str = "target",
    boxes: str | os.PathLike | None = None,
    box_coords: str = "inclusive",
) -> SourcePlan:
    """LID / ImageNet-200 style: ``relative/path.jpg label [label ...]`` per line, labels as
    class names or 0-based indices; with ``mask_root``, ``<stem>.png`` masks where present.

    ``boxes``: a box file, lines ``relative/path.jpg class x0 y0 x1 y1`` (paths relative to
    ``image_root``; coordinates as ``box_coords`` says, see :mod:`mcis_dist.shards.boxes`).
    Without a list file the box file is the list: its images are the files it names, labelled
    with the classes of their boxes. That is how Tiny-ImageNet's validation split reads, from
    ``val/val_annotations.txt`` (``file wnid x0 y0 x1 y1``, inclusive) and ``val/images``.
    """
    classes = read_class_list(classes_file)
    root = _require_dir(image_root, "image root")
    masks = _require_dir(mask_root, "mask root") if mask_root is not None else None
    if list_file is None and boxes is None:
        raise SourceError("the list source needs a list file, or a box file to list its images")
    if boxes is not None:
        _check_box_coords(box_coords)
        if str(boxes) == PER_CLASS:
            raise SourceError(
                f"boxes={PER_CLASS!r} is for the folder source (<class>/<class>_boxes.txt); "
                "the list source takes a box file: file class x0 y0 x1 y1 per line"
            )
    lookup = {name: i for i, name in enumerate(classes)}
    samples: list[PlannedSample] = []
    rejected: list[Rejection] = []
    absent: dict[str, str] = {}  # why a source id is not a sample (for its box lines)
    lf = Path(list_file) if list_file is not None else None
    if lf is not None:
        if not lf.is_file():
            raise SourceError(f"list file {lf} does not exist")
        entries = _read_list(lf, classes, classes_file, lookup)
    found: list[tuple[str, BoxLine]] = []
    bad_boxes: list[Rejection] = []
    if boxes is not None:
        bf = _box_file(boxes)
        found, bad = read_box_file(
            bf,
            box_coords,
            bf.name,
            lambda t: _parse_label(t, classes, lookup),
            classes_hint=_classes_hint(classes, classes_file),
        )
        bad_boxes = [Rejection(sid, reason) for sid, reason in bad]
    if lf is None:  # the box file lists the images; their boxes' classes label them
        labels_of: dict[str, set[int]] = {}
        for sid, box in found:
            labels_of.setdefault(sid, set()).add(box.cls)
        entries = [(sid, tuple(sorted(ls))) for sid, ls in labels_of.items()]
    for entry in entries:
        if isinstance(entry, Rejection):
            rejected.append(entry)
            absent.setdefault(entry.source_id, "its line in the list is rejected")
            continue
        rel, labels = entry
        image = root / rel
        size = _size(image)
        if size is None:
            absent[rel] = f"image file {image} not found"
            if lf is not None:  # else each of its box lines is the rejection
                rejected.append(Rejection(rel, f"image file {image} not found"))
            continue
        mask = None
        if masks is not None:
            candidate = masks / Path(rel).with_suffix(".png")
            msize = _size(candidate)
            if msize is not None:
                mask, size = str(candidate), size + msize
        samples.append(
            PlannedSample(
                key=sample_key(rel),
                source_id=rel,
                domain=domain,
                est_bytes=size + _PER_SAMPLE_OVERHEAD,
                image=str(image),
                mask=mask,
                labels=labels,
            )
        )
    before = len(rejected)
    samples = _dedupe(samples, rejected)
    for r in rejected[before:]:
        absent.setdefault(r.source_id, "its key duplicates another image's")
    rejected += bad_boxes
    if boxes is not None:
        samples = _attach_boxes(classes, samples, found, rejected, absent)
    options = {"list": str(lf)} if lf is not None else {}
    options.update(image_root=str(root), classes=str(classes_file))
    if masks is not None:
        options["mask_root"] = str(masks)
    if boxes is not None:
        options.update(boxes=str(boxes), box_coords=box_coords)
    return SourcePlan("list", split, classes, samples, rejected, options)


def _read_list(
    lf: Path,
    classes: list[str],
    classes_file: str | os.PathLike,
    lookup: dict[str, int],
) -> list[tuple[str, tuple[int, ...]] | Rejection]:
    """(relative path, labels) of each good line of a list file, a Rejection of each bad one,
    in line order."""
    entries: list[tuple[str, tuple[int, ...]] | Rejection] = []
    for lineno, raw in enumerate(lf.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rel, *tokens = line.split()
        if not tokens:
            entries.append(Rejection(rel, f"{lf.name}:{lineno}: empty label list"))
            continue
        try:
            labels = tuple(sorted({_parse_label(t, classes, lookup) for t in tokens}))
        except KeyError as e:
            entries.append(
                Rejection(
                    rel,
                    f"{lf.name}:{lineno}: unknown class {e.args[0]!r} "
                    f"(expected {_classes_hint(classes, classes_file)})",
                )
            )
            continue
        entries.append((rel, labels))
    return entries


def _voc_split_ids(voc: Path, split: str) -> list[str]:
    candidates = [voc / "ImageSets" / "Segmentation" / f"{split}.txt"]
    candidates.append(voc / "ImageSets" / "Main" / f"{split}.txt")
    for c in candidates:
        if c.is_file():
            return [ln.split()[0] for ln in c.read_text().splitlines() if ln.strip()]
    available = sorted(
        {p.stem for d in ("Segmentation", "Main") for p in (voc / "ImageSets" / d).glob("*.txt")}
        - {""}
    )
    raise SourceError(
        f"VOC split '{split}' not found: expected {candidates[0]} "
        f"(available splits: {', '.join(a for a in available if '_' not in a) or 'none'})"
    )


def _voc_xml_labels(path: Path) -> tuple[int, ...]:
    tree = ET.parse(path)
    names = {obj.findtext("name", "").strip() for obj in tree.getroot().iter("object")}
    unknown = sorted(n for n in names if n not in VOC_CLASSES)
    if unknown:
        raise KeyError(unknown[0])
    return tuple(sorted(VOC_CLASSES.index(n) for n in names))


def plan_voc(
    voc_root: str | os.PathLike,
    split: str = "train",
    seg_aug: str | os.PathLike | None = None,
    saliency: str | os.PathLike | None = None,
    labels_from: str = "auto",
) -> SourcePlan:
    """A VOC2012 devkit folder (the one holding JPEGImages/, Annotations/, ImageSets/).

    Labels: ``mask`` (from SegmentationClassAug or SegmentationClass), ``xml`` (Annotations), or
    ``auto`` (the mask where an image has one, else the XML). Masks are stored where they exist;
    saliency maps (``<id>.png`` in ``saliency``) are attached when given.
    """
    if labels_from not in ("auto", "mask", "xml"):
        raise SourceError(f"labels_from={labels_from!r}: expected auto, mask or xml")
    voc = _require_dir(voc_root, "VOC root")
    if (voc / "VOC2012" / "JPEGImages").is_dir():
        voc = voc / "VOC2012"
    if (voc / "VOCdevkit" / "VOC2012" / "JPEGImages").is_dir():
        voc = voc / "VOCdevkit" / "VOC2012"
    jpeg_dir = _require_dir(voc / "JPEGImages", "VOC JPEGImages folder")
    mask_dirs = [_require_dir(seg_aug, "SegmentationClassAug folder")] if seg_aug else []
    if (voc / "SegmentationClass").is_dir():
        mask_dirs.append(voc / "SegmentationClass")
    sal_dir = _require_dir(saliency, "saliency folder") if saliency is not None else None
    ids = _voc_split_ids(voc, split)
    samples, rejected = [], []
    for vid in ids:
        image = jpeg_dir / f"{vid}.jpg"
        size = _size(image)
        if size is None:
            rejected.append(Rejection(vid, f"image file {image} not found"))
            continue
        mask = next((d / f"{vid}.png" for d in mask_dirs if (d / f"{vid}.png").is_file()), None)
        labels = None
        if labels_from == "xml" or (labels_from == "auto" and mask is None):
            xml = voc / "Annotations" / f"{vid}.xml"
            try:
                labels = _voc_xml_labels(xml)
            except FileNotFoundError:
                rejected.append(Rejection(vid, f"no mask and no annotation file {xml}"))
                continue
            except ET.ParseError as e:
                rejected.append(Rejection(vid, f"annotation {xml} is not valid XML ({e})"))
                continue
            except KeyError as e:
                rejected.append(
                    Rejection(vid, f"annotation {xml} names unknown class {e.args[0]!r}")
                )
                continue
            if not labels:
                rejected.append(
                    Rejection(vid, f"annotation {xml} has no objects (empty label list)")
                )
                continue
        elif mask is None:
            rejected.append(Rejection(vid, "labels_from=mask but the image has no mask"))
            continue
        sal = None
        if sal_dir is not None:
            sal_path = sal_dir / f"{vid}.png"
            if not sal_path.is_file():
                rejected.append(Rejection(vid, f"saliency map {sal_path} not found"))
                continue
            sal = str(sal_path)
        est = size + sum(_size(Path(p)) or 0 for p in (mask, sal) if p) + _PER_SAMPLE_OVERHEAD
        samples.append(
            PlannedSample(
                key=sample_key(vid),
                source_id=vid,
                domain="target",
                est_bytes=est,
                image=str(image),
                mask=str(mask) if mask else None,
                saliency=sal,
                labels=labels,
            )
        )
    samples = _dedupe(samples, rejected)
    options = {"voc_root": str(voc), "labels_from": labels_from}
    if seg_aug:
        options["seg_aug"] = str(seg_aug)
    if sal_dir is not None:
        options["saliency"] = str(sal_dir)
    return SourcePlan("voc", split, list(VOC_CLASSES), samples, rejected, options)


def plan_folder(
    root: str | os.PathLike,
    classes_file: str | os.PathLike | None = None,
    split: str = "train",
    domain: str = "web",
    boxes: str | os.PathLike | None = None,
    box_coords: str = "inclusive",
) -> SourcePlan:
    """One sub-folder per class (``root/<class>/*.jpg``, sub-folders included, so
    ``root/<class>/images/*.JPEG`` too), matched to the target class list by name, ignoring case
    and punctuation ("Dining Table" = "diningtable"). Without a class list the sorted folder
    names are the classes. Files in unknown folders are rejected.

    ``boxes`` (see :mod:`mcis_dist.shards.boxes`): a box file of ``file class x0 y0 x1 y1``
    lines, files relative to ``root``; or ``"per-class"``: Tiny-ImageNet's
    ``<class>/<class>_boxes.txt`` in each class folder, lines ``file x0 y0 x1 y1`` naming a file
    in ``<class>/images/`` (or ``<class>/``), of the folder's class. Those files are never taken
    for images: without ``boxes`` they are listed as rejections that say how to use them.
    """
    base = _require_dir(root, "folder root")
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise SourceError(f"folder root {base} has no class sub-folders")
    per_class = boxes is not None and str(boxes) == PER_CLASS
    if boxes is not None:
        _check_box_coords(box_coords)
    if per_class and not any(per_class_box_file(f).is_file() for f in folders):
        raise SourceError(
            f"boxes={PER_CLASS!r} but no class folder of {base} holds a <class>/<class>_boxes.txt "
            f"(expected e.g. {per_class_box_file(folders[0])}; is the root tiny-imagenet-200/train?)"
        )
    classes = read_class_list(classes_file) if classes_file else [f.name for f in folders]
    lookup = {_normalise_name(c): i for i, c in enumerate(classes)}
    samples, rejected = [], []
    found: list[tuple[str, BoxLine]] = []
    for folder in folders:
        label = lookup.get(_normalise_name(folder.name))
        box_file = per_class_box_file(folder)
        files = set()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            sid = str(path.relative_to(base))
            if path == box_file:
                if not per_class:
                    reason = "a per-class box file, not an image: pass --boxes per-class to use it"
                    rejected.append(Rejection(sid, reason))
                elif label is None:
                    reason = f"box file of folder '{folder.name}', which matches no class: not read"
                    rejected.append(Rejection(sid, reason))
                continue
            if label is None:
                rejected.append(
                    Rejection(sid, f"folder '{folder.name}' matches no class in the class list")
                )
                continue
            files.add(sid)
            samples.append(
                PlannedSample(
                    key=sample_key(sid),
                    source_id=sid,
                    domain=domain,
                    est_bytes=(_size(path) or 0) + _PER_SAMPLE_OVERHEAD,
                    image=str(path),
                    labels=(label,),
                )
            )
        if per_class and label is not None and box_file.is_file():
            found += _per_class_boxes(base, folder, box_file, label, box_coords, files, rejected)
    before = len(rejected)
    samples = _dedupe(samples, rejected)
    absent = {r.source_id: "its key duplicates another image's" for r in rejected[before:]}
    if boxes is not None and not per_class:
        bf = _box_file(boxes)
        exact = {name: i for i, name in enumerate(classes)}
        found, bad = read_box_file(
            bf,
            box_coords,
            bf.name,
            lambda t: _parse_label(t, classes, exact),
            classes_hint=_classes_hint(classes, classes_file),
        )
        rejected += [Rejection(sid, reason) for sid, reason in bad]
    if boxes is not None:
        samples = _attach_boxes(classes, samples, found, rejected, absent)
    options = {"root": str(base), "domain": domain}
    if classes_file:
        options["classes"] = str(classes_file)
    if boxes is not None:
        options.update(boxes=str(boxes), box_coords=box_coords)
    return SourcePlan("folder", split, classes, samples, rejected, options)


def _per_class_boxes(
    base: Path,
    folder: Path,
    box_file: Path,
    label: int,
    coords: str,
    files: set[str],
    rejected: list[Rejection],
) -> list[tuple[str, BoxLine]]:
    """The boxes of one per-class box file, keyed by the source id of the image each names:
    ``<class>/images/<file>`` (Tiny-ImageNet) or ``<class>/<file>``, whichever of the folder's
    ``files`` it is (the first, for a file that is neither)."""
    where = str(box_file.relative_to(base))
    found, bad = read_box_file(box_file, coords, where, None, fixed_class=label)

    def sid_of(name: str) -> str:
        nested, flat = str(Path(folder.name) / "images" / name), str(Path(folder.name) / name)
        return flat if flat in files and nested not in files else nested

    rejected += [Rejection(sid_of(name), reason) for name, reason in bad]
    return [(sid_of(name), box) for name, box in found]


def plan_synthetic(spec: SyntheticSpec, split: str = "train") -> SourcePlan:
    try:
        n = spec.num_samples(split)
    except ValueError as e:
        raise SourceError(f"synthetic source: {e}") from None
    mean_side = (spec.min_size + spec.max_size) / 2
    est = int(mean_side * mean_side * 0.35) + _PER_SAMPLE_OVERHEAD  # JPEG q90 + mask PNG
    samples = [
        PlannedSample(
            key=f"synth_{split}_{i:06d}",
            source_id=f"{split}/{i}",
            domain="target",
            est_bytes=est,
            synthetic_index=i,
        )
        for i in range(n)
    ]
    options = {
        k: getattr(spec, k)
        for k in ("num_train", "num_val", "min_size", "max_size", "num_classes", "seed")
    }
    return SourcePlan("synthetic", split, class_names(spec), samples, [], options, synthetic=spec)
