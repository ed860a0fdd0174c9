"""An exported ONNX embedder run by onnxruntime on the CPU, behind the same interface as the PyTorch one.

:func:`load_onnx_embedder` opens the file (:mod:`oxford_ir.models.onnx_file`: its metadata read as plain data and
checked) and returns an ``nn.Module`` the one extraction path (:mod:`oxford_ir.extraction.embedding`) runs like
any other: the same image loading, resizing, cropping, batching and scale combination, only the network runs in
onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oxford_ir.extraction.whitening import Whitened, Whitening
from oxford_ir.models.onnx_file import INPUT, OUTPUT, OnnxInfo, open_onnx


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
    white = info.whitening
    if white is not None:
        tensors = (torch.from_numpy(a) for a in (white.mean, white.projection, white.variances))
        whitening = Whitening(white.kind, *tensors, dict(white.info))
        return Whitened(network, whitening, name=f"the whitening in {path}").eval()
    return network.eval()
