"""backbone=timm: CNNs against torchvision and against each image alone, ViTs against a hand computation.

Random initialisation throughout (no download): tiny timm models at 32-64 px.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from PIL import Image
from torch.nn import functional as F

from oxford_ir.cli.train import train
from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oxford_ir.errors import CheckpointError, ConfigError
from oxford_ir.extraction.embedding import plan_for_model
from oxford_ir.models.backbones import ResNet50
from oxford_ir.models.checkpoint import load_retrieval_checkpoint
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.pooling import AvgPooling, GeM
from oxford_ir.models.timm_backbone import TimmBackbone
from tests.test_train import TINY, compose_train

pytest.importorskip("timm")


def _random_batchnorm_statistics(model: torch.nn.Module, seed: int = 0) -> None:
    """Running statistics other than 0 / 1, so that equal outputs need equal BatchNorm buffers too."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _images(*sizes: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, h, w, generator=generator) for h, w in sizes]


def _padded(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = max(x.shape[-2] for x in images), max(x.shape[-1] for x in images)
    batch = torch.cat([F.pad(x, (0, cols - x.shape[-1], 0, rows - x.shape[-2])) for x in images])
    return batch, torch.tensor([[x.shape[-2], x.shape[-1]] for x in images])


# -- CNNs ------------------------------------------------------------------------------------------
def test_timm_resnet50_from_a_torchvision_file_embeds_as_torchvision_resnet50(tmp_path):
    """The same weights (a torchvision ResNet-50 state dict, read as backbone.weights=<file>) give the same
    embeddings through timm's ResNet-50 as through torchvision's; a file of another model is refused naming it."""
    torch.manual_seed(0)
    torchvision_backbone = ResNet50(weights="none")
    _random_batchnorm_statistics(torchvision_backbone)
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_backbone.state_dict(), path)
    timm_backbone = TimmBackbone(name="resnet50", weights=str(path))
    assert not timm_backbone.renormalises  # timm's resnet50 is ImageNet-normalised like the pipeline
    images = torch.cat(_images((64, 64), (64, 64)))
    reference = Embedder(torchvision_backbone, GeM()).eval()(images)
    torch.testing.assert_close(Embedder(timm_backbone, GeM()).eval()(images), reference, atol=1e-5, rtol=0)

    problem = r"these are not weights of timm test_resnet: \d+ with another shape \(bn1\.weight"
    with pytest.raises(CheckpointError, match=r"resnet50\.pth: " + problem):
        TimmBackbone(name="test_resnet", weights=str(path))
    with pytest.raises(ConfigError, match="no such file"):
        TimmBackbone(name="resnet18", weights=str(tmp_path / "absent.pth"))


@pytest.mark.parametrize(
    "name", ["test_convnext", *(pytest.param(name, marks=pytest.mark.slow) for name in ("resnet18", "convnext_atto"))]
)
def test_bucket_batches_of_a_timm_cnn_embed_each_image_as_alone(name):
    """Padded to one shape, each image is pooled over its own cells exactly as it is alone."""
    images = _images((45, 61), (64, 37), (33, 50))
    batch, sizes = _padded(images)
    torch.manual_seed(0)
    model = Embedder(TimmBackbone(name=name, weights="none"), GeM()).eval()
    assert model.supports_padding and model.padding_note is None
    alone = torch.cat([model(x) for x in images])
    torch.testing.assert_close(model(batch, sizes), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["test_resnet", "regnety_002"])
def test_a_timm_cnn_that_reads_the_padding_gets_shape_batches_and_a_note(name):
    """test_resnet's average-pooled shortcuts (as in resnet10t and the ResNet-D family) and regnety_002's
    squeeze-excitation read the padding. The probe says so from the start, although at timm's initialisation
    regnety's zeroed residual branches hide it: they wake up here as in training, and the padding shows."""
    images = _images((45, 61), (64, 37), (33, 50))
    batch, sizes = _padded(images)
    model = Embedder(TimmBackbone(name=name, weights="none"), GeM()).eval()
    assert not model.supports_padding
    with torch.no_grad():
        if name == "regnety_002":  # hidden at initialisation
            torch.testing.assert_close(model(batch, sizes), torch.cat([model(x) for x in images]), atol=1e-5, rtol=0)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
        alone = torch.cat([model(x) for x in images])
        assert (model(batch, sizes) - alone).abs().max() > 1e-3
    photos = [Image.new("RGB", (61, 45)), Image.new("RGB", (37, 64))]
    plan = plan_for_model(model, photos, None, 4, batching="bucket")
    assert plan.mode == "shape" and f"timm:{name}: a padded image's features differ" in plan.note


def test_unknown_names_bad_options_and_partial_weights_are_one_clear_error(tmp_path):
    resnet = TimmBackbone(name="resnet10t", weights="none")
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in resnet.model.state_dict().items() if not k.startswith("layer4.")}, partial)
    with pytest.raises(CheckpointError, match=r"partial\.pth: these are not weights of timm resnet10t: \d+ missing"):
        TimmBackbone(name="resnet10t", weights=str(partial))
    with pytest.raises(ConfigError, match="timm has no such model; close matches: resnet50"):
        TimmBackbone(name="resnet5O", weights="none")
    with pytest.raises(ConfigError, match="no weights tagged 'nope' for resnet18; it has resnet18.a1_in1k"):
        TimmBackbone(name="resnet18.nope", weights="none")
    with pytest.raises(ConfigError, match="img_size=64 is for ViTs"):
        TimmBackbone(name="resnet10t", weights="none", img_size=64)
    with pytest.raises(ConfigError, match="frozen_stages=9: TimmBackbone has 5 stages"):
        TimmBackbone(name="resnet10t", weights="none", frozen_stages=9)
    with pytest.raises(ConfigError, match="model_args: timm's resnet10t refuses them"):
        TimmBackbone(name="resnet10t", weights="none", model_args={"no_such_argument": 1})
    with pytest.raises(ConfigError, match="model_args sets checkpoint_path, pretrained_cfg, which backbone=timm"):
        TimmBackbone(name="resnet10t", weights="none", model_args={"pretrained_cfg": {}, "checkpoint_path": "x.pth"})


# -- ViTs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone(
        name="vit_tiny_patch16_224", weights="none", img_size=32, frozen_stages=1, model_args={"depth": 2}
    ).eval()


def _vit_by_hand(backbone: TimmBackbone, x: torch.Tensor) -> torch.Tensor:
    """Output tokens of an ImageNet-normalised image, step by step: the model's normalisation (0.5 / 0.5), zeros
    to a multiple of 16, the 2 x 2 position grid of img_size=32 resized bicubically to the image's grid."""
    model = backbone.model
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = ((x * std + mean) - 0.5) / 0.5
    rows, cols = math.ceil(x.shape[-2] / 16), math.ceil(x.shape[-1] / 16)
    x = F.pad(x, (0, cols * 16 - x.shape[-1], 0, rows * 16 - x.shape[-2]))
    patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    grid = model.pos_embed[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=True, align_corners=False)
    tokens = torch.cat([model.cls_token + model.pos_embed[:, :1], patches + grid.flatten(2).transpose(1, 2)], 1)
    return model.norm(model.blocks(model.norm_pre(tokens)))


@torch.no_grad()
def test_vit_interpolates_position_embeddings_pads_to_the_patch_and_pools_cls_or_patches(vit):
    gem = Embedder(vit, GeM(p=3.0)).eval()
    for x in _images((40, 56), (70, 33)):
        tokens = _vit_by_hand(vit, x)
        rows, cols = math.ceil(x.shape[-2] / 16), math.ceil(x.shape[-1] / 16)
        assert vit(x).shape == (1, 192, rows, cols)
        patches = tokens[:, 1:].clamp(min=1e-6)
        torch.testing.assert_close(gem(x), F.normalize(patches.pow(3).mean(1).pow(1 / 3)), atol=1e-5, rtol=0)
        vit.pool_tokens = "cls"
        try:
            cls = Embedder(vit, AvgPooling()).eval()(x)
        finally:
            vit.pool_tokens = "patches"
        torch.testing.assert_close(cls, F.normalize(tokens[:, 0]), atol=1e-5, rtol=0)
        assert (cls - gem(x)).abs().max() > 0.1


def test_vit_options_stages_and_bucket_fallback(vit):
    frozen = {name for name, p in vit.model.named_parameters() if not p.requires_grad}
    assert frozen == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert vit.stage_names[:2] == ["cls_token+pos_embed+patch_embed", "blocks.0"]
    plan = plan_for_model(Embedder(vit, GeM()), [Image.new("RGB", (61, 45))], None, 4, batching="bucket")
    assert plan.mode == "shape" and "timm:vit_tiny_patch16_224 is a Vision Transformer" in plan.note
    vit.pool_tokens = "cls"
    try:
        with pytest.raises(ConfigError, match="pool_tokens=cls: the CLS token is the embedding.*pooling=avg"):
            Embedder(vit, GeM())
    finally:
        vit.pool_tokens = "patches"
    with pytest.raises(ConfigError, match="pool_tokens='mean': choose cls"):
        TimmBackbone(name="vit_tiny_patch16_224", weights="none", pool_tokens="mean", model_args={"depth": 1})


# -- training end to end, and checkpoints of another backbone ----------------------------------------
def test_train_with_a_timm_backbone_and_refuse_its_checkpoint_for_another(tmp_path):
    cfg = compose_train(
        tmp_path, *TINY, "backbone=timm", "backbone.name=test_resnet", "backbone.weights=none",
        "debug=fast_dev_run", "logger=none", "callbacks=none",
    )  # fmt: skip
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1 and math.isfinite(float(metrics["train/loss"]))
    module = objects["model"]
    assert isinstance(module.embedder.backbone, TimmBackbone)

    path = tmp_path / "timm.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    loaded = load_retrieval_checkpoint(path).embedder
    assert isinstance(loaded.backbone, TimmBackbone) and loaded.backbone.renormalises  # test_resnet: mean 0.5
    image = _images((40, 50))[0]
    torch.testing.assert_close(loaded(image), module.embedder.eval()(image))
    with open_dict(cfg):  # the same run with a scratch CNN
        cfg.model.embedder.backbone = {"_target_": "oxford_ir.models.backbones.ScratchCNN", "channels": [8, 16]}
    refusal = "trained with backbone timm:test_resnet, but the config builds scratchcnn"
    with pytest.raises(CheckpointError, match=refusal):
        load_retrieval_checkpoint(path, expected=instantiate(cfg.model, _recursive_=False))


def test_an_index_manifest_rebuilds_a_timm_vit_with_its_normalisation():
    """What oxford-ir-search does with an index's model spec: the trusted-target check passes, and every build
    embeds alike (the same seed, the same re-normalisation from the model's pretrained config)."""
    from oxford_ir.retrieval.model_spec import ModelSpec

    embedder = {
        "_target_": "oxford_ir.models.embedder.Embedder",
        "backbone": {"_target_": "oxford_ir.models.timm_backbone.TimmBackbone", "name": "test_vit", "weights": "none",
                     "pool_tokens": "cls"},
        "pooling": {"_target_": "oxford_ir.models.pooling.AvgPooling"},
    }  # fmt: skip
    spec = ModelSpec.from_dict({"checkpoint": None, "embedder": embedder}, source="manifest.json")
    first, second = spec.build(), spec.build()
    assert first.backbone.renormalises and first.backbone.mean == (0.5, 0.5, 0.5)
    images = torch.cat(_images((48, 48), (48, 48)))
    torch.testing.assert_close(first(images), second(images), atol=0, rtol=0)
    assert "TimmBackbone(name=test_vit" in spec.describe()
