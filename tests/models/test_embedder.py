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
from oxford_ir.models.backbones import MobileNetV2, RawPixels, ResNet50, ScratchCNN
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.pooling import MAC, AvgPooling, FlattenPooling, GeM

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
