"""Exporting the embedding model of a :class:`~oxford_ir.retrieval.model_spec.ModelSpec` to ONNX, checked.

The graph is the network (backbone, pooling, projection, L2 normalisation) with the batch, height and width
dynamic; the metadata (:mod:`oxford_ir.models.onnx_file`) carries the model's fingerprint and spec, the
input normalisation, GeM's power and the post-hoc whitening. GeM is exported as a mean over the feature map
(``avg_pool2d`` with the map's size as kernel would freeze the export's input size into the graph). Before the
file is written, onnxruntime embeds random images of two sizes and the result must match PyTorch to
``tolerance``: a model that does not export faithfully is refused, not written.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from oxford_ir.errors import ConfigError
from oxford_ir.fs import replace_file
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.onnx_file import INPUT, OUTPUT, metadata_props, onnx_session, read_onnx_info
from oxford_ir.models.pooling import GeM
from oxford_ir.retrieval.model_spec import ModelSpec

log = logging.getLogger(__name__)

#: the (height, width) of the random images the export is checked with: two shapes, neither the traced one
CHECK_SIZES = ((72, 56), (48, 96))
#: the largest difference allowed between the PyTorch and onnxruntime embeddings (L2-normalised)
TOLERANCE = 1e-4
#: ONNX opset written
OPSET = 17


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how closely onnxruntime reproduced PyTorch."""

    path: Path
    embedding_dim: int
    max_difference: float
    sizes: tuple[tuple[int, int], ...]
    whitened: bool

    def summary(self) -> str:
        shapes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
        return (
            f"wrote {self.path} ({self.embedding_dim}-d{', whitened' if self.whitened else ''}); onnxruntime vs "
            f"PyTorch on random images of {shapes}: largest difference {self.max_difference:.2e}"
        )


class _Exportable(nn.Module):
    """:class:`Embedder`'s forward on unpadded images, GeM as a mean over the map (no fixed pooling kernel)."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        e = self.embedder
        x = e.backbone(images)
        if isinstance(e.pooling, GeM):
            p = e.pooling.p.to(x.dtype)
            x = x.clamp(min=e.pooling.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
        else:
            x = e.pooling(x)
        if e.projection is not None:
            x = e.projection(F.normalize(x, dim=1))
        return F.normalize(x, dim=1)


def export_onnx(
    spec: ModelSpec,
    out: str | Path,
    *,
    check_sizes: Sequence[tuple[int, int]] = CHECK_SIZES,
    tolerance: float = TOLERANCE,
) -> ExportReport:
    """Write the ONNX file of ``spec``'s model to ``out`` (atomically) after checking it against PyTorch."""
    if spec.onnx is not None:
        raise ConfigError(f"{spec.onnx} is already an ONNX file; export from its checkpoint (ckpt_path=...)")
    out = Path(out).expanduser()
    if out.suffix.lower() != ".onnx":
        raise ConfigError(f"out={out}: give a file name ending in .onnx")
    network = spec.network.build("cpu")
    whitening = spec.load_whitening()
    graph = _Exportable(network) if isinstance(network, Embedder) else network
    graph.eval()
    traced = torch.zeros(1, 3, 64, 64)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's to act on
        try:
            torch.onnx.export(
                graph,
                (traced,),
                buffer,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch"}},
                opset_version=OPSET,
                dynamo=False,
            )
        except Exception as error:  # the exporter raises many kinds for an unsupported operator
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(f"{spec.describe()} cannot be exported to ONNX: {reason[:300]}") from None
    import onnx

    model = onnx.load_from_string(buffer.getvalue())
    props = metadata_props(
        model_fingerprint=spec.fingerprint(),
        model_spec=spec.to_dict(),
        model_description=spec.describe(),
        network_dim=int(network.embedding_dim),
        pooling_power=float(getattr(network, "power", 1.0)),
        whitening=whitening,
    )
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "oxford-ir"
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    difference = _check(network, data, check_sizes, out)
    if not difference <= tolerance:
        raise ConfigError(
            f"{spec.describe()}: the exported graph gives embeddings up to {difference:.2e} away from PyTorch's "
            f"(allowed {tolerance:.0e}) at input sizes {list(check_sizes)}: the network has an operator that "
            "depends on the traced input size; it was not written"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(out, data)
    return ExportReport(
        path=out,
        embedding_dim=whitening.output_dim if whitening is not None else int(network.embedding_dim),
        max_difference=difference,
        sizes=tuple(tuple(s) for s in check_sizes),
        whitened=whitening is not None,
    )


def _check(network: nn.Module, data: bytes, sizes: Sequence[tuple[int, int]], out: Path) -> float:
    """Largest absolute difference between PyTorch's and onnxruntime's embeddings of random images (2 per size);
    the metadata is read back as a loader would."""
    session = onnx_session(data, str(out))
    read_onnx_info(out, session.get_modelmeta().custom_metadata_map)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for height, width in sizes:
        images = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = network(images).numpy()
        (found,) = session.run([OUTPUT], {INPUT: images.numpy()})
        worst = max(worst, float(abs(found - expected).max()))
    return worst
