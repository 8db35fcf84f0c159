"""Export a segmentation network to TorchScript and ONNX, and check each file against PyTorch.

* :func:`export_torchscript` -- ``torch.jit.script`` (or ``trace``), saved with ``torch.jit.save``.
* :func:`export_onnx` -- the TorchScript-based ONNX exporter (``dynamo=False``: needs ``onnx``,
  not ``onnxscript``), input ``image`` (B, 3, H, W) and output ``logits`` (B, C, H, W) with
  dynamic batch, height and width.
* :func:`check_export` -- loads the file (``torch.jit.load`` / an ``onnxruntime``
  InferenceSession on the CPU) and returns the largest absolute difference from the model's
  output on an example batch, raising ValueError above the tolerance.
* :func:`export_all` -- both files in one folder, each checked.

Export runs the model in eval mode (dropout off, BatchNorm running statistics) and restores its
mode afterwards. torch marks both TorchScript and the TorchScript-based ONNX exporter as
deprecated; their deprecation warnings are silenced here.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mcis_dist.seg.train import load_segmenter

__all__ = ["EXPORT_FILES", "check_export", "export_all", "export_onnx", "export_torchscript"]

Kind = Literal["torchscript", "onnx"]
KINDS = ("torchscript", "onnx")
EXPORT_FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx"}
INPUT_NAME, OUTPUT_NAME = "image", "logits"


@contextmanager
def _eval_quiet(model: nn.Module):
    """Eval mode, no grad, and torch's deprecation warnings for jit / legacy ONNX silenced."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        model.train(was_training)


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    example: Tensor | None = None,
    *,
    method: Literal["script", "trace"] = "script",
) -> Path:
    """Save ``model`` as TorchScript at ``path``. ``script`` (default) keeps the input size
    dynamic by construction; ``trace`` records one run on ``example`` (needed then)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _eval_quiet(model):
        if method == "script":
            module = torch.jit.script(model)
        elif method == "trace":
            if example is None:
                raise ValueError("method='trace' needs an example input")
            module = torch.jit.trace(model, example)
        else:
            raise ValueError(f"unknown TorchScript method {method!r}; valid: script, trace")
        torch.jit.save(module, str(path))
    return path


def export_onnx(
    model: nn.Module, path: str | os.PathLike, example: Tensor, opset: int = 17
) -> Path:
    """Save ``model`` as ONNX (opset ``opset``) at ``path``, traced on ``example`` (B, 3, H, W)
    with dynamic batch, height and width axes on ``image`` and ``logits``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    with _eval_quiet(model):
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic},
        )
    return path


def _run_export(path: Path, kind: str, example: Tensor) -> np.ndarray:
    if kind == "torchscript":
        module = torch.jit.load(str(path), map_location=example.device)
        module.eval()
        with torch.no_grad():
            return module(example).float().cpu().numpy()
    import onnxruntime as ort  # lazy: ONNX check only

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: example.detach().float().cpu().numpy()}
    return np.asarray(session.run(None, feed)[0], dtype=np.float32)


def check_export(
    model: nn.Module,
    path: str | os.PathLike,
    kind: Kind,
    example: Tensor,
    atol: float = 1e-4,
) -> float:
    """Largest |exported(example) - model(example)|; ValueError when above ``atol`` or when
    the shapes differ. ``kind``: torchscript or onnx (run by onnxruntime on the CPU)."""
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}; valid: {', '.join(KINDS)}")
    path = Path(path)
    with _eval_quiet(model):
        want = model(example).float().cpu().numpy()
        got = _run_export(path, kind, example)
    if got.shape != want.shape:
        raise ValueError(
            f"{kind} export {path} gives shape {got.shape} on input {tuple(example.shape)}, "
            f"the PyTorch model {want.shape}"
        )
    diff = float(np.abs(got - want).max()) if want.size else 0.0
    if not diff <= atol:  # also catches NaN
        raise ValueError(
            f"{kind} export {path} differs from the PyTorch model by up to {diff:.3g} "
            f"(tolerance {atol:g}) on input {tuple(example.shape)}"
        )
    return diff


def export_all(
    model: nn.Module,
    out_dir: str | os.PathLike,
    example: Tensor,
    opset: int = 17,
    atol: float = 1e-4,
) -> dict[str, dict[str, str | float]]:
    """Write ``model.torchscript.pt`` and ``model.onnx`` to ``out_dir`` and check both on
    ``example``. Returns ``{"torchscript": {"path", "max_abs_diff"}, "onnx": {...}}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, dict[str, str | float]] = {}
    ts = export_torchscript(model, out_dir / EXPORT_FILES["torchscript"], example)
    onnx_path = export_onnx(model, out_dir / EXPORT_FILES["onnx"], example, opset)
    for kind, path in (("torchscript", ts), ("onnx", onnx_path)):
        diff = check_export(model, path, kind, example, atol)
        result[kind] = {"path": str(path), "max_abs_diff": diff}
    return result


def export_trained(
    cfg, out_dir: str, checkpoint: str | None = None, size: int = 0, log=print
) -> dict:
    """``mcis export``: the trained segmentation network as TorchScript and ONNX in ``out_dir``
    (local), each checked against the PyTorch model on a sample batch, plus ``export.json``
    (classes, normalisation, input layout, the checks) so it deploys without this package."""

    model, classes, where = load_segmenter(cfg, checkpoint)
    side = size or cfg.seg.data.crop_size
    example = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = export_all(model, out, example, opset=cfg.seg.export_opset)
    info = {
        "checkpoint": where,
        "classes": ["background", *classes],
        "arch": cfg.seg.arch,
        "backbone": cfg.seg.backbone,
        "input": "float32 (B, 3, H, W), RGB in [0, 1] minus mean, divided by std",
        "mean": cfg.data.mean,
        "std": cfg.data.std,
        "output": "logits (B, C, H, W); argmax over C gives the label (0 = background)",
        "opset": cfg.seg.export_opset,
        "exports": {
            k: {"path": str(v["path"]), "max_abs_diff": v["max_abs_diff"]}
            for k, v in result.items()
        },
    }
    (out / "export.json").write_text(json.dumps(info, indent=1))
    for kind, v in result.items():
        log(f"export: {kind} {v['path']} (max |diff| vs PyTorch {v['max_abs_diff']:.2e})")
    return info
