"""Post-hoc whitening across the commands: validation learns it and stores the best checkpoint's; oxford-ir-eval
reuses or learns the same one; the index and search apply it identically; every mismatch is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from oxford_ir.cli.evaluate import evaluate
from oxford_ir.cli.index import index
from oxford_ir.cli.search import search
from oxford_ir.cli.train import train
from oxford_ir.errors import CheckpointError, ConfigError, IndexFormatError
from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.extraction.whitening import Whitened, Whitening
from oxford_ir.models.checkpoint import load_retrieval_checkpoint
from oxford_ir.retrieval.model_spec import ModelSpec
from tests.test_train import TINY, TINY_SCRATCH, TINY_SYNTHETIC, compose_train

REPO = Path(__file__).resolve().parents[2]
HELD_OUT = ["landmark_00", "landmark_01"]
#: a landmark-disjoint run: trained (and its whitening learned) on landmarks 2 and 3, validated on 0 and 1
LANDMARKS_SPLIT = [
    "data.split=landmarks",
    f"data.held_out_landmarks=[{','.join(HELD_OUT)}]",
    "data.classes_per_batch=2",
]


def compose_command(name: str, tmp_path: Path, run: str, *overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(
            name,
            overrides=[f"paths.output_dir={tmp_path / run}", "extraction.device=cpu", *overrides],
        )


#: another synthetic dataset (seed 1: other photographs) in its own folder: what the trained model is evaluated on
OTHER_DATA = ["synthetic.preset=tiny", "synthetic.seed=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    tmp = tmp_path_factory.mktemp("whitening")
    cfg = compose_train(
        tmp, *TINY, *TINY_SCRATCH, *LANDMARKS_SPLIT, "whitening=learned", "logger=none", "trainer.max_epochs=1"
    )
    metrics, objects = train(cfg)
    best = Path(objects["trainer"].checkpoint_callback.best_model_path)
    other = tmp / "other"
    # the evaluation dataset is written once, by an evaluation without whitening
    evaluate(eval_cfg(tmp, "eval0", best, other, "whitening=none"))
    return SimpleNamespace(tmp=tmp, metrics=metrics, module=objects["model"], datamodule=objects["datamodule"],
                           best=best, other=other)  # fmt: skip


def eval_cfg(tmp: Path, run: str, checkpoint: Path, data: Path, *overrides: str):
    return compose_command(
        "eval", tmp, run, f"ckpt_path={checkpoint}", f"paths.data_dir={data}", "benchmarks=[synthetic]",
        "extraction.image_size=64", "extraction.num_workers=0", *OTHER_DATA, *overrides,
    )  # fmt: skip


def index_cfg(tmp: Path, out: str, checkpoint: Path, *overrides: str):
    return compose_command(
        "index", tmp, f"{out}-run", "images=benchmark:synthetic", f"out={tmp / out}", f"ckpt_path={checkpoint}",
        f"paths.data_dir={tmp / 'other'}", "extraction.image_size=64", "extraction.num_workers=0",
        "index.dtype=float32", "progress=false", *overrides,
    )  # fmt: skip


def search_cfg(tmp: Path, out: str, *overrides: str):
    return compose_command(
        "search", tmp, f"{out}-search", f"index={tmp / out}", "benchmark=synthetic", f"paths.data_dir={tmp / 'other'}",
        "grid.enabled=false", *overrides,
    )  # fmt: skip


def test_validation_logs_both_and_stores_the_best_checkpoints_whitening(trained):
    metrics = trained.metrics
    assert {"final/val/mAP", "final/val/unwhitened/mAP", "untrained/val/mAP"} - set(metrics) == {"untrained/val/mAP"}
    assert metrics["final/val/mAP"] != metrics["final/val/unwhitened/mAP"]
    path = trained.best.with_name(f"{trained.best.stem}.whitening-learned.pt")
    stored = Whitening.load(path, model_fingerprint=ModelSpec(checkpoint=str(trained.best)).fingerprint())
    assert stored.info["image_size"] == 64 and stored.info["scales"] == [1.0]
    names = [Path(p).name for p in stored.info["source"]["images"]]
    assert names and not any(n.startswith(tuple(HELD_OUT)) for n in names)  # the training landmarks' images only
    assert set(names) <= {p.name for p in trained.datamodule.whitening_split.paths}
    assert stored.info["source"]["n_pairs"] > 0


def test_validation_eval_index_and_search_apply_the_same_whitening(trained):
    tmp, best = trained.tmp, trained.best
    stored_path = best.with_name(f"{best.stem}.whitening-learned.pt")
    stored = Whitening.load(stored_path)
    network = load_retrieval_checkpoint(best).embedder
    # validation: the whitened vectors of its last evaluation are those of the test-time path with the stored file
    evaluation = trained.module.last_evaluation
    benchmark = evaluation.benchmark
    path_vectors = extract_embeddings(Whitened(network, stored), benchmark.db_paths, 64, batching="shape")
    assert torch.allclose(evaluation.db, path_vectors, atol=1e-5)

    # oxford-ir-eval reuses the stored whitening; learning it again from the checkpoint's split gives the same one
    flat, _ = evaluate(eval_cfg(tmp, "eval1", best, trained.other, "whitening=learned"))
    assert "reused" in (tmp / "eval1" / "table.txt").read_text()
    relearned_path = tmp / "relearned.pt"
    evaluate(eval_cfg(tmp, "eval2", best, trained.other, "whitening=learned", f"whitening.file={relearned_path}"))
    relearned = Whitening.load(relearned_path)
    assert torch.allclose(relearned.projection, stored.projection, rtol=1e-3, atol=1e-3)
    assert relearned.info["source"]["images_sha256"] == stored.info["source"]["images_sha256"]

    # the index holds the same vectors, and searching it gives oxford-ir-eval's numbers
    index(index_cfg(tmp, "idx-lw", best, "whitening=learned"))
    metrics, _ = search(search_cfg(tmp, "idx-lw"))
    assert metrics["mAP"] == pytest.approx(flat["synthetic/mAP"], abs=1e-6)
    metrics, _ = search(search_cfg(tmp, "idx-lw", "whitening=learned"))  # asking for the index's own: fine
    assert metrics["mAP"] == pytest.approx(flat["synthetic/mAP"], abs=1e-6)


def test_whitening_mismatches_are_refused(trained):
    tmp, best = trained.tmp, trained.best
    # searching an index built without whitening with one (and the other way round)
    index(index_cfg(tmp, "idx-none", best))
    with pytest.raises(ConfigError, match="built without whitening"):
        search(search_cfg(tmp, "idx-none", "whitening=learned"))
    index(index_cfg(tmp, "idx-lw2", best, "whitening=learned"))
    with pytest.raises(ConfigError, match="whitening=none, but index .* was built with the whitening"):
        search(search_cfg(tmp, "idx-lw2", "whitening=none"))
    with pytest.raises(ConfigError, match="built with the learned whitening"):
        search(search_cfg(tmp, "idx-lw2", "whitening=pca"))

    # the whitening of another model
    other = torch.load(best, weights_only=True)
    first = next(k for k, v in other["state_dict"].items() if v.is_floating_point())
    other["state_dict"][first] = other["state_dict"][first] + 1
    other_ckpt = tmp / "other-model.ckpt"
    torch.save(other, other_ckpt)
    stored_path = best.with_name(f"{best.stem}.whitening-learned.pt")
    with pytest.raises(ConfigError, match="learned for another model"):
        index(index_cfg(tmp, "idx-other", other_ckpt, "whitening=learned", f"whitening.file={stored_path}"))
    with pytest.raises(ConfigError, match="whitening file not found"):
        index(index_cfg(tmp, "idx-missing", other_ckpt, "whitening=learned"))
    # ... found beside this model's checkpoint by oxford-ir-eval: kept under another name, never overwritten
    beside = other_ckpt.with_name(f"{other_ckpt.stem}.whitening-learned.pt")
    beside.write_bytes(stored_path.read_bytes())
    evaluate(eval_cfg(tmp, "eval-other", other_ckpt, trained.other, "whitening=learned"))
    (kept,) = tmp.glob(f"{other_ckpt.stem}.whitening-learned.previous-*.pt")
    assert kept.read_bytes() == stored_path.read_bytes()
    assert Whitening.load(beside, model_fingerprint=ModelSpec(checkpoint=str(other_ckpt)).fingerprint())
    # ... and a damaged one is an error, not reused nor replaced
    data = torch.load(beside, weights_only=True)
    data["projection"][0, 0] += 1.0
    torch.save(data, beside)
    damaged = beside.read_bytes()
    with pytest.raises(CheckpointError, match="is damaged"):
        evaluate(eval_cfg(tmp, "eval-damaged", other_ckpt, trained.other, "whitening=learned"))
    assert beside.read_bytes() == damaged

    # the whitening replaced after the index was built: its queries would not match
    evaluate(eval_cfg(tmp, "eval3", best, trained.other, "whitening=learned", "whitening.shrinkage=0.5"))
    with pytest.raises(IndexFormatError, match="changed on disk since the index was built"):
        search(search_cfg(tmp, "idx-lw2"))

    # learned from images the evaluated benchmark holds: the training run's own dataset
    own = compose_command(
        "eval", tmp, "eval4", f"ckpt_path={best}", f"paths.data_dir={tmp / 'data'}", "benchmarks=[synthetic]",
        "extraction.image_size=64", "extraction.num_workers=0", "whitening=learned", "synthetic.preset=default",
        *(f"+synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="images that synthetic evaluates"):
        evaluate(own)


def test_validation_refuses_a_whitening_learned_from_the_evaluated_queries_positives(tmp_path):
    """The seed split trains on the positives of the queries it validates on: a whitening from it is refused."""
    cfg = compose_train(tmp_path, *TINY, *TINY_SCRATCH, "whitening=learned", "logger=none", "trainer.max_epochs=1")
    with pytest.raises(ConfigError, match="use data.split=landmarks"):
        train(cfg)


def test_a_shortened_validation_learns_from_the_images_it_embedded(tmp_path):
    cfg = compose_train(
        tmp_path, *TINY, *TINY_SCRATCH, *LANDMARKS_SPLIT, "whitening=pca", "logger=none", "+trainer.fast_dev_run=2"
    )
    train(cfg)  # fast_dev_run embeds two batches per loader: the whitening is learned from those (or skipped)
