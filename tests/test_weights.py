"""Weight loading: the MXNet NDArray reader and ResNet-38 converter (against files written here
by an independent writer), safe ``.pth`` loading, and torchvision VGG-16 / ResNet files."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from mcis_dist.models import (
    ResNet38,
    WeightsError,
    build_backbone,
    convert_resnet38,
    load_state_dict_file,
    load_torchvision_vgg16,
    load_torchvision_weights,
    read_ndarray_file,
    vgg16,
)
from mcis_dist.models.weights import mxnet_to_torch_key

pytestmark = pytest.mark.usefixtures("one_thread")


# -- an MXNet ``mx.nd.save`` writer, written from the format description ---------------------

FLAGS = {np.dtype("float32"): 0, np.dtype("float64"): 1, np.dtype("float16"): 2}


def write_params(path: Path, arrays: dict[str, np.ndarray], version: str = "v2") -> None:
    out = [struct.pack("<QQ", 0x112, 0), struct.pack("<Q", len(arrays))]
    for a in arrays.values():
        a = np.ascontiguousarray(a)
        if version == "v2":
            out.append(struct.pack("<Ii", 0xF993FAC9, 0))  # magic, dense storage
            out.append(struct.pack(f"<i{a.ndim}q", a.ndim, *a.shape))
        elif version == "v1":
            out.append(struct.pack(f"<Ii{a.ndim}q", 0xF993FAC8, a.ndim, *a.shape))
        else:  # legacy: ndim in place of the magic, uint32 dims
            out.append(struct.pack(f"<I{a.ndim}I", a.ndim, *a.shape))
        out.append(struct.pack("<iii", 2, 0, FLAGS[a.dtype]))  # saved from gpu(0)
        out.append(a.astype(a.dtype.newbyteorder("<")).tobytes())
    out.append(struct.pack("<Q", len(arrays)))
    for key in arrays:
        out.append(struct.pack("<Q", len(key.encode())) + key.encode())
    path.write_bytes(b"".join(out))


BN_MX = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_var",
}


def mxnet_name(torch_key: str) -> str | None:
    """How the ImageNet file names our tensor (psa's renaming), derived independently here."""
    if torch_key == "conv1a.weight":
        return "arg:conv1a_weight"
    if torch_key.endswith("num_batches_tracked"):
        return None
    if torch_key.startswith("bn7."):
        p = BN_MX[torch_key[4:]]
        return ("aux:" if "moving" in p else "arg:") + "bn7_" + p
    block, layer, param = torch_key.split(".")
    m = re.fullmatch(r"b(\d)(?:_(\d+))?", block)
    unit = m.group(1) + ("a" if m.group(2) is None else "b" + m.group(2))
    kind, branch = layer.split("_", 1)
    if kind == "conv":
        return f"arg:res{unit}_{branch}_weight"
    p = BN_MX[param]
    return ("aux:" if "moving" in p else "arg:") + f"bn{unit}_{branch}_{p}"


def random_model(seed: int = 0, **kw) -> ResNet38:
    """A small ResNet-38 (full depth, 1/16 width) with random weights and BN statistics."""
    model = ResNet38(width=1 / 16, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + (0.5 if "running_var" in name else -0.5))
    return model.eval()


def as_mxnet(model: nn.Module, dtype=np.float32) -> dict[str, np.ndarray]:
    arrays = {
        mxnet_name(k): v.numpy().astype(dtype)
        for k, v in model.state_dict().items()
        if mxnet_name(k)
    }
    arrays["arg:linear1000_weight"] = np.ones((1000, 4096 // 16), dtype)
    arrays["arg:linear1000_bias"] = np.zeros((1000,), dtype)
    return arrays


# -- key mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mx", "pt"),
    [
        ("arg:conv1a_weight", "conv1a.weight"),
        ("arg:res2a_branch1_weight", "b2.conv_branch1.weight"),
        ("arg:res2a_branch2a_weight", "b2.conv_branch2a.weight"),
        ("arg:res2b1_branch2b1_weight", "b2_1.conv_branch2b1.weight"),
        ("arg:bn4b5_branch2a_gamma", "b4_5.bn_branch2a.weight"),
        ("arg:bn3b2_branch2b1_beta", "b3_2.bn_branch2b1.bias"),
        ("aux:bn5a_branch2a_moving_mean", "b5.bn_branch2a.running_mean"),
        ("aux:bn7a_branch2b2_moving_var", "b7.bn_branch2b2.running_var"),
        ("arg:res6a_branch2b2_weight", "b6.conv_branch2b2.weight"),
        ("arg:bn7_gamma", "bn7.weight"),
        ("aux:bn7_moving_var", "bn7.running_var"),
        ("res4b3_branch2a_weight", "b4_3.conv_branch2a.weight"),  # no arg:/aux: prefix
        ("arg:linear1000_weight", None),
        ("arg:res2a_branch2a_gamma", None),
        ("arg:mystery_weight", None),
    ],
)
def test_mxnet_key_mapping(mx, pt):
    assert mxnet_to_torch_key(mx) == pt


def test_every_full_resnet38_tensor_has_an_mxnet_name():
    keys = [k for k in ResNet38().state_dict() if not k.endswith("num_batches_tracked")]
    assert len(keys) == 191  # 1 + 15 blocks x 10 + 4 projections + 2 bottlenecks x 16 + 4
    assert all(mxnet_to_torch_key(mxnet_name(k)) == k for k in keys)


# -- the converter ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "dtype"), [("v2", np.float32), ("v1", np.float64), ("legacy", np.float16)]
)
def test_convert_roundtrip(tmp_path, version, dtype):
    src = random_model(seed=1)
    arrays = as_mxnet(src, dtype)
    write_params(tmp_path / "a1.params", arrays, version)

    read = read_ndarray_file(tmp_path / "a1.params")
    assert list(read) == list(arrays)
    np.testing.assert_array_equal(
        read["arg:res4b5_branch2a_weight"].numpy(), arrays["arg:res4b5_branch2a_weight"]
    )

    summary = convert_resnet38(
        tmp_path / "a1.params", tmp_path / "out/r38.pth", model=ResNet38(width=1 / 16)
    )
    assert summary["dropped"] == ["arg:linear1000_bias", "arg:linear1000_weight"]
    assert summary["unmapped"] == [] and summary["unexpected"] == []
    assert summary["tensors"] == len(src.state_dict())
    assert summary["parameters"] == sum(p.numel() for p in src.parameters())

    dst = ResNet38(width=1 / 16).eval()
    assert load_state_dict_file(dst, tmp_path / "out/r38.pth") == {"missing": [], "unexpected": []}
    want = {k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}
    for k, v in dst.state_dict().items():
        if mxnet_name(k):
            assert v.dtype == torch.float32
            torch.testing.assert_close(v, want[mxnet_name(k)], rtol=0, atol=0)
    if dtype != np.float16:
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(dst(x), src(x))


def test_convert_rejects_bad_files(tmp_path):
    src = random_model(depths=(1, 1, 1, 1))
    good = tmp_path / "good.params"
    write_params(good, as_mxnet(src))
    data = good.read_bytes()
    target = ResNet38(width=1 / 16, depths=(1, 1, 1, 1))

    for cut in (10, 30, len(data) // 2, len(data) - 5):
        (tmp_path / "cut.params").write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="truncated"):
            convert_resnet38(tmp_path / "cut.params", tmp_path / "x.pth", model=target)
    (tmp_path / "junk.params").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(WeightsError, match="not an MXNet NDArray file"):
        convert_resnet38(tmp_path / "junk.params", tmp_path / "x.pth", model=target)
    bad_magic = bytearray(data)
    bad_magic[24:28] = struct.pack("<I", 0xDEADBEEF)  # first array's magic
    (tmp_path / "magic.params").write_bytes(bytes(bad_magic))
    with pytest.raises(WeightsError, match="magic 0xdeadbeef"):
        convert_resnet38(tmp_path / "magic.params", tmp_path / "x.pth", model=target)
    assert not (tmp_path / "x.pth").exists()

    # the full-depth file into the shallower model: unexpected keys, listed
    full = tmp_path / "full.params"
    write_params(full, as_mxnet(random_model()))
    with pytest.raises(WeightsError, match=r"keys the model lacks: \[arg:bn2b1_branch2a_beta"):
        convert_resnet38(full, tmp_path / "x.pth", model=target)
    # a file missing tensors: listed
    partial = as_mxnet(src)
    del partial["arg:res3a_branch1_weight"], partial["aux:bn7_moving_mean"]
    write_params(tmp_path / "partial.params", partial)
    with pytest.raises(WeightsError, match=r"missing from the file: \[b3.conv_branch1.weight, bn7"):
        convert_resnet38(tmp_path / "partial.params", tmp_path / "x.pth", model=target)
    # wrong shapes: named
    with pytest.raises(
        WeightsError,
        match=r"arg:conv1a_weight -> conv1a.weight: file \(4, 3, 3, 3\) vs \(64, 3, 3, 3\)",
    ):
        convert_resnet38(good, tmp_path / "x.pth")  # default target: the full ResNet-38
    assert not (tmp_path / "x.pth").exists()


def test_convert_unmapped_keys_strict_and_lenient(tmp_path):
    src = random_model(depths=(1, 1, 1, 1))
    arrays = as_mxnet(src)
    arrays["arg:mystery_weight"] = np.zeros((2, 2), np.float32)
    write_params(tmp_path / "m.params", arrays)
    target = ResNet38(width=1 / 16, depths=(1, 1, 1, 1))
    with pytest.raises(WeightsError, match=r"unmapped keys: \[arg:mystery_weight\].*strict=False"):
        convert_resnet38(tmp_path / "m.params", tmp_path / "m.pth", model=target)
    summary = convert_resnet38(
        tmp_path / "m.params", tmp_path / "m.pth", model=target, strict=False
    )
    assert summary["unmapped"] == ["arg:mystery_weight"]
    load_state_dict_file(target, tmp_path / "m.pth")
    torch.testing.assert_close(target.b7.conv_branch2b2.weight, src.b7.conv_branch2b2.weight)


# -- .pth loading -------------------------------------------------------------------------------


def _touch(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling this would create a marker file: the loader must never do it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_load_state_dict_file_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(
        {"conv1a.weight": torch.zeros(4, 3, 3, 3), "x": Payload(str(marker))}, tmp_path / "evil.pth"
    )
    model = ResNet38(width=1 / 16, depths=(1, 1, 1, 1))
    with pytest.raises(WeightsError, match="not a plain state dict.*will not be executed"):
        load_state_dict_file(model, tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="not a readable torch file"):
        load_state_dict_file(model, tmp_path / "junk.pth")


def test_load_state_dict_file_names_mismatches(tmp_path):
    small = ResNet38(width=1 / 16, depths=(1, 1, 1, 1))
    wide = ResNet38(width=1 / 8, depths=(1, 1, 1, 1))
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(
        WeightsError, match=r"conv1a.weight: file \(4, 3, 3, 3\) vs model \(8, 3, 3, 3\)"
    ):
        load_state_dict_file(wide, tmp_path / "small.pth")

    deeper = ResNet38(width=1 / 16, depths=(2, 1, 1, 1))
    with pytest.raises(WeightsError, match=r"missing keys \[b2_1\.bn_branch2a\.bias"):
        load_state_dict_file(deeper, tmp_path / "small.pth")
    result = load_state_dict_file(deeper, tmp_path / "small.pth", strict=False)
    assert result["unexpected"] == [] and all(k.startswith("b2_1.") for k in result["missing"])
    torch.testing.assert_close(deeper.b7.conv_branch1.weight, small.b7.conv_branch1.weight)

    # the legacy (pre-zip) torch format loads too
    torch.save(small.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    fresh = ResNet38(width=1 / 16, depths=(1, 1, 1, 1))
    load_state_dict_file(fresh, tmp_path / "legacy.pth")
    torch.testing.assert_close(fresh.b5.conv_branch2b1.weight, small.b5.conv_branch2b1.weight)

    # DDP prefix and checkpoint wrappers are unwrapped
    torch.save(
        {"model": {"module." + k: v for k, v in small.state_dict().items()}}, tmp_path / "ckpt.pth"
    )
    fresh = ResNet38(width=1 / 16, depths=(1, 1, 1, 1))
    load_state_dict_file(fresh, tmp_path / "ckpt.pth")
    torch.testing.assert_close(fresh.conv1a.weight, small.conv1a.weight)


# -- torchvision files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tv_vgg16_file(tmp_path_factory):
    """torchvision's own VGG-16 (weights=None), saved as its state dict (built once: 138 M)."""
    tv = torchvision.models.vgg16(weights=None).eval()
    path = tmp_path_factory.mktemp("tv") / "vgg16.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def test_torchvision_vgg16_roundtrip(tv_vgg16_file):
    tv, path = tv_vgg16_file
    ours = vgg16().eval()
    extra_before = ours.extra[0].weight.clone()
    summary = load_torchvision_vgg16(ours, path)
    assert len(summary["loaded"]) == 26
    assert summary["ignored"] == sorted(k for k in tv.state_dict() if k.startswith("classifier."))
    assert summary["kept_init"] == sorted(k for k in ours.state_dict() if k.startswith("extra."))
    for i in (0, 10, 28):
        torch.testing.assert_close(ours.features[i].weight, tv.features[i].weight)
        torch.testing.assert_close(ours.features[i].bias, tv.features[i].bias)
    torch.testing.assert_close(ours.extra[0].weight, extra_before)  # new layers keep their init
    x = torch.randn(1, 3, 64, 64)  # up to conv4_3 the network is torchvision's, pools included
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x)["conv4"], tv.features[:23](x))


def test_torchvision_vgg16_wrong_files(tmp_path, tv_vgg16_file):
    from torchvision.models.vgg import cfgs, make_layers

    vgg11 = {"features." + k: v for k, v in make_layers(cfgs["A"]).state_dict().items()}
    torch.save(vgg11, tmp_path / "vgg11.pth")
    with pytest.raises(
        WeightsError, match=r"missing keys \[features.10.bias.*unexpected keys \[features.11"
    ):
        load_torchvision_vgg16(vgg16(), tmp_path / "vgg11.pth")
    bn = {
        "features." + k: v for k, v in make_layers(cfgs["D"], batch_norm=True).state_dict().items()
    }
    torch.save(bn, tmp_path / "vgg16_bn.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \[.*running_mean"):
        load_torchvision_vgg16(vgg16(), tmp_path / "vgg16_bn.pth")
    sd = {k: v for k, v in tv_vgg16_file[0].state_dict().items() if k.startswith("features.")}
    sd["features.0.weight"] = sd["features.0.weight"][:32]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(
        WeightsError, match=r"features.0.weight: file \(32, 3, 3, 3\) vs model \(64, 3, 3, 3\)"
    ):
        load_torchvision_vgg16(vgg16(), tmp_path / "cut.pth")


def test_torchvision_backbone_weights(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    backbone = build_backbone("torchvision:resnet18")
    summary = load_torchvision_weights(backbone, tmp_path / "r18.pth")
    assert summary["ignored"] == ["fc.bias", "fc.weight"] and summary["kept_init"] == []
    torch.testing.assert_close(backbone.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    with pytest.raises(WeightsError, match="missing keys"):
        load_torchvision_weights(build_backbone("torchvision:resnet34"), tmp_path / "r18.pth")
