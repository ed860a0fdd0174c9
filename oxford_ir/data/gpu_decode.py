"""Optional GPU JPEG decoding (``data.decode=gpu``): workers only read file bytes, the accelerator decodes.

Decoding full-size JPEGs with PIL is what limits training speed on a fast GPU: a DataLoader worker decodes
and resizes a few dozen 1024 px images per second, the GPU consumes more than a thousand. Here the workers
read the encoded bytes (:class:`EncodedTrainDataset`, :class:`EncodedEvalDataset`), the batch travels to
the device as an :class:`EncodedBatch` (the bytes stay in host memory, where nvJPEG reads them), and
:class:`GpuTrainDecoder` / :class:`GpuEvalDecoder` decode the whole batch with one
``torchvision.io.decode_jpeg(list, device=...)`` call, then crop, resize, flip, jitter and normalise on
the device. Training batches are decoded in ``RetrievalDataModule.on_after_batch_transfer`` (or ahead, by
:mod:`oxford_ir.data.prefetch`); evaluation batches by the extraction path
(:func:`oxford_ir.extraction.batches.decode_on_device`).

Same images as the CPU path:

- Files the device decoder cannot be trusted with are decoded in the worker by
  :func:`~oxford_ir.images.load_image` and travel as ``3 x H x W`` uint8 pixels: anything that is not
  a JPEG (PNG, WebP, ...), CMYK/YCCK and RGB-coded (Adobe transform 0) JPEGs, JPEGs that do not end with
  the end-of-image marker (truncated files: nvJPEG may not report them), above
  :data:`~oxford_ir.images.MAX_DECODED_PIXELS`, or whose header PIL cannot parse. A corrupt file
  therefore raises :class:`~oxford_ir.errors.DataError` naming it, as on the CPU path; no image is dropped.
- The EXIF orientation is read in the worker (a header parse) and applied on the device after decoding
  (exact flips and transposes; ``decode_jpeg`` applies it only on the CPU).
- Training crops use the CPU transform's random draws: the crop, flip and colour-jitter parameters of an
  image come from a ``torch.Generator`` seeded with its seed from
  :class:`~oxford_ir.data.sampler.ClassBalancedSampler` (:meth:`Augmentation.draw
  <oxford_ir.data.augmentation.Augmentation.draw>`, the draws of ``Augmentation.transform`` under
  ``torch.manual_seed(seed)``). Both paths crop the same region; a resumed run gets the same crops. The crops
  of the whole batch are then resized, flipped and jittered at once (:mod:`oxford_ir.data.batch_augment`).

Pixels differ slightly from the CPU path: nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's (on
the CPU, ``decode_jpeg`` and PIL agree exactly; nvJPEG upsamples 4:2:0 chroma by replication, libjpeg-turbo
with its "fancy" triangular filter: a few grey levels on colourful detail); training crops are resized as
torchvision resizes tensors (PIL's filters, float instead of PIL's uint8 rounding); evaluation images are resized
with antialiased bicubic interpolation of tensors instead of PIL's Lanczos.
Train with it for speed; report evaluation numbers from the default CPU path (``data.decode=cpu``).

With ``device='cpu'`` the same code runs (torchvision decodes with libjpeg-turbo), which is how the tests
check it; on a machine without CUDA that is slower than the CPU path with workers, so it only warns.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from oxford_ir.benchmarks.path_array import PathArray
from oxford_ir.data.augmentation import Augmentation, interpolation_mode
from oxford_ir.data.batch_augment import BatchAugmentation, check_resampling
from oxford_ir.data.eval_pixels import rounded_box
from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD, thumbnail_size
from oxford_ir.errors import ConfigError
from oxford_ir.images import DECODE_ERRORS, MAX_DECODED_PIXELS, load_image, to_rgb

log = logging.getLogger(__name__)

#: values of ``data.decode``
DECODE_CHOICES = ("cpu", "gpu")
#: EXIF orientation tag
_ORIENTATION = 0x0112
_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


# -- what the workers produce ----------------------------------------------------------------------
class EncodedImage(NamedTuple):
    """One image as a worker sends it: JPEG bytes for the device, or pixels the worker decoded itself."""

    #: 1-D uint8 JPEG file bytes (``decoded=False``) or ``3 x H x W`` uint8 RGB pixels (``decoded=True``)
    data: torch.Tensor
    decoded: bool
    #: EXIF orientation (1-8) to apply after decoding the bytes; 1 for pixels (load_image applied it)
    orientation: int
    path: str


class TrainItem(NamedTuple):
    image: EncodedImage
    label: int
    #: seed of the image's augmentation (crop, flip, colour jitter)
    seed: int


class EvalItem(NamedTuple):
    image: EncodedImage
    index: int
    #: query box ``(x1, y1, x2, y2)`` in pixels of the original image, or None
    bbox: tuple[float, float, float, float] | None


def read_encoded(path: str | Path | Image.Image, label: str | None = None) -> EncodedImage:
    """The bytes of a JPEG the device decoder handles, else the pixels decoded here by ``load_image``.

    Runs in DataLoader workers: reads the file and parses its header (no decoding) for a JPEG; anything
    else (see the module doc) is decoded with :func:`~oxford_ir.images.load_image`, which raises
    :class:`DataError` naming an unreadable file. An already decoded PIL image (an upload, named ``label``)
    travels as its RGB pixels with its EXIF orientation applied, as a file's would be.
    """
    if isinstance(path, Image.Image):
        return EncodedImage(pil_to_tensor(to_rgb(ImageOps.exif_transpose(path))), True, 1, label or "upload")
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError:
        raw = None  # missing, a folder, unreadable: load_image raises the DataError that says which
    if raw is not None:
        orientation = _device_decodable_orientation(raw)
        if orientation is not None:
            return EncodedImage(torch.from_numpy(raw), False, orientation, str(path))
    return EncodedImage(pil_to_tensor(load_image(path)), True, 1, str(path))


def _device_decodable_orientation(raw: np.ndarray) -> int | None:
    """The EXIF orientation of a JPEG that ``decode_jpeg`` decodes like PIL on any device; None otherwise."""
    if len(raw) < 8 or bytes(raw[:3]) != _JPEG_START or bytes(raw[-2:]) != _JPEG_END:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw.data)) as image:
                if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                    return None  # CMYK and YCCK: PIL's conversion is the reference
                if image.mode == "RGB" and image.info.get("adobe_transform") == 0:
                    return None  # components stored as RGB, not YCbCr
                if image.size[0] * image.size[1] > MAX_DECODED_PIXELS:
                    return None  # load_image says that it is too large
                orientation = int(image.getexif().get(_ORIENTATION, 1) or 1)
    except DECODE_ERRORS:
        return None
    return orientation if 1 <= orientation <= 8 else 1  # exif_transpose ignores other values


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """``3 x H x W`` uint8 tensor of an RGB PIL image."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


class EncodedTrainDataset(Dataset):
    """:class:`TrainItem` (encoded image, label, seed) for ``(index, seed)`` from ``ClassBalancedSampler``.

    A plain index (no seed) gets a seed drawn from torch's global generator (random, as on the CPU path).
    """

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int] | np.ndarray) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = PathArray.of(paths)  # compact: no Path object per image (1.6M images)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> TrainItem:
        if isinstance(item, tuple):
            index, seed = item
        else:
            index, seed = item, int(torch.randint(0, 2**62, ()).item())
        return TrainItem(read_encoded(self.paths[index]), int(self.labels[index]), int(seed))


class EncodedEvalDataset(Dataset):
    """:class:`EvalItem` (encoded image, index, box) per image; the evaluation counterpart of
    ``ImageListDataset``. ``paths`` are files or decoded PIL images (uploads, named by ``labels``)."""

    def __init__(
        self,
        paths: Sequence[str | Path | Image.Image],
        bboxes: Sequence[Sequence[float] | None] | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.paths = [p if isinstance(p, Image.Image) else Path(p) for p in paths]
        if bboxes is not None and len(bboxes) != len(self.paths):
            raise ValueError(f"{len(bboxes)} bounding boxes for {len(self.paths)} images; give one per image or None")
        self.bboxes = None if bboxes is None else [None if b is None else tuple(float(v) for v in b) for b in bboxes]
        self.labels = None if labels is None else list(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> EvalItem:
        bbox = None if self.bboxes is None else self.bboxes[index]
        label = self.labels[index] if self.labels is not None else f"upload {index}"
        return EvalItem(read_encoded(self.paths[index], label), int(index), bbox)


# -- the batch -------------------------------------------------------------------------------------
@dataclass
class EncodedBatch:
    """A batch of encoded images; ``labels`` and ``seeds`` for training, ``indices`` and ``bboxes`` for evaluation.

    ``to(device)`` (what Lightning calls) moves labels, indices and worker-decoded pixels, and keeps the JPEG
    bytes and seeds in host memory: nvJPEG reads its input from there, the seeds feed CPU generators.
    """

    data: list[torch.Tensor]
    decoded: list[bool]
    orientations: list[int]
    paths: list[str]
    labels: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    bboxes: list[tuple[float, float, float, float] | None] | None = None

    def __len__(self) -> int:
        return len(self.data)

    @property
    def is_train(self) -> bool:
        return self.labels is not None

    @property
    def device(self) -> torch.device:
        """Where the batch was sent (the decoders work there)."""
        targets = self.labels if self.labels is not None else self.indices
        return targets.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        data = [move(t) if decoded else t for t, decoded in zip(self.data, self.decoded, strict=True)]
        return EncodedBatch(
            data,
            self.decoded,
            self.orientations,
            self.paths,
            move(self.labels),
            self.seeds,
            move(self.indices),
            self.bboxes,
        )

    def pin_memory(self) -> EncodedBatch:
        """Page-locked copies (DataLoader ``pin_memory=True``): faster, asynchronous copies to the GPU."""

        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return EncodedBatch(
            [pin(t) for t in self.data],
            self.decoded,
            self.orientations,
            self.paths,
            pin(self.labels),
            self.seeds,
            pin(self.indices),
            self.bboxes,
        )


def collate_encoded(items: Sequence[TrainItem | EvalItem]) -> EncodedBatch:
    """DataLoader ``collate_fn`` of :class:`EncodedTrainDataset` and :class:`EncodedEvalDataset`."""
    if len(items) == 0:
        raise ValueError("cannot collate an empty batch")
    kind = type(items[0])
    if kind not in (TrainItem, EvalItem) or any(type(item) is not kind for item in items):
        kinds = sorted({type(item).__name__ for item in items})
        raise TypeError(f"collate_encoded takes TrainItem or EvalItem batches (not mixed), got {kinds}")
    images = [item.image for item in items]
    batch = EncodedBatch(
        data=[image.data for image in images],
        decoded=[bool(image.decoded) for image in images],
        orientations=[int(image.orientation) for image in images],
        paths=[str(image.path) for image in images],
    )
    if kind is TrainItem:
        batch.labels = torch.tensor([item.label for item in items], dtype=torch.long)
        batch.seeds = torch.tensor([item.seed for item in items], dtype=torch.long)
    else:
        batch.indices = torch.tensor([item.index for item in items], dtype=torch.long)
        batch.bboxes = [item.bbox for item in items]
    return batch


# -- decoding on the device ------------------------------------------------------------------------
_PROBED: set[str] = set()
_PROBE_LOCK = threading.Lock()


def decode_images(batch: EncodedBatch) -> list[torch.Tensor]:
    """``3 x H x W`` uint8 RGB images on ``batch.device``, EXIF orientation applied, as ``load_image`` shows them.

    All JPEG bytes go to one ``decode_jpeg`` call. If it fails, each image is decoded alone, and one that
    the device decoder refuses is decoded by PIL on the CPU (logged) or raises :class:`DataError` naming it.
    """
    device = batch.device
    _probe(device)
    images: list[torch.Tensor | None] = [
        t.to(device) if decoded else None for t, decoded in zip(batch.data, batch.decoded, strict=True)
    ]
    pending = [i for i, decoded in enumerate(batch.decoded) if not decoded]
    if pending:
        try:
            decoded = _decode_jpegs([batch.data[i] for i in pending], device)
        except RuntimeError:
            decoded = [_decode_one(batch.data[i], batch.paths[i], device) for i in pending]
        for i, image in zip(pending, decoded, strict=True):
            images[i] = apply_orientation(_as_rgb(image), batch.orientations[i])
    return images


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg  # imported where used (a second)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    try:
        return _decode_jpegs([data], device)[0]
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        image = pil_to_tensor(load_image(path))  # DataError naming the file when PIL cannot decode it either
        log.warning("%s: torchvision could not decode it on %s (%s); decoded by PIL on the CPU", path, device, reason)
        return image.to(device)


def _as_rgb(image: torch.Tensor) -> torch.Tensor:
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _probe(device: torch.device) -> None:
    """Decode a tiny JPEG once per device: a torchvision without nvJPEG fails here with a ConfigError."""
    key = str(device)
    if key in _PROBED:
        return
    with _PROBE_LOCK:
        if key in _PROBED:
            return
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 90)).save(buffer, "JPEG")
        try:
            _decode_jpegs([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], device)
        except (RuntimeError, ValueError) as error:
            raise ConfigError(
                f"data.decode=gpu: torchvision cannot decode JPEGs on {device} ({str(error).strip()[:200]}); "
                "install a torchvision built with nvJPEG (the CUDA wheels are) or set data.decode=cpu"
            ) from None
        _PROBED.add(key)


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``C x H x W`` image as PIL's ``ImageOps.exif_transpose`` shows one with this EXIF orientation."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return image.flip(-1)
    if orientation == 3:  # ROTATE_180
        return image.flip(-2, -1)
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return image.flip(-2)
    if orientation == 5:  # TRANSPOSE
        return image.transpose(-2, -1)
    if orientation == 6:  # ROTATE_270 (a quarter turn clockwise)
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:  # TRANSVERSE
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:  # ROTATE_90 (a quarter turn counter-clockwise)
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def _normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or [0, 1] float) ``... x 3 x H x W`` -> float, minus mean, over std (``to_tensor`` + ``normalize``)."""
    images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean_t) / std_t


# -- training --------------------------------------------------------------------------------------
class GpuTrainDecoder:
    """Training batch on its device -> ``(B x 3 x S x S`` normalised float images, labels)``.

    The device counterpart of ``Augmentation.transform(image_size)``: the batch is decoded with one
    ``decode_jpeg`` call, each image's draws come from its seed (:meth:`Augmentation.draw
    <oxford_ir.data.augmentation.Augmentation.draw>`, on the host), and RandomResizedCrop (antialiased), the
    flip, colour jitter and normalisation run on the whole batch as tensor operations
    (:meth:`~oxford_ir.data.batch_augment.BatchAugmentation.crop_and_finish`). Crops are a function of each
    image's seed (see the module doc); pixels are close to, not equal to, the CPU path's.
    """

    def __init__(self, image_size: int, augmentation: Augmentation | Mapping[str, Any] | None = None) -> None:
        if not isinstance(augmentation, Augmentation):
            augmentation = Augmentation.from_config(augmentation)
        check_resampling(augmentation.interpolation)
        self.batch_augmentation = BatchAugmentation(image_size, augmentation)
        self.image_size = image_size
        self.augmentation = augmentation

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if not batch.is_train or batch.seeds is None:
            raise TypeError("GpuTrainDecoder needs a training batch (from EncodedTrainDataset), got an evaluation one")
        images = decode_images(batch)
        draws = [
            self.augmentation.draw(seed, image.shape[-2], image.shape[-1])
            for image, seed in zip(images, batch.seeds.tolist(), strict=True)
        ]
        return self.batch_augmentation.crop_and_finish(images, draws), batch.labels

    def prepare(self, batch: EncodedBatch, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Move ``batch`` to ``device`` (labels, worker-decoded pixels) and decode it there (for a prefetcher)."""
        return self(batch.to(device, non_blocking=True))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, {self.augmentation})"


# -- evaluation ------------------------------------------------------------------------------------
class GpuEvalDecoder:
    """Evaluation batch on its device -> ``(list of normalised 3 x H x W images, indices)``, as ``ImageListDataset``.

    The long side is downscaled to ``image_size`` (never upscaled; None keeps the size) with PIL's thumbnail
    sizes; a query is cropped to its box at full resolution first (PIL's rounding, black outside the image)
    and resized to ``image_size * max(crop) / max(full image)``. Sizes equal the CPU path's; pixels do not,
    because tensors have no Lanczos filter: antialiased bicubic (the default) is the closest, measured on
    real Oxford/Paris photos at 362 px, about 2.4 times closer to PIL's Lanczos than antialiased bilinear
    (mean absolute difference 0.014 vs 0.034 in normalised units). Report papers' numbers from the CPU path.
    """

    def __init__(
        self,
        image_size: int | None,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        valid = isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 1
        if image_size is not None and not valid:
            raise ConfigError(f"eval_image_size must be a positive number of pixels or None, got {image_size!r}")
        if interpolation not in ("bilinear", "bicubic"):
            raise ConfigError(f"GPU evaluation resizing is bilinear or bicubic (antialiased), got {interpolation!r}")
        self.image_size = image_size
        self.interpolation = interpolation_mode(interpolation)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, batch: EncodedBatch) -> tuple[list[torch.Tensor], torch.Tensor]:
        if batch.indices is None:
            raise TypeError("GpuEvalDecoder needs an evaluation batch (from EncodedEvalDataset), got a training one")
        images = decode_images(batch)
        bboxes = batch.bboxes or [None] * len(images)
        rows = zip(images, bboxes, batch.paths, strict=True)
        return [self.preprocess(image, bbox, path) for image, bbox, path in rows], batch.indices

    def preprocess(self, image: torch.Tensor, bbox: Sequence[float] | None, path: str) -> torch.Tensor:
        """One decoded ``3 x H x W`` uint8 image -> cropped, downscaled, normalised float tensor on its device."""
        size: float | None = self.image_size
        if bbox is not None:
            full = max(image.shape[-2:])
            image = crop_box(image, bbox, path)
            if size is not None:
                size = size * max(image.shape[-2:]) / full
        if size is not None:
            width, height = thumbnail_size(image.shape[-1], image.shape[-2], max(size, 1.0))
            if (height, width) != tuple(image.shape[-2:]):
                from torchvision.transforms.v2 import functional as TF  # imported where used (a second)

                image = TF.resize(image, [height, width], interpolation=self.interpolation, antialias=True)
        return _normalise(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, interpolation={self.interpolation.value})"


def crop_box(image: torch.Tensor, bbox: Sequence[float], path: str) -> torch.Tensor:
    """``C x H x W`` image cropped as ``PIL.Image.crop(bbox)``: coordinates rounded, black outside the image."""
    x1, y1, x2, y2 = rounded_box(bbox, path)
    height, width = image.shape[-2:]
    if min(x1, y1) >= 0 and x2 <= width and y2 <= height:
        return image[..., y1:y2, x1:x2]
    out = image.new_zeros((*image.shape[:-2], y2 - y1, x2 - x1))
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if sx2 > sx1 and sy2 > sy1:
        out[..., sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[..., sy1:sy2, sx1:sx2]
    return out


# -- wiring ----------------------------------------------------------------------------------------
def check_decode(decode: str) -> bool:
    """Validate ``data.decode``; True for ``gpu``. Without CUDA, ``gpu`` still works (on the CPU) but warns."""
    if decode not in DECODE_CHOICES:
        raise ConfigError(f"data.decode={decode!r} is unknown; choose one of {', '.join(DECODE_CHOICES)}")
    if decode == "gpu" and not torch.cuda.is_available():
        log.warning(
            "data.decode=gpu but no CUDA device: JPEGs are decoded on the CPU in the training process, one "
            "image after another (the GPU code path, useful for testing); data.decode=cpu with "
            "data.num_workers > 0 is faster here"
        )
    return decode == "gpu"
