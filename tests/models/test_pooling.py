"""Pooling layers against closed-form values and brute-force torch reductions."""

from __future__ import annotations

import math

import pytest
import torch

from oxford_ir.errors import ConfigError
from oxford_ir.models.pooling import MAC, AvgPooling, FlattenPooling, GeM, valid_cell_mask


def test_gem_of_a_constant_map_is_the_constant() -> None:
    x = torch.full((2, 3, 5, 7), 0.37)
    torch.testing.assert_close(GeM()(x), torch.full((2, 3), 0.37))


def test_gem_hand_computed_values() -> None:
    # channel 0: (1^3 + 2^3 + 3^3 + 4^3) / 4 = 25 -> 25^(1/3); channel 1: zeros and negatives clamp to eps
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, -1.0], [2.0, 0.0]]]], dtype=torch.float64)
    gem = GeM(p=3.0).double()
    expected = torch.tensor([[25.0 ** (1 / 3), ((8.0 + 3 * 1e-18) / 4) ** (1 / 3)]], dtype=torch.float64)
    torch.testing.assert_close(gem(x), expected)
    assert gem(x).shape == (1, 2)


def test_gem_with_p_1_is_average_pooling_and_large_p_approaches_max() -> None:
    x = torch.rand(2, 4, 6, 5, dtype=torch.float64) + 0.1
    torch.testing.assert_close(GeM(p=1.0).double()(x), x.mean(dim=(2, 3)))
    big = GeM(p=200.0).double()(x)
    top = x.amax(dim=(2, 3))
    assert torch.all(big <= top + 1e-12)
    # the generalised mean of 30 values is at least max * 30^(-1/p) (all but the max could be ~0)
    assert torch.all(big >= top * 30 ** (-1 / 200.0))
    assert torch.allclose(big, top, rtol=0.02)


def test_gem_p_is_a_learned_parameter_with_the_analytic_gradient() -> None:
    gem = GeM(p=2.5).double()
    assert any(param is gem.p for param in gem.parameters())
    x = torch.rand(1, 1, 3, 3, dtype=torch.float64) + 0.2
    gem(x).sum().backward()
    assert gem.p.grad is not None
    # d/dp (m_p)^(1/p) with m_p = mean(x^p): f * (mean(x^p ln x) / (p m_p) - ln(m_p) / p^2)
    p, values = 2.5, x.flatten()
    m = values.pow(p).mean()
    f = m ** (1 / p)
    expected = f * ((values.pow(p) * values.log()).mean() / (p * m) - m.log() / p**2)
    torch.testing.assert_close(gem.p.grad, expected.reshape(1))


def test_gem_can_be_fixed() -> None:
    assert not GeM(p=3.0, learnable=False).p.requires_grad


def test_power_of_each_pooling() -> None:
    gem = GeM(p=3.0)
    assert gem.power == 3.0
    with torch.no_grad():
        gem.p.fill_(2.25)
    assert gem.power == 2.25
    assert MAC().power == AvgPooling().power == FlattenPooling().power == 1.0


@pytest.mark.parametrize("p", [0.0, -1.0])
def test_gem_rejects_a_non_positive_exponent(p: float) -> None:
    with pytest.raises(ConfigError, match="pooling.p"):
        GeM(p=p)


def test_mac_and_average_match_torch_reductions() -> None:
    x = torch.randn(3, 5, 4, 6)
    torch.testing.assert_close(MAC()(x), torch.amax(x, dim=(2, 3)))
    torch.testing.assert_close(AvgPooling()(x), torch.mean(x, dim=(2, 3)))


def test_flatten_keeps_every_value_channel_major() -> None:
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    out = FlattenPooling()(x)
    assert out.shape == (2, 12)
    torch.testing.assert_close(out[1], torch.arange(12, 24, dtype=torch.float32))


def test_output_dims() -> None:
    for pooling in (GeM(), MAC(), AvgPooling()):
        assert pooling.output_dim(256) == 256
    assert FlattenPooling().output_dim(3, (4, 5)) == 60
    with pytest.raises(ConfigError, match="fixed output size"):
        FlattenPooling().output_dim(256, None)


def test_gem_is_finite_on_zero_maps_and_differentiable_there() -> None:
    x = torch.zeros(1, 2, 3, 3, requires_grad=True)
    gem = GeM()
    out = gem(x)
    out.sum().backward()
    torch.testing.assert_close(out, torch.full((1, 2), 1e-6))
    assert torch.isfinite(gem.p.grad).all() and torch.isfinite(x.grad).all()
    assert math.isfinite(gem.power)


# -- masked pooling: padded images pooled over their own cells ------------------------------------------------
@pytest.mark.parametrize("pooling", [GeM(p=3.0), MAC(), AvgPooling()], ids=["gem", "mac", "avg"])
def test_masked_pooling_of_a_padded_map_equals_pooling_of_the_unpadded_map(pooling: torch.nn.Module) -> None:
    """Whatever the padding holds (here: large values that would dominate a max or a mean), it is left out."""
    torch.manual_seed(0)
    own = [(3, 5), (6, 2), (6, 7)]
    padded = torch.rand(len(own), 4, 6, 7, dtype=torch.float64) * 50.0 + 100.0
    crops = []
    for i, (h, w) in enumerate(own):
        crop = torch.rand(1, 4, h, w, dtype=torch.float64) + 0.05
        padded[i, :, :h, :w] = crop[0]
        crops.append(crop)
    mask = valid_cell_mask(torch.tensor(own), (6, 7), stride=1)
    pooling = pooling.double()
    out = pooling(padded, mask)
    for i, crop in enumerate(crops):
        torch.testing.assert_close(out[i : i + 1], pooling(crop))


def test_valid_cell_mask_by_hand() -> None:
    # stride 32: 33 pixels reach 2 cells, 32 pixels 1, 64 pixels 2
    mask = valid_cell_mask(torch.tensor([[33, 32], [64, 64]]), (3, 3), stride=32)
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [True, False, False], [False, False, False]]
    assert mask[1, 0].sum() == 4 and bool(mask[1, 0, :2, :2].all())


def test_flatten_refuses_a_mask_with_padding() -> None:
    x = torch.rand(1, 2, 2, 2)
    torch.testing.assert_close(FlattenPooling()(x, torch.ones(1, 1, 2, 2, dtype=torch.bool)), x.flatten(1))
    with pytest.raises(ValueError, match="flatten"):
        FlattenPooling()(x, valid_cell_mask(torch.tensor([[1, 2]]), (2, 2), stride=1))
