"""An exported ONNX embedder's file, without PyTorch: its metadata, read and checked, and its onnxruntime session.

``oxford-ir-export`` writes the network (backbone, pooling, projection, L2 normalisation; inputs ``images``
B x 3 x H x W with every size dynamic) and, in the file's ``metadata_props``, what the rest of the test-time
path needs: the fingerprint and spec of the model it came from (so that an index built from either can be
searched with the other, and with nothing else), the input normalisation, GeM's power (multi-scale extraction
combines scales with it), the embedding size and the post-hoc whitening, if any, as plain numbers.
:func:`read_onnx_info` reads that metadata as JSON and base64 (nothing in the file is imported or unpickled) and
checks it. :mod:`oxford_ir.models.onnx_embedder` wraps a session as an ``nn.Module`` for the extraction path;
:mod:`oxford_ir.retrieval.onnx_queries` runs it without PyTorch.
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

from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oxford_ir.errors import CheckpointError, ConfigError
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
    whitening: ArrayWhitening | None


@dataclass(frozen=True)
class ArrayWhitening:
    """The whitening an exported file carries, as float32 arrays: ``normalize(projection @ (x - mean))``
    (:class:`~oxford_ir.extraction.whitening.Whitening` holds the same as tensors)."""

    kind: str
    mean: np.ndarray
    projection: np.ndarray
    variances: np.ndarray
    info: dict

    @property
    def output_dim(self) -> int:
        return int(self.projection.shape[0])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Whitened, L2-normalised ``vectors`` (N x D -> N x d) in float32."""
        x = (np.asarray(vectors, dtype=np.float32) - self.mean) @ self.projection.T
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def encode_array(array: Any) -> dict[str, Any]:
    """A float32 array (or CPU tensor) as plain data: ``{"shape": [...], "float32_base64": "..."}`` (exact,
    unlike decimal text)."""
    if hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    values = np.ascontiguousarray(np.asarray(array)).astype("<f4")
    return {"shape": list(values.shape), "float32_base64": base64.b64encode(values.tobytes()).decode("ascii")}


def decode_array(data: Any, where: str) -> np.ndarray:
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
    return values.astype(np.float32)


def metadata_props(
    *,
    model_fingerprint: str,
    model_spec: Mapping[str, Any],
    model_description: str,
    network_dim: int,
    pooling_power: float,
    whitening: Any,
) -> dict[str, str]:
    """The ``metadata_props`` an exported embedder carries (every value a string); ``whitening``: a
    :class:`~oxford_ir.extraction.whitening.Whitening` or None."""
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


def _read_whitening(data: Any, where: str, network_dim: int) -> ArrayWhitening | None:
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
    return ArrayWhitening(str(data["kind"]), mean, projection, variances, dict(data["info"]))


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
