"""Extraction: query crops as cnnimageretrieval, multi-scale by hand, batching, order, errors, real images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.data.datasets import ImageListDataset
from oxford_ir.data.transforms import eval_transform, resize_long_side, to_tensor_normalised
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.extraction.batches import PlannedBatches
from oxford_ir.extraction.benchmark import extract_benchmark
from oxford_ir.extraction.embedding import embed_image_batch, extract_embeddings, plan_for_model
from oxford_ir.models.backbones import MobileNetV2, ScratchCNN
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.pooling import GeM


def _write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    # smooth-ish content so that resampling filters differ measurably from each other
    base = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
    noise = rng.integers(0, 40, size=(height, width, 3))
    Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Mixed aspect ratios: landscape, portrait, square, panorama; some sizes repeat so batches form."""
    sizes = [(80, 60), (60, 80), (80, 60), (50, 50), (60, 80), (96, 40), (80, 60), (50, 50), (40, 96)]
    return [_write_image(tmp_path / f"im{i}.png", w, h, seed=i) for i, (w, h) in enumerate(sizes)]


def _model(p: float = 3.0) -> Embedder:
    torch.manual_seed(0)
    model = Embedder(ScratchCNN(channels=(4, 8)), GeM(p=p))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


#: exact extraction (no padding): what the tests comparing with images embedded one by one need
EXACT = {"batching": "shape"}


def _one_by_one(model: Embedder, dataset: ImageListDataset) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(dataset[i][0].unsqueeze(0)) for i in range(len(dataset))])


# -- preprocessing ----------------------------------------------------------------------------------
def test_full_images_are_downscaled_to_the_long_side_never_upscaled(images: list[Path]) -> None:
    tensor, index = ImageListDataset(images, 40)[1]
    assert index == 1 and tensor.shape == (3, 40, 30)  # 60 x 80 portrait -> 30 x 40
    expected = to_tensor_normalised(Image.open(images[1]).convert("RGB").resize((30, 40), Image.Resampling.LANCZOS))
    torch.testing.assert_close(tensor, expected)
    assert ImageListDataset(images, 500)[0][0].shape == (3, 60, 80)  # smaller than image_size: unchanged
    torch.testing.assert_close(eval_transform(40)(Image.open(images[1]).convert("RGB")), expected)


def test_resize_long_side_leaves_its_input_alone(images: list[Path]) -> None:
    image = Image.open(images[0]).convert("RGB")
    out = resize_long_side(image, 20)
    assert out.size == (20, 15) and image.size == (80, 60)


def test_resize_long_side_is_one_lanczos_resample_even_for_large_factors(tmp_path: Path) -> None:
    # Pillow's default thumbnail would box-reduce 400 -> 80 first (reducing_gap=2); the published code did not
    image = Image.open(_write_image(tmp_path / "big.png", 400, 300, seed=7)).convert("RGB")
    out = resize_long_side(image, 40)
    assert out.size == (40, 30)
    assert np.array_equal(np.asarray(out), np.asarray(image.resize((40, 30), Image.Resampling.LANCZOS)))
    default = image.copy()
    default.thumbnail((40, 40), Image.Resampling.LANCZOS)
    assert not np.array_equal(np.asarray(out), np.asarray(default))


def test_query_crop_keeps_the_scale_of_the_full_image(images: list[Path]) -> None:
    # 80 x 60 image, 40 x 40 box: the full image would be 40 px long -> the crop becomes 40 * 40 / 80 = 20 px
    bbox = (10.0, 5.0, 50.0, 45.0)
    tensor, _ = ImageListDataset([images[0]], 40, bboxes=[bbox])[0]
    assert tensor.shape == (3, 20, 20)
    crop = Image.open(images[0]).convert("RGB").crop(bbox)
    torch.testing.assert_close(tensor, to_tensor_normalised(crop.resize((20, 20), Image.Resampling.LANCZOS)))


def test_query_crop_with_fractional_box_and_size(images: list[Path]) -> None:
    # PIL rounds the box to (3, 8, 60, 34): 57 x 26; target 50 * 57 / 80 = 35.625 -> 35 wide,
    # height 26 * 35 / 57 = 15.96 -> 16 (thumbnail keeps the aspect ratio closest)
    bbox = (3.4, 7.6, 60.2, 33.9)
    tensor, _ = ImageListDataset([images[0]], 50, bboxes=[bbox])[0]
    assert tensor.shape == (3, 16, 35)
    crop = Image.open(images[0]).convert("RGB").crop((3, 8, 60, 34))
    torch.testing.assert_close(tensor, to_tensor_normalised(crop.resize((35, 16), Image.Resampling.LANCZOS)))


def test_images_without_a_box_among_queries_are_not_cropped(images: list[Path]) -> None:
    dataset = ImageListDataset(images[:2], 40, bboxes=[None, (0, 0, 30, 30)])
    assert dataset[0][0].shape == (3, 30, 40) and dataset[1][0].shape == (3, 15, 15)


def test_empty_box_is_a_data_error_naming_the_file(images: list[Path]) -> None:
    with pytest.raises(DataError, match="bounding box") as info:
        ImageListDataset([images[0]], 40, bboxes=[(30, 10, 30.2, 40)])[0]
    assert str(images[0]) in str(info.value)


def test_dataset_scale_is_bilinear_interpolation_of_the_tensor(images: list[Path]) -> None:
    base = ImageListDataset(images, 40)[5][0]
    scaled = ImageListDataset(images, 40, scale=1 / math.sqrt(2))[5][0]
    expected = F.interpolate(base[None], scale_factor=1 / math.sqrt(2), mode="bilinear", align_corners=False)[0]
    assert base.shape == (3, 17, 40)  # 96 x 40 -> 40 x 16.67, rounded to 17
    assert scaled.shape == (3, 12, 28)  # floor(17 / sqrt 2), floor(40 / sqrt 2)
    torch.testing.assert_close(scaled, expected)


# -- extraction ---------------------------------------------------------------------------------------
def test_batched_extraction_equals_one_by_one_in_path_order(images: list[Path]) -> None:
    model = _model()
    reference = _one_by_one(model, ImageListDataset(images, 40))
    for batch_size in (1, 2, 3, 16):
        out = extract_embeddings(model, images, 40, batch_size=batch_size, **EXACT)
        assert out.shape == (len(images), 8) and out.dtype == torch.float32
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(len(images)))
    assert not out.requires_grad
    out += 1  # a normal tensor, not an inference-mode one


def test_many_distinct_sizes_are_flushed_without_losing_rows(tmp_path: Path) -> None:
    paths = [_write_image(tmp_path / f"s{i}.png", 30 + 3 * i, 40, seed=i) for i in range(11)]
    model = _model()
    reference = _one_by_one(model, ImageListDataset(paths, None))
    torch.testing.assert_close(
        extract_embeddings(model, paths, None, batch_size=2, **EXACT), reference, rtol=1e-5, atol=1e-6
    )


def test_reversed_paths_give_reversed_rows(images: list[Path]) -> None:
    model = _model()
    forward = extract_embeddings(model, images, 40, batch_size=4)
    backward = extract_embeddings(model, images[::-1], 40, batch_size=4)
    torch.testing.assert_close(backward, forward.flip(0), rtol=1e-5, atol=1e-6)


def test_training_mode_is_restored(images: list[Path]) -> None:
    model = _model().train()
    extract_embeddings(model, images[:2], 40)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    extract_embeddings(model, images[:2], 40)
    assert not model.training


def test_single_scale_one_is_plain_extraction(images: list[Path]) -> None:
    model = _model()
    torch.testing.assert_close(
        extract_embeddings(model, images, 40, scales=(1.0,)), extract_embeddings(model, images, 40), rtol=0, atol=0
    )


def test_multi_scale_is_the_power_mean_of_the_scales(images: list[Path]) -> None:
    """extract_ms by hand: v = ((f(x)^p + f(x_s)^p) / 2)^(1/p), L2-normalised, p = GeM's p."""
    model = _model(p=2.5).eval()
    scales = (1.0, 1 / math.sqrt(2))
    bboxes = [None, (5, 5, 55, 75)] + [None] * (len(images) - 2)
    out = extract_embeddings(model, images, 40, bboxes=bboxes, scales=scales, batch_size=3, **EXACT)
    dataset = ImageListDataset(images, 40, bboxes=bboxes)
    with torch.no_grad():
        for i in range(len(images)):
            x = dataset[i][0].unsqueeze(0)
            small = F.interpolate(x, scale_factor=1 / math.sqrt(2), mode="bilinear", align_corners=False)
            v = ((model(x).pow(2.5) + model(small).pow(2.5)) / 2).pow(1 / 2.5)
            torch.testing.assert_close(out[i], (v / v.norm()).squeeze(0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, extract_embeddings(model, images, 40, bboxes=bboxes, **EXACT))


def test_bboxes_crop_only_their_images(images: list[Path]) -> None:
    model = _model()
    bboxes = [None] * len(images)
    bboxes[2] = (10, 10, 70, 50)
    plain = extract_embeddings(model, images, 40)
    cropped = extract_embeddings(model, images, 40, bboxes=bboxes)
    keep = [i for i in range(len(images)) if i != 2]
    torch.testing.assert_close(cropped[keep], plain[keep], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cropped[2], plain[2])


def test_worker_processes_give_the_same_embeddings(images: list[Path]) -> None:
    model = _model()
    torch.testing.assert_close(
        extract_embeddings(model, images, 40, num_workers=2, batch_size=3),
        extract_embeddings(model, images, 40, batch_size=3),
    )


def test_an_undecodable_image_raises_the_data_error_naming_it(images: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError, match="cannot decode image") as info:
        extract_embeddings(_model(), [images[0], broken, images[1]], 40)
    assert str(broken) in str(info.value)


def test_empty_list_and_bad_arguments(images: list[Path]) -> None:
    assert extract_embeddings(_model(), [], 40).shape == (0, 8)
    with pytest.raises(ValueError, match="scales"):
        extract_embeddings(_model(), images, 40, scales=())
    with pytest.raises(ValueError, match="bounding boxes"):
        extract_embeddings(_model(), images, 40, bboxes=[None])


def test_extract_benchmark_crops_queries_to_their_boxes(images: list[Path], tmp_path: Path) -> None:
    names = [p.stem for p in images]
    benchmark = Benchmark(
        name="tiny",
        root=tmp_path,
        protocol="original",
        imlist=names,
        qimlist=[names[0], names[4]],
        gnd=[{"bbx": [10, 5, 50, 45], "ok": [2, 6], "junk": []}, {"bbx": [0, 10, 60, 70], "ok": [1], "junk": []}],
        source=tmp_path / "gnd.pkl",
        image_dir=tmp_path,
        extension=".png",
    )
    model = _model()
    db, queries = extract_benchmark(model, benchmark, 40, batch_size=4, **EXACT)
    torch.testing.assert_close(db, extract_embeddings(model, images, 40, **EXACT))
    boxes = [(10, 5, 50, 45), (0, 10, 60, 70)]
    torch.testing.assert_close(queries, extract_embeddings(model, [images[0], images[4]], 40, bboxes=boxes, **EXACT))
    # bucket batching: the database and the queries share one table, so each image embeds as it would in a
    # single list of every image with those buckets
    db, queries = extract_benchmark(model, benchmark, 40, batch_size=4)
    every = extract_embeddings(model, [*images, images[0], images[4]], 40, bboxes=[None] * len(images) + boxes)
    torch.testing.assert_close(torch.cat([db, queries]), every, rtol=1e-5, atol=1e-6)


# -- real images, real ImageNet weights -----------------------------------------------------------------
@pytest.mark.shared_data
def test_pretrained_mobilenet_gem_matches_landmarks_on_real_paris_images(
    paris_root: Path, mobilenet_weights: Path
) -> None:
    """Two views of La Defense's Grande Arche (and two of Les Invalides) are closer than other landmarks."""
    names = [
        "paris_defense_000000",  # Grande Arche, front
        "paris_defense_000002",  # Grande Arche, same side, another day
        "paris_invalides_000002",  # Dome des Invalides, landscape
        "paris_invalides_000004",  # Dome des Invalides, portrait
        "paris_eiffel_000005",
        "paris_moulinrouge_000004",
    ]
    paths = [paris_root / "jpg" / f"{n}.jpg" for n in names]
    pretrained = Embedder(MobileNetV2(weights=str(mobilenet_weights)), GeM())
    emb = extract_embeddings(pretrained, paths, 224, batch_size=6)
    sim = emb @ emb.T
    for a, b in ((0, 1), (2, 3)):
        others = [j for j in range(len(names)) if j not in (a, b)]
        assert sim[a, b] > sim[a, others].max() and sim[a, b] > sim[b, others].max(), sim
    random = Embedder(MobileNetV2(weights="none"), GeM())
    assert not torch.allclose(extract_embeddings(random, paths[:2], 224), emb[:2], atol=1e-2)


# -- speed options: aspect batching, bf16, channels_last, sharding across processes ----------------------
def test_aspect_batching_runs_fewer_passes_and_stays_close_to_exact(tmp_path: Path) -> None:
    paths = [_write_image(tmp_path / f"a{i}.png", 60 + i, 80 - i, seed=i) for i in range(6)]  # all distinct
    model = _model()
    exact = extract_embeddings(model, paths, 40, batch_size=6, **EXACT)
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    approx = extract_embeddings(model, paths, 40, batch_size=6, batching="aspect", aspect_tolerance=0.2)
    hook.remove()
    assert calls == [6]  # one forward pass instead of six
    cosine = (exact * approx).sum(dim=1)
    assert float(cosine.min()) > 0.99 and not torch.equal(exact, approx)


def test_bf16_autocast_and_channels_last_give_close_embeddings(images: list[Path]) -> None:
    model = _model()
    exact = extract_embeddings(model, images, 40, batch_size=4)
    nhwc = extract_embeddings(_model(), images, 40, batch_size=4, channels_last=True)
    torch.testing.assert_close(nhwc, exact, rtol=1e-4, atol=1e-5)
    bf16 = extract_embeddings(model, images, 40, batch_size=4, precision="bf16")
    assert bf16.dtype == torch.float32 and float((bf16 * exact).sum(dim=1).min()) > 0.99
    with pytest.raises(ConfigError, match="extraction.precision"):
        extract_embeddings(model, images, 40, precision="fp8")


def _extract_in_process_group(rank: int, world: int, init_file: str, paths: list[str], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        bboxes = [None, (3, 4, 50, 40)] + [None] * (len(paths) - 2)
        vectors = extract_embeddings(_model(), paths, 40, bboxes=bboxes, batch_size=2)
        torch.save(vectors, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sharded_extraction_across_processes_is_bit_identical_to_one_process(
    images: list[Path], tmp_path: Path
) -> None:
    """Two gloo processes each embed every other planned batch; both get all rows, bit for bit one process's."""
    import torch.multiprocessing as mp

    paths = [str(p) for p in images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker process
    try:
        bboxes = [None, (3, 4, 50, 40)] + [None] * (len(paths) - 2)
        single = extract_embeddings(_model(), paths, 40, bboxes=bboxes, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    out = str(tmp_path / "rows")
    mp.spawn(_extract_in_process_group, args=(2, str(tmp_path / "init"), paths, out), nprocs=2, join=True)
    for rank in range(2):
        assert torch.equal(torch.load(f"{out}.{rank}"), single)


# -- bucket batching (the default): few input shapes, pooled over each image's own cells ---------------------------
class _ShapeRecorder(torch.nn.Module):
    """Wraps an embedder and records the (batch, height, width) of every input it receives."""

    def __init__(self, inner: Embedder) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[int, int, int]] = []
        self.embedding_dim, self.supports_padding = inner.embedding_dim, inner.supports_padding

    @property
    def power(self) -> float:
        return self.inner.power

    def forward(self, x: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(tuple(x.shape[:1]) + tuple(x.shape[-2:]))
        return self.inner(x, sizes) if sizes is not None else self.inner(x)


def _photos(tmp_path: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(60, 200)), int(rng.integers(60, 200))) for _ in range(n)]
    return [_write_image(tmp_path / f"p{i}.jpg", w, h, seed=i) for i, (w, h) in enumerate(sizes)]


def test_bucket_batching_bounds_the_input_shapes_and_equals_exact(tmp_path: Path) -> None:
    paths = _photos(tmp_path, 40)
    model = _model()
    exact = extract_embeddings(model, paths, 160, batch_size=8, **EXACT)
    recorder = _ShapeRecorder(model)
    for max_shapes in (1, 3, 6):
        recorder.seen.clear()
        bucketed = extract_embeddings(recorder, paths, 160, batch_size=8, max_shapes=max_shapes)
        assert len({s[1:] for s in recorder.seen}) <= max_shapes
        assert sum(s[0] for s in recorder.seen) == len(paths)
        torch.testing.assert_close(bucketed, exact, rtol=0, atol=1e-5)
    recorder.seen.clear()
    extract_embeddings(recorder, paths, 160, batch_size=8, **EXACT)
    assert len({s[1:] for s in recorder.seen}) > 6  # what the buckets save


def test_bucket_plan_summary_and_multi_scale_sizes(tmp_path: Path) -> None:
    paths = _photos(tmp_path, 12, seed=1)
    model = _model(p=2.5)
    plan = plan_for_model(model, paths, 160, 4, max_shapes=4)
    summary = plan.summary()
    assert summary["mode"] == "bucket" and summary["distinct_input_shapes"] <= 4 and summary["images"] == 12
    assert 0 < summary["padded_over_valid_pixels"] < 1
    recorder = _ShapeRecorder(model)
    out = extract_embeddings(recorder, paths, 160, scales=(1.0, 0.5), plan=plan, batch_size=4)
    # each scale adds one shape per bucket: floor(H * s) x floor(W * s)
    buckets = {tuple(b) for b in plan.input_shapes()}
    assert {s[1:] for s in recorder.seen} == buckets | {(h // 2, w // 2) for h, w in buckets}
    torch.testing.assert_close(out.norm(dim=1), torch.ones(12))


def test_a_model_that_cannot_pool_padded_images_gets_exact_batches(images: list[Path]) -> None:
    class Plain(torch.nn.Module):  # no supports_padding: forward takes images only
        embedding_dim = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(x.mean(dim=(-2, -1)), dim=1)

    plan = plan_for_model(Plain(), images, 40, 4)
    assert plan.mode == "shape" and "cannot pool" in plan.note
    extract_embeddings(Plain(), images, 40)  # runs, exact


def test_uploads_embed_exactly_as_their_files(images: list[Path]) -> None:
    model = _model()
    uploads = [Image.open(p) for p in images]
    labels = [f"upload-{i}" for i in range(len(images))]
    torch.testing.assert_close(
        extract_embeddings(model, uploads, 40, labels=labels, batch_size=3),
        extract_embeddings(model, images, 40, batch_size=3),
        rtol=0,
        atol=0,
    )


def test_filling_a_bucket_batch_with_blank_images_changes_nothing(tmp_path: Path) -> None:
    """What a GPU does to keep one batch size per bucket (one cuDNN plan): the real rows are unchanged."""
    paths = _photos(tmp_path, 5, seed=2)
    model = _model().eval()
    plan = plan_for_model(model, paths, 160, 8, max_shapes=1)
    (groups, failures) = PlannedBatches(ImageListDataset(paths, 160), plan.batches)[0]
    assert not failures and len(groups) == 1 and groups[0].padded
    with torch.no_grad():
        plain = embed_image_batch(model, groups[0], (1.0, 0.75))
        filled = embed_image_batch(model, groups[0], (1.0, 0.75), fill_to=8)
    assert filled.shape == plain.shape == (5, 8)
    torch.testing.assert_close(filled, plain, rtol=1e-5, atol=1e-6)


def test_gpu_decode_path_runs_on_the_cpu_and_reports_bad_files(images: list[Path], tmp_path: Path) -> None:
    """decode=gpu: workers read bytes, torchvision decodes (here with libjpeg on the CPU), bicubic resize."""
    jpegs = []
    for i, path in enumerate(images[:6]):
        jpegs.append(tmp_path / f"j{i}.jpg")
        Image.open(path).convert("RGB").save(jpegs[-1], quality=95)
    png = images[6]  # not a JPEG: decoded by PIL in the worker
    model = _model()
    sources = [*jpegs, png]
    boxes = [None, (5, 5, 50, 40)] + [None] * 5
    cpu = extract_embeddings(model, sources, 40, bboxes=boxes, batch_size=3)
    device = extract_embeddings(model, sources, 40, bboxes=boxes, batch_size=3, decode="gpu", num_workers=1)
    cosine = (cpu * device).sum(dim=1)
    assert float(cosine.min()) > 0.99  # Lanczos in PIL vs antialiased bicubic on tensors: close, not equal
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(jpegs[0].read_bytes()[:200])  # truncated: no end-of-image marker, PIL refuses it
    with pytest.raises(DataError, match="broken.jpg"):
        extract_embeddings(model, [jpegs[1], broken], 40, decode="gpu")


# -- on a GPU ----------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_extraction_paths_agree_with_the_cpu(tmp_path: Path) -> None:
    """Bucket batches filled to one batch size, the side stream, results read one batch late, GPU decoding and
    bf16 + channels_last on a real GPU, each against the exact CPU embeddings."""
    paths = _photos(tmp_path, 21)
    model = _model()
    cpu = extract_embeddings(model, paths, 160, batch_size=8, **EXACT)
    recorder = _ShapeRecorder(model)
    cases = {
        "bucket": ({"decode": "cpu"}, 2e-3),  # float32 (cuDNN may use TF32: about 1e-3)
        "bucket, decoded on the GPU": ({"decode": "gpu"}, 3e-2),  # nvJPEG + bicubic vs libjpeg + Lanczos
        "bucket, bf16, channels_last": ({"precision": "bf16", "channels_last": True}, 3e-2),
        "exact shapes": ({**EXACT, "decode": "cpu"}, 2e-3),
    }
    for name, (options, tolerance) in cases.items():
        recorder.seen.clear()
        out = extract_embeddings(
            recorder, paths, 160, batch_size=8, max_shapes=4, device="cuda", num_workers=2, **options
        )
        assert out.device.type == "cpu" and out.shape == cpu.shape, name
        assert float((1 - (out * cpu).sum(dim=1)).max()) < tolerance, name
        if options.get("batching", "bucket") == "bucket":
            assert len({s[1:] for s in recorder.seen}) <= 4 and {s[0] for s in recorder.seen} == {8}, name
    model.cpu()
