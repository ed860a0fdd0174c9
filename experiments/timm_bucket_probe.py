"""Which timm CNNs keep bucket batching exact, and what finding out costs: the padding probe of
``backbone=timm`` (:class:`oxford_ir.models.timm_backbone.TimmBackbone`), run once per model, against the
baseline of embedding one 512-px image with the same model in the same run. Random initialisation (the probe
uses its own unit-gain weights, so the answer is the architecture's, whatever the weights).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/timm_bucket_probe.py resnet50 resnet101 convnext_tiny efficientnet_b0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from oxford_ir.models.timm_backbone import TimmBackbone  # noqa: E402

DEFAULT_MODELS = (
    "resnet50", "resnet101", "resnet152", "resnet50d", "convnext_tiny", "convnextv2_atto", "efficientnet_b0",
    "tf_efficientnet_b0", "mobilenetv3_large_100", "regnety_008", "densenet121",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--size", type=int, default=512, help="long side of the baseline image")
    args = parser.parse_args()
    print(f"| model | bucket batching | probe (s) | one {args.size} x {args.size * 3 // 4} image (s) |")
    print("|---|---|---|---|")
    image = torch.randn(1, 3, args.size * 3 // 4, args.size)
    for name in args.models:
        backbone = TimmBackbone(name=name, weights="none").eval()
        with torch.no_grad():
            backbone(image)  # warm-up: the first call of a shape pays for kernel selection
            start = time.perf_counter()
            backbone(image)
            forward = time.perf_counter() - start
        start = time.perf_counter()
        exact = backbone.supports_padding
        probe = time.perf_counter() - start
        mode = "exact (buckets)" if exact else "shape batches"
        print(f"| {name} | {mode} | {probe:.2f} | {forward:.2f} |", flush=True)


if __name__ == "__main__":
    main()
