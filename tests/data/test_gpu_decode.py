"""The GPU JPEG decode path, run on the CPU through the same code (one test runs CUDA when present).

References: PIL through ``load_image`` (decoded pixels), ``ImageListDataset`` (evaluation tensors),
``Augmentation.transform`` under ``torch.manual_seed(seed)`` (training crops), torchvision's own
``get_params`` and tensor colour functions (random draws, jitter formulas), ``PIL.Image.thumbnail`` and
``PIL.Image.crop`` (sizes and boxes).
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
from torchvision.transforms.v2 import functional as TF

from oxford_ir.data.augmentation import Augmentation
from oxford_ir.data.datasets import ImageListDataset
from oxford_ir.data.gpu_decode import (
    AugmentationDraw,
    EncodedBatch,
    EncodedEvalDataset,
    EncodedTrainDataset,
    EvalItem,
    GpuEvalDecoder,
    GpuTrainDecoder,
    TrainItem,
    check_decode,
    collate_encoded,
    color_jitter,
    crop_box,
    decode_batch,
    decode_images,
    pil_to_tensor,
    read_encoded,
)
from oxford_ir.data.images import load_image
from oxford_ir.data.transforms import IMAGENET_STD, thumbnail_size
from oxford_ir.errors import ConfigError, DataError

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


def test_a_jpeg_that_fails_to_decode_on_the_device_raises_a_data_error_naming_it(tmp_path):
    # a valid header and end marker (so the worker sends the bytes) but no image data: decode_jpeg and PIL both fail
    good = jpeg(tmp_path, "good.jpg")
    raw = good.read_bytes()
    bad = tmp_path / "no_scan.jpg"
    bad.write_bytes(raw[: raw.index(b"\xff\xda")] + b"\xff\xd9")
    batch = eval_batch([good, bad])
    assert batch.decoded == [False, False]
    with pytest.raises(DataError, match="no_scan.jpg"):
        GpuEvalDecoder(32)(batch)


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
    decoder = GpuTrainDecoder(32, augmentation)
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
            draw = decoder.draw(seed, height, width)
            assert torch.equal(state, torch.random.get_rng_state())  # the global generator is untouched
            assert (draw.top, draw.left, draw.height, draw.width) == crop
            assert draw.flip == flip
            assert draw.order == tuple(order.tolist())
            assert draw.factors == tuple(factors)


def test_train_crops_equal_the_cpu_path_without_jitter_and_are_close_with_it(tmp_path):
    paths = [jpeg(tmp_path, f"{i}.jpg", 60 + 11 * i, 45 + 7 * i, seed=i) for i in range(4)]
    seeds = [3, 1234, 2**50 + 5, 99]
    for augmentation, mean_tol, max_tol in [
        # resampling as PIL's to one grey level (measured: max 1 level, mean <= 0.1 level)
        (Augmentation(**NO_JITTER), LEVEL * 0.25, LEVEL * 1.01),
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
    decoder = GpuTrainDecoder(16, Augmentation(scale=(0.05, 1.0), ratio=(0.3, 3.0)))
    fallback = GpuTrainDecoder(16, Augmentation(scale=(0.9, 1.0), ratio=(0.9, 1.1)))
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


def test_batched_color_jitter_equals_torchvision_per_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 9, 11, generator=generator)
    images[0, :, :3] = 0.5  # grey pixels: hue undefined, saturation 0
    draws = [
        AugmentationDraw(0, 0, 9, 11, False, order, factors)
        for order, factors in [
            ((0, 1, 2, 3), (1.2, 0.8, 1.3, 0.05)),
            ((3, 2, 1, 0), (0.7, 1.3, 0.0, -0.05)),
            ((2, 0, 3, 1), (None, 1.1, 0.6, 0.5)),
            ((1, 3, 0, 2), (1.0, None, None, -0.5)),
            ((0, 2, 1, 3), (None, None, None, None)),
            ((3, 1, 2, 0), (1.3, 0.0, 1.0, 0.2)),
        ]
    ]
    functions = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for image, d in zip(images, draws, strict=True):
        for op in d.order:
            if d.factors[op] is not None:
                image = functions[op](image, d.factors[op])
        expected.append(image)
    torch.testing.assert_close(color_jitter(images.clone(), draws), torch.stack(expected), atol=2e-6, rtol=0)


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


def test_dataloader_with_workers_and_decode_batch(tmp_path):
    paths = [jpeg(tmp_path, f"{i}.jpg", 40 + i, 30, seed=i) for i in range(5)] + [_gray_png(tmp_path)]
    pairs = [(i, 100 + i) for i in range(6)]  # what ClassBalancedSampler yields
    loader = DataLoader(
        EncodedTrainDataset(paths, [0, 0, 1, 1, 2, 2]),
        batch_size=3,
        sampler=pairs,
        num_workers=1,
        collate_fn=collate_encoded,
    )
    train, evaluation = GpuTrainDecoder(16), GpuEvalDecoder(20)
    batches = [decode_batch(batch.to("cpu"), train, evaluation) for batch in loader]
    assert [labels.tolist() for _, labels in batches] == [[0, 0, 1], [1, 2, 2]]
    direct, _ = train(train_batch(paths, [s for _, s in pairs]))
    torch.testing.assert_close(torch.cat([images for images, _ in batches]), direct, rtol=0, atol=0)
    plain = (torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
    assert decode_batch(plain, train, evaluation) is plain  # the CPU path's batches pass through
    with pytest.raises(RuntimeError, match="no evaluation decoder"):
        decode_batch(eval_batch(paths[:1]), train, None)


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
        return decode_batch(batch, self.train_decoder, self.eval_decoder)


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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
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
    cpu = decode_images(eval_batch(paths))
    cuda_batch = collate_encoded([EncodedEvalDataset(paths)[i] for i in range(len(paths))]).pin_memory().to("cuda")
    cuda = decode_images(cuda_batch)
    for path, a, b in zip(paths, cpu, cuda, strict=True):
        assert b.device.type == "cuda" and a.shape == b.shape, path.name
        difference = (a.int() - b.cpu().int()).abs().float()
        # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: a few grey levels
        assert difference.mean() < 2.0 and difference.max() <= 48, (path.name, difference.mean(), difference.max())
    seeds = [11, 12, 13, 14, 15, 16]
    images, labels = GpuTrainDecoder(48)(train_batch(paths, seeds))
    dataset = EncodedTrainDataset(paths, list(range(10, 16)))
    cuda_train = collate_encoded([dataset[(i, s)] for i, s in enumerate(seeds)]).to("cuda")
    cuda_images, cuda_labels = GpuTrainDecoder(48)(cuda_train)
    assert cuda_images.device.type == "cuda" and cuda_labels.tolist() == labels.tolist()
    assert (cuda_images.cpu() - images).abs().mean() < 0.05
    evaluated, _ = GpuEvalDecoder(64)(cuda_batch)
    reference = ImageListDataset(paths, 64)
    for i, image in enumerate(evaluated):
        assert image.shape == reference[i][0].shape
        assert (image.cpu() - reference[i][0]).abs().mean() < 0.06
