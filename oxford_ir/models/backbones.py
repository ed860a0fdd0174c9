"""Fully convolutional feature extractors: B x 3 x H x W ImageNet-normalised images -> B x C x h x w.

Each backbone has ``out_channels`` and ``out_size`` (the fixed h x w of its output, or None when it follows
the input size), an ordered list of stages that ``freeze(n)`` / ``unfreeze()`` act on, and, for the
torchvision architectures, weights from ImageNet (``weights="imagenet"``), random (``"none"``) or a local
``.pth`` state dict in torchvision's layout.

``valid_features(x, sizes)`` runs a batch of images padded to one shape (each image at the top left, its
own height and width in ``sizes``) as if each were alone (:mod:`oxford_ir.models.valid_region`) and says
which feature cells belong to each image, so that the pooling leaves the padding out (see
:mod:`oxford_ir.extraction.buckets`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from oxford_ir.errors import CheckpointError, ConfigError
from oxford_ir.models.valid_region import region_mask, to_device, valid_regions

if TYPE_CHECKING:
    import torchvision

#: how many offending keys an error message lists
_SHOWN_KEYS = 5


class Backbone(nn.Module):
    """Base class: stage bookkeeping for partial freezing, and checked loading of state dicts.

    A frozen stage has ``requires_grad=False`` parameters and stays in eval mode even while the model
    trains, so its BatchNorm running statistics are not updated by fine-tuning batches.
    """

    out_channels: int
    #: fixed spatial size of the output, or None when it scales with the input
    out_size: tuple[int, int] | None = None
    #: output stride: ``n`` input pixels give ``ceil(n / stride)`` feature cells (None: not a strided map)
    stride: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self._frozen_stages = 0

    @property
    def supports_padding(self) -> bool:
        """Whether :meth:`valid_features` can run padded images (a strided convolutional map)."""
        return self.stride is not None

    def valid_features(self, x: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of a padded batch and the B x 1 x h x w mask of each image's own cells (None: all cells).

        Every convolution and max-pool sees zeros outside each image's region
        (:func:`~oxford_ir.models.valid_region.valid_regions`), so an image's cells are those it has alone, up to
        the floating-point order of the sums.
        """
        if self.stride is None:
            raise ConfigError(f"{type(self).__name__} has no output stride: it cannot embed padded images")
        with valid_regions(self, sizes, (x.shape[-2], x.shape[-1])) as regions:
            features = self(x)
        shape = (int(features.shape[-2]), int(features.shape[-1]))
        region = regions.get(shape)
        if region is None:  # a layer the tracking does not know changed the size: the stride's arithmetic
            region = torch.div(
                regions[(int(x.shape[-2]), int(x.shape[-1]))] + self.stride - 1, self.stride, rounding_mode="floor"
            )
        return features, region_mask(to_device(region, features.device), shape)

    # -- stages --------------------------------------------------------------------------------
    def _stages(self) -> list[tuple[nn.Module, ...]]:
        """The stages in forward order; each is one or more submodules."""
        return []

    @property
    def stage_names(self) -> list[str]:
        """Human-readable names of the stages (for messages and configs)."""
        return [f"block{i}" for i in range(len(self._stages()))]

    @property
    def num_stages(self) -> int:
        return len(self._stages())

    @property
    def frozen_stages(self) -> int:
        """How many leading stages are frozen."""
        return self._frozen_stages

    def freeze(self, n_stages: int | None = None) -> None:
        """Freeze the first ``n_stages`` stages (all of them when None); later stages become trainable."""
        stages = self._stages()
        n = len(stages) if n_stages is None else int(n_stages)
        if not 0 <= n <= len(stages):
            raise ConfigError(
                f"frozen_stages={n_stages}: {type(self).__name__} has {len(stages)} stages "
                f"({', '.join(self.stage_names) or 'none'}); use 0..{len(stages)}, or freeze=true for all"
            )
        for i, stage in enumerate(stages):
            for module in stage:
                for parameter in module.parameters():
                    parameter.requires_grad_(i >= n)
        self._frozen_stages = n
        self.train(self.training)

    def unfreeze(self) -> None:
        """Make every stage trainable again."""
        self.freeze(0)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        for stage in self._stages()[: self._frozen_stages]:
            for module in stage:
                module.eval()
        return self

    def _apply_freeze_options(self, freeze: bool, frozen_stages: int) -> None:
        if freeze:
            self.freeze(None)
        elif frozen_stages:
            self.freeze(frozen_stages)

    # -- weights -------------------------------------------------------------------------------
    def _remap_key(self, key: str) -> str | None:
        """This backbone's name for a key of a torchvision-layout state dict, or None to ignore the key."""
        return key

    def load_torchvision_state_dict(self, state: Mapping[str, Any], source: str) -> None:
        """Load ``state`` (torchvision layout, classifier keys ignored), checking every backbone key.

        A missing, unexpected or differently shaped key raises :class:`CheckpointError` naming ``source``
        and the first offending keys: a silently half-loaded backbone would only show up as poor mAP.
        """
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(
                f"{source}: not a state dict (a mapping from parameter names to tensors); "
                f"save one with torch.save(model.state_dict(), path)"
            )
        own = self.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            while key.startswith("module."):
                key = key[len("module.") :]
            new_key = self._remap_key(key)
            if new_key is not None:
                mapped[new_key] = value
        # checkpoints from before BatchNorm counted its batches lack these buffers; they carry no weights
        for key, value in own.items():
            if key.endswith("num_batches_tracked"):
                mapped.setdefault(key, value)
        missing = [k for k in own if k not in mapped]
        unexpected = [k for k in mapped if k not in own]
        mismatched = [
            f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
            for k, v in mapped.items()
            if k in own and v.shape != own[k].shape
        ]
        if missing or unexpected or mismatched:
            problems = []
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", mismatched)):
                if keys:
                    shown = ", ".join(keys[:_SHOWN_KEYS]) + (", ..." if len(keys) > _SHOWN_KEYS else "")
                    problems.append(f"{len(keys)} {label} ({shown})")
            raise CheckpointError(
                f"{source}: these are not {type(self).__name__} weights in torchvision's layout: "
                f"{'; '.join(problems)}. Give a state dict of torchvision's {self._arch_name()} "
                "(backbone.weights=/path/to/file.pth), backbone.weights=imagenet, or backbone.weights=none"
            )
        self.load_state_dict(mapped, strict=True)

    def _arch_name(self) -> str:
        return type(self).__name__.lower()

    def _load_weights(self, weights: str | Path | None, imagenet: Callable[[str], Any]) -> None:
        """Resolve ``weights``: "imagenet" (or a torchvision enum name), "none"/None, or a local file."""
        if weights is None or str(weights).strip().lower() in ("none", "null", "random", ""):
            return
        name = str(weights).strip()
        if name.lower() in ("imagenet", "imagenet1k_v1", "imagenet1k_v2"):
            enum_name = "IMAGENET1K_V1" if name.lower() == "imagenet" else name.upper()
            self.load_torchvision_state_dict(imagenet(enum_name), f"torchvision {self._arch_name()} {enum_name}")
            return
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"backbone.weights={name!r}: no such file {path}; give backbone.weights=imagenet, "
                f"backbone.weights=none or backbone.weights=/path/to/file.pth (a torchvision {self._arch_name()} "
                "state dict)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any failure to unpickle means the same thing to the user
            raise CheckpointError(
                f"{path}: cannot read the weights file ({type(error).__name__}: {error}); it is corrupt or not "
                "a state dict saved with torch.save"
            ) from None
        self.load_torchvision_state_dict(state, str(path))


def _download_imagenet(weights_enum: type[torchvision.models.WeightsEnum], arch: str) -> Callable[[str], Any]:
    """A function fetching one member of ``weights_enum`` through torchvision (cached in TORCH_HOME)."""

    def fetch(member: str) -> Any:
        entry = weights_enum[member]
        try:
            return entry.get_state_dict(progress=False, check_hash=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash is a RuntimeError
            raise ConfigError(
                f"the ImageNet weights of {arch} ({entry.url}) could not be downloaded ({error}); "
                f"on a machine without internet give a local file with backbone.weights=/path/to/file.pth "
                f"(a torchvision {arch} state dict), or use backbone.weights=none for random initialisation"
            ) from None

    return fetch


def _no_imagenet(member: str) -> Any:
    raise ConfigError(
        f"backbone.weights={member}: the scratch CNN has no ImageNet weights; use backbone.weights=none (random) "
        "or backbone.weights=/path/to/file.pth (a ScratchCNN state dict)"
    )


def _init_conv(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ScratchCNN(Backbone):
    """A small CNN trained from scratch: blocks of 3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool.

    Each block halves the resolution; the output stride is ``2 ** len(channels)``. Ends with ReLU, so
    activations are non-negative as GeM expects.
    """

    def __init__(
        self,
        channels: tuple[int, ...] | list[int] = (32, 64, 128, 256),
        in_channels: int = 3,
        weights: str | Path | None = None,
        freeze: bool = False,
        frozen_stages: int = 0,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise ConfigError(f"backbone.channels={list(channels)}: give one positive width per block, e.g. [32, 64]")
        blocks, previous = [], in_channels
        for width in channels:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(previous, width, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2, ceil_mode=True),  # any input size, even a tiny query crop
                )
            )
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.channels = channels
        self.out_channels = channels[-1]
        self.stride = 2 ** len(channels)
        self.apply(_init_conv)
        self._load_weights(weights, _no_imagenet)
        self._apply_freeze_options(freeze, frozen_stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def _stages(self) -> list[tuple[nn.Module, ...]]:
        return [(block,) for block in self.blocks]


class ResNet50(Backbone):
    """torchvision's ResNet-50 without average pooling and classifier: 2048 channels at stride 32.

    Module names follow torchvision (``conv1``, ``bn1``, ``layer1`` ...) so its state dicts load as they are.
    Stages: the stem (conv1 + bn1), then layer1 .. layer4.
    """

    out_channels = 2048
    stride = 32
    #: positions of the named modules in a ``nn.Sequential(*list(resnet.children())[:-2])`` (cnnimageretrieval)
    _SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}

    def __init__(
        self,
        weights: str | Path | None = "imagenet",
        freeze: bool = False,
        frozen_stages: int = 0,
    ) -> None:
        super().__init__()
        import torchvision  # a second of imports: only for the backbones built from it

        net = torchvision.models.resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self._load_weights(weights, _download_imagenet(torchvision.models.ResNet50_Weights, "resnet50"))
        self._apply_freeze_options(freeze, frozen_stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _stages(self) -> list[tuple[nn.Module, ...]]:
        return [(self.conv1, self.bn1), (self.layer1,), (self.layer2,), (self.layer3,), (self.layer4,)]

    @property
    def stage_names(self) -> list[str]:
        return ["stem", "layer1", "layer2", "layer3", "layer4"]

    def _arch_name(self) -> str:
        return "resnet50"

    def _remap_key(self, key: str) -> str | None:
        if key.startswith("fc."):
            return None
        key = key.removeprefix("features.")
        head, _, rest = key.partition(".")
        if head in self._SEQUENTIAL_NAMES:
            return f"{self._SEQUENTIAL_NAMES[head]}.{rest}"
        return key


class MobileNetV2(Backbone):
    """torchvision's MobileNetV2 ``features`` (width 1.0): 1280 channels at stride 32, ending in ReLU6.

    Stages: the 19 blocks of ``features``. State dicts of the full model (``features.*`` and ``classifier.*``)
    or of ``features`` alone (keys without the prefix) both load.
    """

    out_channels = 1280
    stride = 32

    def __init__(
        self,
        weights: str | Path | None = "imagenet",
        freeze: bool = False,
        frozen_stages: int = 0,
    ) -> None:
        super().__init__()
        import torchvision  # a second of imports: only for the backbones built from it

        self.features = torchvision.models.mobilenet_v2(weights=None).features
        self._load_weights(weights, _download_imagenet(torchvision.models.MobileNet_V2_Weights, "mobilenet_v2"))
        self._apply_freeze_options(freeze, frozen_stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def _stages(self) -> list[tuple[nn.Module, ...]]:
        return [(block,) for block in self.features]

    @property
    def stage_names(self) -> list[str]:
        return [f"features.{i}" for i in range(len(self.features))]

    def _arch_name(self) -> str:
        return "mobilenet_v2"

    def _remap_key(self, key: str) -> str | None:
        if key.startswith("classifier."):
            return None
        if key[:1].isdigit():
            return f"features.{key}"
        return key


class RawPixels(Backbone):
    """No learned weights: the normalised image average-pooled to a ``grid`` x ``grid`` map, 3 channels.

    With :class:`~oxford_ir.models.pooling.FlattenPooling` the embedding is the 3 * grid * grid raw-pixel
    vector: the baseline any learned embedding has to beat.
    """

    out_channels = 3

    def __init__(self, grid: int = 16) -> None:
        super().__init__()
        if int(grid) < 1:
            raise ConfigError(f"backbone.grid={grid}: the pixel grid needs at least 1 x 1 cells")
        self.grid = int(grid)
        self.out_size = (self.grid, self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, self.grid)

    supports_padding = True

    def valid_features(self, x: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Each image's own region pooled to the grid: exactly the unpadded image's features."""
        rows = [(int(h), int(w)) for h, w in sizes.tolist()]
        return torch.stack([self(x[i : i + 1, :, :h, :w])[0] for i, (h, w) in enumerate(rows)]), None

    def extra_repr(self) -> str:
        return f"grid={self.grid}"
