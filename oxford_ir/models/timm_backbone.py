"""Any timm model as a backbone (``backbone=timm backbone.name=<model>``): CNNs and Vision Transformers.

The model is built by ``timm.create_model`` without its classifier and global pooling: a CNN gives its last
feature map (``forward_features``) to the configured pooling; a ViT (:mod:`oxford_ir.models.timm_vit`) gives its
CLS token or its patch tokens. Weights: ``pretrained`` (timm's own download, cached in the Hugging Face or torch
hub cache), ``none`` (random) or a local file of the model's weights, read by timm as if downloaded (so that
the conversions timm applies to original checkpoints, e.g. DINOv2's, apply to it too).

Normalisation: the whole input pipeline normalises with the ImageNet mean and std
(:mod:`oxford_ir.data.transforms`); a model pretrained with another (CLIP, most ViTs) re-normalises its input
with one per-channel affine map from its ``pretrained_cfg``, so training, validation, evaluation, the index and
search all feed it what it was trained on, and an index's model spec (the backbone's name) implies it.

Bucket batching pads images at the bottom and the right; it stays exact for a CNN whose features of a padded image
equal those of the image alone under the valid-region masks (:mod:`oxford_ir.models.valid_region`). timm's CNNs
include layers the masks cannot make exact (squeeze-excitation and other means over the whole map, TF "same"
padding, average pooling in ResNet-D shortcuts), so that is measured once per model on random images rather than
assumed; a model that fails gets exact shape batches and the reason in the extraction report
(:attr:`TimmBackbone.padding_note`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oxford_ir.errors import ConfigError
from oxford_ir.models import timm_vit
from oxford_ir.models.backbones import Backbone
from oxford_ir.models.timm_create import check_model_args, check_name, create_model, is_vit

#: attributes of timm models that hold the classifier head (unused by ``forward_features``; removed)
_HEAD_ATTRIBUTES = ("head", "fc", "classifier", "global_pool", "head_drop", "fc_norm", "attn_pool")
#: relative tolerance of the padding probe: float32 sums in another order differ by ~1e-6 of the largest feature, a
#: layer that reads the padding by 1e-2 or more
_PROBE_TOLERANCE = 1e-4


def _drop_head(model: nn.Module) -> None:
    """Replace the classifier-side modules that hold parameters (e.g. ConvNeXt's head norm) by identities: they
    are unused by ``forward_features``, and unused parameters break DDP and waste the optimiser's memory."""
    for attribute in _HEAD_ATTRIBUTES:
        module = getattr(model, attribute, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            setattr(model, attribute, nn.Identity())


def _parameter_groups(model: nn.Module) -> list[list[str]]:
    """The model's coarse parameter groups (timm's ``group_matcher``: stem, then stage by stage), in forward order;
    one group of everything for a model without a matcher."""
    from timm.models import group_parameters

    try:
        groups = group_parameters(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):
        return [[name for name, _ in model.named_parameters()]]
    return [list(names) for _, names in sorted(groups.items()) if names]


def _group_name(names: list[str], repeated: set[str]) -> str:
    """``layer1``, ``blocks.3``, ``conv1+bn1``: the top-level modules a group's parameters belong to."""
    heads: list[str] = []
    for name in names:
        parts = name.split(".")
        head = ".".join(parts[:2]) if parts[0] in repeated and len(parts) > 2 else parts[0]
        if head not in heads:
            heads.append(head)
    return "+".join(heads)


def _probe_weights(backbone: TimmBackbone) -> TimmBackbone:
    """``backbone`` with seeded weights of unit gain (He-normal matrices and kernels; scales, shifts and biases in
    [0.5, 1)), so that every branch contributes; the global random generator is left alone."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in backbone.model.parameters():
            if parameter.ndim >= 2:
                values = torch.randn(parameter.shape, generator=generator) * math.sqrt(2.0 / parameter[0].numel())
            else:
                values = 0.5 + 0.5 * torch.rand(parameter.shape, generator=generator)
            parameter.copy_(values.to(parameter.device, parameter.dtype))
    return backbone


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """TF32 off for the probe: on an Ampere GPU its 1e-3 rounding would hide, or fake, a difference."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


class TimmBackbone(Backbone):
    """A timm model without classifier: ``name`` (``resnet101``, ``convnext_base.fb_in22k``,
    ``vit_small_patch14_dinov2.lvd142m`` ...), ``weights`` pretrained | none | a local file.

    ViTs only: ``pool_tokens`` (``cls`` or ``patches``) and ``img_size``, the size the position embeddings are
    learned at (None: the pretrained config's). ``model_args``: more keyword arguments of ``timm.create_model``
    (``drop_path_rate: 0.1``). Stages for ``frozen_stages``: timm's coarse parameter groups.
    """

    def __init__(
        self,
        name: str = "resnet50",
        weights: str | Path | None = "pretrained",
        freeze: bool = False,
        frozen_stages: int = 0,
        pool_tokens: str = "patches",
        img_size: int | None = None,
        model_args: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name = check_name(name)
        self.label = f"timm:{self.name}"
        self.is_vit = is_vit(self.name)
        if not self.is_vit and img_size is not None:
            raise ConfigError(f"backbone.img_size={img_size} is for ViTs; {self.label} takes any size: leave it null")
        kwargs = {**(timm_vit.vit_kwargs(img_size) if self.is_vit else {}), **check_model_args(model_args)}
        self.model = create_model(self.name, weights, kwargs)
        _drop_head(self.model)
        self.out_channels = int(self.model.num_features)
        if self.is_vit:
            self.pool_tokens: str | None = timm_vit.check_pool_tokens(str(pool_tokens), self.model, self.label)
            self.patch_size = timm_vit.patch_size(self.model)
            self.out_size = (1, 1) if self.pool_tokens == "cls" else None
        else:
            if pool_tokens == "cls":
                raise ConfigError(f"backbone.pool_tokens=cls: {self.label} is a CNN without a CLS token")
            self.pool_tokens = None
            info = getattr(self.model, "feature_info", None)
            if getattr(self.model, "output_fmt", "NCHW") != "NCHW" or not info or "reduction" not in info[-1]:
                raise ConfigError(
                    f"backbone.name={self.name}: not supported; backbone=timm takes CNNs (a feature map of a known "
                    f"stride) and ViTs of timm's {', '.join(timm_vit.VIT_MODULES)} modules"
                )
            self.stride = int(info[-1]["reduction"])
        self._set_normalisation()
        groups = _parameter_groups(self.model)
        firsts = [name.split(".")[0] for group in groups for name in group[:1]]
        repeated = {head for head in firsts if firsts.count(head) > 1}
        self._stage_labels = [_group_name(group, repeated) for group in groups]
        self._stage_parameters = groups
        owners = [dict.fromkeys(n.rpartition(".")[0] for n in group if "." in n) for group in groups]
        self._stage_modules = [tuple(self.model.get_submodule(owner) for owner in group) for group in owners]
        self._padding_exact: bool | None = None
        self._apply_freeze_options(freeze, frozen_stages)

    def _set_normalisation(self) -> None:
        """``input_scale`` / ``input_shift``: ImageNet-normalised input -> the model's normalisation."""
        config = getattr(self.model, "pretrained_cfg", {}) or {}
        self.mean = tuple(float(v) for v in config.get("mean", IMAGENET_MEAN))
        self.std = tuple(float(v) for v in config.get("std", IMAGENET_STD))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"backbone.name={self.name}: its pretrained config has no 3-channel mean and std")
        self.renormalises = (self.mean, self.std) != (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        scale = torch.tensor(IMAGENET_STD) / std
        shift = (torch.tensor(IMAGENET_MEAN) - mean) / std
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalises:
            x = torch.addcmul(self.input_shift.to(x.dtype), x, self.input_scale.to(x.dtype))
        if self.is_vit:
            return timm_vit.vit_map(self.model, x, str(self.pool_tokens))
        features = self.model.forward_features(x)
        if features.ndim != 4:
            raise ConfigError(f"{self.label} gives {features.ndim}-d features, not a feature map: it is not a CNN")
        return features

    def check_pooling(self, pooling: nn.Module) -> None:
        """Called by the embedder: refuse a pooling that would distort this backbone's output."""
        if self.is_vit:
            timm_vit.check_pooling(str(self.pool_tokens), pooling, self.label)

    # -- padded batches ------------------------------------------------------------------------
    @property
    def supports_padding(self) -> bool:
        """CNNs whose padded features are exact under the valid-region masks (measured once); never a ViT."""
        if self.is_vit:
            return False
        if self._padding_exact is None:
            self._padding_exact = self._probe_padding()
        return self._padding_exact

    @property
    def padding_note(self) -> str | None:
        """Why bucket batching falls back to shape batches for this model (None when it does not)."""
        if self.is_vit:
            return timm_vit.PADDING_NOTE.format(name=self.label)
        if not self.supports_padding:
            return (
                f"{self.label}: a padded image's features differ from the image alone (a layer reads the whole map "
                "or pads by the input size: squeeze-excitation, TF 'same' padding, average-pooled shortcuts): exact "
                "shape batches instead of buckets"
            )
        return None

    def _probe_padding(self) -> bool:
        """Whether a random image padded into a larger input gets, on its own cells, the features it gets alone. Its
        height, 2 * stride + 1, is odd at every stage (65 -> 33 -> 17 -> 9 -> 5 -> 3 at stride 32), so that every
        stride-2 window straddles its edge; every stage has padding beside it. Run on a copy with
        weights that make every branch count (:func:`_probe_weights`), so the answer is the architecture's: at
        initialisation timm zeroes or shrinks residual branches (the last BatchNorm's scale, ConvNeXt's layer scale),
        which would hide a layer that reads the padding until training wakes it."""
        s = int(self.stride or 1)
        height, width = 2 * s + 1, s + 1
        image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        padded = F.pad(image, (0, s + 5, 0, s + 1))
        probe = _probe_weights(copy.deepcopy(self)).eval()
        device = self.input_scale.device
        with torch.no_grad(), torch.autocast(device.type, enabled=False), _full_float32():
            features, mask = probe.valid_features(padded.to(device), torch.tensor([[height, width]]))
            alone = probe(image.to(device))[0]
        rows, cols = alone.shape[-2:]
        if mask is not None and (int(mask[0, 0, :, 0].sum()), int(mask[0, 0, 0, :].sum())) != (rows, cols):
            return False
        return bool((features[0, :, :rows, :cols] - alone).abs().max() <= _PROBE_TOLERANCE * alone.abs().max())

    # -- stages --------------------------------------------------------------------------------
    def _stages(self) -> list[tuple[nn.Module, ...]]:
        return self._stage_modules

    @property
    def stage_names(self) -> list[str]:
        return list(self._stage_labels)

    def freeze(self, n_stages: int | None = None) -> None:
        """As :meth:`Backbone.freeze`, by timm's parameter groups: parameters of the model itself (a ViT's CLS token
        and position embeddings) freeze with their group."""
        super().freeze(n_stages)
        parameters = dict(self.model.named_parameters())
        for i, names in enumerate(self._stage_parameters):
            for name in names:
                parameters[name].requires_grad_(i >= self._frozen_stages)

    def extra_repr(self) -> str:
        extra = f", pool_tokens={self.pool_tokens}" if self.is_vit else f", stride={self.stride}"
        return f"name={self.name}{extra}, mean={self.mean}, std={self.std}"
