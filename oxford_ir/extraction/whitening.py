"""Post-hoc whitening of embeddings: the closed-form linear map of Radenović et al., stored in a file, applied last.

Two kinds, both fitted once on the embeddings of a model that is no longer trained:

- ``learned`` (Radenović, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2019,
  cnnimageretrieval-pytorch's ``whitenlearn``): from matching pairs ``(q, p)``. The covariance of the pair
  differences ``S = mean((x_q - x_p)(x_q - x_p)^T)`` is whitened (``P1 = chol(S)^-1``), then the whitened
  embeddings ``P1 (x - m)`` are rotated onto their principal axes, so that the leading output dimensions carry
  the most variance between images relative to the variance within matching pairs;
- ``pca`` (its unsupervised variant, ``pcawhitenlearn``): ``diag(lambda)^-1/2 V^T (x - m)`` from the covariance of
  the embeddings themselves, no labels used.

The published fits use no regularisation and need more pairs than dimensions (S singular otherwise). Here the
covariance is shrunk first (``shrinkage`` = lambda: ``(1 - lambda) S + lambda tr(S)/D I``, Ledoit-Wolf style), which
keeps the fit stable on a small sample, and ``dim`` keeps only the leading output dimensions. Applying is
``normalize(P (x - m))``, in float32 whatever the autocast precision.

:class:`Whitened` puts a whitening behind a network for the test-time path: :func:`~oxford_ir.extraction.embedding.
embed_batch` combines the scales of the network alone and whitens the combined vector (whitened vectors can be
negative, so they are never put through GeM's power), which is how validation, ``oxford-ir-eval``, the index,
search and the web page all apply it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from oxford_ir.errors import CheckpointError, ConfigError, DataError
from oxford_ir.fs import replace_file
from oxford_ir.trusted_targets import check_trusted

#: ``whitening.kind`` values
WHITENING_KINDS = ("none", "learned", "pca")
#: what a whitening file says it is
FILE_FORMAT = "oxford-ir-whitening"
#: 2: with the sha256 of its content (:func:`content_sha256`); version 1 files, without one, are refused
FILE_VERSION = 2


@dataclass(frozen=True)
class Whitening:
    """``normalize(projection @ (x - mean))``: ``mean`` (D), ``projection`` (d x D, rows by decreasing ``variances``).

    ``info`` is plain data describing how it was learned: the settings, the source images, the model's fingerprint;
    it is stored with the tensors and compared before a stored whitening is reused.
    """

    kind: str
    mean: torch.Tensor
    projection: torch.Tensor
    variances: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.projection.shape[0])

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        """Whitened, L2-normalised ``vectors`` (N x D -> N x d), float32 on their device."""
        return whiten(vectors, self.mean, self.projection)

    def with_info(self, **info: Any) -> Whitening:
        return Whitening(self.kind, self.mean, self.projection, self.variances, {**self.info, **info})

    # -- the file -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the whitening to ``path`` atomically (a reader sees the old file or the new one, never a part)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        tensors = {name: getattr(self, name).detach().float().cpu().contiguous() for name in _TENSORS}
        content = {"kind": self.kind, **tensors, "info": self.info}
        torch.save(
            {"format": FILE_FORMAT, "version": FILE_VERSION, **content, "sha256": content_sha256(content)}, buffer
        )
        replace_file(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path, *, model_fingerprint: str | None = None, kind: str | None = None) -> Whitening:
        """The whitening stored in ``path``, or a one-line error naming the file and what to do.

        ``model_fingerprint``: refuse a whitening learned for another model (its embeddings would be whitened with
        another model's statistics). ``kind``: refuse a file of another kind (learned vs pca).
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"whitening file not found: {path}; learn it first (oxford-ir-eval ckpt_path=<checkpoint> "
                "whitening=learned, or train with whitening=learned), or set whitening.file to an existing one"
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many kinds on a bad file
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise CheckpointError(
                f"cannot read the whitening file {path}: {reason[:200]}; the file is corrupt or not a whitening: "
                "delete it and learn it again (whitening=learned|pca)"
            ) from None
        if not isinstance(data, Mapping) or data.get("format") != FILE_FORMAT:
            raise CheckpointError(
                f"{path} is not a whitening file of this project (no format {FILE_FORMAT!r}); give the .pt file "
                "written with whitening=learned|pca"
            )
        version = data.get("version", 0)
        if not isinstance(version, int) or version > FILE_VERSION:
            raise CheckpointError(
                f"{path} is a whitening file of version {version!r}, newer than this code reads "
                f"({FILE_VERSION}): update oxford-ir"
            )
        if version < FILE_VERSION or not isinstance(data.get("sha256"), str):
            raise CheckpointError(
                f"{path} is a whitening file of version {version} without a checksum, which cannot be verified: "
                "delete it and learn it again (whitening=learned|pca)"
            )
        mean, projection, variances = data.get("mean"), data.get("projection"), data.get("variances")
        shapes_ok = (
            isinstance(mean, torch.Tensor)
            and isinstance(projection, torch.Tensor)
            and isinstance(variances, torch.Tensor)
            and mean.ndim == 1
            and projection.ndim == 2
            and projection.shape[1] == mean.shape[0]
            and variances.shape == (projection.shape[0],)
        )
        if not shapes_ok or data.get("kind") not in WHITENING_KINDS[1:] or not isinstance(data.get("info"), Mapping):
            raise CheckpointError(
                f"{path}: the whitening's tensors or kind are malformed; delete it and learn it again"
            )
        if content_sha256({name: data[name] for name in ("kind", *_TENSORS, "info")}) != data["sha256"]:
            raise CheckpointError(
                f"{path} is damaged: its content does not match the sha256 stored with it (changed after it was "
                "written); delete it and learn it again (whitening=learned|pca)"
            )
        bad = [name for name in _TENSORS if not bool(torch.isfinite(data[name]).all())]
        if bad:
            raise CheckpointError(
                f"{path}: the whitening's {', '.join(bad)} hold NaN or infinite values; it would whiten every "
                "embedding into garbage: delete it and learn it again (a larger sample or whitening.shrinkage helps)"
            )
        check_trusted(data["info"], str(path), "info")
        whitening = cls(str(data["kind"]), mean, projection, variances, dict(data["info"]))
        if kind is not None and whitening.kind != kind:
            raise ConfigError(
                f"{path} holds a {whitening.kind} whitening, not the {kind} one asked for (whitening={kind})"
            )
        learned_for = whitening.info.get("model_fingerprint")
        if model_fingerprint is not None and learned_for != model_fingerprint:
            raise ConfigError(
                f"{path} was learned for another model (fingerprint {str(learned_for)[:12]}; this model: "
                f"{model_fingerprint[:12]}): its statistics do not fit this model's embeddings. Learn it again for "
                "this model (oxford-ir-eval ckpt_path=<checkpoint> whitening=learned|pca writes it)"
            )
        return whitening


#: the tensors of a whitening file, in the order the checksum reads them
_TENSORS = ("mean", "projection", "variances")


def content_sha256(content: Mapping[str, Any]) -> str:
    """Hex sha256 of a whitening's kind, tensors (shape and float32 bytes) and info (canonical JSON): what its file
    stores beside them, so that a byte changed anywhere in the values is found when the file is read."""
    digest = hashlib.sha256(str(content["kind"]).encode())
    for name in _TENSORS:
        tensor = content[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    digest.update(json.dumps(content["info"], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def whitening_file(kind: str, file: str | Path | None, checkpoint: str | Path | None, run_dir: Path | None) -> Path:
    """Where the ``kind`` whitening of a model is stored: ``file`` when given, else beside the checkpoint
    (``<checkpoint without .ckpt>.whitening-<kind>.pt``), else ``<run_dir>/whitening-<kind>.pt``."""
    if file:
        return Path(str(file)).expanduser()
    if checkpoint:
        checkpoint = Path(str(checkpoint)).expanduser()
        return checkpoint.with_name(f"{checkpoint.stem}.whitening-{kind}.pt")
    if run_dir is None:
        raise ConfigError(
            f"whitening={kind} for a model without a checkpoint: set whitening.file to the file oxford-ir-eval wrote "
            f"(<its run folder>/whitening-{kind}.pt)"
        )
    return run_dir / f"whitening-{kind}.pt"


def whiten(vectors: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """``normalize((vectors - mean) @ projection^T)`` in float32 (autocast off), on ``vectors``' device."""
    device = vectors.device
    with torch.autocast(device.type, enabled=False):
        x = vectors.float() - mean.to(device=device, dtype=torch.float32)
        return F.normalize(x @ projection.to(device=device, dtype=torch.float32).T, dim=1)


class Whitened(nn.Module):
    """A network followed by a whitening: what the test-time path embeds with when whitening is on.

    The extraction path (:func:`~oxford_ir.extraction.embedding.embed_batch`) runs ``network`` over each scale,
    combines the scales, then whitens; ``forward`` is the same for one scale.
    """

    def __init__(self, network: nn.Module, whitening: Whitening, *, name: str = "whitening") -> None:
        super().__init__()
        dim = int(getattr(network, "embedding_dim", 0) or 0)
        if dim and dim != whitening.input_dim:
            raise ConfigError(
                f"{name} expects {whitening.input_dim}-dimensional embeddings, but the model gives {dim}: it was "
                "learned for another model; learn it again for this one"
            )
        self.network = network
        self.whitening = whitening
        self.register_buffer("mean", whitening.mean.float().clone(), persistent=False)
        self.register_buffer("projection", whitening.projection.float().clone(), persistent=False)

    @property
    def embedding_dim(self) -> int:
        return self.whitening.output_dim

    @property
    def supports_padding(self) -> bool:
        return bool(getattr(self.network, "supports_padding", False))

    @property
    def padding_note(self) -> str | None:
        return getattr(self.network, "padding_note", None)

    @property
    def power(self) -> float:
        """The network's power, with which its scales are combined before whitening."""
        return float(getattr(self.network, "power", 1.0))

    def whiten(self, vectors: torch.Tensor) -> torch.Tensor:
        return whiten(vectors, self.mean, self.projection)

    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        return self.whiten(self.network(images) if sizes is None else self.network(images, sizes))


# -- fitting ----------------------------------------------------------------------------------------------
def shrink(covariance: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - shrinkage) C + shrinkage * tr(C) / D * I``: the same trace, eigenvalues pulled towards their mean."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"whitening.shrinkage={shrinkage}: a fraction in [0, 1] (0: the published estimate)")
    d = covariance.shape[0]
    target = torch.trace(covariance) / d
    return (1.0 - shrinkage) * covariance + shrinkage * target * torch.eye(d, dtype=covariance.dtype)


def _check_dim(dim: int | None, full: int) -> int:
    if dim is None:
        return full
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= full:
        raise ConfigError(f"whitening.dim={dim!r}: a whole number of output dimensions in 1..{full}, or null for all")
    return dim


def _descending_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return values.flip(0), vectors.flip(1)


def fit_learned(
    vectors: torch.Tensor,
    queries: torch.Tensor,
    positives: torch.Tensor,
    *,
    shrinkage: float = 0.0,
    dim: int | None = None,
) -> Whitening:
    """Radenović's learned whitening from the embeddings ``vectors`` (N x D) of the images of matching pairs
    ``(vectors[queries[i]], vectors[positives[i]])``; computed in float64.

    As cnnimageretrieval-pytorch's ``whitenlearn``: ``m`` is the mean of the pairs' first images, ``P1`` whitens the
    pair differences (``P1 S P1^T = I`` for the shrunk ``S``), and the rows of ``P = V^T P1`` follow the principal
    axes of every image's ``P1 (x - m)``, largest variance first.
    """
    x = vectors.detach().double().cpu()
    q = torch.as_tensor(queries, dtype=torch.long)
    p = torch.as_tensor(positives, dtype=torch.long)
    n, d = x.shape
    if len(q) == 0 or len(q) != len(p):
        raise DataError(f"learned whitening needs matching pairs: got {len(q)} first and {len(p)} second images")
    out_dim = _check_dim(dim, d)
    mean = x[q].mean(0)
    differences = x[q] - x[p]
    covariance = shrink(differences.T @ differences / len(q), shrinkage)
    lower, info = torch.linalg.cholesky_ex(covariance)
    if int(info) != 0:
        rank = int(torch.linalg.matrix_rank(covariance))
        raise DataError(
            f"learned whitening: the differences of {len(q)} matching pairs span {rank} of the {d} embedding "
            f"dimensions, too few to whiten them (whitening.shrinkage={shrinkage}); set whitening.shrinkage to "
            "0.1 or more, or learn from more pairs"
        )
    inverse = torch.linalg.solve_triangular(lower, torch.eye(d, dtype=x.dtype), upper=False)
    whitened = (x - mean) @ inverse.T
    variances, axes = _descending_eigh(whitened.T @ whitened / n)
    projection = (axes.T @ inverse)[:out_dim]
    return Whitening("learned", mean.float(), projection.float(), variances[:out_dim].float())


def fit_pca(vectors: torch.Tensor, *, shrinkage: float = 0.0, dim: int | None = None) -> Whitening:
    """PCA whitening of ``vectors`` (N x D): ``diag(lambda)^-1/2 V^T (x - m)`` from their (shrunk) covariance,
    largest variance first (cnnimageretrieval-pytorch's ``pcawhitenlearn``); computed in float64."""
    x = vectors.detach().double().cpu()
    n, d = x.shape
    if n < 2:
        raise DataError(f"PCA whitening needs at least 2 images, got {n}")
    out_dim = _check_dim(dim, d)
    mean = x.mean(0)
    centred = x - mean
    variances, axes = _descending_eigh(shrink(centred.T @ centred / n, shrinkage))
    kept = variances[:out_dim]
    floor = float(variances[0]) * 1e-10
    if not bool((kept > floor).all()):
        rank = int((variances > floor).sum())
        raise DataError(
            f"PCA whitening: {n} images span {rank} of the {d} embedding dimensions, fewer than the {out_dim} "
            f"kept (whitening.shrinkage={shrinkage}); set whitening.shrinkage to 0.1 or more, or whitening.dim to "
            f"at most {rank}"
        )
    projection = axes[:, :out_dim].T / kept.sqrt()[:, None]
    return Whitening("pca", mean.float(), projection.float(), kept.float())
