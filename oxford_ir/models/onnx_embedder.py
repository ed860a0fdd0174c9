"""An exported ONNX embedder run by onnxruntime on the CPU, behind the same interface as the PyTorch one.

``oxford-ir-export`` writes the network (backbone, pooling, projection, L2 normalisation; inputs ``images``
B x 3 x H x W with every size dynamic) and, in the file's ``metadata_props``, what the rest of the test-time
path needs: the fingerprint and spec of the model it came from (so that an index built from either can be
searched with the other, and with nothing else), the input normalisation, GeM's power (multi-scale extraction
combines scales with it), the embedding size and the post-hoc whitening, if any, as plain numbers.
:func:`load_onnx_embedder` reads that metadata as JSON and base64 (nothing in the file is imported or
unpickled), checks it, and returns an ``nn.Module`` the one extraction path
(:mod:`oxford_ir.extraction.embedding`) runs like any other: the same image loading, resizing, cropping,
batching and scale combination, only the network runs in onnxruntime.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oxford_ir.errors import CheckpointError, ConfigError
from oxford_ir.extraction.whitening import Whitened, Whitening
from oxford_ir.trusted_targets import check_trusted

#: what an exported file says it is, and the version of its metadata
FORMAT = "oxford-ir-embedder"
FORMAT_VERSION = 1
#: the graph's input and output names
INPUT, OUTPUT = "images", "embedding"
#: metadata_props keys (all values are strings)
KEYS = (
    "format",
    "format_version",
    "model_fingerprint",
    "model_spec",
    "model_description",
    "embedding_dim",
    "network_dim",
    "pooling_power",
    "mean",
    "std",
    "whitening",
)
#: sessions (and their metadata) already opened in this process, keyed by (path, size, mtime_ns)
_sessions: dict[tuple[str, int, int], tuple[Any, OnnxInfo]] = {}


@dataclass(frozen=True)
class OnnxInfo:
    """The metadata of an exported embedder, read back as plain data and checked."""

    path: str
    model_fingerprint: str
    model_spec: dict
    model_description: str
    embedding_dim: int
    network_dim: int
    pooling_power: float
    whitening: Whitening | None


def encode_array(array: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """A float32 array as plain data: ``{"shape": [...], "float32_base64": "..."}`` (exact, unlike decimal text)."""
    values = np.ascontiguousarray(np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array))
    values = values.astype("<f4")
    return {"shape": list(values.shape), "float32_base64": base64.b64encode(values.tobytes()).decode("ascii")}


def decode_array(data: Any, where: str) -> torch.Tensor:
    """Inverse of :func:`encode_array`; a malformed value is a CheckpointError naming ``where``."""
    try:
        shape = [int(s) for s in data["shape"]]
        raw = base64.b64decode(data["float32_base64"], validate=True)
        values = np.frombuffer(raw, dtype="<f4").reshape(shape)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{where} is malformed ({type(error).__name__}: {error}); export the model again"
        ) from None
    if not np.isfinite(values).all():
        raise CheckpointError(f"{where} holds NaN or infinite values; export the model again")
    return torch.from_numpy(values.astype(np.float32))


def metadata_props(
    *,
    model_fingerprint: str,
    model_spec: Mapping[str, Any],
    model_description: str,
    network_dim: int,
    pooling_power: float,
    whitening: Whitening | None,
) -> dict[str, str]:
    """The ``metadata_props`` an exported embedder carries (every value a string)."""
    white = None
    if whitening is not None:
        white = {
            "kind": whitening.kind,
            "mean": encode_array(whitening.mean),
            "projection": encode_array(whitening.projection),
            "variances": encode_array(whitening.variances),
            "info": whitening.info,
        }
    props = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_fingerprint": model_fingerprint,
        "model_spec": dict(model_spec),
        "model_description": model_description,
        "embedding_dim": whitening.output_dim if whitening is not None else int(network_dim),
        "network_dim": int(network_dim),
        "pooling_power": float(pooling_power),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "whitening": white,
    }
    return {key: json.dumps(value) for key, value in props.items()}


def read_onnx_info(path: str | Path, props: Mapping[str, str]) -> OnnxInfo:
    """The checked metadata of the exported file ``path`` (its ``metadata_props`` as a mapping of strings)."""
    where = f"{path}"
    hint = "export it with oxford-ir-export ckpt_path=<checkpoint> format=onnx"
    if "format" not in props:
        raise CheckpointError(f"{where} is an ONNX file without oxford-ir metadata (no {FORMAT!r} format); {hint}")
    values: dict[str, Any] = {}
    for key in KEYS:
        if key not in props:
            raise CheckpointError(f"{where}: the metadata lacks {key!r}; {hint}")
        try:
            values[key] = json.loads(props[key])
        except ValueError:
            raise CheckpointError(f"{where}: the metadata value {key!r} is not JSON; {hint}") from None
    if values["format"] != FORMAT:
        raise CheckpointError(f"{where}: metadata format {values['format']!r}, not {FORMAT!r}; {hint}")
    version = values["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: metadata version {version!r}; this oxford-ir reads up to {FORMAT_VERSION}")
    for key, expected in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        found = values[key]
        if (
            not isinstance(found, list)
            or len(found) != 3
            or any(abs(float(a) - b) > 1e-6 for a, b in zip(found, expected, strict=True))
        ):
            raise CheckpointError(
                f"{where}: the network expects images normalised with {key} {found}, but the extraction path "
                f"normalises with {list(expected)}; export a model trained with this project's preprocessing"
            )
    spec = values["model_spec"]
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: the metadata's model_spec is not a mapping; {hint}")
    check_trusted(spec.get("embedder"), where, "metadata.model_spec.embedder")  # only described, never built
    try:
        fingerprint = str(values["model_fingerprint"])
        embedding_dim, network_dim = int(values["embedding_dim"]), int(values["network_dim"])
        power = float(values["pooling_power"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: malformed metadata ({error}); {hint}") from None
    if len(fingerprint) != 64 or embedding_dim < 1 or network_dim < 1 or not (math.isfinite(power) and power > 0):
        raise CheckpointError(f"{where}: the metadata's fingerprint, sizes or pooling power are invalid; {hint}")
    whitening = _read_whitening(values["whitening"], where, network_dim)
    if (whitening.output_dim if whitening is not None else network_dim) != embedding_dim:
        raise CheckpointError(f"{where}: embedding_dim {embedding_dim} does not match the network and whitening")
    return OnnxInfo(
        path=str(path),
        model_fingerprint=fingerprint,
        model_spec=spec,
        model_description=str(values["model_description"]),
        embedding_dim=embedding_dim,
        network_dim=network_dim,
        pooling_power=power,
        whitening=whitening,
    )


def _read_whitening(data: Any, where: str, network_dim: int) -> Whitening | None:
    if data is None:
        return None
    if (
        not isinstance(data, dict)
        or data.get("kind") not in ("learned", "pca")
        or not isinstance(data.get("info"), dict)
    ):
        raise CheckpointError(f"{where}: the metadata's whitening is malformed; export the model again")
    mean, projection, variances = (
        decode_array(data.get(k), f"{where}: metadata whitening.{k}") for k in ("mean", "projection", "variances")
    )
    if (
        mean.shape != (network_dim,)
        or projection.ndim != 2
        or projection.shape[1] != network_dim
        or variances.shape != (projection.shape[0],)
    ):
        raise CheckpointError(f"{where}: the metadata's whitening has shapes that do not fit the network")
    check_trusted(data["info"], where, "metadata.whitening.info")
    return Whitening(str(data["kind"]), mean, projection, variances, dict(data["info"]))


def onnx_session(model: str | bytes, name: str) -> Any:
    """An onnxruntime session on the CPU of the file path or serialised graph ``model`` (``name`` in messages)."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(f"{name}: running an ONNX model needs onnxruntime: pip install -e '.[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are not the user's to act on
    try:
        session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"cannot load ONNX file {name}: {reason[:300]}; export the model again") from None
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != ([INPUT], [OUTPUT]):
        raise CheckpointError(f"{name}: the graph's inputs/outputs are {names}, not ([{INPUT!r}], [{OUTPUT!r}])")
    return session


def open_onnx(path: str | Path) -> tuple[Any, OnnxInfo]:
    """``(onnxruntime session on the CPU, checked metadata)`` of ``path``, opened once per file version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX file not found: {path}; export one with oxford-ir-export ckpt_path=<checkpoint>")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sessions:
        session = onnx_session(str(path), str(path))
        _sessions[key] = (session, read_onnx_info(path, session.get_modelmeta().custom_metadata_map))
    return _sessions[key]


class OnnxNetwork(nn.Module):
    """The exported network as an ``nn.Module``: B x 3 x H x W images in, L2-normalised B x D out (on the
    images' device; onnxruntime computes on the CPU). It has no parameters; padded batches are not supported,
    so the extraction path plans exact shape batches for it."""

    supports_padding = False

    def __init__(self, session: Any, info: OnnxInfo) -> None:
        super().__init__()
        self.session = session
        self.info = info
        self.embedding_dim = info.network_dim

    @property
    def power(self) -> float:
        return self.info.pooling_power

    def forward(self, images: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        if sizes is not None:
            raise ValueError("an ONNX embedder cannot pool padded images; plan shape batches (batching=shape)")
        feed = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
        (out,) = self.session.run([OUTPUT], {INPUT: feed})
        return torch.from_numpy(out).to(images.device)

    def extra_repr(self) -> str:
        return f"{self.info.path}, dim={self.embedding_dim}"


def load_onnx_embedder(path: str | Path) -> nn.Module:
    """The exported embedder of ``path`` in eval mode: the network, whitened as it was exported (if it was)."""
    session, info = open_onnx(path)
    network = OnnxNetwork(session, info)
    if info.whitening is not None:
        return Whitened(network, info.whitening, name=f"the whitening in {path}").eval()
    return network.eval()
