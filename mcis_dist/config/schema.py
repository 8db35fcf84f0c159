"""The experiment schema: every setting a run has, typed, bounded and described.

Each section is a :class:`~mcis_dist.config.ConfigSection` (unknown keys and wrong types are
errors); ``describe_schema(ExperimentConfig)`` lists every key with its type, default and
description. One section per concern. Over 400 lines because it is one dataclass per config
section, each field with its bounds and one-line description: splitting it would scatter one
schema over several files.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mcis_dist.config.base import ConfigSection


class SyntheticConfig(ConfigSection):
    """Generator settings of the built-in synthetic dataset."""

    num_train: int = Field(600, ge=1, description="Number of synthetic training images.")
    num_val: int = Field(150, ge=1, description="Number of synthetic validation images.")
    min_size: int = Field(128, ge=32, description="Smallest image side, in pixels.")
    max_size: int = Field(176, description="Largest image side, in pixels (>= min_size).")
    num_classes: int = Field(8, ge=1, le=8, description="Foreground classes to draw from (1-8).")
    seed: int = Field(0, description="Seed of the synthetic image generator.")

    @model_validator(mode="after")
    def _check_sizes(self) -> SyntheticConfig:
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        return self


class ShardsConfig(ConfigSection):
    """``mcis shards build`` settings used by an experiment."""

    source: Literal["synthetic", "list", "voc", "folder"] = Field(
        "synthetic", description="Where the images come from (built-in generator or a dataset)."
    )
    url: str = Field("shards/built/demo", description="Shards: local path or s3://bucket/prefix.")
    shard_size_mb: float = Field(256.0, gt=0, description="Target size of one shard, in MB.")
    workers: int = Field(0, ge=0, description="Build processes; 0 = one per CPU core.")
    seed: int = Field(0, description="Seed of the sample order when building shards.")
    verify: Literal["header", "full"] = Field("header", description="Verify headers or decode all.")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint URL; credentials come from AWS env vars only."
    )
    splits: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="For `mcis pipeline` to build a non-synthetic source itself: per split, the "
        "options of `mcis shards build` (list_file, image_root, mask_root, classes, voc_root, "
        "seg_aug, saliency, labels_from, folder_root, domain), e.g. {train: {list_file: "
        "train.txt, image_root: train/, classes: classes.txt}, val: {...}}.",
    )

    @field_validator("splits")
    @classmethod
    def _check_split_options(cls, splits: dict[str, dict[str, str]]):
        for split, options in splits.items():
            unknown = sorted(set(options) - set(SPLIT_OPTIONS))
            if unknown:
                raise ValueError(
                    f"splits.{split}: unknown option(s) {unknown}; valid: {', '.join(SPLIT_OPTIONS)}"
                )
        return splits


SPLIT_OPTIONS = (
    "list_file",
    "image_root",
    "mask_root",
    "classes",
    "voc_root",
    "seg_aug",
    "saliency",
    "labels_from",
    "folder_root",
    "domain",
)


class DataConfig(ConfigSection):
    """The classifier's pair loader (``mcis_dist.data``)."""

    train_url: str | None = Field(
        None, description="Split folder of training shards; default: <shards.url>/train."
    )
    extra_urls: list[str] = Field(
        [], description="More split folders mixed into the stream (extra single-label/web data)."
    )
    backend: Literal["auto", "webdataset", "dali"] = Field(
        "auto", description="Decoding backend; auto = DALI on a GPU, webdataset otherwise."
    )
    batch_size: int = Field(8, ge=1, description="Pairs per batch, per rank.")
    num_workers: int = Field(2, ge=0, description="Loader worker processes per rank (webdataset).")
    mp_context: Literal["fork", "forkserver", "spawn"] = Field(
        "forkserver", description="How loader workers start (forkserver/spawn inside Ray)."
    )
    crop_size: int = Field(256, ge=16, description="Square crop fed to the network, pixels.")
    resize_long: list[int] = Field(
        [256, 512], description="Random rescale of the long side to [lo, hi] pixels."
    )
    hflip: bool = Field(True, description="Random horizontal flip.")
    color_jitter: list[float] = Field(
        [0.3, 0.3, 0.3, 0.1], description="Brightness, contrast, saturation, hue jitter."
    )
    mean: list[float] = Field([0.485, 0.456, 0.406], description="Normalisation mean (RGB).")
    std: list[float] = Field([0.229, 0.224, 0.225], description="Normalisation std (RGB).")
    pool_size: int = Field(256, ge=1, description="Samples each worker keeps to draw partners.")
    max_wait: int = Field(64, ge=0, description="Samples that may wait for a partner.")
    pairing: Literal["reuse", "disjoint"] = Field(
        "reuse",
        description="reuse: every image is the first of one pair, its partner drawn from the "
        "pool (the paper's sampler; an epoch of N images is N pairs, 2N passes); disjoint: "
        "every image in exactly one pair (N / 2 pairs, N passes: half the cost an epoch).",
    )
    shuffle_buffer: int = Field(256, ge=1, description="Per-worker sample shuffle buffer.")
    cross_domain_share: float | None = Field(
        None, ge=0, le=1, description="Share of cross-domain pairs when both are available."
    )
    seed: int = Field(0, ge=0, description="Seed of shard order, shuffling, pairing, augmentation.")
    dali_threads: int = Field(2, ge=1, description="DALI CPU threads per rank.")
    dali_guard: Literal["header", "full"] = Field(
        "header", description="DALI: check images before decoding (header) or decode-check all."
    )
    index_cache: str = Field(
        "~/.cache/mcis/idx", description="Local folder for the .idx files of s3:// shards (DALI)."
    )
    dali_restarts: int = Field(
        3,
        ge=0,
        description="DALI: times an epoch's pipeline is rebuilt after a read error (its S3 "
        "reader does not resume a reset connection), replaying to the batch it stopped at.",
    )
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint for train_url.")

    @model_validator(mode="after")
    def _check_lists(self):
        problems = []
        if len(self.resize_long) != 2 or not 0 < self.resize_long[0] <= self.resize_long[1]:
            problems.append(f"resize_long={self.resize_long}: expected [lo, hi] with 0 < lo <= hi")
        if len(self.color_jitter) != 4 or min(self.color_jitter) < 0:
            problems.append(f"color_jitter={self.color_jitter}: expected 4 values >= 0")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                problems.append(f"{name}={getattr(self, name)}: expected 3 values (RGB)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ModelConfig(ConfigSection):
    """The co-attention classifier (``mcis_dist.models``)."""

    backbone: str = Field(
        "resnet38_tiny",
        description="resnet38, vgg16, resnet38_tiny or torchvision:<name> (build_backbone).",
    )
    weights: str | None = Field(
        None, description="Pretrained backbone weights (.pth state dict, or torchvision VGG-16)."
    )
    pretrained: bool = Field(
        True,
        description="Backbones whose package ships ImageNet weights (efficientnet_lite0, the "
        "photos extra): start from them; false trains from scratch. model.weights, when set, "
        "is loaded instead. Other backbones get ImageNet weights from model.weights only.",
    )
    domains: Literal[1, 3] = Field(1, description="W_P matrices: 1, or 3 for extra-data pairs.")
    shared_phi: bool = Field(False, description="Paper: one φ; authors' code: a separate φ.")
    phi_co_bias: bool = Field(
        False,
        description="Give the separate φ_co (Eq. 5, 8) a bias, zero at init (authors' code: "
        "none); needs shared_phi false.",
    )
    chunk_size: int | None = Field(None, ge=1, description="Co-attention query block size.")
    affinity: Literal["bilinear", "cosine"] = Field(
        "bilinear",
        description="Co-attention affinity: bilinear, Eq. 2 exactly (F_m^T W_P F_n); cosine, "
        "its normalised variant normalize(W_P^T F_m)^T normalize(F_n) / temperature.",
    )
    temperature: float = Field(0.1, gt=0, description="tau of the cosine affinity.")
    learn_temperature: bool = Field(False, description="Learn log(tau) (cosine affinity only).")
    w_p_init: Literal["uniform", "identity"] | None = Field(
        None,
        description="Init of W_P: uniform (nn.Linear's, the authors') or identity; None: uniform "
        "for bilinear, identity for cosine.",
    )
    freeze_backbone: bool = Field(
        False,
        description="Train the head only (phi, phi_co, W_P, W_B): the backbone keeps its "
        "weights, runs in eval mode and without autograd (2-3.5x faster a step on CPUs). "
        "For linear-probe-style runs on a budget; the paper fine-tunes the whole network.",
    )
    freeze_bn: bool | None = Field(
        None,
        description="ResNet-38 family: freeze BatchNorm (eval mode, no gradients), as suits "
        "ImageNet weights. None: the backbone's default (frozen); false trains it (from scratch).",
    )
    backbone_dropout: list[float] | None = Field(
        None,
        description="ResNet-38 family: dropout of blocks b6 and b7, [p6, p7]; None: the "
        "backbone's default [0.3, 0.5].",
    )

    @model_validator(mode="after")
    def _check_backbone_options(self) -> ModelConfig:
        resnet38 = self.backbone in ("resnet38", "resnet38_tiny")
        for name in ("freeze_bn", "backbone_dropout"):
            if getattr(self, name) is not None and not resnet38:
                raise ValueError(
                    f"{name} applies to resnet38 / resnet38_tiny only, "
                    f"not backbone {self.backbone!r}; leave it unset (null)"
                )
        p = self.backbone_dropout
        if p is not None and (len(p) != 2 or not all(0 <= v < 1 for v in p)):
            raise ValueError(f"backbone_dropout={p}: expected [p6, p7] with 0 <= p < 1")
        if self.phi_co_bias and self.shared_phi:
            raise ValueError(
                "phi_co_bias applies to a separate φ_co only, not with shared_phi: true "
                "(φ_co is then φ, which has its own bias)"
            )
        return self


class RunnerConfig(ConfigSection):
    """Training on Ray Train, shared by every trained stage (classifier, AffinityNet, DeepLab):
    workers, optimiser, schedule, precision, checkpoints and fault tolerance."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on GPU nodes).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per worker.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per CPU worker.")
    epochs: int = Field(15, ge=1, description="Training epochs.")
    lr: float = Field(1e-3, gt=0, description="Base learning rate (backbone weights).")
    lr_mult: list[float] = Field(
        [1.0, 2.0, 10.0, 20.0],
        description="lr multipliers: pretrained weights, pretrained biases, new weights, biases.",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(True, description="Nesterov momentum (authors' VOC code).")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay (not on biases).")
    schedule: Literal["step", "poly"] = Field(
        "step", description="step: ×gamma at step_epochs (VOC); poly: (1-it/max)^power (LID)."
    )
    step_epochs: list[int] = Field([5, 10], description="Epochs at which the step schedule decays.")
    gamma: float = Field(0.1, gt=0, le=1, description="Step schedule decay factor.")
    poly_power: float = Field(0.9, gt=0, description="Poly schedule power.")
    warmup_iters: int = Field(0, ge=0, description="Linear warm-up iterations.")
    amp: Literal["none", "bf16", "fp16"] = Field(
        "none", description="Mixed precision; fp16 (with GradScaler) needs a GPU."
    )
    channels_last: bool = Field(False, description="channels_last memory format.")
    checkpoint_every_steps: int = Field(0, ge=0, description="Checkpoint every N steps (0: off).")
    keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept (the newest).")
    report_every_steps: int = Field(20, ge=1, description="Metrics reported to Ray every N steps.")
    max_failures: int = Field(3, ge=0, description="Worker failures survived by restarting.")
    nonfinite: Literal["skip", "stop"] = Field(
        "stop", description="A NaN/inf loss: skip the step, or stop naming the step and terms."
    )
    seed: int = Field(0, ge=0, description="Seed of model init and training randomness.")
    val_every_epochs: int = Field(
        0,
        ge=0,
        description="Validate on a split with masks every N epochs and at the last, reporting "
        "val_miou with the epoch's metrics (0: off; classifier: seg.val_url, AffinityNet: "
        "affinity.val_cams_url).",
    )


class TrainConfig(RunnerConfig):
    """Classifier training on Ray Train (``mcis train-cls``): the runner plus Eq. 10's terms."""

    loss_single: float = Field(1.0, ge=0, description="Weight of Eq. 1 (single-image loss).")
    loss_coattention: float = Field(1.0, ge=0, description="Weight of Eq. 5 (co-attention).")
    loss_contrastive: float = Field(1.0, ge=0, description="Weight of Eq. 9 (contrastive).")
    contrastive_from_epoch: int = Field(2, ge=0, description="Epoch the contrastive loss starts.")
    loss_reduction: Literal["paper", "authors"] = Field(
        "paper", description="paper: m and n terms added; authors: averaged as their code."
    )
    contrastive_classes: Literal["all", "pair"] = Field(
        "all",
        description="Classes Eq. 9's loss averages over: all K (paper), or pair, only those one "
        "image of the pair holds (l_m ∪ l_n; absent classes contribute nothing).",
    )
    self_pair_terms: bool = Field(
        False,
        description="Authors' code: extra Eq. 1/5 terms pairing each image with its flip, "
        "0.75x and 2x copies (6 more forward passes per step).",
    )
    diagnostics: bool = Field(
        True,
        description="Report the attention diagnostics of each batch's first pair with the "
        "metrics (attn_hub_top1, attn_hub_top5, attn_row_max, attn_gate_mean, attn_w_p_drift).",
    )
    self_pair_scales: list[float] = Field(
        [0.75, 2.0],
        description="Rescaled copies of the self-pair terms, besides the flip (authors: 0.75, "
        "2); [] keeps the flip only (2 more forward passes per step instead of 6).",
    )
    seam: bool = Field(
        False, description="SEAM's equivariant attention (PCM, ER + ECR) on image m (LID)."
    )
    seam_weight: float = Field(1.0, ge=0, description="Weight of SEAM's ER + ECR losses.")


class CamsConfig(ConfigSection):
    """Localization maps (``mcis cams``, paper §3.2) and their evaluation (``mcis eval cams``)."""

    split_url: str | None = Field(
        None, description="Split folder whose images get maps; default: data.train_url."
    )
    out_url: str | None = Field(
        None, description="Output folder of the CAM shards; default: <run_root>/<name>/cams."
    )
    checkpoint: str | None = Field(
        None, description="Classifier checkpoint (folder or .pt); default: the newest of the run."
    )
    mode: Literal["single", "coattentive", "authors"] = Field(
        "coattentive",
        description="single: S_n (Eq. 1); coattentive: K related images per class (§3.2), "
        "multi-scale x flip; authors: the authors' test-time aggregation of five maps per class "
        "(with the flip, 0.75x and 2x copies, and K related images; scales/flip unused).",
    )
    class_layer: Literal["phi", "phi_co"] = Field(
        "phi",
        description="single mode: the class layer applied to the image's own features: phi "
        "(S_n, Eq. 1), or phi_co, the layer trained on co-attentive features (Eq. 5; a "
        "control: co-attentive maps without related images).",
    )
    normalize: Literal["relu_max", "minmax"] = Field(
        "relu_max",
        description="single and coattentive modes: relu_max, each scale's map through ReLU and "
        "the sum divided by its peak (psa, MCIS: what the pseudo masks start from; a class "
        "whose evidence is negative everywhere gets an empty map); minmax, the raw sum mapped "
        "to [0, 1] by its minimum and maximum (the WSOL protocol of Choe et al., CVPR 2020, "
        "for box scores: every class gets a map).",
    )
    readout: Literal["feature", "contribution", "object"] = Field(
        "feature",
        description="coattentive mode: feature, phi_co of the image's co-attentive feature "
        "(§3.2); contribution, each position's phi_co evidence weighted by the attention the "
        "related image pays it (the spatial decomposition of Eq. 5's score, like a CAM); "
        "object, the same but only the attention paid by the related image's own class-k "
        "region (its single-round map as weights).",
    )
    readout_layer: Literal["phi_co", "phi"] = Field(
        "phi_co",
        description="coattentive mode: the class layer the read-out uses: phi_co (Eq. 5, "
        "trained on co-attentive features) or phi (Eq. 1, the single-round maps' layer).",
    )
    square: int | None = Field(
        None,
        ge=16,
        description="authors mode: resize the image and its related images to square x square "
        "first (the authors: 256); None keeps each image's size (related: related_size).",
    )
    authors_gate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="authors mode: maps 2-5 count only when sigmoid(mean of the raw map) > this.",
    )
    related: int = Field(3, ge=1, description="Related images per labelled class (|R|, Table 5).")
    related_url: str | None = Field(
        None,
        description="Split folder the related images are drawn from (same class list); "
        "default: split_url itself. Mapping a validation split with related images of the "
        "training split keeps the validation images apart from each other.",
    )
    related_classes: Literal["same", "other"] = Field(
        "same",
        description="same: related images hold the mapped class (§3.2); other: a control, "
        "related images holding none of the image's classes (what co-attention adds when the "
        "related images share nothing with it).",
    )
    related_pool: int = Field(
        0,
        ge=0,
        description="Draw related images from a fixed per-class pool of this size (0: all "
        "images of the class); small pools make the feature cache hit.",
    )
    related_size: int | None = Field(
        None, ge=16, description="Long side of related images, pixels; default: data.crop_size."
    )
    contrastive: bool = Field(
        False,
        description="Also average contrastive maps against images without the class "
        "(Eq. 7-8; Table 2: adds nothing).",
    )
    self_pairs: bool = Field(
        False,
        description="Authors' code: the image's flip, 0.75x and 2x copies as extra related "
        "images of every class.",
    )
    scales: list[float] = Field([0.5, 1.0, 1.5, 2.0], description="Test scales of the image.")
    flip: bool = Field(True, description="Also run every scale flipped.")
    out_stride: int = Field(8, ge=1, description="Stored maps' stride to the image (1: full size).")
    num_actors: int = Field(
        0, ge=0, description="Actors; 0: one per GPU, or one per cpus_per_actor."
    )
    use_gpu: bool = Field(False, description="One GPU per actor.")
    cpus_per_actor: int = Field(1, ge=1, description="CPUs reserved per actor.")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads per CPU actor.")
    amp: bool = Field(True, description="fp16 autocast on GPUs (ignored on CPUs).")
    feature_cache_mb: int = Field(
        512, ge=0, description="Per-actor LRU cache of related images' features, MB (0: off)."
    )
    max_failures: int = Field(3, ge=0, description="Lost actors replaced before the stage fails.")
    seed: int = Field(0, ge=0, description="Seed of the related-image draws.")
    bg_threshold: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Background score of CAM label maps (set here, never picked "
        "by looking at ground truth).",
    )
    eval_thresholds: list[float] = Field(
        [round(0.05 * i, 2) for i in range(13)],
        description="Background thresholds swept by `mcis eval cams` (reporting only).",
    )
    eval_attention_pairs: int = Field(
        48,
        ge=0,
        description="Pairs of the split on which `mcis eval cams` measures the classifier's "
        "attention diagnostics (hub mass, background/foreground attention, gate, W_P drift); 0: off.",
    )
    eval_grid: int = Field(8, ge=0, description="Images in the overlay grid of `mcis eval cams`.")

    @model_validator(mode="after")
    def _check(self):
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales={self.scales}: expected a non-empty list of values > 0")
        if not self.eval_thresholds or not all(0 <= t <= 1 for t in self.eval_thresholds):
            raise ValueError(f"eval_thresholds={self.eval_thresholds}: expected values in [0, 1]")
        if self.normalize == "minmax" and self.mode == "authors":
            raise ValueError(
                "normalize=minmax applies to modes single and coattentive; authors mode "
                "normalises its five maps as the authors' code does (leave relu_max)"
            )
        return self


class JointDataConfig(ConfigSection):
    """Images joined with per-pixel labels (confident labels or pseudo masks) by key, augmented
    together: random rescale, crop padded with the mean (image) and 255 (labels), flip."""

    batch_size: int = Field(8, ge=1, description="Images per batch, per rank.")
    num_workers: int = Field(0, ge=0, description="Loader worker processes per rank.")
    mp_context: Literal["fork", "forkserver", "spawn"] = Field(
        "forkserver", description="How loader workers start (forkserver/spawn inside Ray)."
    )
    crop_size: int = Field(448, ge=16, description="Square crop, pixels.")
    scale: list[float] = Field([0.9, 1.5], description="Random rescale factor range [lo, hi].")
    hflip: bool = Field(True, description="Random horizontal flip.")
    shuffle_buffer: int = Field(256, ge=1, description="Per-worker sample shuffle buffer.")
    seed: int = Field(0, ge=0, description="Seed of shard order, shuffling and augmentation.")

    @model_validator(mode="after")
    def _check_scale(self):
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale={self.scale}: expected [lo, hi] with 0 < lo <= hi")
        return self


class AffinityTrainConfig(RunnerConfig):
    """AffinityNet training (psa's code: 8 epochs, lr 0.01 ResNet-38 / 0.1 VGG, poly 0.9)."""

    epochs: int = Field(8, ge=1, description="Training epochs.")
    lr: float = Field(0.01, gt=0, description="Base learning rate (backbone weights).")
    schedule: Literal["step", "poly"] = Field("poly", description="Learning-rate schedule.")
    nesterov: bool = Field(False, description="Nesterov momentum.")


class AffinityConfig(ConfigSection):
    """AffinityNet (psa; paper §4.4): confident labels from the CAMs, then ``mcis affinity``."""

    cams_url: str | None = Field(None, description="CAM folder; default: cams.out_url.")
    out_url: str | None = Field(
        None, description="Labels and run folder; default: <run_root>/<name>/affinity."
    )
    label_mode: Literal["alpha", "threshold"] = Field(
        "alpha", description="alpha: backgrounds (1-max)^alpha_low/high; threshold: constants."
    )
    alpha_low: float = Field(4.0, gt=0, description="Background power of confident foreground.")
    alpha_high: float = Field(32.0, gt=0, description="Background power of confident background.")
    fg_threshold: float = Field(0.3, ge=0, le=1, description="threshold mode: foreground above.")
    bg_threshold: float = Field(0.05, ge=0, le=1, description="threshold mode: background below.")
    crf: bool = Field(False, description="Dense CRF on both label score maps (as psa does).")
    backbone: str | None = Field(None, description="AffinityNet backbone; default: model.backbone.")
    init_from_classifier: bool = Field(
        True, description="Start the backbone from the classifier checkpoint's backbone."
    )
    head_width: float = Field(1.0, gt=0, description="Head width multiplier (64/128/256 x it).")
    radius: int = Field(5, ge=1, description="Pair radius at stride 8.")
    val_cams_url: str | None = Field(
        None,
        description="CAMs of a split with masks (e.g. the val split) for affinity.train."
        "val_every_epochs: their random walk (masks.*) is scored after each epoch.",
    )
    data: JointDataConfig = Field(default_factory=JointDataConfig, description="Loader.")
    train: AffinityTrainConfig = Field(
        default_factory=AffinityTrainConfig, description="Ray Train runner."
    )
    num_actors: int = Field(0, ge=0, description="Label actors; 0: one per cpus_per_actor CPUs.")
    cpus_per_actor: int = Field(1, ge=1, description="CPUs per label actor.")
    max_failures: int = Field(3, ge=0, description="Lost label actors replaced before failing.")

    @model_validator(mode="after")
    def _check(self):
        if self.bg_threshold > self.fg_threshold:
            raise ValueError(
                f"bg_threshold ({self.bg_threshold}) must be <= fg_threshold ({self.fg_threshold})"
            )
        return self


class MasksConfig(ConfigSection):
    """Pseudo masks (``mcis masks``): random walk with AffinityNet (LID), saliency-guided
    labels (VOC route, paper §3.2), or thresholded CAMs (the baseline)."""

    mode: Literal["random_walk", "saliency", "cams"] = Field(
        "random_walk", description="random_walk (LID), saliency (VOC), or cams (baseline)."
    )
    cams_url: str | None = Field(None, description="CAM folder; default: cams.out_url.")
    checkpoint: str | None = Field(
        None, description="AffinityNet checkpoint; default: the newest of the affinity run."
    )
    out_url: str | None = Field(
        None, description="Pseudo-mask shards; default: <run_root>/<name>/masks."
    )
    beta: float = Field(8.0, gt=0, description="Affinity power beta of T = D^-1 A^beta.")
    steps: int = Field(256, ge=0, description="Random-walk steps t.")
    radius: int = Field(5, ge=1, description="Random-walk neighbourhood radius at stride 8.")
    background: Literal["constant", "power"] = Field(
        "constant", description="constant: bg_threshold (LID 0.2); power: (1-max)^bg_power."
    )
    bg_threshold: float = Field(0.2, ge=0, le=1, description="Constant background score.")
    bg_power: float = Field(16.0, gt=0, description="Background power (psa).")
    ignore_margin: float = Field(
        0.0, ge=0, le=1, description="Pixels whose best two scores differ by less: 255 (0: off)."
    )
    crf: bool = Field(False, description="Dense CRF on the final scores before the argmax.")
    num_actors: int = Field(0, ge=0, description="Actors; 0: one per GPU or cpus_per_actor CPUs.")
    use_gpu: bool = Field(False, description="One GPU per actor.")
    cpus_per_actor: int = Field(1, ge=1, description="CPUs reserved per actor.")
    torch_threads: int = Field(1, ge=1, description="torch threads per CPU actor.")
    max_failures: int = Field(3, ge=0, description="Lost actors replaced before the stage fails.")
    eval_grid: int = Field(8, ge=0, description="Images in the overlay grid of `mcis eval masks`.")


class SegDataConfig(JointDataConfig):
    """The segmentation loader: images with their pseudo masks (crop 512, scale 0.5-2)."""

    crop_size: int = Field(512, ge=16, description="Square crop, pixels.")
    scale: list[float] = Field([0.5, 2.0], description="Random rescale factor range [lo, hi].")


class SegTrainConfig(RunnerConfig):
    """DeepLab training (LID: lr 0.007 poly, wd 1e-4, 100 epochs, global batch 48)."""

    epochs: int = Field(100, ge=1, description="Training epochs.")
    lr: float = Field(0.007, gt=0, description="Base learning rate.")
    lr_mult: list[float] = Field(
        [1.0, 1.0, 10.0, 10.0],
        description="lr multipliers: backbone weights, backbone biases, head weights, head biases.",
    )
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (not on biases).")
    schedule: Literal["step", "poly"] = Field("poly", description="Learning-rate schedule.")
    nesterov: bool = Field(False, description="Nesterov momentum.")


class SegConfig(ConfigSection):
    """The segmentation network trained on pseudo masks (``mcis seg``), its evaluation
    (``mcis eval seg``), export (``mcis export``) and predictions (``mcis predict``)."""

    arch: Literal["deeplabv3", "largefov"] = Field(
        "deeplabv3", description="DeepLab-V3 (ASPP, LID) or DeepLab-LargeFOV (VOC route)."
    )
    backbone: str = Field(
        "resnet101", description="torchvision ResNet: resnet18, resnet34, resnet50, resnet101."
    )
    weights: str | None = Field(
        None, description="torchvision-format ResNet state dict (.pth) to start the backbone from."
    )
    output_stride: Literal[8, 16] = Field(8, description="Backbone output stride (dilation).")
    masks_url: str | None = Field(
        None, description="Pseudo masks to train on; default masks.out_url."
    )
    val_url: str | None = Field(
        None, description="Split with ground-truth masks to evaluate on; default <shards.url>/val."
    )
    out_url: str | None = Field(None, description="Run folder; default <run_root>/<name>/seg.")
    global_batch: int | None = Field(
        None, ge=1, description="Global batch split across the workers (else data.batch_size each)."
    )
    data: SegDataConfig = Field(
        default_factory=SegDataConfig, description="Loader (crop, scale, flip, batch per rank)."
    )
    train: SegTrainConfig = Field(default_factory=SegTrainConfig, description="Ray Train runner.")
    eval_scales: list[float] = Field([1.0], description="Test scales (multi-scale: several).")
    eval_flip: bool = Field(False, description="Also average the flipped image's scores.")
    crf: bool = Field(False, description="Dense CRF on the test scores (paper §3.3).")
    export_opset: int = Field(17, ge=7, description="ONNX opset of `mcis export`.")
    num_actors: int = Field(0, ge=0, description="Prediction/eval actors; 0: per GPU or CPUs.")
    use_gpu: bool = Field(False, description="One GPU per prediction/eval actor.")
    cpus_per_actor: int = Field(1, ge=1, description="CPUs per prediction/eval actor.")
    torch_threads: int = Field(1, ge=1, description="torch threads per CPU actor.")
    max_failures: int = Field(3, ge=0, description="Lost actors replaced before failing.")
    eval_grid: int = Field(8, ge=0, description="Images in the overlay grid of `mcis eval seg`.")


class PipelineConfig(ConfigSection):
    """``mcis pipeline`` / ``mcis demo``: which extra baselines to run for the report."""

    basic_baseline: bool = Field(
        False, description="Also train the basic classifier (Eq. 1 only) for cam_miou_basic."
    )


class ExperimentConfig(ConfigSection):
    """One experiment: its name, where its runs live, and its sections."""

    name: str = Field("demo", description="Experiment name ([A-Za-z0-9_.-]+); runs/<name>/.")
    run_root: str = Field("runs", description="Local path or s3:// URL under which runs live.")
    shards: ShardsConfig = Field(default_factory=ShardsConfig, description="Shard building.")
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="Synthetic data."
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Pair loader.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Classifier model.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Classifier training.")
    cams: CamsConfig = Field(default_factory=CamsConfig, description="Localization maps.")
    affinity: AffinityConfig = Field(default_factory=AffinityConfig, description="AffinityNet.")
    masks: MasksConfig = Field(default_factory=MasksConfig, description="Pseudo masks.")
    seg: SegConfig = Field(default_factory=SegConfig, description="Segmentation network.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Pipeline.")

    @model_validator(mode="after")
    def _derive_urls(self):
        if self.data.train_url is None:  # the shards this experiment builds feed its loader
            self.data.train_url = f"{self.shards.url.rstrip('/')}/train"
        if self.data.endpoint_url is None:  # one endpoint for the shards and their readers
            self.data.endpoint_url = self.shards.endpoint_url
        if self.cams.split_url is None:
            self.cams.split_url = self.data.train_url
        run = f"{self.run_root.rstrip('/')}/{self.name}"
        if self.cams.out_url is None:
            self.cams.out_url = f"{run}/cams"
        if self.affinity.cams_url is None:
            self.affinity.cams_url = self.cams.out_url
        if self.affinity.out_url is None:
            self.affinity.out_url = f"{run}/affinity"
        if self.masks.cams_url is None:
            self.masks.cams_url = self.cams.out_url
        if self.masks.out_url is None:
            self.masks.out_url = f"{run}/masks"
        if self.seg.masks_url is None:
            self.seg.masks_url = self.masks.out_url
        if self.seg.val_url is None:
            self.seg.val_url = f"{self.shards.url.rstrip('/')}/val"
        if self.seg.out_url is None:
            self.seg.out_url = f"{run}/seg"
        return self

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value) or value in (".", ".."):
            raise ValueError("must be non-empty, of [A-Za-z0-9_.-] only, and not '.' or '..'")
        return value
