"""Pretrained weights as data: where they come from, how their keys map, and safe loaders.

Model constructors never read files (STYLE rule 2); these functions put weights into a built
model. Every ``.pth`` is read with ``torch.load(weights_only=True, map_location="cpu")``: a file
that needs arbitrary unpickling is refused, never executed.

* :func:`load_torchvision_vgg16` -- torchvision's ImageNet VGG-16 file into :class:`VGG16`.
* :func:`load_torchvision_weights` -- any torchvision file into a ``torchvision:<name>`` backbone.
* :func:`load_state_dict_file` -- our own ``.pth`` state dicts (converted ResNet-38, ...).
* :func:`convert_resnet38` -- the ImageNet ResNet-38 MXNet ``.params`` file to a ``.pth``,
  read by :func:`read_ndarray_file` without MXNet.

MXNet NDArray list format (``mx.nd.save``), all little-endian: uint64 magic 0x112, uint64
reserved; uint64 array count, then per array: uint32 magic -- V2 0xF993FAC9 / V3 0xF993FACA
(then int32 storage type, 0 = dense), V1 0xF993FAC8, or else legacy, where this word is the ndim
-- then the shape (V1-V3: int32 ndim + int64 dims; legacy: uint32 dims), stopping here for an
empty array; int32 dev_type, int32 dev_id, int32 dtype flag, the raw data. Then uint64 key count
and per key uint64 length + bytes; keys are ``arg:<name>`` or ``aux:<name>``.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mcis_dist.models.resnet38 import ResNet38
from mcis_dist.models.vgg import CONV_INDICES

__all__ = [
    "PRETRAINED",
    "PretrainedWeights",
    "WeightsError",
    "convert_resnet38",
    "load_state_dict_file",
    "load_torchvision_vgg16",
    "load_torchvision_weights",
    "mxnet_to_torch_key",
    "read_ndarray_file",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """A weight file that cannot be used: unreadable, unsafe, or not matching the model."""


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a backbone's ImageNet weights come from and what input they expect (RGB in [0, 1],
    then ``(x - mean) / std``). The file is fetched by the user; nothing here downloads."""

    backbone: str
    filename: str
    source: str
    loader: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


PRETRAINED: dict[str, PretrainedWeights] = {
    "resnet38": PretrainedWeights(
        backbone="resnet38",
        filename="ilsvrc-cls_rna-a1_cls1000_ep-0001.params",
        source="'Wider or Deeper' model A1 (MXNet); convert with `mcis weights convert-resnet38`",
        loader="convert_resnet38, then load_state_dict_file",
    ),
    "vgg16": PretrainedWeights(
        backbone="vgg16",
        filename="vgg16-397923af.pth",
        source="torchvision VGG16_Weights.IMAGENET1K_V1",
        loader="load_torchvision_vgg16",
    ),
}


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# --------------------------------------------------------------------------------------------
# torch files


def _torch_load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict safely; unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` and a
    DistributedDataParallel ``module.`` prefix."""
    try:
        try:  # memory-mapped: tensors that are never used (a classifier) are never read
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            obj = torch.load(path, weights_only=True, map_location="cpu")  # legacy format
    except pickle.UnpicklingError as e:
        detail = (str(e).split("WeightsUnpickler error:")[-1].strip().splitlines() or [""])[0]
        if "global" in detail.lower():
            raise WeightsError(
                f"{path} is not a plain state dict: loading it needs arbitrary unpickling "
                f"({detail[:200]}), which could run code from the file, so it will not be executed"
            ) from e
        raise WeightsError(f"{path} is not a readable torch file ({detail[:200]})") from e
    except (RuntimeError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise WeightsError(f"{path} is not a readable torch file: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _check_shapes(model: nn.Module, sd: dict[str, torch.Tensor], path) -> None:
    own = model.state_dict()
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad:
        raise WeightsError(f"{path}: {len(bad)} shape mismatches: " + "; ".join(bad[:20]))


def load_state_dict_file(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True
) -> dict[str, list[str]]:
    """Load one of our ``.pth`` state dicts (e.g. a converted ResNet-38) into ``model``.

    Shape mismatches are always an error, named key by key; missing and unexpected keys are an
    error when ``strict``, else returned. Returns ``{"missing": [...], "unexpected": [...]}``.
    """
    sd = _torch_load(path)
    _check_shapes(model, sd, path)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise WeightsError(
            f"{path} does not match {type(model).__name__}: missing keys [{_listing(missing)}]; "
            f"unexpected keys [{_listing(unexpected)}]"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return {"missing": missing, "unexpected": unexpected}


def _load_torchvision_sd(
    model: nn.Module, path, expected: set[str], head: tuple[str, ...]
) -> dict[str, list[str]]:
    sd = _torch_load(path)
    ignored = sorted(k for k in sd if k.split(".")[0] in head)
    body = {k: v for k, v in sd.items() if k.split(".")[0] not in head}
    missing, unexpected = sorted(expected - set(body)), sorted(set(body) - expected)
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not match {type(model).__name__}: missing keys [{_listing(missing)}]; "
            f"unexpected keys [{_listing(unexpected)}]"
        )
    _check_shapes(model, body, path)
    result = model.load_state_dict(body, strict=False)
    return {"loaded": sorted(body), "ignored": ignored, "kept_init": sorted(result.missing_keys)}


def load_torchvision_vgg16(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load a torchvision-format VGG-16 state dict (``features.N.weight`` ...) into a
    :class:`~mcis_dist.models.vgg.VGG16`: the 13 convs by name; ``classifier.*`` is ignored and
    the new ``extra.*`` convs keep their initialisation. Returns ``loaded``/``ignored``/``kept_init``
    key lists. A VGG-16-BN file or any other layout is refused with the keys that do not fit."""
    expected = {f"features.{i}.{w}" for i in CONV_INDICES for w in ("weight", "bias")}
    summary = _load_torchvision_sd(model, path, expected, head=("classifier",))
    stray = [k for k in summary["kept_init"] if not k.startswith("extra.")]
    if stray:
        raise WeightsError(f"{type(model).__name__} is not the VGG-16 layout: [{_listing(stray)}]")
    return summary


def load_torchvision_weights(backbone: nn.Module, path: str | os.PathLike) -> dict[str, list]:
    """Load a torchvision classification state dict into a ``torchvision:<name>`` backbone;
    classifier keys (``fc.*``, ``classifier.*``) are ignored, anything else must match."""
    expected = set(backbone.state_dict())
    return _load_torchvision_sd(backbone, path, expected, head=("fc", "classifier"))


# --------------------------------------------------------------------------------------------
# MXNet NDArray files

_LIST_MAGIC = 0x112
_V1, _V2, _V3 = 0xF993FAC8, 0xF993FAC9, 0xF993FACA
_DTYPES = {0: "<f4", 1: "<f8", 2: "<f2", 3: "u1", 4: "<i4", 5: "i1", 6: "<i8", 7: "?"}


class _Reader:
    def __init__(self, f, path) -> None:
        self.f, self.path, self.size = f, path, os.fstat(f.fileno()).st_size

    def take(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise WeightsError(
                f"{self.path}: truncated or corrupt MXNet file: needed {n} bytes for {what} at "
                f"offset {self.f.tell() - len(data)}, file has {self.size}"
            )
        return data

    def ints(self, fmt: str, what: str) -> tuple[int, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def remaining(self) -> int:
        return self.size - self.f.tell()


def _read_ndarray(r: _Reader, i: int) -> torch.Tensor:
    what = f"array {i}"
    (magic,) = r.ints("I", what)
    if magic in (_V2, _V3):
        (stype,) = r.ints("i", what)
        if stype != 0:
            raise WeightsError(f"{r.path}: {what} is sparse (storage type {stype}); unsupported")
    if magic in (_V1, _V2, _V3):
        (ndim,) = r.ints("i", what)
        if not -1 <= ndim <= 32:
            raise WeightsError(f"{r.path}: corrupt MXNet file: {what} has ndim {ndim}")
        shape = r.ints(f"{max(ndim, 0)}q", what)
        empty = ndim == -1 if magic == _V3 else ndim == 0
    elif magic <= 32:  # legacy: the word just read is the ndim, dims are uint32
        shape = r.ints(f"{magic}I", what)
        empty = magic == 0
    else:
        raise WeightsError(f"{r.path}: corrupt MXNet file: {what} has magic {magic:#x}")
    if empty:
        return torch.empty(0)
    if any(d < 0 for d in shape):
        raise WeightsError(f"{r.path}: corrupt MXNet file: {what} has shape {shape}")
    _dev_type, _dev_id, flag = r.ints("iii", what)
    if flag not in _DTYPES:
        raise WeightsError(f"{r.path}: {what} has unsupported dtype flag {flag}")
    dtype = np.dtype(_DTYPES[flag])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > r.remaining():
        raise WeightsError(
            f"{r.path}: truncated or corrupt MXNet file: {what} of shape {shape} needs {nbytes} "
            f"bytes, {r.remaining()} left"
        )
    buf = bytearray(nbytes)  # writable, so the tensor can share it without a copy
    if r.f.readinto(buf) != nbytes:
        raise WeightsError(f"{r.path}: truncated MXNet file: {what} data ends early")
    return torch.from_numpy(np.frombuffer(buf, dtype=dtype).reshape(shape))


def read_ndarray_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an MXNet ``mx.nd.save`` file (``.params``) into ``{key: tensor}``, keys as stored
    (``arg:...``/``aux:...``). Truncated or corrupt files raise :class:`WeightsError`."""
    with open(path, "rb") as f:
        r = _Reader(f, path)
        header, _reserved = r.ints("QQ", "the header")
        if header != _LIST_MAGIC:
            raise WeightsError(
                f"{path} is not an MXNet NDArray file (header {header:#x}, expected 0x112)"
            )
        (count,) = r.ints("Q", "the array count")
        if count > r.remaining() // 4:  # an array takes at least its 4-byte magic
            raise WeightsError(f"{path}: truncated or corrupt MXNet file: {count} arrays claimed")
        arrays = [_read_ndarray(r, i) for i in range(count)]
        (nkeys,) = r.ints("Q", "the key count")
        if nkeys != count:
            raise WeightsError(f"{path}: corrupt MXNet file: {count} arrays but {nkeys} keys")
        keys = []
        for i in range(nkeys):
            (n,) = r.ints("Q", f"key {i}")
            if n > r.remaining():
                raise WeightsError(f"{path}: truncated or corrupt MXNet file at key {i}")
            keys.append(r.take(n, f"key {i}").decode("utf-8", errors="replace"))
    return dict(zip(keys, arrays, strict=True))


_BN = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_var": "running_var",
}
_BLOCK = re.compile(r"(res|bn)(\d)(a|b(\d+))_(branch(?:1|2a|2b1|2b2))_(\w+)")
_CLASSIFIER = re.compile(r"(linear|fc)\d*_(weight|bias)")


def mxnet_to_torch_key(key: str) -> str | None:
    """Map one ResNet-38 MXNet key to our parameter name, or None if it is not a backbone
    tensor. ``arg:res4b5_branch2a_weight`` -> ``b4_5.conv_branch2a.weight``,
    ``aux:bn2a_branch1_moving_var``... -> ``b2.bn_branch1.running_var``, ``bn7_gamma`` ->
    ``bn7.weight``, ``conv1a_weight`` -> ``conv1a.weight``."""
    name = key.split(":", 1)[1] if key.startswith(("arg:", "aux:")) else key
    if name == "conv1a_weight":
        return "conv1a.weight"
    if name.startswith("bn7_") and name[4:] in _BN:
        return "bn7." + _BN[name[4:]]
    m = _BLOCK.fullmatch(name)
    if not m:
        return None
    kind, stage, _, index, branch, param = m.groups()
    block = f"b{stage}" + (f"_{index}" if index else "")
    if kind == "res" and param == "weight":
        return f"{block}.conv_{branch}.weight"
    if kind == "bn" and param in _BN:
        return f"{block}.bn_{branch}.{_BN[param]}"
    return None


def convert_resnet38(
    src_params: str | os.PathLike,
    dst_pth: str | os.PathLike,
    *,
    model: ResNet38 | None = None,
    strict: bool = True,
) -> dict:
    """Convert the ImageNet ResNet-38 MXNet ``.params`` file into a ``.pth`` state dict.

    Keys are renamed with :func:`mxnet_to_torch_key`, checked against ``model`` (default: a
    fresh full :class:`ResNet38`; pass a smaller one to check another width), cast to its dtype
    and saved with ``torch.save`` (atomically). The classifier (``linear1000_*``) is dropped.
    Errors: shape mismatches and model tensors missing from the file; with ``strict`` also
    keys that map to nothing (``unmapped``) or to no tensor of the model (``unexpected``).
    Returns a summary: counts and the dropped/unmapped/unexpected key lists.
    """
    arrays = read_ndarray_file(src_params)
    net = model if model is not None else ResNet38()
    own, params = net.state_dict(), {n for n, _ in net.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    dropped, unmapped, unexpected, bad = [], [], [], []
    for key, value in arrays.items():
        name = mxnet_to_torch_key(key)
        plain = key.split(":", 1)[-1]
        if name is None:
            (dropped if _CLASSIFIER.fullmatch(plain) else unmapped).append(key)
        elif name not in own:
            unexpected.append(f"{key} -> {name}")
        elif tuple(value.shape) != tuple(own[name].shape):
            bad.append(f"{key} -> {name}: file {tuple(value.shape)} vs {tuple(own[name].shape)}")
        else:
            out[name] = value.to(own[name].dtype)
    for name, t in own.items():  # BatchNorm batch counters have no MXNet counterpart
        if name.endswith("num_batches_tracked") and name not in out:
            out[name] = torch.zeros_like(t)
    missing = [k for k in own if k not in out]
    if bad or missing or (strict and (unmapped or unexpected)):
        parts = [f"{len(bad)} shape mismatches: " + "; ".join(bad[:20])] if bad else []
        parts += [f"missing from the file: [{_listing(missing)}]"] if missing else []
        if strict:
            parts += [f"unmapped keys: [{_listing(unmapped)}]"] if unmapped else []
            parts += [f"keys the model lacks: [{_listing(unexpected)}]"] if unexpected else []
            if not (bad or missing):
                parts.append("(strict=False skips unmapped/unexpected keys)")
        raise WeightsError(f"{src_params} does not convert to ResNet-38: " + "; ".join(parts))
    dst = Path(dst_pth)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save({k: out[k] for k in own}, tmp)
    os.replace(tmp, dst)
    return {
        "source": str(src_params),
        "destination": str(dst),
        "tensors": len(own),
        "parameters": sum(out[k].numel() for k in params),
        "dropped": sorted(dropped),
        "unmapped": sorted(unmapped),
        "unexpected": sorted(unexpected),
    }
