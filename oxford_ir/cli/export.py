"""``oxford-ir-export``: the embedding model of a checkpoint (or an embedder config) as a checked ONNX file.

The logic is :func:`export` (a composed config in, an
:class:`~oxford_ir.retrieval.onnx_export.ExportReport` out); the file's graph and metadata are described in
:mod:`oxford_ir.models.onnx_embedder`. PyTorch is imported only once a model is exported, so ``--help`` and a
refused command answer at once.
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
    from oxford_ir.retrieval.onnx_export import ExportReport

log = logging.getLogger(__name__)

FORMATS = ("onnx",)


def export(cfg: DictConfig) -> ExportReport:
    """Export the configured model (``ckpt_path``, or backbone/pooling/embedder) with its whitening; prints a
    summary line."""
    from oxford_ir.retrieval.model_spec import ModelSpec
    from oxford_ir.retrieval.onnx_export import export_onnx

    if str(cfg.format) not in FORMATS:
        raise ConfigError(f"format={cfg.format}: choose one of {', '.join(FORMATS)}")
    try:
        sizes = [(int(h), int(w)) for h, w in cfg.check_sizes]
        tolerance = float(cfg.tolerance)
    except (TypeError, ValueError):
        raise ConfigError(
            f"check_sizes={OmegaConf.to_container(cfg.check_sizes)} / tolerance={cfg.tolerance}: give "
            "[[height, width], ...] in pixels and a positive number"
        ) from None
    if not sizes or min(min(s) for s in sizes) < 8 or not tolerance > 0:
        raise ConfigError("check_sizes: at least one [height, width] of 8 pixels or more; tolerance > 0")
    spec = ModelSpec.from_config(cfg)
    report = export_onnx(spec, _out(cfg, spec), check_sizes=sizes, tolerance=tolerance)
    print(report.summary())
    return report


def _out(cfg: DictConfig, spec) -> Path:
    """``out=``, or beside the checkpoint, or in the run folder."""
    if cfg.get("out"):
        return Path(str(cfg.out)).expanduser()
    if spec.checkpoint is None:
        return Path(cfg.paths.output_dir) / "model.onnx"
    checkpoint = Path(spec.checkpoint)
    kind = OmegaConf.select(cfg, "whitening.kind")
    suffix = f"-whitening-{kind}" if spec.whitening is not None else ""
    return checkpoint.with_name(f"{checkpoint.stem}{suffix}.onnx")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
@exit_on_user_error
def _main(cfg: DictConfig) -> None:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    export(cfg)


def main() -> None:
    """Console script: a mistyped key or option is answered with its close match (:mod:`.hydra_typos`)."""
    refuse_typos("export")
    quick_help()
    _main()


if __name__ == "__main__":
    main()
