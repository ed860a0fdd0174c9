"""The embedding network: unit-norm outputs, projection, shared (Siamese) weights, Hydra configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.nn import functional as F

from oxford_ir.errors import ConfigError
from oxford_ir.models.backbones import Backbone, MobileNetV2, RawPixels, ResNet50, ScratchCNN
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.pooling import MAC, AvgPooling, FlattenPooling, GeM, valid_cell_mask

CONF = Path(__file__).resolve().parents[2] / "conf"


def _tiny(projection_dim: int | None = None, whitening: bool = False) -> Embedder:
    return Embedder(ScratchCNN(channels=(4, 8)), GeM(), projection_dim=projection_dim, whitening=whitening)


def test_embeddings_are_unit_norm_rows() -> None:
    model = _tiny().eval()
    out = model(torch.randn(5, 3, 20, 28))
    assert out.shape == (5, 8) and model.embedding_dim == 8
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))


def test_embedder_is_backbone_then_pooling_then_l2() -> None:
    model = Embedder(ScratchCNN(channels=(4, 8)), MAC()).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), F.normalize(model.backbone(x).amax(dim=(2, 3)), dim=1))


def test_projection_is_linear_between_two_normalisations() -> None:
    model = _tiny(projection_dim=5).eval()
    assert model.embedding_dim == 5 and model.projection.bias is not None
    x = torch.randn(3, 3, 16, 16)
    pooled = model.pooling(model.backbone(x))
    expected = F.normalize(model.projection(F.normalize(pooled, dim=1)), dim=1)
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model(x).norm(dim=1), torch.ones(3))
    assert _tiny(whitening=True).embedding_dim == 8


def test_power_follows_the_pooling_unless_projected() -> None:
    assert _tiny().power == 3.0
    assert _tiny(projection_dim=4).power == 1.0
    assert Embedder(ScratchCNN(channels=(4,)), AvgPooling()).power == 1.0


def test_raw_pixels_with_flatten_is_the_normalised_pixel_vector() -> None:
    model = Embedder(RawPixels(grid=16), FlattenPooling())
    assert model.embedding_dim == 16 * 16 * 3
    small = Embedder(RawPixels(grid=2), FlattenPooling())
    x = torch.randn(2, 3, 4, 6)
    cells = x.reshape(2, 3, 2, 2, 2, 3).mean(dim=(3, 5)).reshape(2, 12)
    torch.testing.assert_close(small(x), cells / cells.norm(dim=1, keepdim=True))
    assert model(torch.randn(1, 3, 50, 70)).shape == (1, 768)


def test_flatten_after_a_convolutional_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="backbone=raw_pixels"):
        Embedder(ScratchCNN(channels=(4,)), FlattenPooling())


def test_bad_projection_dim() -> None:
    with pytest.raises(ConfigError, match="projection_dim=0"):
        _tiny(projection_dim=0)


def test_siamese_branches_share_one_set_of_weights() -> None:
    """Anchor, positive and negative go through the same module: its gradient is the sum over branches."""
    torch.manual_seed(0)
    model = _tiny(projection_dim=6).eval()
    n_params = len(list(model.parameters()))
    xa, xp, xn = (torch.randn(2, 3, 16, 16) for _ in range(3))

    def loss_fn(a, p, n):
        return F.relu((a - p).pow(2).sum(1) - (a - n).pow(2).sum(1) + 0.5).sum() + (a * p).sum()

    loss_fn(model(xa), model(xp), model(xn)).backward()
    shared = [p.grad.clone() for p in model.parameters()]
    assert len(list(model.parameters())) == n_params  # embedding three inputs adds no weights

    # the same gradient computed branch by branch, the other two branches through a frozen copy
    frozen = copy.deepcopy(model).requires_grad_(False)
    total = [torch.zeros_like(g) for g in shared]
    for branch in range(3):
        model.zero_grad()
        outs = [(model if i == branch else frozen)(x) for i, x in enumerate((xa, xp, xn))]
        loss_fn(*outs).backward()
        total = [t + p.grad for t, p in zip(total, model.parameters(), strict=True)]
    for got, expected in zip(shared, total, strict=True):
        torch.testing.assert_close(got, expected)
    assert any(g.abs().sum() > 0 for g in shared)


# -- Hydra configs -----------------------------------------------------------------------------------
def _compose(backbone: str, pooling: str, **backbone_overrides) -> Embedder:
    cfg = OmegaConf.create(
        {
            "backbone": OmegaConf.load(CONF / "backbone" / f"{backbone}.yaml"),
            "pooling": OmegaConf.load(CONF / "pooling" / f"{pooling}.yaml"),
            "embedder": OmegaConf.load(CONF / "embedder" / "default.yaml"),
        }
    )
    for key, value in backbone_overrides.items():
        cfg.backbone[key] = value
    return instantiate(cfg.embedder)


@pytest.mark.parametrize(
    ("backbone", "pooling", "cls", "pool_cls", "dim", "overrides"),
    [
        ("scratch", "gem", ScratchCNN, GeM, 256, {}),
        ("mobilenetv2", "mac", MobileNetV2, MAC, 1280, {"weights": "none"}),
        ("resnet50", "avg", ResNet50, AvgPooling, 2048, {"weights": "none"}),
        ("raw_pixels", "flatten", RawPixels, FlattenPooling, 768, {}),
    ],
)
def test_configs_instantiate(backbone, pooling, cls, pool_cls, dim, overrides) -> None:
    model = _compose(backbone, pooling, **overrides)
    assert isinstance(model, Embedder) and isinstance(model.backbone, cls) and isinstance(model.pooling, pool_cls)
    assert model.embedding_dim == dim and model.projection is None


def test_mobilenet_config_defaults_to_imagenet_weights() -> None:
    assert OmegaConf.load(CONF / "backbone" / "mobilenetv2.yaml").weights == "imagenet"
    assert OmegaConf.load(CONF / "pooling" / "gem.yaml").p == 3.0


def test_square_whitening_starts_as_the_identity():
    backbone = ScratchCNN(channels=(4, 8))
    plain = Embedder(backbone, GeM())
    whitened = Embedder(backbone, GeM(), whitening=True)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(whitened(x), plain(x))
    assert not torch.equal(Embedder(backbone, GeM(), projection_dim=4).projection.weight[:, :4], torch.eye(4))


# -- padded images: the embedding of each image's own region ----------------------------------------------------
class _Patches(Backbone):
    """Strided patches without spatial mixing across them: 8 x 8 average, then 1 x 1 convolutions. Padding cannot
    reach a cell of an image whose sides are multiples of the stride."""

    out_channels = 6
    stride = 8

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(F.avg_pool2d(x, 8, ceil_mode=True))


@pytest.mark.parametrize("pooling", [GeM(), MAC(), AvgPooling()], ids=["gem", "mac", "avg"])
def test_padded_images_embed_as_unpadded_where_the_padding_cannot_reach(pooling: torch.nn.Module) -> None:
    torch.manual_seed(0)
    model = Embedder(_Patches(), pooling, whitening=True).eval()
    own = [(16, 24), (40, 8), (32, 40)]
    images = [torch.randn(1, 3, h, w) for h, w in own]
    padded = torch.randn(3, 3, 40, 40) * 10  # the padding holds anything
    for i, (h, w) in enumerate(own):
        padded[i, :, :h, :w] = images[i][0]
    with torch.no_grad():
        out = model(padded, torch.tensor(own))
        for i, image in enumerate(images):
            torch.testing.assert_close(out[i : i + 1], model(image))


@pytest.mark.parametrize(
    "backbone",
    [lambda: ScratchCNN(channels=(8, 16, 32)), lambda: MobileNetV2(weights=None), lambda: ResNet50(weights=None)],
    ids=["scratch", "mobilenetv2", "resnet50"],
)
def test_padded_images_through_a_cnn_equal_each_image_alone(backbone) -> None:
    """3 x 3 convolutions, strided convolutions, max-pools and BatchNorm (which turns zero padding into non-zero
    values) near the edges: with each layer's input masked, each image embeds as alone, whatever the padding."""
    torch.manual_seed(0)
    model = Embedder(backbone(), GeM()).eval()
    with torch.no_grad():
        for module in model.modules():  # BatchNorm statistics that move zeros away from zero
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    own = [(50, 60), (37, 45), (64, 41), (1, 1)]
    images = [torch.randn(1, 3, h, w) for h, w in own]
    padded = torch.randn(len(own), 3, 64, 64) * 5
    for i, (h, w) in enumerate(own):
        padded[i, :, :h, :w] = images[i][0]
    with torch.no_grad():
        out = model(padded, torch.tensor(own))
        alone = torch.cat([model(image) for image in images])
        features = model.backbone(padded)
        cells = valid_cell_mask(torch.tensor(own), tuple(features.shape[-2:]), model.backbone.stride)
        pooled_only = model.pooling(features, cells)
    torch.testing.assert_close(out, alone, rtol=0, atol=1e-6)
    # masking the pooling alone is not enough: the edge cells see the padding through the convolutions
    error_pooling_only = (F.normalize(pooled_only, dim=1) - alone)[:3].abs().max()
    assert error_pooling_only > 100 * (out - alone).abs().max()


def test_raw_pixels_of_a_padded_image_are_exact_and_every_embedder_says_if_it_pads() -> None:
    model = Embedder(RawPixels(grid=4), FlattenPooling())
    image = torch.randn(1, 3, 20, 30)
    padded = torch.full((1, 3, 32, 32), 7.0)
    padded[..., :20, :30] = image
    torch.testing.assert_close(model(padded, torch.tensor([[20, 30]])), model(image))
    assert model.supports_padding and _tiny().supports_padding
