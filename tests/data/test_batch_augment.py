"""Training augmentation of whole batches: the same seeded draws as the per-image transform, pixels as
torchvision's per-image ops for those draws, and no per-image loop on the device.

References: ``Augmentation.transform`` under ``torch.manual_seed(seed)`` (the per-image CPU path, PIL),
torchvision's tensor functionals applied image by image (``resized_crop``, ``hflip``, ``adjust_*``).
"""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from oxford_ir.data.augmentation import Augmentation, AugmentationDraw, SeededCrop
from oxford_ir.data.batch_augment import (
    BatchAugmentation,
    CropBatch,
    CropCollate,
    CropItem,
    JitterPlan,
    check_resampling,
    color_jitter,
    resized_crops,
)
from oxford_ir.data.transforms import IMAGENET_STD
from oxford_ir.errors import ConfigError

#: one grey level in normalised units, for the channel with the smallest std (the largest step)
LEVEL = 1 / 255 / min(IMAGENET_STD)
NO_JITTER = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}
MODES = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, textured, coloured RGB picture (as a photo: gradients, detail, a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.4), rng.uniform(0, 6.3)
        channels.append(128 + 80 * np.sin(fx * x + phase) * np.cos(fy * y + c) + 40 * (x / width - y / height))
    pixels = np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def per_image_jitter(image: torch.Tensor, draw: AugmentationDraw) -> torch.Tensor:
    """torchvision's ColorJitter of one float image with a draw's order and factors."""
    for op in draw.order:
        if draw.factors[op] is not None:
            image = ADJUST[op](image, draw.factors[op])
    return image


def normalised(images: torch.Tensor, augmentation: Augmentation) -> torch.Tensor:
    return TF.normalize(images, list(augmentation.mean), list(augmentation.std))


# -- the draws ---------------------------------------------------------------------------------------------------
def test_seeded_crop_draws_and_crops_as_the_per_image_transform():
    """Worker side: the same crop box, flip and jitter factors as Augmentation.transform for the seed, and
    without jitter the very same pixels."""
    images = [photo(97, 61, 1), photo(40, 120, 2), photo(64, 64, 3)]
    for interpolation in ("bilinear", "bicubic", "lanczos"):
        augmentation = Augmentation(scale=(0.1, 1.0), ratio=(0.5, 2.0), interpolation=interpolation)
        crop = SeededCrop(24, augmentation)
        plain = Augmentation(**{**augmentation.as_dict(), **NO_JITTER})
        for seed in (0, 5, 2**40 + 7):
            for image in images:
                pixels, draw = crop(image, seed)
                assert pixels.dtype == torch.uint8 and pixels.shape == (3, 24, 24)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    box = (
                        augmentation.transform(24)
                        .transforms[0]
                        .get_params(image, augmentation.scale, augmentation.ratio)
                    )
                    flip = bool(torch.rand(1) < augmentation.hflip)
                    jitter = augmentation.transform(24).transforms[2]
                    order, *factors = jitter.get_params(
                        jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue
                    )
                assert (draw.top, draw.left, draw.height, draw.width) == box and draw.flip == flip
                assert draw.order == tuple(order.tolist()) and draw.factors == tuple(factors)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    reference = plain.transform(24)(image)  # the same draws: no jitter draws come after the crop
                assert torch.equal(normalised(pixels.float() / 255, augmentation), reference)


def test_batched_augmentation_is_close_to_the_per_image_transform_with_the_same_seeds():
    """The training path (crop in the worker, batched jitter on the device) against the per-image PIL
    transform: the same draws, jitter on floats instead of PIL's uint8."""
    augmentation = Augmentation()
    images = [photo(90 + 7 * i, 70 - 5 * i, i) for i in range(8)]
    seeds = [3, 17, 2**33 + 1, 8, 99, 1234, 5, 42]
    items = []
    for image, seed in zip(images, seeds, strict=True):
        pixels, draw = SeededCrop(32, augmentation)(image, seed)
        items.append(CropItem(pixels, 0, draw))
    batch, _ = CropCollate(BatchAugmentation(32, augmentation))(items)
    for i, (image, seed) in enumerate(zip(images, seeds, strict=True)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            reference = augmentation.transform(32)(image)
        difference = (batch[i] - reference).abs()
        # PIL jitters uint8 images, rounding after every operation (measured: mean <= 0.03, max <= 0.11)
        assert difference.mean() < 0.05 and difference.max() < 0.3, (i, difference.mean(), difference.max())


# -- colour jitter -----------------------------------------------------------------------------------------------
def test_batched_color_jitter_equals_torchvision_per_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 9, 11, generator=generator)
    images[0, :, :3] = 0.5  # grey pixels: hue undefined, saturation 0
    images[1, :, 0] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)  # saturated primaries
    images[1, :, 1] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1)
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
    expected = torch.stack([per_image_jitter(image, d) for image, d in zip(images, draws, strict=True)])
    torch.testing.assert_close(color_jitter(images.clone(), draws), expected, atol=2e-6, rtol=0)


def test_batched_color_jitter_with_drawn_factors_equals_torchvision_per_image():
    augmentation = Augmentation(brightness=0.5, contrast=0.5, saturation=0.8, hue=0.3)
    images = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    draws = [augmentation.draw(seed, 8, 8) for seed in range(32)]
    assert len({d.order for d in draws}) > 8  # many orders in one batch
    expected = torch.stack([per_image_jitter(image, d) for image, d in zip(images, draws, strict=True)])
    torch.testing.assert_close(color_jitter(images.clone(), draws), expected, atol=3e-6, rtol=0)


def test_jitter_plan_groups_each_step_into_contiguous_blocks_and_restores_the_order():
    draws = [Augmentation().draw(seed, 10, 10) for seed in range(40)]
    plan = JitterPlan.from_draws(draws)
    position = np.arange(40)  # position[i]: the image at row i
    for step in range(4):
        if plan.gathers[step] is not None:
            position = position[plan.gathers[step]]
        assert sum(stop - start for _, start, stop in plan.blocks[step]) == 40
        for op, start, stop in plan.blocks[step]:
            for row in range(start, stop):
                d = draws[position[row]]
                assert d.order[step] == op and plan.factors[step, row] == np.float32(d.factors[op])
    assert np.array_equal(position[plan.gathers[4]], np.arange(40))
    assert JitterPlan.from_draws([Augmentation(**NO_JITTER).draw(0, 10, 10)]).empty


# -- random resized crop of decoded images -----------------------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_batched_resized_crops_equal_torchvision_per_image(interpolation):
    """Crop + antialiased resize + flip of images of different sizes at once, against torchvision's resize of
    each crop: equal to float rounding, when shrinking and when enlarging."""
    generator = torch.Generator().manual_seed(2)
    images = [
        torch.randint(0, 256, (3, 40 + 9 * i, 70 - 8 * i), dtype=torch.uint8, generator=generator) for i in range(5)
    ]
    augmentation = Augmentation(scale=(0.05, 1.0), ratio=(0.4, 2.5), interpolation=interpolation)
    draws = [augmentation.draw(seed, image.shape[1], image.shape[2]) for seed, image in enumerate(images)]
    assert any(d.flip for d in draws) and not all(d.flip for d in draws)
    for size in (13, 48, 96):
        batch = resized_crops(images, draws, size, interpolation)
        assert batch.shape == (5, 3, size, size) and batch.dtype == torch.float32
        for image, d, out in zip(images, draws, batch, strict=True):
            crop = TF.resized_crop(image.float(), d.top, d.left, d.height, d.width, [size, size], MODES[interpolation])
            expected = (TF.horizontal_flip(crop) if d.flip else crop).clamp(0, 255)
            torch.testing.assert_close(out, expected, atol=5e-4, rtol=0)  # on the 0-255 scale


def test_batched_resized_crops_in_float16_stay_within_half_a_grey_level():
    """What CUDA computes (float16 matrix products on tensor cores), here on the CPU."""
    images = [torch.from_numpy(np.array(photo(300 - 40 * i, 200 + 30 * i, i))).permute(2, 0, 1) for i in range(4)]
    augmentation = Augmentation()
    draws = [augmentation.draw(seed, image.shape[1], image.shape[2]) for seed, image in enumerate(images)]
    exact = resized_crops(images, draws, 64, "bilinear")
    half = resized_crops(images, draws, 64, "bilinear", dtype=torch.float16)
    assert (half - exact).abs().max() <= 0.5  # grey levels (measured: 0.28)


def test_the_crop_of_the_batched_path_matches_the_worker_crop():
    """decode=gpu and decode=cpu crop the same region of the same image for a seed: the batched resize of the
    decoded image against the worker's PIL crop, to PIL's uint8 rounding."""
    augmentation = Augmentation(**NO_JITTER)
    images = [photo(120, 90, 4), photo(75, 130, 5)]
    tensors = [torch.from_numpy(np.asarray(image)).permute(2, 0, 1) for image in images]
    for seed in range(6):
        draws = [augmentation.draw(seed, image.height, image.width) for image in images]
        batch = resized_crops(tensors, draws, 40, augmentation.interpolation)
        for image, out in zip(images, batch, strict=True):
            pixels, _ = SeededCrop(40, augmentation)(image, seed)
            difference = (out - pixels.float()).abs()
            assert difference.max() <= 1.0 and difference.mean() < 0.4  # PIL rounds after each pass


# -- the batch ---------------------------------------------------------------------------------------------------
def test_finish_and_crop_and_finish_equal_per_image_torchvision_ops():
    augmentation = Augmentation(interpolation="bicubic")
    images = [torch.from_numpy(np.array(photo(80 + 10 * i, 60, i))).permute(2, 0, 1).contiguous() for i in range(4)]
    draws = [augmentation.draw(seed, image.shape[1], image.shape[2]) for seed, image in enumerate(images)]
    batched = BatchAugmentation(24, augmentation)
    expected = []
    for image, d in zip(images, draws, strict=True):
        crop = TF.resized_crop(image.float(), d.top, d.left, d.height, d.width, [24, 24], MODES["bicubic"])
        crop = (TF.horizontal_flip(crop) if d.flip else crop).clamp(0, 255) / 255
        expected.append(normalised(per_image_jitter(crop, d), augmentation))
    torch.testing.assert_close(batched.crop_and_finish(images, draws), torch.stack(expected), atol=2e-5, rtol=0)
    crops = torch.stack([torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8) for _ in draws])
    expected = [
        normalised(per_image_jitter(c.float() / 255, d), augmentation) for c, d in zip(crops, draws, strict=True)
    ]
    torch.testing.assert_close(batched.finish(crops, draws), torch.stack(expected), atol=1e-5, rtol=0)


class _CountKernels(TorchDispatchMode):
    """Counts the ATen operations run under it that compute (launch kernels on a device); views (slicing an
    image, the host's bookkeeping) and wrapping host arrays are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func.overloadpacket) != "aten.lift_fresh":
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_no_per_image_loop_on_the_device():
    """The batch is augmented by the same kernels whatever its size: a batch and the same batch with every image
    four times (the same crop sizes and jitter blocks) launch the same computing operations, as often; the
    decoded images of any sizes are gathered by one call."""
    augmentation = Augmentation()
    batched = BatchAugmentation(16, augmentation)
    images = [torch.randint(0, 256, (3, 30 + 5 * i, 50 - 4 * i), dtype=torch.uint8) for i in range(8)]
    draws = [augmentation.draw(seed, image.shape[1], image.shape[2]) for seed, image in enumerate(images)]
    crops = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    batched.finish(crops, draws)  # the normalisation constants are copied to the device once, before counting
    counts = []
    for times in (1, 4):
        inputs = (
            crops.repeat_interleave(times, dim=0),
            [image for image in images for _ in range(times)],
            [d for d in draws for _ in range(times)],
        )
        with _CountKernels() as finish:
            batched.finish(inputs[0], inputs[2])
        with _CountKernels() as crop:
            batched.crop_and_finish(inputs[1], inputs[2])
        counts.append((finish.ops, crop.ops))
    assert counts[0] == counts[1]
    finish_ops, crop_ops = counts[0]
    assert crop_ops["aten._foreach_copy_"] == 1 and crop_ops["aten.bmm"] == 2  # one gather, two products
    assert sum(finish_ops.values()) < 500 and sum(crop_ops.values()) < 600, (finish_ops, crop_ops)


def test_crop_batches_move_and_pin_and_collate_finishes_on_the_cpu():
    augmentation = Augmentation()
    items = [
        CropItem(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8), i, augmentation.draw(i, 20, 20)) for i in range(3)
    ]
    raw = CropCollate()(items)
    assert isinstance(raw, CropBatch) and len(raw) == 3 and raw.crops.shape == (3, 3, 8, 8)
    assert raw.labels.tolist() == [0, 1, 2] and raw.device.type == "cpu"
    moved = raw.to("meta")
    assert moved.crops.device.type == "meta" and moved.labels.device.type == "meta" and moved.draws == raw.draws
    finisher = BatchAugmentation(8, augmentation)
    images, labels = CropCollate(finisher)(items)  # what workers do when training on the CPU
    assert torch.equal(images, finisher.finish(raw.crops, raw.draws)) and torch.equal(labels, raw.labels)
    assert torch.equal(finisher.prepare(raw)[0], images)
    again = pickle.loads(pickle.dumps(CropCollate(finisher)))  # sent to spawned workers
    assert torch.equal(again(items)[0], images)
    if torch.cuda.is_available():
        assert raw.pin_memory().crops.is_pinned()


def test_bad_sizes_and_interpolations_are_config_errors():
    with pytest.raises(ConfigError, match="image_size"):
        BatchAugmentation(0)
    with pytest.raises(ConfigError, match="image_size"):
        SeededCrop(-1)
    with pytest.raises(ConfigError, match="augmentation.interpolation=lanczos"):
        check_resampling("lanczos")
    check_resampling("bicubic")
    with pytest.raises(ValueError, match="draws"):
        BatchAugmentation(8).finish(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batched_augmentation_equals_the_cpu_one():
    """The same code on CUDA: jitter equal to float rounding, float16 resampling within half a grey level."""
    augmentation = Augmentation()
    images = [torch.from_numpy(np.array(photo(200 + 30 * i, 150, i))).permute(2, 0, 1).contiguous() for i in range(6)]
    draws = [augmentation.draw(seed, image.shape[1], image.shape[2]) for seed, image in enumerate(images)]
    batched = BatchAugmentation(64, augmentation)
    cpu = batched.crop_and_finish(images, draws)
    cuda = batched.crop_and_finish([image.cuda() for image in images], draws)
    assert cuda.device.type == "cuda"
    assert (cuda.cpu() - cpu).abs().max() < 0.6 * LEVEL * 1.5  # half a level, through jitter's factors <= 1.3
    crops = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(
        batched.finish(crops.cuda(), draws).cpu(), batched.finish(crops, draws), atol=1e-5, rtol=0
    )
