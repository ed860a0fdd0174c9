"""oxford-ir-export and the ONNX embedder: the file embeds as PyTorch does (two image sizes, several scales, with a
whitening), indexes and searches interchangeably with its checkpoint, refuses another model and tampered metadata,
and the search command's start-up imports no deep-learning stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from oxford_ir.cli.export import export
from oxford_ir.cli.index import index
from oxford_ir.cli.search import search
from oxford_ir.errors import CheckpointError, ConfigError, IndexFormatError, UntrustedConfigError
from oxford_ir.extraction.embedding import extract_embeddings
from oxford_ir.extraction.whitening import Whitened, fit_pca
from oxford_ir.models.onnx_embedder import OnnxNetwork, load_onnx_embedder
from oxford_ir.models.onnx_file import open_onnx, read_onnx_info
from oxford_ir.retrieval.index_format import RetrievalIndex
from oxford_ir.retrieval.model_spec import ModelSpec
from oxford_ir.retrieval.onnx_export import export_onnx

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "_target_": "oxford_ir.models.embedder.Embedder",
    "backbone": {"_target_": "oxford_ir.models.backbones.ScratchCNN", "channels": [8, 16]},
    "pooling": {"_target_": "oxford_ir.models.pooling.GeM", "p": 3.0},
}


def write_checkpoint(path: Path, seed: int) -> torch.nn.Module:
    """A RetrievalModule checkpoint of the tiny scratch CNN + GeM, random weights of ``seed``; returns its embedder."""
    from oxford_ir.models.module import RetrievalModule

    torch.manual_seed(seed)
    module = RetrievalModule(
        embedder=TINY,
        loss={"_target_": "pytorch_metric_learning.losses.TripletMarginLoss", "margin": 0.1},
        distance={"_target_": "pytorch_metric_learning.distances.CosineSimilarity"},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2},
    )
    with torch.no_grad():
        module.embedder.pooling.p.fill_(2.5 + seed / 10)  # not the default p: the metadata must carry it
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return module.embedder.eval()


def compose_cfg(name: str, tmp: Path, *overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        device = [] if name == "export" else ["extraction.device=cpu"]
        return compose(name, overrides=[f"paths.output_dir={tmp / 'run'}", *device, *overrides])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Two checkpoints of different weights, the first exported by the command, photos of two sizes and their
    index built by the index command with the ONNX file."""
    root = tmp_path_factory.mktemp("export")
    ckpt, other = root / "model.ckpt", root / "other.ckpt"
    network = write_checkpoint(ckpt, seed=0)
    write_checkpoint(other, seed=1)
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path={ckpt}", f"paths.output_dir={root / 'run'}"])
    report = export(cfg)
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        height, width = (30, 40) if i % 2 else (44, 28)  # landscape and portrait: two network input sizes
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    settings = [f"images={photos}", "extraction.image_size=40", "index.dtype=float32", "progress=false"]
    index(compose_cfg("index", root, *settings, f"out={root / 'by_onnx'}", f"onnx={report.path}"))
    return {
        "root": root,
        "ckpt": ckpt,
        "other": other,
        "onnx": report.path,
        "network": network,
        "photos": photos,
        "onnx_index": root / "by_onnx",
        "index_settings": settings,
    }


def test_the_onnx_file_embeds_as_pytorch_at_two_sizes_and_two_scales(exported):
    assert exported["onnx"] == exported["ckpt"].with_suffix(".onnx")  # the default: beside the checkpoint
    onnx_model = load_onnx_embedder(exported["onnx"])
    assert isinstance(onnx_model, OnnxNetwork) and onnx_model.power == pytest.approx(2.5)  # GeM's p, from metadata
    photos = sorted(exported["photos"].iterdir())
    for scales in ([1.0], [1.0, 0.7]):
        expected = extract_embeddings(exported["network"], photos, None, scales=scales, batching="shape")
        found = extract_embeddings(onnx_model, photos, None, scales=scales, batching="bucket")  # falls back
        assert float((found - expected).abs().max()) < 1e-4
        np.testing.assert_allclose(found.norm(dim=1).numpy(), 1.0, atol=1e-5)


def test_an_exported_whitening_is_applied_after_the_scales_are_combined(exported, tmp_path):
    spec = ModelSpec(checkpoint=str(exported["ckpt"]))
    sample = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    whitening = fit_pca(sample, shrinkage=0.1, dim=12).with_info(model_fingerprint=spec.fingerprint())
    whitening.save(tmp_path / "whitening-pca.pt")
    whitened_spec = ModelSpec(checkpoint=spec.checkpoint, whitening=str(tmp_path / "whitening-pca.pt"))
    report = export_onnx(whitened_spec, tmp_path / "whitened.onnx")
    assert report.whitened and report.embedding_dim == 12
    onnx_model = load_onnx_embedder(report.path)
    assert isinstance(onnx_model, Whitened)
    assert open_onnx(report.path)[1].model_fingerprint == whitened_spec.fingerprint() != spec.fingerprint()
    photos = sorted(exported["photos"].iterdir())
    expected = extract_embeddings(whitened_spec.build(), photos, None, scales=[1.0, 0.7], batching="shape")
    found = extract_embeddings(onnx_model, photos, None, scales=[1.0, 0.7])
    assert expected.shape == (6, 12) and float((found - expected).abs().max()) < 1e-4


def test_index_with_onnx_then_search_with_onnx_or_the_checkpoint_but_not_another_model(exported, tmp_path, capsys):
    photos, onnx_file, onnx_index = exported["photos"], exported["onnx"], exported["onnx_index"]
    settings = [*exported["index_settings"], f"out={tmp_path / 'by_ckpt'}", f"ckpt_path={exported['ckpt']}"]
    index(compose_cfg("index", tmp_path, *settings))
    by_onnx, by_ckpt = RetrievalIndex.load(onnx_index), RetrievalIndex.load(tmp_path / "by_ckpt")
    assert by_onnx.model.onnx == str(onnx_file) and by_onnx.fingerprint == by_ckpt.fingerprint
    assert float(np.abs(by_onnx.vectors() - by_ckpt.vectors()).max()) < 1e-4

    def top(index_dir: Path, *overrides: str) -> list[list[str]]:
        cfg = compose_cfg(
            "search", tmp_path, f"index={index_dir}", f"query={photos}", "k=4", "grid.enabled=false", *overrides
        )
        records, _ = search(cfg)
        return [[hit["path"] for hit in record["results"]] for record in records]

    own = top(onnx_index)  # the index's own model: the ONNX file
    assert own == top(onnx_index, f"ckpt_path={exported['ckpt']}") == top(tmp_path / "by_ckpt", f"onnx={onnx_file}")
    assert [ranking[0] for ranking in own] == [f"p{i}.png" for i in range(6)]
    capsys.readouterr()
    with pytest.raises(IndexFormatError, match="is another model"):
        top(onnx_index, f"ckpt_path={exported['other']}")


def test_metadata_is_read_as_checked_plain_data(exported):
    session, info = open_onnx(exported["onnx"])
    props = dict(session.get_modelmeta().custom_metadata_map)
    assert read_onnx_info("x.onnx", props) == info.__class__(**{**info.__dict__, "path": "x.onnx"})
    assert info.model_fingerprint == ModelSpec(checkpoint=str(exported["ckpt"])).fingerprint()
    untrusted = {**props, "model_spec": '{"embedder": {"_target_": "os.system", "command": "touch /tmp/x"}}'}
    with pytest.raises(UntrustedConfigError, match="os.system"):
        read_onnx_info("x.onnx", untrusted)
    with pytest.raises(CheckpointError, match="normalised with mean"):
        read_onnx_info("x.onnx", {**props, "mean": "[0.5, 0.5, 0.5]"})
    with pytest.raises(CheckpointError, match="lacks 'pooling_power'"):
        read_onnx_info("x.onnx", {k: v for k, v in props.items() if k != "pooling_power"})
    with pytest.raises(CheckpointError, match="without oxford-ir metadata"):
        read_onnx_info("x.onnx", {})


def test_export_refuses_bad_settings(exported, tmp_path):
    base = [f"ckpt_path={exported['ckpt']}"]
    with pytest.raises(ConfigError, match="format=tflite"):
        export(compose_cfg("export", tmp_path, *base, "format=tflite"))
    with pytest.raises(ConfigError, match="ending in .onnx"):
        export(compose_cfg("export", tmp_path, *base, f"out={tmp_path / 'model.bin'}"))
    with pytest.raises(CheckpointError, match="onnx=.*no such file"):
        ModelSpec.from_config({"onnx": str(tmp_path / "missing.onnx")})
    with pytest.raises(ConfigError, match="give one model"):
        ModelSpec.from_config({"onnx": str(exported["onnx"]), "ckpt_path": str(exported["ckpt"])})
    with pytest.raises(ConfigError, match="carries its own whitening"):
        ModelSpec.from_config({"onnx": str(exported["onnx"]), "whitening": {"kind": "pca"}})


def test_the_search_command_imports_only_what_it_uses(exported, tmp_path):
    """--help: no deep-learning library at all; a one-image search with an ONNX index: onnxruntime only, no PyTorch
    (:mod:`oxford_ir.retrieval.onnx_queries`)."""
    search_args = [
        f"index={exported['onnx_index']}",
        f"query={exported['photos'] / 'p1.png'}",
        "k=2",
        "grid.enabled=false",
    ]
    search_args += ["extraction.device=cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    code = (
        "import sys\n"
        "from hydra.core.global_hydra import GlobalHydra\n"
        "from oxford_ir.cli.search import main\n"
        "heavy = ('torch', 'torchvision', 'lightning', 'pytorch_metric_learning', 'wandb', 'fastapi', 'onnxruntime')\n"
        "sys.argv = ['oxford-ir-search', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HELP', [m for m in heavy if m in sys.modules])\n"
        "GlobalHydra.instance().clear()\n"
        f"sys.argv = ['oxford-ir-search', *{search_args!r}]\n"
        "main()\n"
        "print('SEARCH', [m for m in heavy if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "oxford-ir-search: search an index" in result.stdout
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "SEARCH ['onnxruntime']" and "HELP []" in lines
    assert any(line.split()[::2] == ["1", "p1.png"] for line in lines)  # rank 1: the query itself


@pytest.mark.slow  # a MobileNetV2 export (~10 s); the tiny model's test above checks the same in the fast suite
@pytest.mark.shared_data
def test_real_photos_embed_as_pytorch_with_the_pretrained_mobilenet(oxford_root, mobilenet_weights, tmp_path):
    embedder = {
        "_target_": "oxford_ir.models.embedder.Embedder",
        "backbone": {"_target_": "oxford_ir.models.backbones.MobileNetV2", "weights": str(mobilenet_weights)},
        "pooling": {"_target_": "oxford_ir.models.pooling.GeM", "p": 3.0},
    }
    spec = ModelSpec(embedder=embedder)
    report = export_onnx(spec, tmp_path / "mobilenet.onnx")
    photos = sorted((oxford_root / "jpg").glob("*.jpg"))[:4]
    expected = extract_embeddings(spec.build(), photos, 160, batching="shape")
    found = extract_embeddings(load_onnx_embedder(report.path), photos, 160)
    assert float((found - expected).abs().max()) < 1e-4


def test_a_checkpoint_s_embedder_loads_without_the_training_module(exported, tmp_path):
    from oxford_ir.models.checkpoint import load_checkpoint_embedder, load_retrieval_checkpoint

    alone = load_checkpoint_embedder(exported["ckpt"])
    full = load_retrieval_checkpoint(exported["ckpt"]).embedder
    assert not alone.training and alone.state_dict().keys() == full.state_dict().keys()
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in alone.state_dict().items())
    data = torch.load(exported["ckpt"], weights_only=True)
    data["state_dict"]["embedder.pooling.p"] = torch.ones(2)
    torch.save(data, tmp_path / "edited.ckpt")
    with pytest.raises(
        CheckpointError, match=r"edited\.ckpt: its weights do not fit .*pooling\.p \(2,\) in the checkpoint"
    ):
        load_checkpoint_embedder(tmp_path / "edited.ckpt")
    data["hyper_parameters"]["embedder"]["pooling"] = {"_target_": "os.system", "command": "touch hacked"}
    torch.save(data, tmp_path / "hostile.ckpt")
    with pytest.raises(UntrustedConfigError, match=r"hostile\.ckpt: hyper_parameters\.embedder\.pooling\._target_"):
        load_checkpoint_embedder(tmp_path / "hostile.ckpt")
    assert not (tmp_path / "hacked").exists() and not Path("hacked").exists()


def test_a_memory_mapped_checkpoint_s_weights_are_copied_out_and_the_legacy_format_still_loads(exported, tmp_path):
    """Checkpoints are read memory-mapped (the tensors not used are never read): the loaded weights are copies, so
    rewriting the file in place afterwards changes nothing; a file of torch's legacy format loads as before."""
    from oxford_ir.models.checkpoint import load_checkpoint_embedder, load_retrieval_checkpoint

    data = torch.load(exported["ckpt"], weights_only=True)
    data["state_dict"]["loss.W"] = torch.randn(512, 16)  # what a many-class loss adds: never read for an embedder
    torch.save(data, tmp_path / "with_classes.ckpt")
    embedder = load_checkpoint_embedder(tmp_path / "with_classes.ckpt")
    expected = {k: v.clone() for k, v in embedder.state_dict().items()}
    size = (tmp_path / "with_classes.ckpt").stat().st_size
    with open(tmp_path / "with_classes.ckpt", "r+b") as handle:  # in place: the same file a mapping would see
        handle.write(bytes(size))
    assert all(torch.equal(v, expected[k]) for k, v in embedder.state_dict().items())
    torch.save(data, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    legacy = load_checkpoint_embedder(tmp_path / "legacy.ckpt")
    assert all(torch.equal(v, expected[k]) for k, v in legacy.state_dict().items())
    module = load_retrieval_checkpoint(exported["ckpt"])
    assert all(torch.equal(v, expected[k]) for k, v in module.embedder.state_dict().items())


def test_asking_for_a_whitening_the_onnx_index_lacks_is_refused(exported, tmp_path):
    cfg = compose_cfg(
        "search", tmp_path, f"index={exported['onnx_index']}", f"query={exported['photos']}", "whitening=pca"
    )
    with pytest.raises(ConfigError, match="which carries no whitening"):
        search(cfg)
