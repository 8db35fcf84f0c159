"""TorchScript and ONNX export of DeepLab-V3 (ResNet-18): exported files match PyTorch, ONNX
Runtime takes other input sizes, and a file that does not match its model is refused."""

from __future__ import annotations

import onnx
import pytest
import torch

from mcis_dist.models.deeplab import deeplabv3
from mcis_dist.seg.export import (
    EXPORT_FILES,
    check_export,
    export_all,
    export_onnx,
    export_torchscript,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with_stats(seed: int):
    """A resnet18 DeepLab-V3 whose BatchNorm running statistics are not the identity."""
    torch.manual_seed(seed)
    model = deeplabv3("resnet18", num_classes=4, output_stride=8)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.train()  # export must switch to eval itself


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = model_with_stats(0)
    example = torch.randn(1, 3, 64, 64)
    out = tmp_path_factory.mktemp("export")
    yield model, example, export_all(model, out, example, opset=17)
    torch.set_num_threads(threads)


def test_export_all_matches_pytorch(exported):
    model, _, result = exported
    assert set(result) == {"torchscript", "onnx"}
    for kind, entry in result.items():
        assert entry["path"].endswith(EXPORT_FILES[kind])
        assert 0.0 <= entry["max_abs_diff"] <= 1e-4
    assert model.training  # mode restored
    proto = onnx.load(result["onnx"]["path"])
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in proto.graph.input] == ["image"]


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_dynamic_batch_and_size(exported, kind):
    model, _, result = exported
    other = torch.randn(2, 3, 72, 56)  # another batch and size than the export example
    assert check_export(model, result[kind]["path"], kind, other) <= 1e-4


def test_onnx_runtime_output_shape(exported):
    import onnxruntime as ort

    _, _, result = exported
    session = ort.InferenceSession(result["onnx"]["path"], providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"image": torch.randn(3, 3, 40, 88).numpy()})
    assert out.shape == (3, 4, 40, 88)


def test_check_export_refuses_another_model(exported):
    _, example, result = exported
    other = model_with_stats(1)
    for kind in ("torchscript", "onnx"):
        with pytest.raises(ValueError, match=rf"{kind} export .* differs .* \(tolerance 0.0001\)"):
            check_export(other, result[kind]["path"], kind, example)
    with pytest.raises(ValueError, match="valid: torchscript, onnx"):
        check_export(other, result["onnx"]["path"], "tflite", example)


def test_trace_and_standalone_exports(tmp_path):
    model = model_with_stats(2)
    example = torch.randn(1, 3, 48, 40)
    ts = export_torchscript(model, tmp_path / "sub" / "traced.pt", example, method="trace")
    assert check_export(model, ts, "torchscript", example) <= 1e-4
    path = export_onnx(model, tmp_path / "m.onnx", example, opset=13)
    assert check_export(model, path, "onnx", torch.randn(1, 3, 32, 64)) <= 1e-4
    with pytest.raises(ValueError, match="needs an example"):
        export_torchscript(model, tmp_path / "x.pt", method="trace")
