"""A training batch of whole images of different shapes embeds each image as alone, with the gradients of the
images alone: on one padded canvas when the network allows it (BatchNorm frozen), else one pass per shape."""

from __future__ import annotations

import pytest
import torch

from oxford_ir.models.backbones import ScratchCNN
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.image_lists import can_pad, embed_image_list
from oxford_ir.models.pooling import GeM
from oxford_ir.models.timm_backbone import TimmBackbone

#: (height, width): two images share a shape, the others are portrait or landscape of other sizes
SHAPES = [(24, 18), (18, 24), (24, 18), (20, 20), (24, 13), (9, 24)]


def images(seed: int = 0, scale: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h * scale, w * scale, generator=generator) for h, w in SHAPES]


def frozen(embedder: Embedder) -> Embedder:
    """Training mode, BatchNorm in eval mode (``model.freeze_batchnorm``)."""
    embedder.train()
    for layer in embedder.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.eval()
    return embedder


def forward(embedder: Embedder):
    return lambda batch, sizes=None: embedder(batch) if sizes is None else embedder(batch, sizes)


@pytest.mark.parametrize("backbone", ["scratch", "timm_test_convnext"])
@pytest.mark.parametrize("pad", [True, False])
def test_each_image_embeds_and_trains_as_alone(backbone: str, pad: bool) -> None:
    torch.manual_seed(0)
    inner = (
        ScratchCNN(channels=[8, 16]) if backbone == "scratch" else TimmBackbone(name="test_convnext", weights="none")
    )
    embedder = frozen(Embedder(inner, GeM(p=3.0)))
    assert can_pad(embedder)
    batch = images(scale=1 if backbone == "scratch" else 4)  # ConvNeXt: a stride of 32
    found = embed_image_list(embedder, batch, forward(embedder), pad=pad)
    weights = torch.randn(found.shape, generator=torch.Generator().manual_seed(1))
    (found * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in embedder.named_parameters() if p.grad is not None}
    embedder.zero_grad()
    alone = torch.cat([embedder(image[None]) for image in batch])
    (alone * weights).sum().backward()
    torch.testing.assert_close(found, alone, atol=1e-5, rtol=0)
    assert grads and grads.keys() == {name for name, p in embedder.named_parameters() if p.grad is not None}
    for name, p in embedder.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_batchnorm_in_training_mode_or_a_network_that_reads_the_padding_runs_one_pass_per_shape() -> None:
    torch.manual_seed(0)
    training = Embedder(ScratchCNN(channels=[8, 16]), GeM()).train()
    assert not can_pad(training)  # the padding would enter the batch statistics
    assert can_pad(frozen(training))
    reads_padding = Embedder(TimmBackbone(name="test_resnet", weights="none"), GeM()).eval()
    assert not can_pad(reads_padding)  # its average-pooled shortcuts read the padding
    calls: list[tuple[int, ...]] = []

    def counted(batch, sizes=None):
        calls.append(tuple(batch.shape))
        return training(batch)

    found = embed_image_list(training, images(), counted, pad=False)
    assert found.shape[0] == len(SHAPES) and sorted(calls) == sorted({(SHAPES.count(s), 3, *s) for s in SHAPES})
    calls.clear()
    embed_image_list(frozen(training), images(), counted, pad=True)
    assert calls == [(len(SHAPES), 3, 24, 24)]  # one canvas of the longest side: one input shape
