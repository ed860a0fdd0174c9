"""Loading a trained :class:`~oxford_ir.models.module.RetrievalModule` from a checkpoint, or saying why not.

:func:`load_retrieval_checkpoint` reads the file with ``weights_only=True`` (a checkpoint that holds other objects is
refused, not unpickled), checks that it was written by the module, rebuilds the model from its hyperparameters
without fetching pretrained backbone weights (the state dict replaces them), and compares the weights key for key
and shape for shape with that model, or with a model built from the current config (``expected``). Every refusal
is one :class:`~oxford_ir.errors.CheckpointError` naming the file and what to use instead.

:func:`load_checkpoint_embedder` rebuilds only the embedder, with the same checks, for indexing and search: it
needs neither the training module nor Lightning and pytorch-metric-learning, which a search would otherwise spend
a second importing.
"""

from __future__ import annotations

import inspect
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from oxford_ir.errors import CheckpointError, OxfordIRError
from oxford_ir.trusted_targets import check_trusted

if TYPE_CHECKING:
    from oxford_ir.models.module import RetrievalModule

#: hyperparameters a checkpoint of the module always has
REQUIRED_HPARAMS = ("embedder", "loss", "distance", "optimizer")
#: where Lightning keeps them (``LightningModule.CHECKPOINT_HYPER_PARAMS_KEY``)
HPARAMS_KEY = "hyper_parameters"
#: the prefix of the embedder's weights in the module's state dict
EMBEDDER_PREFIX = "embedder."


def _state_mismatch(
    model_state: Mapping[str, torch.Tensor], ckpt_state: Mapping[str, Any], limit: int = 5
) -> list[str]:
    """Human-readable differences between two state dicts: missing, unexpected, and reshaped keys."""
    problems = []
    missing = [k for k in model_state if k not in ckpt_state]
    unexpected = [k for k in ckpt_state if k not in model_state]
    reshaped = [
        f"{k} {tuple(ckpt_state[k].shape)} in the checkpoint vs {tuple(v.shape)} in the model"
        for k, v in model_state.items()
        if k in ckpt_state and isinstance(ckpt_state[k], torch.Tensor) and tuple(ckpt_state[k].shape) != tuple(v.shape)
    ]
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:limit])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:limit])})")
    if reshaped:
        problems.append(f"{len(reshaped)} keys of another shape (e.g. {'; '.join(reshaped[:limit])})")
    return problems


def _read_checkpoint(path: Path, map_location: Any) -> dict:
    """The checkpoint's content, tensors memory-mapped when they stay on the CPU: only the tensors used are read
    from disk, so an embedder is loaded without the class weights of a many-class loss (81k x 2048: 666 MB) and
    the optimizer's moments (twice as much) that the same file holds. A file of torch's legacy format (not a zip
    archive) is read whole."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; give the path of a .ckpt file written by training")
    mmap = _on_cpu(map_location) and zipfile.is_zipfile(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, IndexError, ... on bad files
        text = str(error)
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsafe:
            raise CheckpointError(
                f"{path}: the checkpoint holds a {unsafe.group(1)} object, not only tensors and plain data; it was not "
                "written by this project's training, and unpickling it could run code from the file: load it with "
                "the code that wrote it"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        reason = detail.group(1) if detail else (text.strip().splitlines() or [type(error).__name__])[0]
        if isinstance(error, KeyError) or reason.isdigit():  # pickle's reader on bytes that are no pickle at all
            reason = "not a PyTorch file (no pickle or zip archive inside)"
        raise CheckpointError(
            f"cannot read checkpoint {path}: {reason}; the file is corrupt or truncated (an interrupted copy or "
            "save?): use another checkpoint, e.g. last.ckpt or the best-*.ckpt of the run"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no state_dict); give a .ckpt written by oxford-ir-train"
        )
    return checkpoint


def _on_cpu(map_location: Any) -> bool:
    """Whether ``torch.load(map_location=...)`` leaves tensors on the CPU (None: where they were saved, unknown)."""
    if isinstance(map_location, str | torch.device):
        try:
            return torch.device(map_location).type == "cpu"
        except RuntimeError:
            return False
    return False


def _without_pretrained_weights(embedder: Any) -> Any:
    """The embedder config with ``backbone.weights: none``: the checkpoint's state dict replaces them anyway,
    so rebuilding never downloads ImageNet weights or needs the local weights file of the training machine."""
    if not isinstance(embedder, dict) or not isinstance(embedder.get("backbone"), dict):
        return embedder
    backbone = embedder["backbone"]
    if "weights" not in backbone:
        return embedder
    return {**embedder, "backbone": {**backbone, "weights": "none"}}


def backbone_identity(embedder: Any) -> str:
    """``timm:resnet101``, ``resnet50``, ``scratchcnn``: which network an embedder config's backbone is."""
    backbone = embedder.get("backbone") if isinstance(embedder, Mapping) else None
    if not isinstance(backbone, Mapping):
        return "?"
    target = str(backbone.get("_target_", "?"))
    if target.endswith(".TimmBackbone"):
        return f"timm:{backbone.get('name')}"
    return target.rsplit(".", 1)[-1].lower()


def _check_same_backbone(path: Path, trained: Any, configured: Any) -> None:
    """Refuse a checkpoint of another timm model (or a timm checkpoint for another backbone), naming both: two timm
    models can share every key and shape (DeiT and ViT) and still differ, e.g. in their input normalisation."""
    old, new = backbone_identity(trained), backbone_identity(configured)
    if old != new and "timm:" in old + new:
        raise CheckpointError(
            f"{path} was trained with backbone {old}, but the config builds {new}: compose the same backbone as the "
            f"run that wrote it (e.g. backbone=timm backbone.name=...), or give a checkpoint of {new}"
        )


def load_retrieval_checkpoint(
    path: str | Path, map_location: Any = "cpu", *, expected: RetrievalModule | None = None
) -> RetrievalModule:
    """The :class:`RetrievalModule` saved in ``path``, in eval mode, or a :class:`CheckpointError` that says why not.

    ``expected`` (a module built from the current config) makes the check stricter: the checkpoint's
    weights must fit that model, key for key and shape for shape; the error then names the first
    mismatched keys and the embedder the checkpoint was trained with, i.e. the config to use instead.
    """
    from oxford_ir.models.module import RetrievalModule
    from oxford_ir.models.settings import describe_config

    path = Path(path)
    checkpoint, hparams = _read_module_checkpoint(path, map_location)
    state = checkpoint["state_dict"]
    trained_with = describe_config(hparams.get("embedder"))
    if expected is not None:
        _check_same_backbone(path, hparams.get("embedder"), expected.hparams.get("embedder"))
        problems = _state_mismatch(expected.state_dict(), state)
        if problems:
            raise CheckpointError(
                f"{path} does not fit the configured model {describe_config(expected.hparams.get('embedder'))}: "
                f"{'; '.join(problems)}. The checkpoint was trained with {trained_with}: compose that config "
                "(e.g. the same backbone=/pooling=/embedder.projection_dim= overrides as the run that wrote it)"
            )
    accepted = set(inspect.signature(RetrievalModule.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    kwargs["embedder"] = _without_pretrained_weights(kwargs.get("embedder"))
    try:
        module = RetrievalModule(**kwargs)
    except OxfordIRError as error:
        raise CheckpointError(f"{path}: cannot rebuild the model from its hyper_parameters: {error}") from None
    problems = _state_mismatch(module.state_dict(), state)
    if problems:
        raise CheckpointError(
            f"{path}: its weights do not fit the model its own hyper_parameters describe ({trained_with}): "
            f"{'; '.join(problems)}. The file was edited or written by another version of the code"
        )
    module.load_state_dict(state, strict=True)
    return module.eval()


def _read_module_checkpoint(path: Path, map_location: Any, *, only_embedder: bool = False) -> tuple[dict, dict]:
    """The checkpoint and its hyperparameters, checked to be the module's and to name only trusted targets (with
    ``only_embedder``, those of the embedder, the one part then built: checking the loss, miner and distance would
    import pytorch-metric-learning, a second, to vet parts that are never built)."""
    checkpoint = _read_checkpoint(path, map_location)
    hparams = checkpoint.get(HPARAMS_KEY) or {}
    missing = [k for k in REQUIRED_HPARAMS if k not in hparams]
    if missing:
        raise CheckpointError(
            f"{path} was not written by RetrievalModule: its hyper_parameters ({sorted(hparams) or 'none'}) have no "
            f"{', '.join(missing)}; load it with the model class that trained it"
        )
    if only_embedder:
        check_trusted(hparams["embedder"], str(path), "hyper_parameters.embedder")
    else:
        check_trusted(hparams, str(path), "hyper_parameters")
    return checkpoint, hparams


def load_checkpoint_embedder(path: str | Path, map_location: Any = "cpu") -> torch.nn.Module:
    """The embedder saved in ``path`` (the module's ``embedder`` and its weights), in eval mode: what
    :func:`load_retrieval_checkpoint` gives as ``.embedder``, with the same checks, without building the module
    (the targets of the parts it does not build, loss, miner, distance, optimizer, are not vetted: none is built)."""
    from oxford_ir.config import instantiate

    path = Path(path)
    checkpoint, hparams = _read_module_checkpoint(path, map_location, only_embedder=True)
    config = _without_pretrained_weights(hparams["embedder"])
    try:
        embedder = instantiate(config, "embedder")
    except OxfordIRError as error:
        raise CheckpointError(f"{path}: cannot rebuild the model from its hyper_parameters: {error}") from None
    state = {k[len(EMBEDDER_PREFIX) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(EMBEDDER_PREFIX)}
    problems = _state_mismatch(embedder.state_dict(), state)
    if problems:
        from oxford_ir.models.settings import describe_config

        raise CheckpointError(
            f"{path}: its weights do not fit the model its own hyper_parameters describe "
            f"({describe_config(hparams['embedder'])}): {'; '.join(problems)}. The file was edited or written by "
            "another version of the code"
        )
    embedder.load_state_dict(state, strict=True)
    return embedder.eval()


def checkpoint_data_settings(path: str | Path) -> dict[str, Any]:
    """The datamodule arguments a checkpoint's run trained with (Lightning stores them beside the model's), e.g.
    to learn a whitening from the same training split; a CheckpointError when the file holds none."""
    path = Path(path)
    checkpoint = _read_checkpoint(path, "cpu")
    settings = checkpoint.get("datamodule_hyper_parameters")
    if not isinstance(settings, Mapping) or not settings:
        raise CheckpointError(
            f"{path} does not record the data it was trained on (no datamodule_hyper_parameters); give the training "
            "split to learn from as whitening.source={benchmark: ..., split: ...}"
        )
    check_trusted(settings, str(path), "datamodule_hyper_parameters")
    return dict(settings)
