"""Losses with a learned weight vector per class (``loss=arcface|subcenter_arcface|cosface``): what they need and
what they log.

pytorch-metric-learning's ``ArcFaceLoss``, ``CosFaceLoss``, ``SubCenterArcFaceLoss`` (and ``NormalizedSoftmaxLoss``,
``ProxyAnchorLoss``, ...) hold a parameter ``W`` of ``embedding_size x num_classes`` and score every image against
every class: a classification loss, not a loss over tuples of the batch. So:

- their config leaves ``num_classes`` and ``embedding_size`` null: ``oxford-ir-train`` fills ``num_classes`` with
  the datamodule's number of training labels (:func:`fill_num_classes`) and the module ``embedding_size`` with its
  embedder's ``embedding_dim`` (:func:`build_loss`), so the checkpoint's hyperparameters hold both numbers and
  ``load_from_checkpoint`` rebuilds ``W`` with nothing else; ``W`` is in the state dict and the optimizer (group
  ``loss``, at ``model.loss_lr``);
- they take no miner: there is nothing to mine, and a configured one (the quickstart's) is left out, said once
  (:func:`without_miner`; FastAP's too), so that ``experiment=quickstart loss=arcface`` and sweeps over losses work;
- ``train/num_triplets`` means nothing for them: ``train/class_cosine`` is logged instead, the mean cosine of each
  image to its class's weight vector (the nearest of its sub-centres) without the margin: it rises towards 1 as
  images gather around their class;
- ``val/loss`` on held-out landmarks cannot be computed (their classes have no weights) and is skipped, saying why.

Labels must be ``0 .. num_classes - 1``: the training split's labels are (landmarks, then one per distractor).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from pytorch_metric_learning.losses import FastAPLoss, LargeMarginSoftmaxLoss

from oxford_ir.config import instantiate
from oxford_ir.errors import ConfigError

#: the config keys a classification loss needs
CLASS_KEYS = ("num_classes", "embedding_size")
#: the distance choice (conf/distance) that gives each pytorch-metric-learning distance class
DISTANCE_CHOICES = {"CosineSimilarity": "distance=cosine", "LpDistance": "distance=euclidean"}
#: what pytorch-metric-learning's losses assert about their distance
_REQUIRED_DISTANCE = re.compile(r"requires the distance metric to be (\w+)|requires distance\.(\w+) to be (\S+)")


def _target_class(loss: Mapping) -> type | None:
    from hydra.utils import get_class

    try:
        return get_class(str(loss.get("_target_")))
    except Exception:  # instantiate names what cannot be imported, with the key
        return None


def takes_classes(loss: Mapping) -> bool:
    """Whether the loss config's class is built with ``num_classes`` and ``embedding_size`` (a weight per class).

    Read from the constructors of the class and its bases: ``SubCenterArcFaceLoss`` passes them through
    ``**kwargs`` to ``ArcFaceLoss``.
    """
    cls = _target_class(loss)
    return cls is not None and _counts_classes(cls)


def _counts_classes(cls: type) -> bool:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            try:
                names |= set(inspect.signature(klass.__init__).parameters)
            except (TypeError, ValueError):
                continue
    return all(key in names for key in CLASS_KEYS)


def is_class_loss(loss_fn: Any) -> bool:
    """A built loss with a weight per class (its class is built with ``num_classes`` and ``embedding_size``)."""
    return _counts_classes(type(loss_fn))


def fill_num_classes(loss: Any, num_classes: int) -> None:
    """Set ``loss.num_classes`` (a config node, changed in place) to the datamodule's number of training labels;
    a value already set must be that number."""
    given = loss.get("num_classes")
    if given is not None and int(given) != int(num_classes):
        raise ConfigError(
            f"loss.num_classes={given} but the training split has {num_classes} labels (classes and distractors): "
            "leave loss.num_classes=null, oxford-ir-train fills it"
        )
    loss["num_classes"] = int(num_classes)


def without_miner(loss: Mapping, miner: Mapping | None) -> Mapping | None:
    """``miner``, or None for a loss with a weight per class and for FastAP (a smooth AP of each image's ranking of
    the whole batch, as published), saying once that the configured miner is not used."""
    if miner is None:
        return None
    if takes_classes(loss):
        why = "scores each image against every class's weights"
    elif issubclass(_target_class(loss) or object, FastAPLoss):
        why = "ranks the whole batch"
    else:
        return miner
    name = str(miner.get("_target_", "the miner")).rsplit(".", 1)[-1]
    rank_zero_info(f"loss={_short(loss)} {why}: {name} is not used")
    return None


def _short(loss: Mapping) -> str:
    return str(loss.get("_target_", "?")).rsplit(".", 1)[-1]


def build_loss(loss: dict, distance: Any, embedding_dim: int) -> tuple[Any, dict]:
    """The loss built from its config with the shared ``distance``, and the config as built (a classification
    loss's ``embedding_size`` filled from ``embedding_dim``): what the module keeps as its hyperparameter.

    Refused, each with its fix: a classification loss without ``num_classes``, an
    ``embedding_size`` other than the embedder's, and a distance the loss does not work with.
    """
    if takes_classes(loss):
        name = _short(loss)
        if loss.get("num_classes") is None:
            raise ConfigError(
                f"loss.num_classes is not set for {name}: oxford-ir-train sets it to the training split's number of "
                "labels; give loss.num_classes=<labels> when building the module yourself"
            )
        given = loss.get("embedding_size")
        if given is not None and int(given) != int(embedding_dim):
            raise ConfigError(
                f"loss.embedding_size={given} but the embedder's embeddings have {embedding_dim} dimensions: leave "
                "loss.embedding_size=null (filled from the embedder)"
            )
        loss = {**loss, "embedding_size": int(embedding_dim)}
    try:
        return instantiate(loss, "loss", distance=distance), loss
    except ConfigError as error:
        required = _REQUIRED_DISTANCE.search(str(error))
        if required is None:
            raise
        kind, key, value = required.groups()
        choice = DISTANCE_CHOICES.get(kind or "", f"a distance with {key}={value}")
        raise ConfigError(f"{error}; the miner and the loss share one distance: choose {choice}") from None


@dataclass(frozen=True)
class ClassStatistics:
    """What a training batch of a loss with a weight per class logs besides its loss."""

    #: ``train/class_cosine`` (:func:`class_cosine`); None outside the large-margin softmax family
    class_cosine: float | None


def class_statistics(loss_fn: Any, embeddings: torch.Tensor, labels: torch.Tensor) -> ClassStatistics:
    return ClassStatistics(class_cosine(loss_fn, embeddings, labels))


@torch.no_grad()
def class_cosine(loss_fn: Any, embeddings: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean cosine similarity of each embedding to its class's weight vector, the nearest of its sub-centres
    (``SubCenterArcFaceLoss``); None for a loss outside the large-margin softmax family.

    Only the batch's classes' columns of ``W`` are read (81k classes cost nothing more than 8)."""
    if not isinstance(loss_fn, LargeMarginSoftmaxLoss):
        return None
    weights = loss_fn.W.detach()
    centres = int(getattr(loss_fn, "sub_centers", 1))
    labels = labels.to(weights.device).long()
    columns = (labels.reshape(-1, 1) * centres + torch.arange(centres, device=weights.device)).reshape(-1)
    vectors = torch.nn.functional.normalize(weights[:, columns].t().float(), dim=1)
    rows = torch.nn.functional.normalize(embeddings.detach().float().to(weights.device), dim=1)
    cosines = (rows.repeat_interleave(centres, dim=0) * vectors).sum(dim=1).reshape(-1, centres)
    return float(cosines.max(dim=1).values.mean())


def random_batches_warning(loss_fn: Any, sampler: str | None) -> str | None:
    """A warning when plain shuffled batches (``data.sampler=random``) feed a loss over tuples of the batch: such a
    batch may hold no two images of a class, and then no positive to learn from."""
    if sampler != "random" or is_class_loss(loss_fn):
        return None
    return (
        f"data.sampler=random with {type(loss_fn).__name__}: shuffled batches may hold no positives (two images of "
        "a class), and such a batch trains nothing (train/num_triplets 0); use data.sampler=balanced (P x K) for "
        "losses over tuples of the batch, random for loss=arcface|subcenter_arcface|cosface"
    )
