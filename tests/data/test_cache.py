"""The preprocessed image cache: bit-identical evaluation tensors, invalidation, atomicity, errors, the datamodule.

Tiny synthetic images (tens of pixels) written into tmp_path, or the TINY synthetic benchmark of conftest.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import oxford_ir.data.cache as cache_module
import oxford_ir.data.cache_format as cache_format_module
from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.data.cache import build_image_cache, default_train_long_side
from oxford_ir.data.cache_format import ImageCacheError, cache_key, open_image_cache
from oxford_ir.data.datamodule import RetrievalDataModule
from oxford_ir.data.datasets import ImageListDataset, pixels_to_tensor, train_image
from oxford_ir.data.eval_pixels import crop, eval_image
from oxford_ir.data.transforms import resize_long_side, to_tensor_normalised
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.images import decode_image, load_image
from tests.data.test_datamodule import _eval_loaders as eval_loaders
from tests.data.test_datamodule import make as make_datamodule


def write_image(path: Path, width: int, height: int, seed: int, quality: int = 90) -> Path:
    """A smooth random RGB image (a blurred noise field, like a photo compresses), JPEG or PNG by suffix."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=quality) if path.suffix == ".jpg" else image.save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Five images of different sizes and aspect ratios (JPEG and PNG)."""
    sizes = [(60, 40), (40, 60), (72, 72), (50, 30), (64, 48)]
    return [
        write_image(tmp_path / "src" / f"im{i}.{'jpg' if i % 2 == 0 else 'png'}", w, h, seed=i)
        for i, (w, h) in enumerate(sizes)
    ]


BOXES = [None, [3.4, 5.0, 30.6, 41.2], None, [0, 0, 50, 30], [10.2, 4.8, 63.0, 47.0]]


class Counter:
    """Counts the images the cache decodes (builds run with num_workers=0, in this process)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        real_eval, real_train = cache_module.eval_image, cache_module.train_image

        def counting_eval(path, size, box=None):
            self.paths.append(str(path))
            return real_eval(path, size, box)

        def counting_train(path, long_side):
            self.paths.append(str(path))
            return real_train(path, long_side)

        monkeypatch.setattr(cache_module, "eval_image", counting_eval)
        monkeypatch.setattr(cache_module, "train_image", counting_train)

    def take(self) -> list[str]:
        out, self.paths = self.paths, []
        return out


def touch_later(path: Path) -> None:
    """Move the mtime forward by a second (a rewrite within the same clock tick must still count)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def pixel_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("pixels-*"))


# -- bit-identity ----------------------------------------------------------------------------------


def test_cached_eval_tensors_are_bit_identical(data_dir: Path, tmp_path: Path) -> None:
    benchmark = load_benchmark("synthetic", data_dir)
    paths = [*benchmark.db_paths, *benchmark.query_paths]
    boxes = [None] * benchmark.n_db + list(benchmark.query_bboxes)
    assert any(b is not None for b in boxes)
    cache = build_image_cache(tmp_path / "eval", paths, boxes=boxes, kind="eval", long_side=48, progress=False)
    assert len(cache) == len(paths)
    for dataset_args in ((benchmark.db_paths, None), (benchmark.query_paths, benchmark.query_bboxes)):
        plain = ImageListDataset(dataset_args[0], 48, bboxes=dataset_args[1])
        cached = ImageListDataset(dataset_args[0], 48, bboxes=dataset_args[1], cache=cache)
        for i in range(len(plain)):
            expected, cached_tensor = plain[i][0], cached[i][0]
            assert cached_tensor.dtype == torch.float32 and torch.equal(expected, cached_tensor)
        # multi-scale rescaling applies to cached images the same way
        scaled = ImageListDataset(dataset_args[0], 48, bboxes=dataset_args[1], scale=0.5, cache=cache)
        assert torch.equal(scaled[0][0], ImageListDataset(dataset_args[0], 48, bboxes=dataset_args[1], scale=0.5)[0][0])
    # and both equal the published preprocessing written out by hand (torchvision to_tensor + normalize)
    q = 0
    path, box = benchmark.query_paths[q], benchmark.query_bboxes[q]
    full = load_image(path)
    cropped = crop(full, box, path)
    by_hand = to_tensor_normalised(resize_long_side(cropped, 48 * max(cropped.size) / max(full.size)))
    assert torch.equal(ImageListDataset([path], 48, bboxes=[box], cache=cache)[0][0], by_hand)
    assert torch.equal(pixels_to_tensor(np.asarray(full)), to_tensor_normalised(full))


def test_full_size_eval_cache_and_multiprocess_build_agree(images: list[Path], tmp_path: Path) -> None:
    """image_size=None keeps the original pixels; 2 decoding processes write the same pixels as 1."""
    serial = build_image_cache(tmp_path / "a", images, boxes=BOXES, kind="eval", long_side=None, progress=False)
    parallel = build_image_cache(
        tmp_path / "b", images, boxes=BOXES, kind="eval", long_side=None, num_workers=2, progress=False
    )
    for i, (path, box) in enumerate(zip(images, BOXES, strict=True)):
        expected = np.asarray(eval_image(path, None, box))
        row_a, row_b = serial.rows([path], [box])[0], parallel.rows([path], [box])[0]
        assert np.array_equal(serial.pixels(row_a), expected) and np.array_equal(parallel.pixels(row_b), expected)
        if box is None:
            assert np.array_equal(expected, np.asarray(load_image(path))), i


def test_dataloader_workers_read_the_cache(images: list[Path], tmp_path: Path) -> None:
    """Workers get the cache pickled without its pixels and map the file themselves."""
    cache = build_image_cache(tmp_path / "cache", images, boxes=BOXES, kind="eval", long_side=32, progress=False)
    reference = [ImageListDataset(images, 32, bboxes=BOXES)[i][0] for i in range(5)]
    for path in images:  # from here on, only the cache can give the pixels
        path.unlink()
    dataset = ImageListDataset(images, 32, bboxes=BOXES, cache=cache)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    got = {index: tensor for tensor, index in loader}
    assert sorted(got) == list(range(5))
    assert all(torch.equal(got[i], reference[i]) for i in range(5))


# -- invalidation ---------------------------------------------------------------------------------


def test_changed_source_is_decoded_again_and_the_rest_reused(
    images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = Counter(monkeypatch)
    folder = tmp_path / "cache"
    build_image_cache(folder, images, boxes=BOXES, kind="eval", long_side=32, progress=False)
    assert len(counter.take()) == 5
    first_files = pixel_files(folder)
    # fresh: nothing decoded, nothing written
    build_image_cache(folder, images, boxes=BOXES, kind="eval", long_side=32, progress=False)
    assert counter.take() == [] and pixel_files(folder) == first_files
    # rewrite image 1 (same size: only its mtime and bytes change)
    write_image(images[1], 40, 60, seed=99)
    touch_later(images[1])
    cache = build_image_cache(folder, images, boxes=BOXES, kind="eval", long_side=32, progress=False)
    assert counter.take() == [os.path.abspath(images[1])]
    assert pixel_files(folder) != first_files and len(pixel_files(folder)) == 1  # the old pixel file is gone
    for path, box in zip(images, BOXES, strict=True):
        row = cache.rows([path], [box])[0]
        assert np.array_equal(cache.pixels(row), np.asarray(eval_image(path, 32, box)))
    assert cache.stale(images, BOXES) == []
    touch_later(images[3])
    assert cache.stale(images, BOXES) == [cache_key(images[3], BOXES[3])]


def test_size_and_box_changes(images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = Counter(monkeypatch)
    folder = tmp_path / "cache"
    build_image_cache(folder, images, boxes=BOXES, kind="eval", long_side=32, progress=False)
    counter.take()
    # another size in the same folder: every entry is made again
    cache = build_image_cache(folder, images, boxes=BOXES, kind="eval", long_side=24, progress=False)
    assert len(counter.take()) == 5 and cache.long_side == 24
    assert int(cache.shapes[cache.rows([images[2]])[0]].max()) == 24
    # another box for one query: only that entry is decoded; the other entries (old box included) are kept
    boxes = list(BOXES)
    boxes[1] = [1.0, 2.0, 20.0, 50.0]
    cache = build_image_cache(folder, images, boxes=boxes, kind="eval", long_side=24, progress=False)
    assert counter.take() == [os.path.abspath(images[1])]
    row = cache.rows([images[1]], [boxes[1]])[0]
    assert np.array_equal(cache.pixels(row), np.asarray(eval_image(images[1], 24, boxes[1])))
    assert cache_key(images[1], BOXES[1]) in cache and len(cache) == 6
    # another kind (training images) in the same folder is another setting too
    cache = build_image_cache(folder, images, kind="train", long_side=24, progress=False)
    assert len(counter.take()) == 5 and cache.kind == "train" and len(cache) == 5


def test_removed_source_and_missing_source(images: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    build_image_cache(folder, images, kind="eval", long_side=32, progress=False)
    images[4].unlink()
    # asking for it names the file
    with pytest.raises(DataError, match=r"image not found: .*im4\.jpg"):
        build_image_cache(folder, images, kind="eval", long_side=32, progress=False)
    # not asking for it: its entry is dropped at the next rebuild, the others reused
    write_image(images[0], 60, 40, seed=50)
    touch_later(images[0])
    cache = build_image_cache(folder, images[:4], kind="eval", long_side=32, progress=False)
    assert len(cache) == 4 and cache_key(images[4]) not in cache


# -- atomicity ------------------------------------------------------------------------------------


def test_a_crash_mid_build_leaves_the_previous_cache(
    images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "cache"
    before = build_image_cache(folder, images, kind="eval", long_side=32, progress=False)
    old_pixels = [before.pixels(r) for r in range(len(before))]
    old_files = pixel_files(folder)
    manifest_before = (folder / "manifest.json").read_bytes()

    calls = []
    real = cache_module.eval_image

    def crash_on_third(path, size, box=None):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of decoding
        return real(path, size, box)

    monkeypatch.setattr(cache_module, "eval_image", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_image_cache(folder, images, kind="eval", long_side=20, progress=False)
    assert len(calls) == 3
    # the previous build is untouched and opens; the half-written pixel file is gone
    assert (folder / "manifest.json").read_bytes() == manifest_before and pixel_files(folder) == old_files
    after = open_image_cache(folder)
    assert [np.array_equal(after.pixels(r), old_pixels[r]) for r in range(len(after))] == [True] * 5

    # a crash at the commit itself (the manifest rename): still the previous build, no stray files
    monkeypatch.setattr(cache_module, "eval_image", real)

    def no_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.os, "replace", no_replace)
    with pytest.raises(KeyboardInterrupt):
        build_image_cache(folder, images, kind="eval", long_side=20, progress=False)
    monkeypatch.undo()
    assert (folder / "manifest.json").read_bytes() == manifest_before and pixel_files(folder) == old_files
    assert not list(folder.glob("manifest.*.tmp"))

    # a hard kill (no cleanup): leftovers are ignored by readers and deleted by the next build
    (folder / f"pixels-{'a' * 32}.u8").write_bytes(b"\x00" * 100)
    (folder / f"manifest.{'b' * 32}.tmp").write_text("{")
    assert open_image_cache(folder).pixel_file == old_files[0]
    rebuilt = build_image_cache(folder, images, kind="eval", long_side=20, progress=False)
    assert pixel_files(folder) == [rebuilt.pixel_file] and not list(folder.glob("manifest.*.tmp"))
    assert rebuilt.long_side == 20


def test_readers_never_mix_two_builds(images: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    reader = build_image_cache(folder, images, kind="eval", long_side=32, progress=False)
    row = reader.rows([images[0]])[0]
    old = reader.pixels(row)
    write_image(images[0], 60, 40, seed=1234)
    touch_later(images[0])
    rebuilt = build_image_cache(folder, images, kind="eval", long_side=32, progress=False)
    new = rebuilt.pixels(rebuilt.rows([images[0]])[0])
    assert not np.array_equal(old, new)
    # the open reader keeps reading its own build (its memory map outlives the deleted file)
    assert np.array_equal(reader.pixels(row), old)
    # a worker that unpickles it after the rebuild cannot map the old file: a clear error, not mixed pixels
    worker_copy = pickle.loads(pickle.dumps(reader))
    with pytest.raises(ImageCacheError, match="rebuilt by another process"):
        worker_copy.pixels(row)
    # pickling never carries the pixels
    assert len(pickle.dumps(rebuilt)) < rebuilt.pixel_bytes + 5000 or rebuilt.pixel_bytes < 5000
    assert np.array_equal(pickle.loads(pickle.dumps(rebuilt)).pixels(rebuilt.rows([images[0]])[0]), new)


def test_an_open_between_manifest_and_pixel_file_retries(images: list[Path], tmp_path: Path, monkeypatch) -> None:
    """A build that commits and deletes the old pixels between a reader's two reads: the reader reads again."""
    folder = tmp_path / "cache"
    build_image_cache(folder, images, kind="eval", long_side=32, progress=False)
    stale_manifest = json.loads((folder / "manifest.json").read_text())
    write_image(images[2], 72, 72, seed=77)
    touch_later(images[2])
    build_image_cache(folder, images, kind="eval", long_side=32, progress=False)
    real = cache_format_module._read_manifest
    served = []

    def first_stale(path):
        served.append(path)
        return stale_manifest if len(served) == 1 else real(path)

    monkeypatch.setattr(cache_format_module, "_read_manifest", first_stale)
    cache = open_image_cache(folder)
    assert len(served) == 2 and cache.pixel_file != stale_manifest["pixels"]["file"]


# -- errors ---------------------------------------------------------------------------------------


def test_corrupt_cache_is_a_clear_error_and_is_rebuilt(images: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    build_image_cache(folder, images, kind="eval", long_side=32, progress=False)
    manifest = folder / "manifest.json"
    good = manifest.read_text()
    for broken in (
        "{not json",
        json.dumps({"format": "something else"}),
        good.replace('"entries":[[', '"entries":[[1,'),
    ):
        manifest.write_text(broken)
        with pytest.raises(ImageCacheError, match=rf"image cache {folder} is corrupt.*Delete the folder"):
            open_image_cache(folder)
    # building over it rebuilds (with a warning), and the result reads
    cache = build_image_cache(folder, images, kind="eval", long_side=32, progress=False)
    assert len(cache) == 5 and np.array_equal(cache.pixels(0), np.asarray(eval_image(images[0], 32)))
    # a truncated pixel file
    pixels = folder / cache.pixel_file
    pixels.write_bytes(pixels.read_bytes()[:-10])
    with pytest.raises(ImageCacheError, match=r"corrupt: its pixel file .* has \d+ bytes, the manifest says"):
        open_image_cache(folder)
    # a deleted pixel file
    pixels.unlink()
    with pytest.raises(ImageCacheError, match="corrupt: its pixel file .* is missing"):
        open_image_cache(folder)
    with pytest.raises(ImageCacheError, match="no image cache in"):
        open_image_cache(tmp_path / "nothing")


def test_unwritable_cache_folder(images: list[Path], tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ImageCacheError, match=r"cannot create the image cache in .*a_file/cache.*data\.cache\.dir"):
        build_image_cache(blocker / "cache", images, kind="eval", long_side=32, progress=False)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(ImageCacheError, match="cannot create the image cache in"):
                build_image_cache(locked / "cache", images, kind="eval", long_side=32, progress=False)
        finally:
            locked.chmod(0o700)


def test_corrupt_source_and_wrong_use(images: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "src" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    for workers in (0, 2):
        with pytest.raises(DataError, match=r"cannot decode image .*bad\.jpg.*while building the image cache"):
            build_image_cache(tmp_path / f"c{workers}", [*images, bad], kind="eval", long_side=32, num_workers=workers)
    cache = build_image_cache(tmp_path / "cache", images, kind="eval", long_side=32, progress=False)
    with pytest.raises(
        ImageCacheError, match=r"does not hold 1 of the 1 images .*im0\.jpg box \[1\.0, 2\.0, 3\.0, 4\.0\]"
    ):
        ImageListDataset([images[0]], 32, bboxes=[[1, 2, 3, 4]], cache=cache)
    with pytest.raises(ValueError, match="needs evaluation images at image_size=48"):
        ImageListDataset(images, 48, cache=cache)
    with pytest.raises(ValueError, match="a training image cache needs a long_side"):
        build_image_cache(tmp_path / "t", images, kind="train", long_side=None)
    with pytest.raises(ValueError, match="kind must be one of eval, train"):
        build_image_cache(tmp_path / "t", images, kind="test", long_side=3)


# -- draft mode and training images -----------------------------------------------------------------


def test_training_loads_draft_jpegs_twice_the_needed_size(tmp_path: Path) -> None:
    big = write_image(tmp_path / "big.jpg", 1024, 768, seed=3)
    # evaluation (default): far below DRAFT_MIN_PIXELS, decoded in full whatever draft_size says
    assert decode_image(big, draft_size=200).image.size == (1024, 768)
    # training: the strongest 1/2^k reduction that keeps the long side >= draft_size
    drafted = decode_image(big, draft_size=200, always_draft=True)
    assert drafted.image.size == (256, 192) and drafted.size == (1024, 768)
    assert decode_image(big, draft_size=400, always_draft=True).image.size == (512, 384)
    assert decode_image(big, draft_size=513, always_draft=True).image.size == (1024, 768)  # less than 2x: no draft
    # a portrait JPEG: the long side is what counts
    tall = write_image(tmp_path / "tall.jpg", 300, 1200, seed=4)
    assert decode_image(tall, draft_size=150, always_draft=True).image.size == (38, 150)
    # PNG is never drafted
    png = write_image(tmp_path / "big.png", 400, 300, seed=5)
    assert decode_image(png, draft_size=100, always_draft=True).image.size == (400, 300)
    # a cached training image: long side exactly train_long_side, from the drafted decode
    image = train_image(big, 200)
    assert image.size == (200, 150)
    assert np.array_equal(np.asarray(image), np.asarray(resize_long_side(drafted.image, 200)))
    # never upscaled
    assert train_image(png, 1000).size == (400, 300)


def test_default_train_long_side() -> None:
    assert default_train_long_side(362, 0.25) == 724
    assert default_train_long_side(96, 0.25) == 192
    assert default_train_long_side(224, 0.08) == 792  # ceil(224 / 0.282843 = 791.96)
    assert default_train_long_side(100, 1.0) == 100


# -- the datamodule -------------------------------------------------------------------------------


def make(data_dir: Path, cache_dir: Path | None, **overrides) -> RetrievalDataModule:
    """test_datamodule's tiny datamodule, with the cache in ``cache_dir`` (None: no cache)."""
    if cache_dir is not None:
        overrides["cache"] = {"enabled": True, "dir": str(cache_dir), "progress": False, **overrides.get("cache", {})}
    return make_datamodule(data_dir, **overrides)


def test_datamodule_reads_training_and_evaluation_images_from_the_cache(data_dir: Path, tmp_path: Path) -> None:
    cached = make(data_dir, tmp_path / "cache")
    plain = make(data_dir, None)
    # 32 px crops of scale >= 0.25: ceil(32 / 0.5) = 64, the size of the TINY images (nothing resized)
    assert cached.train_long_side == 64
    cached.prepare_data()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["eval-synthetic-48", "train-synthetic-64"]
    for dm in (cached, plain):
        dm.setup("fit")
    train_loader = cached.train_dataloader()
    assert train_loader.dataset.cache is not None and len(train_loader.dataset.cache) == len(cached.train_split)
    # the augmentation runs on the cached pixels: with nothing to downscale, exactly the uncached batches
    for (images, labels), (ref_images, ref_labels) in zip(train_loader, plain.train_dataloader(), strict=True):
        assert images.shape == (8, 3, 32, 32) and torch.equal(labels, ref_labels)
        assert torch.equal(images, ref_images)
    # evaluation: the same images, in the same order, bit for bit
    for loader, reference in zip(eval_loaders(cached), eval_loaders(plain), strict=True):
        assert loader.dataset.images.cache is not None
        for (groups, _), (ref_groups, _) in zip(loader, reference, strict=True):
            for batch, ref in zip(groups, ref_groups, strict=True):
                assert torch.equal(batch.indices, ref.indices) and torch.equal(batch.sizes, ref.sizes)
                assert torch.equal(batch.images, ref.images)


def test_datamodule_training_cache_at_a_smaller_long_side(data_dir: Path, tmp_path: Path) -> None:
    dm = make(data_dir, tmp_path / "cache", cache={"train_long_side": 40, "num_workers": 0})
    dm.setup("fit")  # no prepare_data: setup builds what is missing
    assert dm.cache_folder("train", "synthetic") == tmp_path / "cache" / "train-synthetic-40"
    cache = dm.train_dataloader().dataset.cache
    assert cache.long_side == 40 and int(cache.shapes.max()) == 40
    dataset = dm.train_dataloader().dataset
    assert [max(dataset._image(i).size) for i in range(3)] == [40, 40, 40]  # the 64 px sources, as cached
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)
    # validate only: the training cache is neither needed nor opened
    only_eval = make(data_dir, tmp_path / "cache2")
    only_eval.setup("validate")
    assert only_eval._train_cache is None and only_eval._eval_caches
    assert [p.name for p in (tmp_path / "cache2").iterdir()] == ["eval-synthetic-48"]


def test_datamodule_default_cache_dir_and_config_errors(data_dir: Path, tmp_path: Path) -> None:
    dm = RetrievalDataModule(data_dir=data_dir, eval_image_size=None, cache={"enabled": True})
    assert dm.cache_dir == data_dir / "cache"
    assert dm.cache_folder("eval", "rsynthetic") == data_dir / "cache" / "eval-synthetic-full"
    assert not RetrievalDataModule(data_dir=data_dir).cache_config.enabled
    bad = [
        ({"enabled": "yes"}, "data.cache.enabled must be true or false"),
        ({"train_long_side": 0}, "data.cache.train_long_side must be a positive integer"),
        ({"num_workers": -1}, "data.cache.num_workers must be a non-negative integer"),
        ({"dir": ""}, "data.cache.dir must be a folder path"),
        ({"folder": "x"}, r"unknown data.cache key\(s\) \['folder'\]"),
        ("on", "data.cache must be a mapping"),
    ]
    for cache, message in bad:
        with pytest.raises(ConfigError, match=message):
            RetrievalDataModule(data_dir=data_dir, cache=cache)
    with pytest.raises(ConfigError, match="data.pin_memory must be true or false"):
        RetrievalDataModule(data_dir=data_dir, pin_memory="yes")


def test_datamodule_cache_follows_a_changed_image(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dm = make(data, tmp_path / "cache")
    dm.prepare_data()
    dm.setup("validate")
    first = dm.eval_images()[0][0][0]
    path = dm.eval_benchmark.db_paths[0]
    write_image(path, 64, 48, seed=321, quality=95)
    touch_later(path)
    again = make(data, tmp_path / "cache")
    again.setup("validate")
    changed = again.eval_images()[0][0][0]
    assert not torch.equal(first, changed)
    assert torch.equal(changed, ImageListDataset([path], 48)[0][0])


# -- a real training run ----------------------------------------------------------------------------


def test_fast_dev_run_with_the_cache(tmp_path: Path) -> None:
    from oxford_ir.cli.train import train
    from tests.test_train import TINY as TRAIN_TINY
    from tests.test_train import TINY_SCRATCH, compose_train

    cfg = compose_train(
        tmp_path,
        *TRAIN_TINY,
        *TINY_SCRATCH,
        "logger=none",
        "debug=fast_dev_run",
        "data.cache.enabled=true",
        "data.cache.progress=false",
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    caches = sorted(p.name for p in (tmp_path / "data" / "cache").iterdir())
    assert caches == ["eval-synthetic-64", "train-synthetic-64"]
    trainer = objects["trainer"]
    assert trainer.train_dataloader.dataset.cache is not None
    assert all(loader.dataset.images.cache is not None for loader in trainer.val_dataloaders)
    assert 0.0 <= metrics["val/mAP"] <= 1.0 and metrics["train/num_triplets"] >= 0


def test_cli_builds_what_the_datamodule_reads(data_dir: Path, tmp_path: Path, capsys) -> None:
    from oxford_ir.cli.data import main

    cache_dir = tmp_path / "cache"
    args = ["-q", "cache", "synthetic", "--root", str(data_dir), "--dir", str(cache_dir), "--eval-size", "48"]
    assert main([*args, "--train-long-side", "64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # 48 database images + 10 cropped queries; training: every database image (any split is a subset)
    assert "eval cache: 58 images at long side 48" in out and "train cache: 48 images at long side 64" in out
    dm = make(data_dir, cache_dir)
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.rglob("manifest.json")}
    dm.setup("fit")  # finds both caches fresh: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in cache_dir.rglob("manifest.json")} == before
    assert dm._train_cache.folder == cache_dir / "train-synthetic-64" and dm._eval_caches
    with pytest.raises(SystemExit) as error:
        main(
            ["cache", "synthetic", "--root", str(data_dir), "--dir", str(data_dir / "synthetic" / "gnd_synthetic.pkl")]
        )
    assert error.value.code == 2 and "cannot create the image cache in" in capsys.readouterr().err
