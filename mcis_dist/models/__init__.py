"""Backbones for the co-attention classifier and how their pretrained weights are loaded.

``build_backbone(name)`` builds one by name (``resnet38``, ``resnet38_tiny``, ``vgg16``,
``torchvision:<model name>``); the backbone contract is documented in
:mod:`mcis_dist.models.backbones`, weight loading in :mod:`mcis_dist.models.weights`.
"""

from mcis_dist.models.backbones import (
    BACKBONES,
    TorchvisionBackbone,
    backbone_names,
    build_backbone,
    register_backbone,
    split_parameters,
    validate_backbone,
)
from mcis_dist.models.resnet38 import ResNet38, resnet38, resnet38_tiny
from mcis_dist.models.vgg import VGG16, vgg16
from mcis_dist.models.weights import (
    PRETRAINED,
    WeightsError,
    convert_resnet38,
    load_state_dict_file,
    load_torchvision_vgg16,
    load_torchvision_weights,
    read_ndarray_file,
)

__all__ = [
    "BACKBONES",
    "PRETRAINED",
    "ResNet38",
    "TorchvisionBackbone",
    "VGG16",
    "WeightsError",
    "backbone_names",
    "build_backbone",
    "convert_resnet38",
    "load_state_dict_file",
    "load_torchvision_vgg16",
    "load_torchvision_weights",
    "read_ndarray_file",
    "register_backbone",
    "resnet38",
    "resnet38_tiny",
    "split_parameters",
    "validate_backbone",
    "vgg16",
]
