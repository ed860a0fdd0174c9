"""The whitening of a model, as the commands find, learn, store and check it (the math is in
:mod:`oxford_ir.extraction.whitening`, the training sample in :mod:`oxford_ir.extraction.whitening_source`).

- ``oxford-ir-train whitening=learned|pca``: validation learns it every pass; the one learned for the best
  checkpoint is written beside it (:func:`save_run_whitening`).
- ``oxford-ir-eval``: :func:`evaluation_whitening` reuses the stored file when it was learned for this model with
  these settings, image size and scales from the same images, else learns it (from the checkpoint's own training
  split, or ``whitening.source``) and writes it; a source overlapping an evaluated benchmark is refused.
- ``oxford-ir-index``: the file must exist; the index's model spec holds it and its fingerprint covers it.
- ``oxford-ir-search`` and the web page use the index's own; a search asking for another one is refused
  (:func:`check_requested_whitening`).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.splits import TrainSplit
from oxford_ir.config import instantiate, to_plain
from oxford_ir.errors import ConfigError
from oxford_ir.extraction.distributed import barrier, rank_and_world
from oxford_ir.extraction.whitening import Whitened, Whitening, whitening_file
from oxford_ir.extraction.whitening_source import (
    WhiteningSettings,
    check_disjoint,
    learn_whitening,
    split_sample,
)
from oxford_ir.retrieval.model_spec import ModelSpec, file_sha256

log = logging.getLogger(__name__)


def source_split(checkpoint: str | None, source: Any, data_dir: Path) -> TrainSplit:
    """The training split a whitening is learned from: the checkpoint's run's datamodule settings (its data
    folder too), with ``source`` (datamodule arguments) on top; without a checkpoint, ``source`` in ``data_dir``
    unless it names its own."""
    from oxford_ir.data.datamodule import RetrievalDataModule  # Lightning: imported only to learn a whitening
    from oxford_ir.models.checkpoint import checkpoint_data_settings

    source = to_plain(source)
    if source is not None and not isinstance(source, Mapping):
        raise ConfigError(
            f"whitening.source={source!r}: null (the checkpoint's training split) or data settings, e.g. "
            "{benchmark: rparis6k, split: landmarks, held_out_landmarks: [louvre, moulinrouge]}"
        )
    settings: dict[str, Any] = checkpoint_data_settings(checkpoint) if checkpoint else {}
    accepted = set(inspect.signature(RetrievalDataModule.__init__).parameters) - {"self"}
    unknown = sorted(set(source or {}) - accepted)
    if unknown:
        raise ConfigError(f"whitening.source.{unknown[0]}: not a data setting; the keys are those of conf/data/*.yaml")
    if not settings and not source:
        raise ConfigError(
            "whitening=learned|pca for a model without a checkpoint: say which training split to learn it from, e.g. "
            "whitening.source={benchmark: rparis6k, split: landmarks, held_out_landmarks: [louvre, moulinrouge]}"
        )
    from_checkpoint = bool(settings)
    settings = {key: value for key, value in settings.items() if key in accepted}
    settings.update(source or {})
    if "data_dir" not in (source or {}) and not from_checkpoint:
        settings["data_dir"] = str(data_dir)
    if not Path(str(settings["data_dir"])).expanduser().is_dir():
        raise ConfigError(
            f"the training data of the whitening's source, {settings['data_dir']} (where {checkpoint} was trained), "
            "is not here: set whitening.source.data_dir=<the folder holding the training benchmark>"
        )
    settings.update(num_workers=0, cache={"enabled": False})  # only the ground truth and the file list are read
    target = f"{RetrievalDataModule.__module__}.{RetrievalDataModule.__name__}"
    datamodule = instantiate({"_target_": target, **settings}, "whitening.source")
    if rank_and_world()[0] == 0:
        datamodule.prepare_data()
    barrier()
    datamodule.setup("validate")
    return datamodule.whitening_split


def _differences(stored: Whitening, expected: Mapping[str, Any]) -> list[str]:
    """The keys of ``expected`` on which ``stored.info`` differs (the source by its images' hash)."""
    info = dict(stored.info)
    info["images_sha256"] = (info.get("source") or {}).get("images_sha256")
    return [key for key, value in expected.items() if info.get(key) != value]


def evaluation_whitening(
    cfg: DictConfig,
    network: nn.Module,
    benchmarks: Sequence[Benchmark],
    *,
    image_size: int | None,
    scales: Sequence[float],
    **extract_kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """``network`` behind the configured whitening (``cfg.whitening``), and what ``metrics.json`` says of it; the
    network itself and ``{}`` with ``whitening=none``.

    The stored file is reused when it was learned for this network with these settings, ``image_size`` and
    ``scales`` from the same images; otherwise the whitening is learned and the file (re)written. Either way a
    whitening whose images overlap what ``benchmarks`` evaluate is refused.
    """
    node = to_plain(cfg.get("whitening"))
    settings = WhiteningSettings.from_config(node)
    if settings is None:
        return network, {}
    checkpoint = cfg.get("ckpt_path")
    path = whitening_file(settings.kind, node.get("file"), checkpoint, Path(cfg.paths.output_dir))
    split = source_split(checkpoint, node.get("source"), Path(cfg.paths.data_dir))
    sample = split_sample(split, settings)
    what = f"the {settings.kind} whitening ({sample.description})"
    check_disjoint(sample.paths, benchmarks, what)
    scales = [float(s) for s in scales]
    expected = {
        "settings": settings.as_dict(),
        "image_size": image_size,
        "scales": scales,
        "images_sha256": sample.images_sha256,
        "model_fingerprint": ModelSpec.from_config(cfg, whitening=False).fingerprint(),
    }
    whitening = None
    if path.is_file():
        stored = Whitening.load(path)  # a damaged file is an error, never silently replaced
        changed = _differences(stored, expected)
        if changed:
            kept = keep_aside(path)
            log.warning(
                "%s was learned with other %s: kept as %s, learning it again", path, ", ".join(changed), kept.name
            )
        else:
            whitening, status = stored, "reused"
    if whitening is None:
        log.info("learning %s from %d images (%d pairs)", what, len(sample.paths), len(sample.queries))
        learned = learn_whitening(network, sample, settings, image_size=image_size, scales=scales, **extract_kwargs)
        whitening, status = learned.with_info(model_fingerprint=expected["model_fingerprint"]), "learned"
        if rank_and_world()[0] == 0:
            whitening.save(path)
        barrier()
    report = {
        "kind": settings.kind,
        "file": str(path.resolve()),
        "status": status,
        "source": sample.description,
        "images": len(sample.paths),
        "pairs": len(sample.queries),
        "dim": whitening.output_dim,
        "shrinkage": settings.shrinkage,
    }
    log.info("whitening: %s %s (%s)", status, path, sample.description)
    return Whitened(network, whitening, name=f"the whitening {path}"), report


def save_run_whitening(whitening: Whitening | None, checkpoint: str, node: Any) -> Path | None:
    """Write the whitening that validation learned for ``checkpoint`` (the best one) beside it; its info gets the
    checkpoint's fingerprint, so ``oxford-ir-eval`` and ``oxford-ir-index`` accept it for that checkpoint only."""
    node = to_plain(node)
    settings = WhiteningSettings.from_config(node)
    if whitening is None or settings is None or not checkpoint:
        return None
    path = whitening_file(settings.kind, node.get("file"), checkpoint, None)
    fingerprint = ModelSpec(checkpoint=str(Path(checkpoint).resolve())).fingerprint()
    if path.is_file():
        kept = keep_aside(path)
        log.warning("%s existed (learned for another checkpoint?): kept as %s", path, kept.name)
    return whitening.with_info(model_fingerprint=fingerprint).save(path)


def keep_aside(path: Path) -> Path:
    """Move the whitening file ``path`` to ``<stem>.previous-<its sha256[:12]>.pt`` beside it, so that writing a
    new one never destroys a whitening another model or setting may still need."""
    kept = path.with_name(f"{path.stem}.previous-{file_sha256(path)[:12]}{path.suffix}")
    os.replace(path, kept)
    return kept


def check_requested_whitening(node: Any, model: ModelSpec, where: str) -> None:
    """Refuse a search that asks for a whitening (``node``: ``cfg.whitening``; None asks for the index's own)
    other than the one the index ``where`` was built with: its query vectors would not match the database's."""
    node = to_plain(node)
    if node is None:
        return
    settings = WhiteningSettings.from_config(node)
    rebuild = f"rebuild it with oxford-ir-index ... whitening={settings.kind if settings else 'none'}"
    if model.onnx is not None:  # the whitening is inside the file
        from oxford_ir.models.onnx_file import open_onnx

        inside = open_onnx(model.onnx)[1].whitening
        if (settings.kind if settings else None) != (inside.kind if inside else None):
            raise ConfigError(
                f"whitening={settings.kind if settings else 'none'}, but index {where} was built with the ONNX file "
                f"{model.onnx}, which carries {f'a {inside.kind}' if inside else 'no'} whitening: search without "
                f"whitening=, or export and index with the whitening you want"
            )
        return
    if settings is None and model.whitening is not None:
        raise ConfigError(
            f"whitening=none, but index {where} was built with the whitening {model.whitening}: search without "
            f"whitening= (the index's own), or {rebuild}"
        )
    if settings is None:
        return
    if model.whitening is None:
        raise ConfigError(
            f"whitening={settings.kind}, but index {where} was built without whitening: its database vectors are not "
            f"whitened; search without whitening=, or {rebuild}"
        )
    stored = Whitening.load(model.whitening)
    asked = node.get("file")
    if asked and not Path(str(asked)).expanduser().is_file():
        raise ConfigError(f"whitening.file={asked}: no such file")
    differs = stored.kind != settings.kind or (
        asked and file_sha256(Path(str(asked)).expanduser()) != file_sha256(Path(model.whitening))
    )
    if differs:
        raise ConfigError(
            f"whitening={settings.kind}{f' (file {asked})' if asked else ''}, but index {where} was built with the "
            f"{stored.kind} whitening {model.whitening}: search without whitening=, or {rebuild}"
        )


def check_whitening_disjoint(model: ModelSpec, benchmark: Benchmark) -> None:
    """Refuse to evaluate ``benchmark`` with a model whose whitening was learned from images it evaluates."""
    whitening = model.load_whitening()
    if whitening is not None:
        source = whitening.info.get("source") or {}
        what = f"the whitening {model.whitening} ({source.get('description', 'its training images')})"
        check_disjoint(source.get("images", ()), [benchmark], what)
