"""``oxford-ir-index``: embed an image collection (folder, glob or benchmark) into an index folder.

The logic is :func:`index` (a composed config in, an :class:`~oxford_ir.retrieval.index_report.IndexReport` out);
the format is documented in :mod:`oxford_ir.retrieval.index_format`, the incremental / atomic update rules in
:mod:`oxford_ir.retrieval.index_build`. ``onnx=<file>`` indexes with a file written by ``oxford-ir-export``
(onnxruntime on the CPU). PyTorch is imported once there is something to embed, so ``--help`` answers at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from oxford_ir.cli.hydra_typos import refuse_typos
from oxford_ir.cli.quick_help import quick_help
from oxford_ir.config import CONFIG_DIR
from oxford_ir.errors import ConfigError, exit_on_user_error

if TYPE_CHECKING:
    from oxford_ir.retrieval.index_report import IndexReport

log = logging.getLogger(__name__)


def index(cfg: DictConfig) -> IndexReport:
    """Build or update the index ``cfg.out`` of ``cfg.images`` with the configured model; prints a summary."""
    from oxford_ir.extraction.distributed import init_from_environment, rank_and_world
    from oxford_ir.extraction.options import extraction_options, resolve_device
    from oxford_ir.retrieval.budgeted_index import BudgetOptions
    from oxford_ir.retrieval.image_sources import resolve_images
    from oxford_ir.retrieval.index_build import build_index
    from oxford_ir.retrieval.model_spec import ModelSpec

    if cfg.index.get("merge", False):  # index.merge=true: join the shards built with index.shard=i/N
        return _merge(cfg)
    shard = _shard(cfg)
    for key in ("images", "out"):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
            raise ConfigError(
                f"{key}= is required: oxford-ir-index images=<folder, 'glob' or benchmark:<name>> out=<index folder>"
            )
    ex = cfg.extraction
    image_size = _number(cfg, "extraction.image_size", int, optional=True)
    scales = _number(cfg, "extraction.scales", lambda v: [float(s) for s in v])
    batch_size = _number(cfg, "extraction.batch_size", int)
    num_workers = _number(cfg, "extraction.num_workers", int)
    checkpoint_every = _number(cfg, "index.checkpoint_every", float, optional=True)
    options = extraction_options(ex)
    # torchrun: one process per device (sharing one index, or each its own shard)
    device = (shard.device(str(ex.device)) if shard else init_from_environment()) or resolve_device(str(ex.device))
    model = ModelSpec.from_config(cfg)
    source = resolve_images(
        str(cfg.images), Path(cfg.paths.data_dir), allow_missing_images=bool(cfg.get("allow_missing_images", False))
    )
    listing, out = source, Path(str(cfg.out))
    if shard:
        source, out = shard.select(listing, out)
    log.info("indexing %d images of %s with %s", len(source.paths), source.root, model.describe())
    report = build_index(
        model,
        source,
        out,
        image_size=image_size,
        scales=scales,
        dtype=str(cfg.index.dtype),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=bool(cfg.get("progress", True)),
        incremental=str(cfg.index.get("incremental", "auto")),
        checkpoint_every=checkpoint_every,
        budget=BudgetOptions.from_config(OmegaConf.to_container(cfg.index, resolve=True)),
        **options,
    )
    if shard:
        shard.record(listing, out)
    if rank_and_world()[0] == 0:
        print(report.summary())
    return report


def _shard(cfg: DictConfig):
    """``index.shard``: None (the whole listing), or the :class:`~oxford_ir.retrieval.index_shards.Shard`."""
    value = cfg.index.get("shard")
    if value is None:
        return None
    from oxford_ir.retrieval.index_shards import parse_shard

    return parse_shard(value)


def _merge(cfg: DictConfig) -> IndexReport:
    from oxford_ir.retrieval.index_shards import merge_shards

    if OmegaConf.is_missing(cfg, "out") or cfg.get("out") in (None, ""):
        raise ConfigError("index.merge=true needs out=: the index whose shards (<out>.shards/<i>-of-<N>) to join")
    if cfg.index.get("shard") is not None:
        raise ConfigError("index.merge=true joins every shard: leave index.shard unset")
    from oxford_ir.retrieval.budgeted_index import BudgetOptions

    budget = BudgetOptions.from_config(OmegaConf.to_container(cfg.index, resolve=True))
    report = merge_shards(Path(str(cfg.out)), budget=budget)
    print(report.summary())
    return report


def _number(cfg: DictConfig, key: str, convert, *, optional: bool = False):
    """``convert(cfg[key])``, or a ConfigError naming the key (None passes when ``optional``)."""
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return None
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not valid; see conf/index.yaml for what it takes") from None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="index")
@exit_on_user_error
def _main(cfg: DictConfig) -> None:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    index(cfg)


def main() -> None:
    """Console script: a mistyped key or option is answered with its close match (:mod:`.hydra_typos`)."""
    refuse_typos("index")
    quick_help()
    _main()


if __name__ == "__main__":
    main()
