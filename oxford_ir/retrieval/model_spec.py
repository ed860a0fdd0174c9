"""How to rebuild the embedding model of an index: a training checkpoint or an embedder config.

An index stores this spec, not the network, so a searcher can embed queries with exactly the model that
embedded the database. The fingerprint identifies the model by content (the checkpoint's bytes, or the
embedder config with every local weights file replaced by its sha256), so moving files keeps it and
retraining into the same path changes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from oxford_ir import hashing
from oxford_ir.errors import CheckpointError, ConfigError
from oxford_ir.trusted_targets import check_trusted

if TYPE_CHECKING:  # PyTorch is imported where a network is built: an ONNX search runs without it
    import torch

    from oxford_ir.extraction.whitening import Whitening

#: string values of an embedder config treated as local files (when they exist): paths, not keywords such
#: as ``weights: imagenet``
_WEIGHT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors", ".pkl", ".npz")
#: sha256 of files already hashed in this process, keyed by (path, size, mtime_ns)
_file_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, streamed; cached per (path, size, mtime) for the life of the process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        _file_hashes[key] = hashing.file_sha256(path)
    return _file_hashes[key]


@dataclass(frozen=True)
class ModelSpec:
    """Exactly one of ``checkpoint`` (absolute path of a training ``.ckpt``), ``embedder`` (a resolved
    embedder config with ``_target_``, local weight paths absolute) or ``onnx`` (absolute path of a file written by
    ``oxford-ir-export``, whitening included, run by onnxruntime); and ``whitening``, the absolute path of a
    post-hoc whitening file (:mod:`oxford_ir.extraction.whitening`) applied after the network, or None.

    An ONNX file has the fingerprint of the model it was exported from, so an index built with either can be
    searched with the other."""

    checkpoint: str | None = None
    embedder: dict | None = None
    whitening: str | None = None
    onnx: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.checkpoint, self.embedder, self.onnx)) != 1:
            raise ConfigError(
                "a model is either a checkpoint (ckpt_path=...), an ONNX file (onnx=...) or an embedder config, "
                "exactly one"
            )
        if self.onnx is not None and self.whitening is not None:
            raise ConfigError(
                f"onnx={self.onnx} carries its own whitening (or none): export it with the whitening instead "
                "(oxford-ir-export ckpt_path=... whitening=learned)"
            )
        if self.embedder is not None and "_target_" not in self.embedder:
            raise ConfigError(f"embedder config {self.embedder} has no _target_; compose it from conf/embedder")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping | DictConfig, *, whitening: bool = True) -> ModelSpec:
        """From a composed config: ``ckpt_path`` when set, else the ``embedder`` node (as in conf/eval.yaml); with
        ``whitening`` (and a ``whitening`` node of kind learned or pca), the file of that whitening, which must
        exist (beside the checkpoint, or ``whitening.file``)."""
        network = cls._network_from_config(cfg)
        node = cfg.get("whitening") if whitening else None
        if node is None:
            return network
        from oxford_ir.extraction.whitening import Whitening, whitening_file
        from oxford_ir.extraction.whitening_source import WhiteningSettings

        settings = WhiteningSettings.from_config(node)  # checked: kind and values
        if settings is None:
            return network
        if network.onnx is not None:
            raise ConfigError(
                f"onnx={network.onnx} with whitening={settings.kind}: an ONNX file carries its own whitening; export "
                "it with that whitening (oxford-ir-export ckpt_path=... whitening=...) and leave whitening unset here"
            )
        path = whitening_file(settings.kind, node.get("file"), network.checkpoint, None)
        # refused now, not at the first query
        Whitening.load(path, model_fingerprint=network.fingerprint(), kind=settings.kind)
        return cls(checkpoint=network.checkpoint, embedder=network.embedder, whitening=str(path.resolve()))

    @classmethod
    def _network_from_config(cls, cfg: Mapping | DictConfig) -> ModelSpec:
        ckpt, onnx = cfg.get("ckpt_path"), cfg.get("onnx")
        if ckpt and onnx:
            raise ConfigError(f"ckpt_path={ckpt} and onnx={onnx}: give one model, not both")
        if onnx:
            path = Path(str(onnx)).expanduser()
            if not path.is_file():
                raise CheckpointError(
                    f"onnx={onnx}: no such file; write one with oxford-ir-export ckpt_path=<checkpoint> format=onnx"
                )
            return cls(onnx=str(path.resolve()))
        if ckpt:
            path = Path(str(ckpt)).expanduser()
            if not path.is_file():
                raise CheckpointError(
                    f"ckpt_path={ckpt}: no such file; give a checkpoint written by oxford-ir-train "
                    "(<run>/checkpoints/last.ckpt or best-*.ckpt), or leave ckpt_path unset to use backbone=/pooling="
                )
            return cls(checkpoint=str(path.resolve()))
        embedder = cfg.get("embedder")
        if embedder is None:
            raise ConfigError("no model: set ckpt_path=<checkpoint> or compose an embedder (backbone=..., pooling=...)")
        if isinstance(embedder, DictConfig | ListConfig):
            embedder = OmegaConf.to_container(embedder, resolve=True)
        return cls(embedder=_absolute_files(dict(embedder)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str) -> ModelSpec:
        """Inverse of :meth:`to_dict`, as read back from the file ``source`` (an index manifest): its embedder
        config may only name the project's own builders (:mod:`oxford_ir.trusted_targets`)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a model spec is a mapping with checkpoint or embedder, got {type(data).__name__}")
        check_trusted(data.get("embedder"), source, "model.embedder")
        return cls(
            checkpoint=data.get("checkpoint"),
            embedder=data.get("embedder"),
            whitening=data.get("whitening"),
            onnx=data.get("onnx"),
        )

    def to_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"checkpoint": self.checkpoint, "embedder": self.embedder}
        if self.onnx is not None:
            spec["onnx"] = self.onnx
        return spec if self.whitening is None else {**spec, "whitening": self.whitening}

    @property
    def network(self) -> ModelSpec:
        """The same model without its whitening (an ONNX file: itself, whitening included)."""
        return ModelSpec(checkpoint=self.checkpoint, embedder=self.embedder, onnx=self.onnx)

    def load_whitening(self) -> Whitening | None:
        """The whitening file's content, checked to belong to this network; None without one."""
        if self.whitening is None:
            return None
        from oxford_ir.extraction.whitening import Whitening

        return Whitening.load(self.whitening, model_fingerprint=self.network.fingerprint())

    # -- use -----------------------------------------------------------------------------------
    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The embedder in eval mode on ``device`` (images in, L2-normalised N x D out); deterministic."""
        import torch

        from oxford_ir.extraction.whitening import Whitened

        if self.onnx is not None:
            from oxford_ir.models.onnx_embedder import load_onnx_embedder

            return load_onnx_embedder(self.onnx)  # onnxruntime runs on the CPU; outputs follow the inputs' device
        if self.checkpoint is not None:
            from oxford_ir.models.checkpoint import load_checkpoint_embedder

            model = load_checkpoint_embedder(self.checkpoint)  # the embedder alone: no Lightning to import
        else:
            import hydra

            # seeded: a config with randomly initialised parts (weights=none) always gives the same network,
            # so that queries embedded later match an index built earlier
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = hydra.utils.instantiate(self.embedder)
        whitening = self.load_whitening()
        if whitening is not None:
            model = Whitened(model, whitening, name=f"the whitening {self.whitening}")
        return model.to(device).eval()

    def describe(self) -> str:
        """One line for people: ``checkpoint /runs/x/last.ckpt`` or ``MobileNetV2(weights=...) + GeM(p=3.0)``."""
        if self.onnx is not None:
            from oxford_ir.models.onnx_file import open_onnx

            return f"ONNX {self.onnx} (exported from {open_onnx(self.onnx)[1].model_description})"
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}{self._whitening_note()}"
        cfg = self.embedder or {}
        parts = [_describe(cfg[key]) for key in ("backbone", "pooling") if isinstance(cfg.get(key), Mapping)]
        extras = [_describe_args(cfg, skip=("backbone", "pooling"))]
        text = " + ".join(parts) if parts else _describe(cfg)
        return text + (f" [{extras[0]}]" if extras[0] else "") + self._whitening_note()

    def _whitening_note(self) -> str:
        return "" if self.whitening is None else f" + whitening {self.whitening}"

    def fingerprint(self) -> str:
        """Hex sha256 identifying the model's weights and architecture by content.

        Checkpoint: over the sha256 of the file. Embedder: over its canonical JSON, each local file it names
        replaced by that file's sha256. A named file that has gone raises :class:`ConfigError`. With a whitening,
        over the network's fingerprint and the whitening file's sha256 (without, exactly the network's, so that
        indexes written before whitening existed keep theirs). ONNX file: the fingerprint of the model it was
        exported from, read from its metadata.
        """
        if self.onnx is not None:
            from oxford_ir.models.onnx_file import open_onnx

            return open_onnx(self.onnx)[1].model_fingerprint
        if self.whitening is not None:
            path = Path(self.whitening)
            if not path.is_file():
                raise ConfigError(f"whitening file not found: {path}; the whitening of this model was moved or deleted")
            text = json.dumps({"network": self.network.fingerprint(), "whitening_sha256": file_sha256(path)})
            return hashlib.sha256(text.encode()).hexdigest()
        if self.checkpoint is not None:
            path = Path(self.checkpoint)
            if not path.is_file():
                raise CheckpointError(f"checkpoint not found: {path}; the model of this index was moved or deleted")
            payload: Any = {"checkpoint_sha256": file_sha256(path)}
        else:
            payload = {"embedder": _hash_files(self.embedder)}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()


def _looks_like_file(value: str) -> bool:
    return "/" in value or "\\" in value or value.lower().endswith(_WEIGHT_SUFFIXES)


def _absolute_files(value: Any) -> Any:
    """Existing local file paths made absolute, so the spec rebuilds from any working directory."""
    if isinstance(value, Mapping):
        return {str(k): _absolute_files(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_absolute_files(v) for v in value]
    if isinstance(value, str) and _looks_like_file(value):
        path = Path(value).expanduser()
        if path.is_file():
            return str(path.resolve())
    return value


def _hash_files(value: Any) -> Any:
    """The config with each local file path replaced by ``{"sha256": ...}`` of its content."""
    if isinstance(value, Mapping):
        return {str(k): _hash_files(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_hash_files(v) for v in value]
    if isinstance(value, str) and _looks_like_file(value):
        path = Path(value).expanduser()
        if path.is_file():
            return {"sha256": file_sha256(path)}
        if path.suffix.lower() in _WEIGHT_SUFFIXES:
            raise ConfigError(f"weights file not found: {path}; the model of this index names a file that is gone")
    return value


def _describe(cfg: Any) -> str:
    if not isinstance(cfg, Mapping):
        return repr(cfg)
    target = str(cfg.get("_target_", "?")).rsplit(".", 1)[-1]
    return f"{target}({_describe_args(cfg)})"


def _describe_args(cfg: Mapping, skip: tuple[str, ...] = ()) -> str:
    args = []
    for key, value in cfg.items():
        if key.startswith("_") or key in skip or value is None or value is False:
            continue
        args.append(f"{key}={_describe(value) if isinstance(value, Mapping) else value}")
    return ", ".join(args)
