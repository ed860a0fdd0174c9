"""Running a convolutional network on zero-padded images exactly as on each image alone.

A bucket batch (:mod:`oxford_ir.extraction.buckets`) holds images padded at the bottom and the right. Near an
image's edge a convolution or a max-pool would read the padding (which, after a BatchNorm, is no longer zero)
where, on the image alone, it reads the layer's own zero padding. Zeroing the input of every convolution and
max-pool outside each image's own region makes each image's feature cells those of the image alone, up to the
floating-point order of the sums: the zeros are exactly what the layer's padding supplies (max-pools follow a
ReLU in these networks, so a zero is neutral to the max as well).

Each image's region is tracked through the network with the layers' own size arithmetic, keyed by the spatial
shape of the feature map (every layer of a stage sees the same shape, each downsampling gives a new one), so
residual branches and strided shortcuts need no special case. A batch without padding is left alone, and so
are 1 x 1 convolutions (they read no neighbour; most layers of a ResNet or MobileNet bottleneck), so the
extra work is one multiplication per 3 x 3 (or larger) layer, on padded batches only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

Shape = tuple[int, int]


def region_mask(region: torch.Tensor, shape: Shape) -> torch.Tensor:
    """B x 1 x H x W bool mask of the top-left ``region`` (B x 2: rows, columns) of each image."""
    rows = torch.arange(shape[0], device=region.device).view(1, -1, 1)
    cols = torch.arange(shape[1], device=region.device).view(1, 1, -1)
    return ((rows < region[:, 0].view(-1, 1, 1)) & (cols < region[:, 1].view(-1, 1, 1))).unsqueeze(1)


def output_region(layer: nn.Module, region: torch.Tensor) -> torch.Tensor:
    """The region (B x 2) a convolution or max-pool makes of an input region: its output size for an input of
    exactly that size (PyTorch's formula, ceil mode included)."""
    if isinstance(layer, nn.Conv2d) and isinstance(layer.padding, str):
        if layer.padding == "same":
            return region
        padding = (0, 0)
    else:
        padding = _pair(layer.padding)
    kernel, stride, dilation = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size), _pair(layer.dilation)
    ceil_mode = bool(getattr(layer, "ceil_mode", False))
    out = []
    for axis in range(2):
        n = region[:, axis]
        span = n + 2 * padding[axis] - dilation[axis] * (kernel[axis] - 1) - 1
        if ceil_mode:
            size = -torch.div(-span, stride[axis], rounding_mode="floor") + 1
            # PyTorch: the last window must start inside the input or its left padding
            size = size - ((size - 1) * stride[axis] >= n + padding[axis]).long()
        else:
            size = torch.div(span, stride[axis], rounding_mode="floor") + 1
        out.append(size.clamp(min=0))
    return torch.stack(out, dim=1)


def reads_neighbours(layer: nn.Module) -> bool:
    """Whether a layer's output cell can read input cells beyond the region that maps to it: not a 1 x 1
    convolution without padding (at any stride it reads only its own cell), which therefore needs no mask."""
    if isinstance(layer, nn.Conv2d) and not isinstance(layer.padding, str):
        return _pair(layer.kernel_size) != (1, 1) or _pair(layer.padding) != (0, 0)
    return True


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


@contextlib.contextmanager
def valid_regions(network: nn.Module, sizes: torch.Tensor, shape: Shape) -> Iterator[dict[Shape, torch.Tensor]]:
    """While inside, every ``nn.Conv2d`` and ``nn.MaxPool2d`` of ``network`` sees zeros outside each image's own
    region. ``sizes`` (B x 2) are the images' own sizes in a padded input of spatial ``shape``. Yields the map
    ``feature-map shape -> B x 2 regions`` (on the CPU), filled as the network runs (the caller reads its
    output's there).

    Sizes on the CPU keep the host from waiting for the GPU: the regions are computed there and only the band
    of each feature map that holds padding (below the shortest image, right of the narrowest) is zeroed, in
    place (under ``torch.no_grad``; with gradients, a masked copy). The zeros change nothing but padding, which
    no valid cell reads once every layer that reads neighbours has its input masked.
    """
    regions: dict[Shape, torch.Tensor] = {(int(shape[0]), int(shape[1])): sizes.detach().to("cpu", torch.long)}
    bands: dict[tuple[Shape, torch.device], tuple[int, int, torch.Tensor] | None] = {}

    def band_for(x: torch.Tensor) -> tuple[int, int, torch.Tensor] | None:
        key = ((int(x.shape[-2]), int(x.shape[-1])), x.device)
        if key not in bands:
            region = regions.get(key[0])
            rows, cols = key[0]
            top = None if region is None else (min(int(region[:, 0].min()), rows), min(int(region[:, 1].min()), cols))
            if top is None or top == (rows, cols):
                bands[key] = None
            else:
                bands[key] = (*top, ~region_mask(to_device(region, x.device), key[0]))
        return bands[key]

    def before(layer: nn.Module, args: tuple) -> tuple | None:
        x = args[0]
        band = band_for(x)
        if band is None:
            return None
        top, left, outside = band
        if torch.is_grad_enabled() and x.requires_grad:
            return (x.masked_fill(outside, 0), *args[1:])
        x[..., top:, :].masked_fill_(outside[..., top:, :], 0)
        x[..., :top, left:].masked_fill_(outside[..., :top, left:], 0)
        return None

    def after(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        region = regions.get((int(args[0].shape[-2]), int(args[0].shape[-1])))
        key = (int(output.shape[-2]), int(output.shape[-1]))
        if region is not None and key not in regions:
            regions[key] = output_region(layer, region)

    layers = [m for m in network.modules() if isinstance(m, nn.Conv2d | nn.MaxPool2d)]
    handles = [m.register_forward_pre_hook(before) for m in layers if reads_neighbours(m)]
    handles += [m.register_forward_hook(after) for m in layers]
    try:
        yield regions
    finally:
        for handle in handles:
            handle.remove()


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without making the host wait for the GPU (pinned, asynchronous copy)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)
