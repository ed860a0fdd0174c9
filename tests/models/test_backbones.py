"""Backbones: output shapes, weight loading (real ImageNet MobileNetV2 file, bad files), freezing."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from oxford_ir.errors import CheckpointError, ConfigError
from oxford_ir.models.backbones import MobileNetV2, RawPixels, ResNet50, ScratchCNN


def _same_state(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    own = model.state_dict()
    assert set(own) == {prefix + k for k in state}
    for key, value in state.items():
        assert torch.equal(own[prefix + key], value), key


# -- shapes ----------------------------------------------------------------------------------------
def test_scratch_cnn_shape_and_non_negative_output() -> None:
    net = ScratchCNN(channels=(4, 8, 16)).eval()
    out = net(torch.randn(2, 3, 32, 24))
    assert out.shape == (2, 16, 4, 3)
    assert net.out_channels == 16 and net.out_size is None and net.num_stages == 3
    assert out.min() >= 0


def test_scratch_cnn_rejects_empty_channels() -> None:
    with pytest.raises(ConfigError, match="channels"):
        ScratchCNN(channels=())


def test_raw_pixels_is_a_block_average_without_weights() -> None:
    net = RawPixels(grid=2)
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    expected = x.reshape(2, 3, 2, 2, 2, 3).mean(dim=(3, 5))  # 2 x 3 cells of 2 rows x 3 columns each
    torch.testing.assert_close(net(x), expected)
    assert list(net.parameters()) == [] and net.out_channels == 3 and net.out_size == (2, 2)


def test_resnet50_random_init_runs_on_a_small_image() -> None:
    net = ResNet50(weights="none").eval()
    with torch.inference_mode():
        out = net(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 2048, 2, 2) and net.out_channels == 2048
    assert net.stage_names == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_mobilenet_v2_random_init_shape() -> None:
    net = MobileNetV2(weights=None).eval()
    with torch.inference_mode():
        out = net(torch.randn(1, 3, 64, 48))
    assert out.shape == (1, 1280, 2, 2) and net.num_stages == 19


# -- real ImageNet weights ----------------------------------------------------------------------------
@pytest.mark.shared_data
def test_real_mobilenet_weights_load_exactly(mobilenet_weights: Path) -> None:
    state = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    assert not any(k.startswith("classifier.") for k in state)  # features only: nothing to classify with
    net = MobileNetV2(weights=str(mobilenet_weights))
    _same_state(net, state)
    random = MobileNetV2(weights="none")
    assert not torch.equal(random.features[0][0].weight, net.features[0][0].weight)


@pytest.mark.shared_data
def test_features_only_and_full_model_layouts_both_load(mobilenet_weights: Path, tmp_path: Path) -> None:
    state = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    # keys of model.features.state_dict(): no "features." prefix; plus DataParallel's "module."
    bare = {k.removeprefix("features."): v for k, v in state.items()}
    torch.save(bare, tmp_path / "bare.pth")
    _same_state(MobileNetV2(weights=tmp_path / "bare.pth"), state)
    # a whole torchvision model: classifier keys are ignored
    full = {f"module.{k}": v for k, v in state.items()}
    full["classifier.1.weight"], full["classifier.1.bias"] = torch.randn(1000, 1280), torch.randn(1000)
    torch.save({"state_dict": full}, tmp_path / "full.pth")
    _same_state(MobileNetV2(weights=str(tmp_path / "full.pth")), state)


@pytest.mark.shared_data
def test_imagenet_download_path_loads_what_torchvision_returns(
    mobilenet_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    requested = []

    def fake_get_state_dict(self, *args, **kwargs):
        requested.append(self.name)
        return dict(state, **{"classifier.1.weight": torch.zeros(1000, 1280), "classifier.1.bias": torch.zeros(1000)})

    monkeypatch.setattr(torchvision.models.MobileNet_V2_Weights, "get_state_dict", fake_get_state_dict)
    _same_state(MobileNetV2(weights="imagenet"), state)
    assert requested == ["IMAGENET1K_V1"]


@pytest.mark.parametrize(
    ("cls", "enum", "error"),
    [
        (MobileNetV2, torchvision.models.MobileNet_V2_Weights, urllib.error.URLError("[Errno -3] name resolution")),
        (ResNet50, torchvision.models.ResNet50_Weights, OSError("Network is unreachable")),
    ],
)
def test_imagenet_offline_is_a_config_error(cls, enum, error, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(enum, "get_state_dict", offline)
    with pytest.raises(ConfigError, match="could not be downloaded") as info:
        cls(weights="imagenet")
    assert "weights=/path/to/file.pth" in str(info.value) and "weights=none" in str(info.value)


# -- ResNet-50 layouts ----------------------------------------------------------------------------------
def test_resnet50_loads_torchvision_and_cnnimageretrieval_layouts(tmp_path: Path) -> None:
    reference = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_()
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    torch.save(reference.state_dict(), tmp_path / "torchvision.pth")  # with fc.*: ignored
    _same_state(ResNet50(weights=str(tmp_path / "torchvision.pth")), expected)
    # cnnimageretrieval: net.features = nn.Sequential(*list(resnet.children())[:-2]) -> "features.4.0.conv1.weight"
    sequential = nn.Sequential(*list(reference.children())[:-2])
    torch.save({f"features.{k}": v for k, v in sequential.state_dict().items()}, tmp_path / "cirtorch.pth")
    _same_state(ResNet50(weights=str(tmp_path / "cirtorch.pth")), expected)


# -- bad weights ---------------------------------------------------------------------------------------
def test_resnet50_state_dict_fed_to_mobilenet_names_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        MobileNetV2(weights=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "missing (features.0.0.weight" in message and "unexpected (conv1.weight" in message


@pytest.mark.shared_data
def test_a_tensor_of_the_wrong_shape_is_named(mobilenet_weights: Path, tmp_path: Path) -> None:
    state = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    state["features.18.1.weight"] = torch.ones(640)
    path = tmp_path / "narrow.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"features\.18\.1\.weight \(640,\) \(expected \(1280,\)\)") as info:
        MobileNetV2(weights=str(path))
    assert str(path) in str(info.value)


def test_missing_keys_are_refused_not_half_loaded(tmp_path: Path) -> None:
    state = MobileNetV2(weights="none").state_dict()
    del state["features.5.conv.0.0.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 missing \(features\.5\.conv\.0\.0\.weight\)"):
        MobileNetV2(weights=str(path))


def test_missing_weights_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "mobilenet.pth"
    with pytest.raises(ConfigError, match="no such file") as info:
        MobileNetV2(weights=str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_unreadable_weights_file_is_a_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read the weights file") as info:
        ResNet50(weights=str(path))
    assert str(path) in str(info.value)


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(CheckpointError, match="not a state dict") as info:
        MobileNetV2(weights=str(path))
    assert str(path) in str(info.value)


# -- freezing -----------------------------------------------------------------------------------------
def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_frozen_stages_do_not_change_in_an_optimizer_step() -> None:
    torch.manual_seed(0)
    net = ScratchCNN(channels=(4, 6, 8), frozen_stages=2)
    net.train()
    frozen, trainable = net.blocks[:2], net.blocks[2]  # (the slice is a new container, not a frozen module)
    assert all(not m.training for block in frozen for m in block.modules())
    assert all(m.training for m in trainable.modules())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    frozen_stats, trainable_stats = _bn_stats(frozen), _bn_stats(trainable)

    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    net(torch.randn(4, 3, 16, 16)).square().mean().backward()
    optimizer.step()

    after = net.state_dict()
    for key, value in before.items():
        if key.startswith(("blocks.0.", "blocks.1.")):
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["blocks.2.0.weight"], before["blocks.2.0.weight"])
    assert all(torch.equal(a, b) for a, b in zip(_bn_stats(frozen), frozen_stats, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(_bn_stats(trainable), trainable_stats, strict=True))
    assert all(p.grad is None for p in frozen.parameters())


def test_freeze_all_then_unfreeze() -> None:
    net = MobileNetV2(weights="none", freeze=True)
    net.train()
    assert net.frozen_stages == 19
    assert not any(p.requires_grad for p in net.parameters())
    assert not any(m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    net.unfreeze()
    assert net.frozen_stages == 0 and all(p.requires_grad for p in net.parameters())
    assert all(m.training for m in net.modules())
    net.freeze(3)
    assert not any(p.requires_grad for p in net.features[:3].parameters())
    assert all(p.requires_grad for p in net.features[3:].parameters())
    assert not net.features[2].training and net.features[3].training


def test_resnet50_stem_is_the_first_stage() -> None:
    net = ResNet50(weights="none", frozen_stages=1).train()
    assert not net.conv1.weight.requires_grad and not net.bn1.training
    assert all(p.requires_grad for p in net.layer1.parameters()) and net.layer1.training
    net.eval().train()
    assert not net.bn1.training


def test_too_many_frozen_stages_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"frozen_stages=4: ScratchCNN has 3 stages"):
        ScratchCNN(channels=(4, 4, 4), frozen_stages=4)


def test_scratch_cnn_loads_its_own_state_dict_and_has_no_imagenet_weights(tmp_path):
    source = ScratchCNN(channels=(4, 8))
    torch.save(source.state_dict(), tmp_path / "scratch.pth")
    loaded = ScratchCNN(channels=(4, 8), weights=str(tmp_path / "scratch.pth"))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        ScratchCNN(channels=(4, 8), weights="imagenet")
