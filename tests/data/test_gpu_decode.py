"""The GPU JPEG decode path, run on the CPU through the same code (two tests run on CUDA when present: nvJPEG
against libjpeg-turbo with bounds for what nvJPEG does differently, and a corrupt JPEG on the device).

References: PIL through ``load_image`` (decoded pixels), ``ImageListDataset`` (evaluation tensors),
``Augmentation.transform`` under ``torch.manual_seed(seed)`` (training crops), torchvision's own
``get_params`` (random draws), ``PIL.Image.thumbnail`` and ``PIL.Image.crop`` (sizes and boxes). The batched
augmentation itself is tested in ``test_batch_augment.py``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from oxford_ir.data.augmentation import Augmentation
from oxford_ir.data.datasets import ImageListDataset
from oxford_ir.data.gpu_decode import (
    EncodedBatch,
    EncodedEvalDataset,
    EncodedTrainDataset,
    EvalItem,
    GpuEvalDecoder,
    GpuTrainDecoder,
    TrainItem,
    check_decode,
    collate_encoded,
    crop_box,
    decode_images,
    pil_to_tensor,
    read_encoded,
)
from oxford_ir.data.transforms import IMAGENET_STD, thumbnail_size
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.images import load_image

#: one grey level in normalised units, for the channel with the smallest std (the largest step)
LEVEL = 1 / 255 / min(IMAGENET_STD)
NO_JITTER = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured, coloured ``height x width x 3`` uint8 picture (JPEG-friendly, unlike noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3), rng.uniform(0, 6.3)
        channels.append(128 + 70 * np.sin(fx * x + phase) * np.cos(fy * y + c) + 40 * (x / width - y / height))
    return np.clip(np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3)), 0, 255).astype(np.uint8)


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def jpeg(tmp_path: Path, name: str, width: int = 40, height: int = 28, seed: int = 0, **options) -> Path:
    return save(Image.fromarray(photo(width, height, seed)), tmp_path / name, format="JPEG", quality=90, **options)


def batch_of(items) -> EncodedBatch:
    return collate_encoded(items).to("cpu")


def eval_batch(paths, bboxes=None) -> EncodedBatch:
    dataset = EncodedEvalDataset(paths, bboxes)
    return batch_of([dataset[i] for i in range(len(dataset))])


def train_batch(paths, seeds) -> EncodedBatch:
    dataset = EncodedTrainDataset(paths, list(range(10, 10 + len(paths))))
    return batch_of([dataset[(i, seed)] for i, seed in enumerate(seeds)])


def cpu_train_crop(path: Path, seed: int, augmentation: Augmentation, size: int) -> torch.Tensor:
    """What the CPU path (``TrainImageDataset``) makes of ``path`` for ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return augmentation.transform(size)(load_image(path))


# -- decoding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2}, {"progressive": True}],
    ids=["444", "422", "420", "progressive"],
)
def test_jpegs_go_to_the_decoder_and_match_pil_exactly(tmp_path, options):
    # torchvision's CPU decode and PIL both use libjpeg-turbo with the same settings: identical pixels
    paths = [jpeg(tmp_path, f"{i}.jpg", 37 + 8 * i, 29, seed=i, **options) for i in range(3)]
    batch = eval_batch(paths)
    assert batch.decoded == [False] * 3 and all(t.dim() == 1 for t in batch.data)
    for path, image in zip(paths, decode_images(batch), strict=True):
        assert image.dtype == torch.uint8
        assert torch.equal(image, pil_to_tensor(load_image(path)))


def test_grayscale_jpeg_is_decoded_as_rgb(tmp_path):
    path = save(Image.fromarray(photo(30, 20)[..., 1]), tmp_path / "gray.jpg", format="JPEG")
    batch = eval_batch([path])
    assert batch.decoded == [False]
    (image,) = decode_images(batch)
    assert image.shape == (3, 20, 30)
    assert torch.equal(image, pil_to_tensor(load_image(path)))


def _cmyk_jpeg(tmp_path):
    return save(Image.fromarray(photo(30, 20)).convert("CMYK"), tmp_path / "cmyk.jpg", format="JPEG")


def _rgba_png(tmp_path):
    array = np.concatenate([photo(30, 20), np.full((20, 30, 1), 255, np.uint8)], axis=-1)
    array[:5, :, 3] = 0  # transparent band: composited onto white by load_image
    return save(Image.fromarray(array, "RGBA"), tmp_path / "alpha.png")


def _gray_png(tmp_path):
    return save(Image.fromarray(photo(30, 20)[..., 0]), tmp_path / "gray.png")


def _jpeg_named_png(tmp_path):
    return save(Image.fromarray(photo(30, 20)), tmp_path / "really_a.png", format="PNG")


@pytest.mark.parametrize("make", [_cmyk_jpeg, _rgba_png, _gray_png, _jpeg_named_png])
def test_other_files_are_decoded_in_the_worker_like_load_image(tmp_path, make):
    path = make(tmp_path)
    encoded = read_encoded(path)
    assert encoded.decoded and encoded.orientation == 1
    reference = pil_to_tensor(load_image(path))
    assert torch.equal(encoded.data, reference)
    (image,) = decode_images(eval_batch([path]))
    assert torch.equal(image, reference)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_after_decoding(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = jpeg(tmp_path, "rotated.jpg", 40, 24, exif=exif.tobytes())
    encoded = read_encoded(path)
    assert not encoded.decoded and encoded.orientation == orientation  # stays on the fast path
    reference = pil_to_tensor(load_image(path))
    (image,) = decode_images(eval_batch([path]))
    assert image.shape == reference.shape == ((3, 40, 24) if orientation >= 5 else (3, 24, 40))
    assert torch.equal(image, reference)


def _garbage(path: Path) -> None:
    path.write_bytes(b"not an image at all" * 10)


def _truncated(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(photo(40, 30)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    "corrupt", [_garbage, _truncated, _empty, None], ids=["garbage", "truncated", "empty", "missing"]
)
def test_unreadable_files_raise_a_data_error_naming_them_in_the_worker(tmp_path, corrupt):
    path = tmp_path / "broken.jpg"
    if corrupt is not None:
        corrupt(path)
    with pytest.raises(DataError, match="broken.jpg"):
        EncodedEvalDataset([path])[0]
    with pytest.raises(DataError, match="broken.jpg"):
        EncodedTrainDataset([path], [0])[(0, 1)]


def _with_a_scan_of_an_unknown_component(jpeg_bytes: bytes) -> bytes:
    """The JPEG with its scan header naming component 9, which the frame does not have: every marker is in
    place (any Pillow parses the header, so the worker sends the bytes), but no decoder can decode the scan."""
    data = bytearray(jpeg_bytes)
    scan = data.index(b"\xff\xda")  # SOS: marker, length (2), number of components, then (id, tables) pairs
    assert data[scan + 4] == 3 and data[scan + 5] == 1
    data[scan + 5] = 9
    return bytes(data)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_a_jpeg_that_fails_to_decode_on_the_device_raises_a_data_error_naming_it(tmp_path, device):
    # the worker sends both files' bytes; on the device the batch decode fails (libjpeg-turbo on the CPU, nvJPEG
    # on CUDA), each image is decoded alone, and the bad one goes to PIL, which fails too: DataError naming it
    good = jpeg(tmp_path, "good.jpg")
    bad = tmp_path / "bad_scan.jpg"
    bad.write_bytes(_with_a_scan_of_an_unknown_component(good.read_bytes()))
    batch = train_batch([good, bad], [1, 2])
    assert batch.decoded == [False, False]
    batch = batch.to(device)
    with pytest.raises(DataError, match="bad_scan.jpg"):
        decode_images(batch)
    with pytest.raises(DataError, match="bad_scan.jpg"):
        GpuTrainDecoder(16)(batch)
    (image,) = decode_images(train_batch([good], [1]).to(device))  # the decoder still works afterwards
    assert image.device.type == device and image.shape == (3, 28, 40)


# -- evaluation -------------------------------------------------------------------------------------
def test_thumbnail_size_equals_pil(tmp_path):
    for width, height in [(100, 60), (60, 100), (77, 77), (1024, 768), (333, 1000), (5, 301), (301, 5)]:
        for size in [1, 1.7, 4, 31.5, 64, 99.99, 100, 362, 1500]:
            image = Image.new("RGB", (width, height))
            image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=None)
            assert thumbnail_size(width, height, size) == image.size, (width, height, size)


def test_crop_box_equals_pil_crop_with_rounding_and_black_outside():
    image = Image.fromarray(photo(30, 20))
    tensor = pil_to_tensor(image)
    boxes = [(2, 3, 17, 19), (2.5, 3.5, 17.5, 18.49), (0, 0, 30, 20), (-4.2, -3, 12, 25.6), (25, 10, 41, 30)]
    for box in boxes:
        assert torch.equal(crop_box(tensor, box, "x.jpg"), pil_to_tensor(image.crop(box))), box
    with pytest.raises(DataError, match=r"x\.jpg.*empty"):
        crop_box(tensor, (5, 5, 5.2, 9), "x.jpg")
    with pytest.raises(DataError, match=r"x\.jpg.*four finite numbers"):
        crop_box(tensor, (0, 0, float("nan"), 4), "x.jpg")


def test_eval_decoder_matches_image_list_dataset(tmp_path):
    # database images of several shapes, one already smaller than image_size (never upscaled), and queries
    # with boxes (fractional, one reaching outside the image) as ImageListDataset crops them
    shapes = [(160, 120), (90, 150), (128, 128), (50, 30), (201, 97)]
    paths = [jpeg(tmp_path, f"{i}.jpg", w, h, seed=i) for i, (w, h) in enumerate(shapes)]
    bboxes = [(10.5, 20.2, 150.7, 100.0), None, (-6, 3, 70.4, 140), (5, 5, 45, 25), (60, 10.5, 160.5, 90)]
    size = 64
    for boxes in (None, bboxes):
        reference = ImageListDataset(paths, size, bboxes=boxes)
        images, indices = GpuEvalDecoder(size)(eval_batch(paths, boxes))
        assert indices.tolist() == list(range(len(paths)))
        for i, image in enumerate(images):
            expected = reference[i][0]
            assert image.dtype == torch.float32 and image.shape == expected.shape, (i, boxes)
            difference = (image - expected).abs()
            # measured here: mean <= 0.007, max <= 0.069 (antialiased bicubic vs PIL's Lanczos)
            assert difference.mean() < 0.02 and difference.max() < 0.15, (i, boxes)
    # the query crop of the small image is below its target size: kept as it is, exactly the CPU pixels
    assert images[3].shape == (3, 20, 40)
    assert torch.equal(images[3], reference[3][0])


def test_eval_decoder_on_real_photos_matches_image_list_dataset(oxford_root):
    # real Oxford JPEGs (1024 px) at 362 px, and the first all_souls query with its published box
    paths = sorted((oxford_root / "jpg").glob("*.jpg"))
    assert paths
    images, _ = GpuEvalDecoder(362)(eval_batch(paths))
    reference = ImageListDataset(paths, 362)
    for i, image in enumerate(images):
        expected = reference[i][0]
        assert image.shape == expected.shape
        difference = (image - expected).abs()
        # measured on these and 6 Paris photos: mean <= 0.027, max <= 0.36 in normalised units
        assert difference.mean() < 0.04 and difference.max() < 0.5, paths[i].name
    query = oxford_root / "jpg" / "all_souls_000013.jpg"
    box = (136.5, 34.1, 648.5, 955.7)
    (image,), _ = GpuEvalDecoder(362)(eval_batch([query], [box]))
    expected = ImageListDataset([query], 362, bboxes=[box])[0][0]
    assert image.shape == expected.shape
    assert (image - expected).abs().mean() < 0.04


# -- training ---------------------------------------------------------------------------------------
def test_draws_are_those_of_the_cpu_transform():
    augmentation = Augmentation(scale=(0.1, 1.0), ratio=(0.5, 2.0), hflip=0.5)
    jitter = T.ColorJitter(augmentation.brightness, augmentation.contrast, augmentation.saturation, augmentation.hue)
    for seed in [0, 1, 7, 2**40 + 3, 2**62 - 1]:
        for height, width in [(30, 40), (400, 90), (12, 12), (3, 200)]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                crop = T.RandomResizedCrop.get_params(
                    torch.empty(3, height, width), augmentation.scale, augmentation.ratio
                )
                flip = bool(torch.rand(1) < augmentation.hflip)
                order, *factors = T.ColorJitter.get_params(
                    jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue
                )
            state = torch.random.get_rng_state()
            draw = augmentation.draw(seed, height, width)
            assert torch.equal(state, torch.random.get_rng_state())  # the global generator is untouched
            assert (draw.top, draw.left, draw.height, draw.width) == crop
            assert draw.flip == flip
            assert draw.order == tuple(order.tolist())
            assert draw.factors == tuple(factors)


def test_train_crops_equal_the_cpu_path_without_jitter_and_are_close_with_it(tmp_path):
    paths = [jpeg(tmp_path, f"{i}.jpg", 60 + 11 * i, 45 + 7 * i, seed=i) for i in range(4)]
    seeds = [3, 1234, 2**50 + 5, 99]
    for augmentation, mean_tol, max_tol in [
        # resampling with PIL's filters; PIL rounds to uint8 after each pass, the batched resize keeps floats
        # (measured: max 0.97 level, mean <= 0.31 level)
        (Augmentation(**NO_JITTER), LEVEL * 0.4, LEVEL * 1.01),
        # PIL's uint8 jitter vs floats (measured: mean <= 0.035, max <= 0.16 in normalised units)
        (Augmentation(), 0.05, 0.3),
    ]:
        images, labels = GpuTrainDecoder(32, augmentation)(train_batch(paths, seeds))
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert labels.tolist() == [10, 11, 12, 13]
        for i, (path, seed) in enumerate(zip(paths, seeds, strict=True)):
            difference = (images[i] - cpu_train_crop(path, seed, augmentation, 32)).abs()
            assert difference.mean() <= mean_tol and difference.max() <= max_tol, (i, augmentation)


def test_train_decoder_is_deterministic_per_seed(tmp_path):
    paths = [jpeg(tmp_path, f"{i}.jpg", 50, 40, seed=i) for i in range(3)]
    decoder = GpuTrainDecoder(24)
    first, _ = decoder(train_batch(paths, [5, 6, 7]))
    torch.manual_seed(12345)  # the global state plays no part
    again, _ = decoder(train_batch(paths, [5, 6, 7]))
    other, _ = decoder(train_batch(paths, [8, 6, 7]))
    assert torch.equal(first, again)
    assert not torch.equal(first[0], other[0]) and torch.equal(first[1:], other[1:])


def test_crops_stay_inside_the_image():
    decoder = Augmentation(scale=(0.05, 1.0), ratio=(0.3, 3.0))
    fallback = Augmentation(scale=(0.9, 1.0), ratio=(0.9, 1.1))
    central = 0
    for height, width in [(20, 30), (500, 7), (7, 500), (1, 1), (64, 64)]:
        for seed in range(200):
            for dec in (decoder, fallback):
                d = dec.draw(seed, height, width)
                assert d.top >= 0 and d.top + d.height <= height and d.height >= 1
                assert d.left >= 0 and d.left + d.width <= width and d.width >= 1
                central += (d.top, d.left) == ((height - d.height) // 2, (width - d.width) // 2)
    assert central > 0  # extreme aspect ratios exercised the central-crop fallback


def test_flip_probability_zero_and_one(tmp_path):
    path = jpeg(tmp_path, "a.jpg", 36, 36)
    whole = {"scale": (1.0, 1.0), **NO_JITTER}  # the whole (square) image: the central-crop fallback
    never, _ = GpuTrainDecoder(20, Augmentation(hflip=0.0, **whole))(train_batch([path] * 3, [1, 2, 3]))
    always, _ = GpuTrainDecoder(20, Augmentation(hflip=1.0, **whole))(train_batch([path] * 3, [1, 2, 3]))
    assert torch.equal(never[0], never[1]) and torch.equal(never[0], never[2])
    assert torch.equal(always, never.flip(-1))
    assert not torch.equal(always, never)
    expected = cpu_train_crop(path, 1, Augmentation(hflip=0.0, **whole), 20)
    assert (never[0] - expected).abs().max() <= LEVEL * 1.01


def test_lanczos_and_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="augmentation.interpolation=lanczos"):
        GpuTrainDecoder(32, Augmentation(interpolation="lanczos"))
    with pytest.raises(ConfigError, match="image_size"):
        GpuTrainDecoder(0)
    with pytest.raises(ConfigError, match="eval_image_size"):
        GpuEvalDecoder(-3)


# -- batches, loaders and Lightning -----------------------------------------------------------------
def test_batch_to_moves_targets_and_pixels_but_keeps_bytes_and_seeds_on_the_host(tmp_path):
    paths = [jpeg(tmp_path, "a.jpg"), _gray_png(tmp_path)]
    batch = collate_encoded([EncodedTrainDataset(paths, [4, 5])[(i, 9)] for i in range(2)])
    moved = batch.to(torch.device("meta"))
    assert moved.labels.device.type == "meta" and moved.device.type == "meta"
    assert moved.data[0].device.type == "cpu" and moved.data[1].device.type == "meta"  # bytes, then pixels
    assert moved.seeds.device.type == "cpu" and moved.paths == [str(p) for p in paths]
    evaluation = collate_encoded([EncodedEvalDataset(paths, [None, (1, 2, 3, 4)])[i] for i in range(2)])
    assert evaluation.to("meta").indices.device.type == "meta" and evaluation.bboxes == [None, (1.0, 2.0, 3.0, 4.0)]


def test_collate_rejects_empty_and_mixed_batches(tmp_path):
    path = jpeg(tmp_path, "a.jpg")
    with pytest.raises(ValueError, match="empty"):
        collate_encoded([])
    with pytest.raises(TypeError, match="not mixed"):
        collate_encoded([EncodedTrainDataset([path], [0])[(0, 1)], EncodedEvalDataset([path])[0]])


def test_dataloader_workers_send_batches_the_decoder_finishes(tmp_path):
    paths = [jpeg(tmp_path, f"{i}.jpg", 40 + i, 30, seed=i) for i in range(5)] + [_gray_png(tmp_path)]
    pairs = [(i, 100 + i) for i in range(6)]  # what ClassBalancedSampler yields
    loader = DataLoader(
        EncodedTrainDataset(paths, [0, 0, 1, 1, 2, 2]),
        batch_size=3,
        sampler=pairs,
        num_workers=1,
        collate_fn=collate_encoded,
    )
    train = GpuTrainDecoder(16)
    batches = [train(batch.to("cpu")) for batch in loader]
    assert [labels.tolist() for _, labels in batches] == [[0, 0, 1], [1, 2, 2]]
    direct, _ = train(train_batch(paths, [s for _, s in pairs]))
    torch.testing.assert_close(torch.cat([images for images, _ in batches]), direct, rtol=0, atol=0)
    with pytest.raises(TypeError, match="needs a training batch"):
        train(eval_batch(paths[:1]))


class _EncodedData(pl.LightningDataModule):
    """The wiring the RetrievalDataModule gets with data.decode=gpu, on a tiny data set."""

    def __init__(self, paths, labels) -> None:
        super().__init__()
        self.paths, self.labels = paths, labels
        self.train_decoder = GpuTrainDecoder(16, Augmentation(hflip=1.0))
        self.eval_decoder = GpuEvalDecoder(24)

    def train_dataloader(self):
        pairs = [(i, 7 * i) for i in range(len(self.paths))]
        dataset = EncodedTrainDataset(self.paths, self.labels)
        return DataLoader(dataset, batch_size=4, sampler=pairs, drop_last=True, collate_fn=collate_encoded)

    def val_dataloader(self):
        dataset = EncodedEvalDataset(self.paths, [None, (2, 2, 20, 18)] + [None] * (len(self.paths) - 2))
        return DataLoader(dataset, batch_size=3, collate_fn=collate_encoded)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return self.train_decoder(batch) if batch.is_train else self.eval_decoder(batch)


class _Probe(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append(("train", tuple(images.shape), labels.tolist()))
        return self.layer(images.mean(dim=(-2, -1))).sum()

    def validation_step(self, batch, batch_idx):
        images, indices = batch
        self.seen.append(("val", [tuple(i.shape) for i in images], indices.tolist()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_decodes_in_on_after_batch_transfer(tmp_path):
    paths = [jpeg(tmp_path, f"{i}.jpg", 40, 30 + 2 * i, seed=i) for i in range(4)]
    module = _Probe()
    trainer = pl.Trainer(
        accelerator="cpu",
        fast_dev_run=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=_EncodedData(paths, [0, 0, 1, 1]))
    assert ("train", (4, 3, 16, 16), [0, 0, 1, 1]) in module.seen
    reference = ImageListDataset(paths[:3], 24, bboxes=[None, (2, 2, 20, 18), None])
    assert ("val", [tuple(reference[i][0].shape) for i in range(3)], [0, 1, 2]) in module.seen


def test_check_decode(caplog):
    with pytest.raises(ConfigError, match="data.decode='tpu'"):
        check_decode("tpu")
    assert check_decode("cpu") is False
    with caplog.at_level(logging.WARNING, logger="oxford_ir.data.gpu_decode"):
        assert check_decode("gpu") is True
    assert ("no CUDA device" in caplog.text) == (not torch.cuda.is_available())


def test_items_are_typed(tmp_path):
    path = jpeg(tmp_path, "a.jpg")
    item = EncodedTrainDataset([path], [3])[(0, 11)]
    assert isinstance(item, TrainItem) and (item.label, item.seed) == (3, 11)
    assert torch.equal(item.image.data, torch.from_numpy(np.fromfile(path, dtype=np.uint8)))
    unseeded = EncodedTrainDataset([path], [3])[0]
    assert 0 <= unseeded.seed < 2**62
    evaluated = EncodedEvalDataset([path], [(1, 2, 30, 20)])[0]
    assert isinstance(evaluated, EvalItem) and (evaluated.index, evaluated.bbox) == (0, (1.0, 2.0, 30.0, 20.0))


# -- CUDA ---------------------------------------------------------------------------------------------
#: nvJPEG against libjpeg-turbo (PIL, and torchvision on the CPU), in grey levels: (mean, max) bounds. nvJPEG
#: upsamples subsampled chroma (4:2:0: 420.jpg, progressive.jpg and rotated.jpg, PIL's default) by replication,
#: libjpeg-turbo with its "fancy" triangular filter; on these colourful, noisy images that alone differs by a mean
#: of 3.84 / 2.24 / 3.31 and a max of 19 / 13 / 18 levels (libjpeg-turbo's `djpeg -nosmooth` against `djpeg`;
#: an H200 gave the same 3.84 on 420.jpg). Without subsampling (4:4:4, grayscale) only the IDCT and colour
#: conversion rounding differ (islow against float IDCT: mean <= 0.04, max 3; even libjpeg's fast integer IDCT
#: stays at mean 1.0, max 3). The PNG is decoded by the worker.
NVJPEG_BOUNDS = {"420.jpg": (5.0, 32), "progressive.jpg": (5.0, 32), "rotated.jpg": (5.0, 32)}
NVJPEG_UNSUBSAMPLED = (1.5, 6)


@needs_cuda
def test_cuda_decoding_is_close_to_the_cpu_path(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    paths = [
        jpeg(tmp_path, "420.jpg", 160, 120, seed=1),
        jpeg(tmp_path, "444.jpg", 90, 150, seed=2, subsampling=0),
        jpeg(tmp_path, "progressive.jpg", 128, 96, seed=3, progressive=True),
        jpeg(tmp_path, "rotated.jpg", 120, 80, seed=4, exif=exif.tobytes()),
        save(Image.fromarray(photo(100, 70, 5)[..., 0]), tmp_path / "gray.jpg", format="JPEG"),
        _rgba_png(tmp_path),
    ]
    seeds = [11, 12, 13, 14, 15, 16]
    cpu_batch = train_batch(paths, seeds)
    cuda_batch = cpu_batch.pin_memory().to("cuda")
    cpu = decode_images(cpu_batch)
    cuda = decode_images(cuda_batch)
    for path, a, b in zip(paths, cpu, cuda, strict=True):
        assert b.device.type == "cuda" and a.shape == b.shape, path.name
        difference = (a.int() - b.cpu().int()).abs().float()
        if path.suffix == ".png":
            assert torch.equal(a, b.cpu())
            continue
        mean, largest = NVJPEG_BOUNDS.get(path.name, NVJPEG_UNSUBSAMPLED)
        assert difference.mean() < mean and difference.max() <= largest, (
            path.name,
            difference.mean(),
            difference.max(),
        )
    # training crops: the same draws; the decode differences above, resampled (float16 on CUDA: <= 0.3 level).
    # Measured with the chroma replication emulated: mean 0.006, per image <= 0.016 in normalised units
    images, labels = GpuTrainDecoder(48)(cpu_batch)
    cuda_images, cuda_labels = GpuTrainDecoder(48)(cuda_batch)
    assert cuda_images.device.type == "cuda" and cuda_labels.tolist() == labels.tolist()
    difference = (cuda_images.cpu() - images).abs()
    assert difference.mean() < 0.02 and difference.mean(dim=(1, 2, 3)).max() < 0.04, difference.mean(dim=(1, 2, 3))
    # evaluation (measured with the emulation: mean <= 0.012 per image against PIL's Lanczos)
    evaluated, _ = GpuEvalDecoder(64)(eval_batch(paths).pin_memory().to("cuda"))
    reference = ImageListDataset(paths, 64)
    for i, image in enumerate(evaluated):
        assert image.shape == reference[i][0].shape
        assert (image.cpu() - reference[i][0]).abs().mean() < 0.06
