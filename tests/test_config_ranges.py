"""Config values of the right type but out of range (issue 21 item 6): refused by rules of kind and parameter name."""

from __future__ import annotations

import pytest

from oxford_ir.config import check_node
from oxford_ir.errors import ConfigError

ADAM = {"_target_": "torch.optim.Adam", "_partial_": True}
STEP = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 2}
EMBEDDER = {"_target_": "oxford_ir.models.embedder.Embedder", "backbone": {"_target_": "torch.nn.Identity"}}


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({**ADAM, "lr": 1e300}, "optimizer.lr=1e+300: expected a learning rate of at most 10"),
        ({**ADAM, "lr": float("inf")}, "optimizer.lr=inf: expected a finite number"),
        ({**ADAM, "lr": float("nan")}, "optimizer.lr=nan: expected a finite number"),
        ({**ADAM, "eps": -float("inf")}, "optimizer.eps=-inf: expected a finite number"),
        ({**ADAM, "betas": [0.9, float("inf")]}, "optimizer.betas=[0.9, inf]: expected a finite number"),
        ({**ADAM, "weight_decay": 1e39}, "optimizer.weight_decay=1e+39: expected a number within float32's range"),
        ({**EMBEDDER, "projection_dim": -4}, "optimizer.projection_dim=-4: expected a size of at least 1"),
    ],
)
def test_out_of_range_values_name_the_key_the_value_and_what_it_takes(node, message):
    with pytest.raises(ConfigError) as error:
        check_node(node, "optimizer")
    assert str(error.value).startswith(message)
    assert "'s " in str(error.value)  # and whose parameter it is


@pytest.mark.parametrize("node", [{**ADAM, "lr": 10.0, "eps": 1e-300}, {**STEP}, {**EMBEDDER}])
def test_values_in_range_pass(node):
    check_node(node, "optimizer")


@pytest.mark.parametrize("value", [float("inf"), 1e300, float("nan"), 0.0, -1e-3])
def test_the_backbone_learning_rate_follows_the_same_rule(value):
    """``model.backbone_lr`` is a module argument, not a ``_target_`` parameter: checked with the module's values."""
    from oxford_ir.models.settings import check_values

    with pytest.raises(ConfigError, match=r"model\.backbone_lr=.*at most 10"):
        check_values([1.0], [1], value, 0)
    check_values([1.0], [1], 1e-4, 0)


def test_a_value_left_missing_is_one_line_naming_the_key():
    """``oxford-ir-train data=base`` composes a data node whose benchmark is ``???``: an omegaconf traceback before."""
    from omegaconf import OmegaConf

    from oxford_ir.config import instantiate

    node = OmegaConf.create({"data": {"_target_": "oxford_ir.data.datamodule.RetrievalDataModule", "benchmark": "???"}})
    with pytest.raises(ConfigError, match=r"^data\.benchmark has no value .* data\.benchmark=<value>"):
        instantiate(node.data, "data")
