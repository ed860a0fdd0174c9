"""RetrievalDataModule: training batches through the framework, evaluation images and settings, config errors."""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from oxford_ir.benchmarks.registry import load_benchmark
from oxford_ir.benchmarks.splits import full_ground_truth
from oxford_ir.benchmarks.synthetic import SYNTHETIC_DEFAULTS, SYNTHETIC_PRESETS
from oxford_ir.callbacks.distributed import SpawnedProcessGroupTeardown
from oxford_ir.config import instantiate as build
from oxford_ir.data.augmentation import Augmentation, train_transform
from oxford_ir.data.datamodule import RetrievalDataModule
from oxford_ir.data.sampler import ClassBalancedSampler
from oxford_ir.errors import ConfigError, DataError
from oxford_ir.extraction.benchmark import benchmark_loaders
from oxford_ir.models.backbones import ScratchCNN
from oxford_ir.models.embedder import Embedder
from oxford_ir.models.pooling import GeM
from tests.data.conftest import TINY
from tests.data.test_sampler import check_batch

REPO = Path(__file__).resolve().parents[2]


def data_config(name: str) -> DictConfig:
    """``conf/data/<name>.yaml`` composed with its defaults (``base``), interpolations left to the caller's root."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(f"data/{name}").data


def make(data_dir: Path, **overrides) -> RetrievalDataModule:
    kwargs = {
        "data_dir": data_dir,
        "benchmark": "synthetic",
        "split": "seed",
        "image_size": 32,
        "eval_image_size": 48,
        "classes_per_batch": 3,
        "images_per_class": 2,
        "distractors_per_batch": 2,
        "eval_batch_size": 4,
        "seed": 7,
        "synthetic": TINY,
        **overrides,
    }
    return RetrievalDataModule(**kwargs)


# -- the data module --------------------------------------------------------------------------------------


def test_prepare_data_writes_the_synthetic_benchmark(tmp_path: Path) -> None:
    dm = make(tmp_path)
    dm.prepare_data()
    assert (tmp_path / "synthetic" / "gnd_synthetic.pkl").is_file()
    assert len(list((tmp_path / "synthetic" / "jpg").glob("*.jpg"))) == 5 * 8 + 8


def test_prepare_data_honours_the_synthetic_preset(tmp_path: Path) -> None:
    """``data.synthetic.preset`` picks the parameters, as ``synthetic.preset`` of oxford-ir-eval does."""
    dm = make(tmp_path, synthetic={"preset": "tiny", "n_distractors": 4})
    dm.prepare_data()
    tiny = SYNTHETIC_PRESETS["tiny"]
    n_images = tiny["n_landmarks"] * (tiny["queries_per_landmark"] + tiny["images_per_landmark"]) + 4
    assert len(list((tmp_path / "synthetic" / "jpg").glob("*.jpg"))) == n_images
    with pytest.raises(ConfigError, match=r"data.synthetic.preset='huge': choose one of \['default', 'tiny'\]"):
        make(tmp_path, synthetic={"preset": "huge"}).prepare_data()


def test_setup_and_training_batches(data_dir: Path) -> None:
    dm = make(data_dir)
    dm.setup("fit")
    split = dm.train_split
    assert dm.num_classes == 5 + 8 and split.num_landmark_classes == 5
    assert np.array_equal(dm.train_labels, split.labels)
    assert dm.eval_benchmark.name == "synthetic" and dm.eval_benchmark.n_queries == 10
    assert not {p.stem for p in split.paths} & set(dm.eval_benchmark.qimlist)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ClassBalancedSampler) and loader.batch_size == 3 * 2 + 2
    # default length: about one pass over the 25 landmark images, ceil(25 / (3 x 2)) batches
    assert len(loader) == math.ceil(25 / 6)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long
    first = loader.sampler.batches(0)[0]
    assert labels.tolist() == split.labels[first].tolist()
    check_batch(first, split.labels, 5, 3, 2, 2)
    # normalised: roughly zero-centred values, well outside [0, 1]
    assert images.min() < 0 < images.max()


def test_whole_training_images_keep_their_aspect_ratio_and_are_the_test_time_pixels(data_dir: Path) -> None:
    """``train_images=whole``: a batch is the list of its images, each whole at long side ``image_size`` and its
    own aspect ratio, exactly the test-time tensor of the file (no augmentation), in the sampler's order."""
    from oxford_ir.data.datasets import pixels_to_tensor
    from oxford_ir.data.eval_pixels import eval_image

    dm = make(data_dir, train_images="whole", image_size=24)
    dm.setup("fit")
    loader = dm.train_dataloader()
    images, labels = next(iter(loader))
    first = loader.sampler.batches(0)[0]
    assert isinstance(images, list) and len(images) == len(first) == 8
    assert labels.tolist() == dm.train_split.labels[first].tolist()
    for image, index in zip(images, first, strict=True):
        path = dm.train_split.paths[index]
        with Image.open(path) as opened:
            width, height = opened.size
        assert max(image.shape[1:]) == min(24, max(width, height))
        assert abs(image.shape[2] / image.shape[1] - width / height) < 0.1  # the aspect ratio, not a square
        assert torch.equal(image, pixels_to_tensor(eval_image(path, 24)))
    assert any(image.shape[1] != image.shape[2] for image in images)  # the synthetic photos are 4:3 and 3:4


def test_landmarks_split_through_the_module(data_dir: Path) -> None:
    dm = make(data_dir, split="landmarks", held_out_landmarks=["landmark_02"])
    dm.setup("fit")
    assert "landmark_02" not in dm.train_split.label_names
    assert set(dm.eval_benchmark.query_landmarks) == {"landmark_02"}
    assert dm.eval_benchmark.n_db == 48  # the full database


def test_held_out_settings_are_ignored_by_the_other_splits(data_dir: Path) -> None:
    dm = make(data_dir, split="seed", n_held_out=2)
    dm.setup("validate")
    assert dm.split.held_out_landmarks == () and dm.eval_benchmark.n_queries == 10


def _eval_loaders(dm: RetrievalDataModule) -> list:
    """The validation loaders as the module plans them (``RetrievalModule.evaluation_loaders``), for a tiny CNN."""
    model = Embedder(ScratchCNN(channels=(4, 8)), GeM())
    loaders, _ = benchmark_loaders(model, dm.eval_benchmark, images=dm.eval_images(), **dm.eval_settings)
    return loaders


def test_val_loaders_cover_every_image_once_in_order(data_dir: Path) -> None:
    dm = make(data_dir)
    dm.setup("validate")
    benchmark = dm.eval_benchmark
    database, queries = _eval_loaders(dm)
    seen = []
    for groups, failures in database:
        assert not failures
        for batch in groups:
            assert batch.indices.dtype == torch.long and batch.images.shape[0] == len(batch.indices)
            for (h, w), index in zip(batch.sizes.tolist(), batch.indices.tolist(), strict=True):
                with Image.open(benchmark.db_paths[index]) as original:
                    full_w, full_h = original.size
                assert max(h, w) == min(48, max(full_w, full_h))
                assert batch.images.shape[-2] >= h and batch.images.shape[-1] >= w  # padded to its bucket
            seen += batch.indices.tolist()
    assert sorted(seen) == list(range(benchmark.n_db))
    seen = []
    for groups, _ in queries:
        for batch in groups:
            for (h, w), index in zip(batch.sizes.tolist(), batch.indices.tolist(), strict=True):
                # by hand: PIL crops at the rounded box, then the crop keeps the scale of the whole image
                with Image.open(benchmark.query_paths[index]) as original:
                    full_long = max(original.size)
                x1, y1, x2, y2 = (round(v) for v in benchmark.query_bboxes[index])
                crop_w, crop_h = x2 - x1, y2 - y1
                target = 48 * max(crop_w, crop_h) / full_long
                long_side = min(max(crop_w, crop_h), math.floor(target))
                short_side = long_side * min(crop_w, crop_h) / max(crop_w, crop_h)
                assert max(h, w) == long_side and abs(min(h, w) - short_side) <= 1
                assert (w >= h) == (crop_w >= crop_h)
            seen += batch.indices.tolist()
    assert sorted(seen) == list(range(benchmark.n_queries))


def test_val_dataloader_is_planned_by_the_module(data_dir: Path) -> None:
    dm = make(data_dir, eval_batching="shape")
    dm.setup("validate")
    assert dm.eval_settings["batching"] == "shape" and dm.eval_settings["batch_size"] == 4
    with pytest.raises(ConfigError, match="planned by the LightningModule"):
        dm.val_dataloader()
    with pytest.raises(ConfigError, match="data.eval_batching='padded'"):
        make(data_dir, eval_batching="padded")


# -- errors -------------------------------------------------------------------------------------------


def test_k_too_large_names_the_classes(data_dir: Path) -> None:
    dm = make(data_dir, images_per_class=6)
    with pytest.raises(ConfigError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert "images_per_class=6" in message and "landmark_00: 5" in message
    assert "lower images_per_class to at most 5" in message


def test_unknown_landmark(data_dir: Path) -> None:
    dm = make(data_dir, split="landmarks", held_out_landmarks=["eiffel"])
    with pytest.raises(ConfigError, match=r"unknown landmark\(s\) 'eiffel'.*landmark_00, landmark_01"):
        dm.setup("fit")


def test_too_few_classes(data_dir: Path) -> None:
    dm = make(data_dir, split="landmarks", n_held_out=3, classes_per_batch=3)
    with pytest.raises(ConfigError, match="only 2 have that many.*lower classes_per_batch to at most 2"):
        dm.setup("fit")


def test_too_many_distractors(data_dir: Path) -> None:
    dm = make(data_dir, distractors_per_batch=9)
    with pytest.raises(ConfigError, match="distractors_per_batch=9 but .* has 8 distractor images"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"split": "cross"}, "split=cross trains on synthetic and evaluates on another dataset"),
        ({"split": "disjoint"}, "data.split='disjoint' is unknown"),
        ({"benchmark": "holidays"}, "unknown benchmark 'holidays'"),
        ({"use_distractors": False}, "distractors_per_batch=2 needs data.use_distractors=true"),
        ({"augmentation": {"flip": 0.5}}, r"unknown augmentation parameter\(s\) \['flip'\]"),
        ({"augmentation": {"scale": [0.5, 0.2]}}, "augmentation.scale must be"),
        ({"image_size": 0}, "data.image_size must be a positive integer"),
        ({"train_images": "full"}, "data.train_images='full': choose crop"),
        ({"train_images": "whole", "decode": "gpu"}, "data.train_images=whole decodes each image whole in the workers"),
        ({"train_images": "whole", "cache": {"enabled": True}}, "set data.decode=cpu and data.cache.enabled=false"),
    ],
)
def test_config_errors(data_dir: Path, overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(data_dir, **overrides)


def test_data_eval_scales_is_deprecated_and_ignored(data_dir: Path, caplog) -> None:
    """An old config that still sets data.eval_scales builds, with a warning pointing at model.eval_scales."""
    node = OmegaConf.create({"_target_": "oxford_ir.data.datamodule.RetrievalDataModule", "data_dir": str(data_dir)})
    node.eval_scales = [1.0, 0.7071]
    with caplog.at_level(logging.WARNING, logger="oxford_ir.data.datamodule"):
        dm = build(node, "data")
    assert "data.eval_scales=[1.0, 0.7071] is deprecated and ignored" in caplog.text
    assert "set model.eval_scales instead" in caplog.text
    assert "eval_scales" not in dm.hparams and not hasattr(dm, "eval_scales")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="oxford_ir.data.datamodule"):
        make(data_dir)
    assert "eval_scales" not in caplog.text


def test_missing_training_images(data_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    dm = make(copy)
    dm.setup("validate")
    n_training = len(dm.split)
    victim = dm.split.paths[0]
    (copy / "synthetic" / "jpg" / victim.name).unlink()
    with pytest.raises(DataError, match=r"1 of \d+ database and query images are missing .* allow_missing_images=true"):
        make(copy).setup("fit")
    dm = make(copy, allow_missing_images=True)
    with pytest.warns(UserWarning):
        dm.setup("fit")
    assert victim.name not in {p.name for p in dm.train_split.paths}
    assert len(dm.train_split) == n_training - 1
    assert dm.eval_benchmark.is_subset and dm.eval_benchmark.n_db == 47


def test_before_setup(data_dir: Path) -> None:
    with pytest.raises(RuntimeError, match=r"call setup\('fit'\) first"):
        _ = make(data_dir).train_labels


# -- augmentation -----------------------------------------------------------------------------------


def test_train_transform() -> None:
    image = Image.new("RGB", (120, 80), (200, 100, 50))
    out = train_transform(40, {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0})(image)
    assert out.shape == (3, 40, 40)
    # a uniform image stays uniform: the ImageNet-normalised colour, whatever the crop and flip
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(Augmentation().mean)) / torch.tensor(
        Augmentation().std
    )
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    steps = [
        type(t).__name__
        for t in Augmentation(hflip=0, brightness=0, contrast=0, saturation=0, hue=0).transform(8).transforms
    ]
    assert steps == ["RandomResizedCrop", "ToTensor", "Normalize"]
    crop = Augmentation(scale=(0.3, 0.6)).transform(16).transforms[0]
    assert crop.scale == (0.3, 0.6) and crop.size == (16, 16)


# -- real data and the real framework -------------------------------------------------------------------


@pytest.mark.shared_data
def test_real_paris_subset_landmarks_split(paris_root: Path) -> None:
    dm = RetrievalDataModule(
        data_dir=paris_root,
        benchmark="rparis6k",
        split="landmarks",
        held_out_landmarks=["eiffel"],
        allow_missing_images=True,
        image_size=48,
        eval_image_size=64,
        classes_per_batch=4,
        images_per_class=2,
        batches_per_epoch=1,
        distractors_per_batch=0,
        seed=0,
    )
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        dm.setup("fit")
    split = dm.train_split
    assert "eiffel" not in split.label_names
    assert all(p.is_file() for p in split.paths)
    # brute force on the full ground truth: no training image is a positive or junk of an eiffel query
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = full_ground_truth(load_benchmark("rparis6k", paris_root, allow_missing_images=True))
    eiffel = set()
    for q, landmark in enumerate(full.query_landmarks):
        if landmark == "eiffel":
            for i in [*full.positives(q), *full.gnd[q]["junk"]]:
                eiffel.add(full.imlist[i])
    names = {p.stem for p in split.paths}
    assert names and not names & eiffel
    assert not any(n.startswith("paris_eiffel_") for n in names)
    # landmarks on disk: defense, invalides, louvre, moulinrouge (50 images each in ../shared)
    drawn = sorted({split.label_names[c] for c in dm.train_classes})
    assert drawn == ["defense", "invalides", "louvre", "moulinrouge"]
    assert set(dm.eval_benchmark.query_landmarks) == {"eiffel"} and dm.eval_benchmark.n_db == 238
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 48, 48) and len(set(labels.tolist())) == 4


class _Recorder(pl.LightningModule):
    """Records the labels of every training batch; learns nothing."""

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        # a hyperparameter the data module holds too, with another value: logging must not refuse it
        self.save_hyperparameters()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append(labels.tolist())
        return (images.mean() * self.weight).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_sets_the_epoch_and_keeps_the_sampler(data_dir: Path, tmp_path: Path) -> None:
    dm = make(data_dir, batches_per_epoch=2)
    module = _Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[SpawnedProcessGroupTeardown()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    assert isinstance(trainer.train_dataloader.sampler, ClassBalancedSampler)
    labels = dm.train_labels
    expected = [labels[b].tolist() for epoch in (0, 1) for b in dm.train_sampler().batches(epoch)]
    assert module.seen == expected
    assert module.seen[:2] != module.seen[2:]


def test_configs_instantiate(tmp_path: Path) -> None:
    names = sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml") if p.stem != "base")
    assert {"collection", "oxford5k", "paris6k", "paris_to_oxford", "roxford5k", "rparis6k", "synthetic"} <= set(names)
    for name in names:
        data = data_config(name)
        if name == "collection":  # the folder or manifest is named on the command line (benchmark: ???)
            data.benchmark = f"collection:{tmp_path}"
        cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "seed": 3, "data": data})
        dm = instantiate(cfg.data)
        assert isinstance(dm, RetrievalDataModule) and dm.data_dir == tmp_path and dm.hparams.seed == 3
        assert isinstance(dm.hparams.augmentation, dict) and "eval_scales" not in cfg.data
    quickstart = OmegaConf.create({"paths": {"data_dir": "d"}, "seed": 0, "data": data_config("synthetic")})
    # the quickstart benchmark is the documented default one
    assert OmegaConf.to_container(quickstart.data.synthetic) == {"seed": 0, **SYNTHETIC_DEFAULTS}
    cross = instantiate(
        OmegaConf.create({"paths": {"data_dir": "d"}, "seed": 0, "data": data_config("paris_to_oxford")}).data
    )
    assert cross.hparams.split == "cross" and cross.eval_benchmark_name == "roxford5k"


class _RankRecorder(_Recorder):
    """Writes the labels each process trained on to ``<folder>/rank<r>.json``."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def on_train_end(self) -> None:
        import json

        (Path(self.folder) / f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


@pytest.mark.slow  # 10-20 s: two spawned processes import torch and Lightning
def test_ddp_processes_draw_disjoint_shares(data_dir: Path, tmp_path: Path) -> None:
    """Real DDP (two CPU processes, gloo): Lightning keeps the sampler and each process trains its own share."""
    import json

    dm = make(data_dir, batches_per_epoch=3)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=True,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[SpawnedProcessGroupTeardown()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_RankRecorder(str(tmp_path)), datamodule=dm)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    dm.setup("fit")
    labels = dm.train_labels
    split = dm.train_split
    reference = ClassBalancedSampler(
        labels,
        dm.train_classes,
        3,
        2,
        3,
        distractors=np.flatnonzero(split.is_distractor),
        distractors_per_batch=2,
        seed=7,
        num_replicas=2,
    )
    for rank in range(2):
        expected = [labels[b].tolist() for epoch in (0, 1) for b in reference.global_batches(epoch)[rank::2]]
        assert seen[rank] == expected


def test_augmentation_of_each_draw_depends_only_on_seed_epoch_and_position(data_dir):
    """Resume-exactness: the same (seed, epoch) gives the same crops whatever the global random state."""
    dm = make(data_dir)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    torch.manual_seed(1)
    first, labels_a = next(iter(loader))
    torch.manual_seed(999)
    np.random.seed(5)
    again, labels_b = next(iter(loader))
    assert torch.equal(first, again) and torch.equal(labels_a, labels_b)
    loader.sampler.set_epoch(4)
    other, _ = next(iter(loader))
    assert not torch.equal(first, other)
    seeds = loader.sampler.draw_seeds(3)
    assert seeds.shape == loader.sampler.batches(3).shape and len(np.unique(seeds)) == seeds.size


def test_loader_defaults_pin_and_keep_workers(data_dir: Path) -> None:
    """conf/data pins memory (only applied with an accelerator) and keeps workers (only when there are any)."""
    for path in sorted((REPO / "conf" / "data").glob("*.yaml")):
        cfg = data_config(path.stem)
        assert cfg.pin_memory is True and cfg.persistent_workers is True, path.name
        assert cfg.cache.enabled is False and cfg.cache.dir is None and cfg.cache.train_long_side is None, path.name
    dm = make(data_dir, num_workers=1)
    dm.setup("fit")
    loaders = [dm.train_dataloader(), *_eval_loaders(dm)]
    assert all(loader.persistent_workers for loader in loaders)
    assert all(loader.pin_memory == torch.cuda.is_available() for loader in loaders)
    no_workers = make(data_dir, num_workers=0)
    no_workers.setup("fit")
    assert not no_workers.train_dataloader().persistent_workers
