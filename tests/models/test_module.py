"""RetrievalModule on real Lightning Trainers: training statistics, validation = the protocol, configs, checkpoints.

Everything is tiny (a 2-block ScratchCNN, 32-pixel images written as real PNG files) so that each Trainer run
takes about a second on a CPU.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.benchmarks.ranking import rank_database
from oxford_ir.callbacks.distributed import SpawnedProcessGroupTeardown
from oxford_ir.data.datasets import ImageListDataset
from oxford_ir.errors import CheckpointError, ConfigError, DataError
from oxford_ir.extraction.benchmark import extract_benchmark
from oxford_ir.models.checkpoint import load_retrieval_checkpoint
from oxford_ir.models.module import RetrievalModule
from oxford_ir.models.validation import assemble_by_index

CONF = Path(__file__).resolve().parents[2] / "conf"
BENCH = "tinybench"
TRAINER_KWARGS = dict(
    accelerator="cpu",
    devices=1,
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
    log_every_n_steps=1,
)


# -- building blocks ------------------------------------------------------------------------------
def embedder_cfg(channels=(8, 16), projection_dim=None, frozen_stages=0) -> dict:
    return {
        "_target_": "oxford_ir.models.embedder.Embedder",
        "backbone": {
            "_target_": "oxford_ir.models.backbones.ScratchCNN",
            "channels": list(channels),
            "frozen_stages": frozen_stages,
        },
        "pooling": {"_target_": "oxford_ir.models.pooling.GeM", "p": 3.0},
        "projection_dim": projection_dim,
    }


def make_module(**overrides) -> RetrievalModule:
    torch.manual_seed(0)
    kwargs = dict(
        embedder=embedder_cfg(),
        loss={"_target_": "pytorch_metric_learning.losses.TripletMarginLoss", "margin": 0.1},
        miner={"_target_": "pytorch_metric_learning.miners.BatchHardMiner"},
        distance={"_target_": "pytorch_metric_learning.distances.CosineSimilarity"},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2},
    )
    kwargs.update(overrides)
    return RetrievalModule(**kwargs)


def write_benchmark(root: Path, protocol: str = "original", distractors: int = 0) -> Benchmark:
    """4 landmarks x 3 database images of three sizes (+ distractors), 4 queries with boxes, junk; real PNGs."""
    rng = np.random.default_rng(0)
    image_dir = root / "png"
    image_dir.mkdir(parents=True, exist_ok=True)
    sizes = [(32, 32), (48, 32), (32, 40)]  # (width, height): several shapes per validation batch
    colours = rng.uniform(0, 255, size=(4, 3))
    imlist, qimlist, gnd = [], [], []
    for landmark in range(4):
        for k, (w, h) in enumerate(sizes):
            pixels = colours[landmark] + rng.normal(0, 60, size=(h, w, 3))
            name = f"db_{landmark}_{k}"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(image_dir / f"{name}.png")
            imlist.append(name)
    for k in range(distractors):
        name = f"distractor_{k}"
        Image.fromarray(rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)).save(image_dir / f"{name}.png")
        imlist.append(name)
    for landmark in range(4):
        pixels = colours[landmark] + rng.normal(0, 60, size=(40, 40, 3))
        name = f"query_{landmark}"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(image_dir / f"{name}.png")
        qimlist.append(name)
        own = [3 * landmark, 3 * landmark + 1, 3 * landmark + 2]
        other = 3 * ((landmark + 1) % 4)
        bbx = [2.0, 3.0, 2.0 + 30 + landmark, 3.0 + 28]
        if protocol == "original":
            gnd.append({"ok": own[:2], "junk": [own[2]], "bbx": bbx})
        else:
            gnd.append({"easy": own[:1], "hard": own[1:], "junk": [other], "bbx": bbx})
    return Benchmark(
        name=BENCH,
        root=root,
        protocol=protocol,
        imlist=imlist,
        qimlist=qimlist,
        gnd=gnd,
        source=root / "gnd_tinybench.pkl",
        image_dir=image_dir,
        extension=".png",
    ).validate()


def train_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of 8: the first has 8 distinct labels (no triplet), the second 4 classes x 2 images."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 1, 1, 2, 2, 3, 3])
    centres = torch.randn(8, 3, 1, 1, generator=gen)
    images = centres[labels] + 0.5 * torch.randn(len(labels), 3, 32, 32, generator=gen)
    return images, labels


class StandInDataModule(pl.LightningDataModule):
    """The datamodule contract the module relies on: P x K train batches, and the evaluation benchmark with its
    images and settings (the module plans and loads them). Exact ``shape`` batches by default, so that
    validation can be compared with images embedded one by one."""

    def __init__(self, benchmark: Benchmark, eval_batch_size: int = 64, batching: str = "shape") -> None:
        super().__init__()
        self.eval_benchmark = benchmark
        self.eval_batch_size = eval_batch_size
        self.batching = batching
        self.train_images, self.train_labels = train_tensors()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.train_images, self.train_labels), batch_size=8, shuffle=False)

    def db_dataset(self):
        return ImageListDataset(self.eval_benchmark.db_paths, None)

    def query_dataset(self):
        return ImageListDataset(self.eval_benchmark.query_paths, None, bboxes=self.eval_benchmark.query_bboxes)

    def eval_images(self):
        return self.db_dataset(), self.query_dataset()

    def val_dataloader(self):
        return self.trainer.lightning_module.evaluation_loaders(self)

    @property
    def eval_settings(self) -> dict:
        return {
            "image_size": None,
            "batch_size": self.eval_batch_size,
            "batching": self.batching,
            "max_shapes": 16,
            "num_workers": 0,
            "pin_memory": False,
            "persistent_workers": False,
            "gpu_decode": False,
        }


class MemoryLogger(Logger):
    """Keeps every logged row and the hyperparameters, to check names and per-step values."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []
        self.hparams: dict | None = None

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self.hparams = dict(params)

    def series(self, key: str) -> list[float]:
        return [row[key] for _, row in self.rows if key in row]


def literal_embedding(embedder, image: torch.Tensor, scales=(1.0,)) -> torch.Tensor:
    """One image through the network alone; several scales combined as cnnimageretrieval's extract_ms, literally."""
    x = image.unsqueeze(0)
    if len(scales) == 1 and scales[0] == 1.0:
        return embedder(x)[0]
    p = embedder.power
    v = torch.zeros(embedder.embedding_dim)
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        v += embedder(xs)[0].pow(p)
    v = (v / len(scales)).pow(1.0 / p)
    return v / v.norm()


def direct_evaluation(embedder, datamodule: StandInDataModule, scales=(1.0,), kappas=(1, 5, 10)):
    """Embed every image one by one, rank, evaluate: what validation must reproduce."""
    embedder.eval()
    with torch.no_grad():
        db = torch.stack([literal_embedding(embedder, x, scales) for x, _ in datamodule.db_dataset()])
        queries = torch.stack([literal_embedding(embedder, x, scales) for x, _ in datamodule.query_dataset()])
    benchmark = datamodule.eval_benchmark
    metrics, _ = benchmark.evaluate_detailed(rank_database(db, queries), kappas)
    return db, queries, metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real fit (2 steps, a full validation), then a checkpoint: shared by several tests."""
    root = tmp_path_factory.mktemp("module")
    datamodule = StandInDataModule(write_benchmark(root / "bench"))
    module = make_module()
    logger = MemoryLogger()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, logger=logger, **TRAINER_KWARGS)
    trainer.fit(module, datamodule=datamodule)
    checkpoint = root / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    return {"module": module, "datamodule": datamodule, "trainer": trainer, "logger": logger, "ckpt": checkpoint}


# -- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("frozen", [False, True])
def test_freeze_batchnorm_keeps_the_running_statistics_while_scale_and_shift_train(tmp_path, frozen: bool):
    """cnnimageretrieval-pytorch's fine-tuning: BatchNorm normalises with its running statistics and never updates
    them, across epochs and the validation between them; its affine parameters still learn."""
    datamodule = StandInDataModule(write_benchmark(tmp_path))
    module = make_module(freeze_batchnorm=frozen)
    norms = [m for m in module.embedder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone()) for m in norms]
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, num_sanity_val_steps=0, logger=False, **TRAINER_KWARGS)
    trainer.fit(module, datamodule=datamodule)
    assert norms and all(int(m.num_batches_tracked) == (0 if frozen else 4) for m in norms)
    for m, (mean, var, weight) in zip(norms, before, strict=True):
        assert torch.equal(m.running_mean, mean) == frozen and torch.equal(m.running_var, var) == frozen
        assert not torch.equal(m.weight.detach(), weight)  # the scale trains either way


def test_fast_dev_run_logs_training_statistics_and_the_evaluation(tmp_path):
    datamodule = StandInDataModule(write_benchmark(tmp_path))
    module = make_module()
    trainer = pl.Trainer(fast_dev_run=2, **TRAINER_KWARGS)
    trainer.fit(module, datamodule=datamodule)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/num_triplets", "train/active_fraction", "val/mAP"):
        assert key in metrics, f"{key} not logged; got {sorted(metrics)}"
    for key in ("mAP", "mP@1", "mP@5", "mP@10"):
        assert f"val/{BENCH}/{key}" in metrics
    assert float(metrics["val/mAP"]) == float(metrics[f"val/{BENCH}/mAP"])
    # the second batch is 4 classes x 2 images: batch-hard mines one triplet per anchor
    assert float(metrics["train/num_triplets"]) == 8.0


def test_every_step_logs_its_mining_statistics_and_an_empty_batch_shows(trained):
    logger = trained["logger"]
    # step 0: 8 distinct labels, no triplet; step 1: 4 x 2, eight anchors with a positive and a negative
    assert logger.series("train/num_triplets") == [0.0, 8.0]
    assert logger.series("train/loss")[0] == 0.0 and logger.series("train/loss")[1] > 0.0
    active = logger.series("train/active_fraction")
    assert active[0] == 0.0 and 0.0 < active[1] <= 1.0
    validated = [row for _, row in logger.rows if "val/mAP" in row]
    assert len(validated) == 1 and f"val/{BENCH}/mP@1" in validated[0]
    # and the epoch's mean training loss, once (the stand-in datamodule has no val/loss batches: none logged)
    assert logger.series("train/loss_epoch") == [pytest.approx(sum(logger.series("train/loss")) / 2)]
    assert logger.series("val/loss") == []
    # the hyperparameters are plain containers (what a logger and a checkpoint can hold)
    assert type(logger.hparams["embedder"]) is dict and type(logger.hparams["embedder"]["backbone"]) is dict


def test_zero_triplet_batch_gives_a_zero_loss_with_a_gradient_graph():
    module = make_module()
    images, labels = train_tensors()
    loss, stats = module.compute_loss(images[:8], labels[:8])
    assert stats.num_triplets == 0 and stats.active_fraction == 0.0
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # the optimizer step runs and changes nothing
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in module.parameters())


def test_miner_and_loss_share_one_distance_object():
    module = make_module()
    assert module.miner.distance is module.distance and module.loss_fn.distance is module.distance
    pairs = make_module(
        loss={"_target_": "pytorch_metric_learning.losses.MultiSimilarityLoss"},
        miner={"_target_": "pytorch_metric_learning.miners.MultiSimilarityMiner", "epsilon": 0.1},
        distance={"_target_": "pytorch_metric_learning.distances.LpDistance", "p": 2},
    )
    assert pairs.miner.distance is pairs.distance is pairs.loss_fn.distance
    assert not pairs.distance.is_inverted


def test_pair_miner_logs_pair_counts(tmp_path):
    datamodule = StandInDataModule(write_benchmark(tmp_path))
    module = make_module(miner={"_target_": "pytorch_metric_learning.miners.MultiSimilarityMiner", "epsilon": 0.1})
    images, labels = train_tensors()
    _, stats = module.compute_loss(images[8:], labels[8:])
    assert stats.num_pos_pairs is not None and stats.num_neg_pairs is not None
    trainer = pl.Trainer(fast_dev_run=2, **TRAINER_KWARGS)
    trainer.fit(module, datamodule=datamodule)
    assert {"train/num_pos_pairs", "train/num_neg_pairs"} <= set(trainer.callback_metrics)


# -- validation ----------------------------------------------------------------------------------
def test_validation_metrics_equal_a_direct_computation(trained):
    module, datamodule = trained["module"], trained["datamodule"]
    db, queries, expected = direct_evaluation(module.embedder, datamodule)
    evaluation = module.last_evaluation
    assert evaluation.benchmark is datamodule.eval_benchmark
    torch.testing.assert_close(evaluation.db, db, atol=1e-5, rtol=0)
    torch.testing.assert_close(evaluation.queries, queries, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(evaluation.ranks, rank_database(db, queries))
    metrics = trained["trainer"].callback_metrics
    assert set(evaluation.metrics) == set(expected)
    for key, value in expected.items():
        assert float(metrics[f"val/{BENCH}/{key}"]) == pytest.approx(value, abs=1e-6)
        assert evaluation.metrics[key] == pytest.approx(value, abs=1e-6)
    assert float(metrics["val/mAP"]) == pytest.approx(expected["mAP"], abs=1e-6)
    assert set(evaluation.per_query) == {"AP"} and evaluation.per_query["AP"].shape == (4,)
    assert not evaluation.db.is_inference()  # usable by callbacks outside the validation loop


def test_revisited_benchmark_logs_every_protocol_and_selects_medium(tmp_path):
    datamodule = StandInDataModule(write_benchmark(tmp_path, protocol="revisited"), eval_batch_size=5)
    module = make_module(kappas=[1, 5])
    trainer = pl.Trainer(logger=False, **TRAINER_KWARGS)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    _, _, expected = direct_evaluation(module.embedder, datamodule, kappas=(1, 5))
    metrics = trainer.callback_metrics
    assert {f"val/{BENCH}/{k}" for k in expected} | {"val/mAP"} == set(metrics)
    assert {"E/mAP", "M/mAP", "H/mAP", "E/mP@1", "M/mP@5", "H/mP@5"} <= set(expected)
    for key, value in expected.items():
        assert float(metrics[f"val/{BENCH}/{key}"]) == pytest.approx(value, abs=1e-6)
    assert float(metrics["val/mAP"]) == pytest.approx(expected["M/mAP"], abs=1e-6)


def test_multi_scale_validation_is_the_generalised_mean_over_scales(trained):
    datamodule = trained["datamodule"]
    module = make_module(eval_scales=[1.0, 0.75])
    trainer = pl.Trainer(logger=False, **TRAINER_KWARGS)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    db, queries, expected = direct_evaluation(module.embedder, datamodule, scales=(1.0, 0.75))
    assert module.embedder.power == pytest.approx(3.0)
    torch.testing.assert_close(module.last_evaluation.db, db, atol=1e-5, rtol=0)
    torch.testing.assert_close(module.last_evaluation.queries, queries, atol=1e-5, rtol=0)
    for key, value in expected.items():
        assert float(trainer.callback_metrics[f"val/{BENCH}/{key}"]) == pytest.approx(value, abs=1e-6)


def test_bucket_validation_equals_oxford_ir_eval_extraction(tmp_path):
    """Validation goes through the extraction path of oxford-ir-eval: padded buckets, one table for the database
    and the queries, the same embeddings."""
    datamodule = StandInDataModule(write_benchmark(tmp_path), eval_batch_size=3, batching="bucket")
    module = make_module(eval_scales=[1.0, 0.75])
    pl.Trainer(logger=False, **TRAINER_KWARGS).validate(module, datamodule=datamodule, verbose=False)
    benchmark = datamodule.eval_benchmark
    db, queries = extract_benchmark(module.embedder, benchmark, None, scales=(1.0, 0.75), batch_size=3)
    torch.testing.assert_close(module.last_evaluation.db, db, atol=1e-6, rtol=0)
    torch.testing.assert_close(module.last_evaluation.queries, queries, atol=1e-6, rtol=0)
    assert module._eval_plans[0].mode == "bucket" and module._eval_plans[0].buckets
    shapes = module._eval_plans[0].input_shapes() | module._eval_plans[1].input_shapes()
    assert len(shapes) <= 16 and all(h % 32 == 0 and w % 32 == 0 for h, w in shapes)


def test_sanity_check_and_shortened_passes_evaluate_the_embedded_subset(tmp_path):
    """num_sanity_val_steps / limit_val_batches embed part of the benchmark: evaluated as a marked subset."""

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.seen = []

        def on_validation_end(self, trainer, pl_module) -> None:
            evaluation = pl_module.last_evaluation
            self.seen.append((trainer.sanity_checking, evaluation.benchmark if evaluation else None))

    datamodule = StandInDataModule(write_benchmark(tmp_path), eval_batch_size=4)
    recorder = Recorder()
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=1,
        logger=False,
        callbacks=[recorder],
        **TRAINER_KWARGS,
    )
    trainer.fit(make_module(), datamodule=datamodule)
    (sanity, sanity_bench), (full, full_bench) = recorder.seen
    assert sanity and sanity_bench.is_subset and sanity_bench.n_db == 4
    assert "4/12 database images" in sanity_bench.subset_note
    # the first planned batch of each loader: database images 0, 3, 6, 9 (the 32 x 32 ones) and query 0
    # (each query crop has its own size), whose positives 0 and 1 include image 0
    assert sanity_bench.imlist == datamodule.eval_benchmark.imlist[0:12:3]
    assert sanity_bench.qimlist == datamodule.eval_benchmark.qimlist[:1]
    assert not full and full_bench is datamodule.eval_benchmark and not full_bench.is_subset

    limited = pl.Trainer(limit_val_batches=1, logger=False, **TRAINER_KWARGS)
    module = make_module()
    with pytest.warns(UserWarning, match="limit_val_batches=1.*not comparable"):
        limited.validate(module, datamodule=datamodule, verbose=False)
    assert module.last_evaluation.benchmark.is_subset and "val/mAP" in limited.callback_metrics

    # a shortened pass whose queries have no positive among the embedded images: nothing to evaluate
    no_positive = StandInDataModule(_database_reversed(datamodule.eval_benchmark), eval_batch_size=1)
    limited = pl.Trainer(limit_val_batches=1, logger=False, **TRAINER_KWARGS)
    with pytest.warns(UserWarning, match="1/12 database images and 1/4 queries.*not evaluated"):
        limited.validate(module, datamodule=no_positive, verbose=False)
    assert module.last_evaluation is None and not limited.callback_metrics


def _database_reversed(benchmark: Benchmark) -> Benchmark:
    """The same benchmark with the database listed backwards (ground truth renumbered): its first image, a
    positive of the last query only, comes first."""
    n = benchmark.n_db
    gnd = [
        {**entry, "ok": [n - 1 - i for i in entry["ok"]], "junk": [n - 1 - i for i in entry["junk"]]}
        for entry in benchmark.gnd
    ]
    return replace(benchmark, imlist=benchmark.imlist[::-1], gnd=gnd)


def test_a_full_pass_missing_images_is_a_clear_error(tmp_path):
    datamodule = StandInDataModule(write_benchmark(tmp_path))
    module = make_module()
    planned = module.evaluation_loaders

    def losing_two_images(dm):  # a broken loader: database images 5 and 7 never arrive
        loaders = planned(dm)
        database = loaders[0].dataset
        kept = [replace(b, indices=tuple(i for i in b.indices if i not in (5, 7))) for b in database.batches]
        database.batches = [b for b in kept if b.indices]
        return loaders

    module.evaluation_loaders = losing_two_images
    trainer = pl.Trainer(logger=False, **TRAINER_KWARGS)
    with pytest.raises(DataError, match=r"10/12 database images") as info:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    assert "missing database indices [5, 7]" in str(info.value) and BENCH in str(info.value)


def test_assemble_by_index_drops_sampler_duplicates_and_reports_gaps():
    vectors = torch.arange(12.0).reshape(6, 2)
    # DistributedSampler over 5 images on 2 processes: rank 0 gets 0, 2, 4; rank 1 gets 1, 3, 0 (padding)
    indices = torch.tensor([0, 2, 4, 1, 3, 0])
    vectors[5] = vectors[0]
    out, present = assemble_by_index(indices, vectors, 5)
    assert present.all()
    torch.testing.assert_close(out, torch.stack([vectors[0], vectors[3], vectors[1], vectors[4], vectors[2]]))
    _, present = assemble_by_index(torch.tensor([0, 2]), vectors[:2], 4)
    assert present.tolist() == [True, False, True, False]
    with pytest.raises(DataError, match="index 9"):
        assemble_by_index(torch.tensor([0, 9]), vectors[:2], 4)


def test_restrict_benchmark_renumbers_the_ground_truth(tmp_path):
    benchmark = write_benchmark(tmp_path)
    db_kept = np.zeros(12, dtype=bool)
    db_kept[[0, 2, 3, 4]] = True
    restricted, kept = benchmark.restrict(db_kept, np.array([True, True, False, True]), "kept by the test")
    assert restricted.imlist == ["db_0_0", "db_0_2", "db_1_0", "db_1_1"]
    assert kept.tolist() == [0, 1]  # query 3 has no positive among the kept images
    assert restricted.gnd[0]["ok"].tolist() == [0] and restricted.gnd[0]["junk"].tolist() == [1]
    assert restricted.gnd[1]["ok"].tolist() == [2, 3] and restricted.is_subset
    assert "4/12 database images and 2/4 queries kept by the test" in restricted.subset_note
    assert benchmark.restrict(np.zeros(12, dtype=bool), np.ones(4, dtype=bool), "kept by the test") is None


# -- optimisation --------------------------------------------------------------------------------
def test_backbone_pooling_and_head_have_separate_learning_rates():
    adamw = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2, "weight_decay": 1e-4}
    module = make_module(backbone_lr=1e-4, pooling_lr=1e-1, embedder=embedder_cfg(projection_dim=6), optimizer=adamw)
    optimizer = module.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"backbone", "pooling", "head"}
    assert groups["backbone"]["lr"] == 1e-4 and groups["pooling"]["lr"] == 1e-1 and groups["head"]["lr"] == 1e-2
    # GeM's p without weight decay (as cnnimageretrieval-pytorch trains it), the others with the optimizer's
    assert groups["pooling"]["weight_decay"] == 0.0
    assert groups["backbone"]["weight_decay"] == groups["head"]["weight_decay"] == 1e-4
    backbone = {id(p) for p in module.embedder.backbone.parameters()}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone
    assert [id(p) for p in groups["pooling"]["params"]] == [id(module.embedder.pooling.p)]
    head = {id(p) for p in groups["head"]["params"]}
    assert id(module.embedder.projection.weight) in head and not head & backbone
    assert len(head) + len(backbone) + 1 == len(list(module.parameters()))
    # without backbone_lr and pooling_lr every group uses the optimizer's lr
    assert {g["lr"] for g in make_module().configure_optimizers().param_groups} == {1e-2}


def test_scheduler_settings_reach_lightning():
    module = make_module(
        scheduler={
            "scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 2},
            "interval": "step",
            "frequency": 3,
        }
    )
    config = module.configure_optimizers()
    scheduler = config["lr_scheduler"]
    assert scheduler["interval"] == "step" and scheduler["frequency"] == 3
    assert isinstance(scheduler["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert scheduler["scheduler"].optimizer is config["optimizer"]
    bare = make_module(scheduler={"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 2})
    assert bare.configure_optimizers()["lr_scheduler"]["interval"] == "epoch"


class FreezeRecorder(pl.Callback):
    """Per epoch: which backbone parameters could train, and the backbone's weights and BN statistics after it."""

    def __init__(self) -> None:
        self.trainable: list[list[bool]] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.trainable.append([p.requires_grad for p in pl_module.embedder.backbone.parameters()])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.embedder.backbone.state_dict().items()})


def fit_for_freezing(module: RetrievalModule, epochs: int) -> FreezeRecorder:
    images, labels = train_tensors()
    loader = DataLoader(TensorDataset(images[8:], labels[8:]), batch_size=8)
    recorder = FreezeRecorder()
    trainer = pl.Trainer(max_epochs=epochs, limit_val_batches=0, logger=False, callbacks=[recorder], **TRAINER_KWARGS)
    trainer.fit(module, train_dataloaders=loader)
    return recorder


def test_backbone_is_frozen_for_the_first_epochs_then_trains():
    module = make_module(freeze_backbone_epochs=2)
    initial = {k: v.clone() for k, v in module.embedder.backbone.state_dict().items()}
    p_initial = module.embedder.pooling.p.detach().clone()
    recorder = fit_for_freezing(module, epochs=3)
    assert [all(flags) for flags in recorder.trainable] == [False, False, True]
    assert [any(flags) for flags in recorder.trainable] == [False, False, True]
    for state in recorder.states[:2]:  # weights and BatchNorm running statistics untouched while frozen
        for key, value in initial.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert any(not torch.equal(recorder.states[2][k], v) for k, v in initial.items() if k.endswith("weight"))
    assert not torch.equal(module.embedder.pooling.p.detach(), p_initial)  # the head trained all along


def test_partial_warmup_freeze_keeps_the_configured_permanent_freeze():
    """frozen_stages=2 for one epoch, then back to the backbone config's own frozen_stages=1."""
    module = make_module(embedder=embedder_cfg(frozen_stages=1), freeze_backbone_epochs=1, frozen_stages=2)
    blocks = module.embedder.backbone.blocks
    stage_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    order = [stage_of[id(p)] for p in module.embedder.backbone.parameters()]
    recorder = fit_for_freezing(module, epochs=2)
    assert [t for t, s in zip(recorder.trainable[0], order, strict=True) if s == 1] == [False] * order.count(1)
    assert all(t == (s == 1) for t, s in zip(recorder.trainable[1], order, strict=True))


# -- configs -------------------------------------------------------------------------------------
MINERS = ("batch_hard", "triplet_hard", "triplet_semihard", "triplet_all", "multi_similarity", "none")


def compose_model(*overrides: str) -> DictConfig:
    base = {
        "embedder": "default",
        "backbone": "scratch",
        "pooling": "gem",
        "loss": "triplet",
        "miner": "batch_hard",
        "distance": "cosine",
        "optimizer": "adam",
        "scheduler": "none",
        "whitening": "none",
    }
    for override in overrides:
        group, _, option = override.partition("=")
        if group in base:
            base[group] = option
    extra = [o for o in overrides if o.partition("=")[0] not in base]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(
            config_name=None,
            overrides=[
                "+model=retrieval",
                *(f"+{group}={option}" for group, option in base.items()),
                "backbone.channels=[8,16]",
                # scheduler configs read trainer.max_epochs: a trainer node must be present
                "+trainer.max_epochs=4",
                *extra,
            ],
        )


#: every loss, miner and distance file at least once; each loss with both distances, a triplet and a pair miner
COMBINATIONS = [
    *(("triplet", miner, "cosine") for miner in MINERS),
    ("triplet", "batch_hard", "euclidean"),
    ("triplet", "multi_similarity", "euclidean"),
    ("contrastive", "batch_hard", "euclidean"),
    ("contrastive", "multi_similarity", "euclidean"),
    ("contrastive", "none", "euclidean"),
    ("contrastive", "batch_hard", "cosine"),
    ("multi_similarity", "multi_similarity", "cosine"),
    ("multi_similarity", "batch_hard", "cosine"),
    ("multi_similarity", "none", "cosine"),
    ("multi_similarity", "multi_similarity", "euclidean"),
]


@pytest.mark.parametrize(("loss", "miner", "distance"), COMBINATIONS)
def test_loss_miner_distance_configs_build_a_working_model(loss, miner, distance):
    overrides = [f"loss={loss}", f"miner={miner}", f"distance={distance}"]
    if loss == "contrastive" and distance == "cosine":
        # Hydra wraps what the constructor raises; the ConfigError is its cause
        with pytest.raises(InstantiationException) as info:
            instantiate(compose_model(*overrides).model)
        assert isinstance(info.value.__cause__, ConfigError) and "pos_margin > neg_margin" in str(info.value.__cause__)
        overrides += ["loss.pos_margin=1.0", "loss.neg_margin=0.5"]
    cfg = compose_model(*overrides)
    module = instantiate(cfg.model)
    assert isinstance(module, RetrievalModule)
    assert module.loss_fn.distance is module.distance
    assert (module.miner is None) == (miner == "none")
    if module.miner is not None:
        assert module.miner.distance is module.distance
    assert type(module.hparams["loss"]) is dict and type(module.hparams["embedder"]["backbone"]) is dict
    images, labels = train_tensors()
    loss_value, stats = module.compute_loss(images[8:], labels[8:])
    assert torch.isfinite(loss_value) and stats.active_fraction is not None
    if miner == "none":  # every triplet of 4 classes x 2: 8 anchors, 1 positive, 6 negatives each
        assert stats.num_triplets == 8 * 1 * 6


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("scheduler", ["cosine", "step", "none"])
def test_every_optimizer_scheduler_config(optimizer, scheduler):
    cfg = compose_model(f"optimizer={optimizer}", f"scheduler={scheduler}", "model.backbone_lr=1e-5")
    module = instantiate(cfg.model)
    config = module.configure_optimizers()
    opt = config["optimizer"] if isinstance(config, dict) else config
    assert type(opt).__name__.lower() == optimizer
    assert [g["lr"] for g in opt.param_groups] == [1e-5, cfg.optimizer.lr]
    if scheduler == "none":
        assert not isinstance(config, dict)
    else:
        sched = config["lr_scheduler"]["scheduler"]
        assert config["lr_scheduler"]["interval"] == "epoch"
        if scheduler == "cosine":
            assert sched.T_max == 4  # ${trainer.max_epochs}


def test_model_config_keeps_its_parts_as_configs_for_the_checkpoint():
    cfg = compose_model("model.freeze_backbone_epochs=1", "model.eval_scales=[1.0,0.5]")
    module = instantiate(cfg.model)  # _recursive_: false in the node: the module builds the parts itself
    hparams = module.hparams
    assert hparams["embedder"]["backbone"]["_target_"] == "oxford_ir.models.backbones.ScratchCNN"
    assert hparams["embedder"]["backbone"]["channels"] == [8, 16]
    assert hparams["miner"] == {"_target_": "pytorch_metric_learning.miners.BatchHardMiner"}
    assert hparams["scheduler"] is None and hparams["eval_scales"] == [1.0, 0.5]
    assert all(not isinstance(v, DictConfig) for v in hparams.values())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3}}, "needs _partial_: true"),
        (
            {"loss": {"_target_": "pytorch_metric_learning.losses.TripletMarginLoss", "distance": {"_target_": "x"}}},
            "sets its own distance",
        ),
        ({"embedder": torch.nn.Linear(2, 2)}, "must be a config with _target_"),
        ({"freeze_backbone_epochs": 1, "frozen_stages": 5}, "has 2 stages"),
        ({"eval_scales": []}, "eval_scales"),
        ({"scheduler": {"scheduler": {"_target_": "x", "_partial_": True}, "every": 2}}, "unknown settings"),
        ({"embedder": {**embedder_cfg(), "projection_dim": 0}}, "projection_dim=0"),
        (
            {"distance": {"_target_": "pytorch_metric_learning.distances.NoSuchDistance"}},
            "distance: cannot build",
        ),
    ],
)
def test_bad_model_configs_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_module(**overrides)


# -- checkpoints ---------------------------------------------------------------------------------
def test_load_from_checkpoint_alone_rebuilds_an_identical_model(trained):
    module = trained["module"].eval()
    x = torch.randn(3, 3, 32, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = module(x)
    for loaded in (RetrievalModule.load_from_checkpoint(trained["ckpt"]), load_retrieval_checkpoint(trained["ckpt"])):
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        assert loaded.hparams == module.hparams
        assert loaded.miner.distance is loaded.distance is loaded.loss_fn.distance


def test_missing_and_corrupt_checkpoints(trained, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere.ckpt"):
        load_retrieval_checkpoint(tmp_path / "nowhere.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*garbage.ckpt.*corrupt or truncated"):
        load_retrieval_checkpoint(garbage)
    data = trained["ckpt"].read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.ckpt.*corrupt or truncated"):
        load_retrieval_checkpoint(truncated)
    opcode_garbage = tmp_path / "opcodes.ckpt"
    opcode_garbage.write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match=r"opcodes.ckpt: Unsupported operand.*corrupt or truncated"):
        load_retrieval_checkpoint(opcode_garbage)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"root": Path("/")}}, unsafe)
    with pytest.raises(CheckpointError, match=r"unsafe.ckpt: the checkpoint holds a pathlib\.\w*Path object"):
        load_retrieval_checkpoint(unsafe)
    not_lightning = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, not_lightning)
    with pytest.raises(CheckpointError, match="weights.pt is not a Lightning checkpoint"):
        load_retrieval_checkpoint(not_lightning)


class OtherModel(pl.LightningModule):
    def __init__(self, hidden: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(hidden, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    trainer = pl.Trainer(max_steps=1, logger=False, **TRAINER_KWARGS)
    trainer.fit(OtherModel(), train_dataloaders=DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4))
    path = tmp_path / "other.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"other.ckpt was not written by RetrievalModule.*\['hidden'\].*embedder"):
        load_retrieval_checkpoint(path)


def test_checkpoint_that_does_not_fit_the_configured_model_names_keys_and_config(trained):
    other = make_module(embedder=embedder_cfg(channels=(8, 32)))
    with pytest.raises(CheckpointError) as info:
        load_retrieval_checkpoint(trained["ckpt"], expected=other)
    message = str(info.value)
    assert str(trained["ckpt"]) in message
    assert "embedder.backbone.blocks.1.0.weight (16, 8, 3, 3) in the checkpoint vs (32, 8, 3, 3)" in message
    assert "trained with Embedder(backbone=ScratchCNN(channels=[8, 16]" in message
    # the configured model itself fits
    assert load_retrieval_checkpoint(trained["ckpt"], expected=make_module()).training is False


def test_edited_checkpoint_is_refused(trained, tmp_path):
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    del checkpoint["state_dict"]["embedder.pooling.p"]
    edited = tmp_path / "edited.ckpt"
    torch.save(checkpoint, edited)
    with pytest.raises(CheckpointError, match=r"do not fit the model its own hyper_parameters.*embedder.pooling.p"):
        load_retrieval_checkpoint(edited)
    checkpoint["hyper_parameters"]["embedder"]["backbone"]["_target_"] = "oxford_ir.models.backbones.NoSuchNet"
    torch.save(checkpoint, edited)
    with pytest.raises(CheckpointError, match="cannot rebuild the model.*NoSuchNet"):
        load_retrieval_checkpoint(edited)


def test_channels_last_module_gives_the_same_loss_gradients_and_checkpoint():
    plain, nhwc = make_module(), make_module(channels_last=True)
    weight = next(p for p in nhwc.embedder.parameters() if p.ndim == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = train_tensors()
    losses = []
    for module in (plain, nhwc):
        loss, stats = module.compute_loss(images[8:], labels[8:])
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(plain.embedder.parameters(), nhwc.embedder.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4)
    assert set(nhwc.state_dict()) == set(plain.state_dict()) and nhwc.hparams.channels_last is True


# -- slow: compilation, several processes ----------------------------------------------------------
@pytest.mark.slow
def test_compiled_embedder_gives_the_same_embeddings_and_checkpoint_keys():
    plain, compiled = make_module(), make_module(compile=True)
    assert set(plain.state_dict()) == set(compiled.state_dict())
    compiled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), plain.eval()(x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_processes_gather_the_full_benchmark(tmp_path):
    """ddp_spawn on 2 CPU processes: DistributedSampler pads with duplicates; the metrics equal one process."""
    datamodule = StandInDataModule(write_benchmark(tmp_path, distractors=1), eval_batch_size=2)  # 13: padded
    single = pl.Trainer(logger=False, **TRAINER_KWARGS)
    single.validate(make_module(), datamodule=datamodule, verbose=False)
    multi = pl.Trainer(
        logger=False,
        **{**TRAINER_KWARGS, "devices": 2},
        strategy="ddp_spawn",
        callbacks=[SpawnedProcessGroupTeardown()],
    )
    multi.validate(make_module(), datamodule=datamodule, verbose=False)
    assert set(multi.callback_metrics) == set(single.callback_metrics)
    for key, value in single.callback_metrics.items():
        assert float(multi.callback_metrics[key]) == pytest.approx(float(value), abs=1e-6)
