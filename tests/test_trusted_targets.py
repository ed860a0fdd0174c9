"""Configs read back from files never run code: every place that reads one (an index manifest, a checkpoint's
hyper_parameters and datamodule_hyper_parameters, a whitening file's info, a run folder's saved overrides) is given
each payload of a hostile file, and must refuse it with one line naming the file, having run nothing.

Each payload is first shown to be live: Hydra's own ``instantiate`` runs it (writes the marker file, deletes the
victim folder, imports the planted module). On the code before the allow-list, the manifest and checkpoint cases
ran their payload.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from oxford_ir.cli.run_folder import resume_overrides
from oxford_ir.cli.search import main as search_main
from oxford_ir.errors import UntrustedConfigError
from oxford_ir.extraction.whitening import Whitening
from oxford_ir.models.checkpoint import checkpoint_data_settings, load_retrieval_checkpoint
from oxford_ir.models.module import RetrievalModule
from oxford_ir.retrieval.index_build import build_index
from oxford_ir.retrieval.index_format import MANIFEST_FILE, RetrievalIndex
from oxford_ir.retrieval.model_spec import ModelSpec
from oxford_ir.trusted_targets import TRUST_VARIABLE, is_trusted

PAYLOAD_NAMES = [
    "os.system",
    "subprocess.run",
    "builtins.exec",
    "builtins.eval",
    "pathlib.Path.write_text",
    "shutil.rmtree",
    "importlib.import_module",
]
PLANTED_MODULE = "oxford_ir_planted_module"

EMBEDDER = {
    "_target_": "oxford_ir.models.embedder.Embedder",
    "backbone": {"_target_": "oxford_ir.models.backbones.ScratchCNN", "channels": [4, 8]},
    "pooling": {"_target_": "oxford_ir.models.pooling.GeM"},
}


class Payloads:
    """The hostile nodes, and whether any of them ran: a marker file, a victim folder, a planted module."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.mark, self.victim = root / "ran", root / "victim"
        self.victim.mkdir()
        (root / f"{PLANTED_MODULE}.py").write_text(f"open({str(self.mark)!r}, 'w').close()\n")
        monkeypatch.syspath_prepend(str(root))
        sys.modules.pop(PLANTED_MODULE, None)
        code = f"open({str(self.mark)!r}, 'w').close()"
        self.nodes = {
            "os.system": {"_target_": "os.system", "_args_": [f"touch '{self.mark}'"]},
            "subprocess.run": {"_target_": "subprocess.run", "_args_": [["touch", str(self.mark)]]},
            "builtins.exec": {"_target_": "builtins.exec", "_args_": [code]},
            "builtins.eval": {"_target_": "builtins.eval", "_args_": [code]},
            "pathlib.Path.write_text": {
                "_target_": "pathlib.Path.write_text",
                "_args_": [{"_target_": "pathlib.Path", "_args_": [str(self.mark)]}, "x"],
            },
            "shutil.rmtree": {"_target_": "shutil.rmtree", "_args_": [str(self.victim)]},
            "importlib.import_module": {"_target_": "importlib.import_module", "_args_": [PLANTED_MODULE]},
        }

    def ran(self) -> bool:
        return self.mark.exists() or not self.victim.exists() or PLANTED_MODULE in sys.modules


@pytest.fixture
def payloads(tmp_path, monkeypatch) -> Payloads:
    yield (found := Payloads(tmp_path / "payload", monkeypatch))
    sys.modules.pop(PLANTED_MODULE, None)
    assert found is not None


def build_without_blocklist(node):
    """What Hydra 1.3.2 (which ``hydra-core>=1.3`` admits) does with a node: import the target and call it with its
    arguments built first. Hydra 1.3.8 blocklists some of these targets, not all (``pathlib.Path.write_text``)."""
    if isinstance(node, list):
        return [build_without_blocklist(v) for v in node]
    if not isinstance(node, dict) or "_target_" not in node:
        return node
    parts = node["_target_"].split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            value = getattr(value, part)
        break
    args = build_without_blocklist(node.get("_args_", []))
    return value(*args, **{k: build_without_blocklist(v) for k, v in node.items() if not k.startswith("_")})


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_each_payload_runs_when_built(name, payloads):
    """The control: these nodes do run code when built, so 'nothing ran' below means the refusal held."""
    build_without_blocklist(payloads.nodes[name])
    assert payloads.ran()


def test_hydra_s_own_blocklist_misses_some_payloads(payloads):
    """Why the project needs its allow-list even on Hydra 1.3.8: its blocklist lets this one through."""
    hydra.utils.instantiate(payloads.nodes["pathlib.Path.write_text"])
    assert payloads.mark.exists()


def test_the_allow_list_takes_the_project_s_parts_and_nothing_else(monkeypatch):
    for target in (
        "torch.optim.Adam",
        "torch.optim.lr_scheduler.StepLR",
        "oxford_ir.models.embedder.Embedder",
        "oxford_ir.data.datamodule.RetrievalDataModule",
        "oxford_ir.callbacks.checkpoint.RunCheckpoint",
        "pytorch_metric_learning.miners.TripletMarginMiner",
        "lightning.pytorch.Trainer",
        "lightning.pytorch.loggers.WandbLogger",
    ):
        assert is_trusted(target), target
    for target in (
        *PAYLOAD_NAMES,
        "oxford_ir.models.checkpoint.Path",  # a class imported into a trusted module, not defined there
        "oxford_ir.fs.replace_file",  # the project's own function that writes files
        "oxford_ir.models.checkpoint.load_retrieval_checkpoint",
        "lightning.pytorch.cli.LightningCLI",  # builds a whole command line
        "tests.reliability.kill_training.KillAt",
        "torch.optim.Adam; import os",
        42,
    ):
        assert not is_trusted(target), target
    monkeypatch.setenv(TRUST_VARIABLE, "tests.reliability")
    assert is_trusted("tests.reliability.kill_training.KillAt")


# -- an index manifest --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trusted_index")
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        (root / "photos").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / "photos" / f"p{i}.png")
    build_index(ModelSpec(embedder=EMBEDDER), root / "photos", root / "index", image_size=32, num_workers=0,
                progress=False)  # fmt: skip
    return root


def tampered_index(index: Path, tmp_path: Path, embedder: dict) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(index / "index", copy)
    manifest_path = next(copy.glob("v*")) / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["embedder"] = embedder
    manifest["model_fingerprint"] = ModelSpec(embedder=embedder).fingerprint()  # as a forger would
    manifest_path.write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_an_index_manifest_cannot_run_code(name, index, payloads, tmp_path):
    hostile = {**EMBEDDER, "backbone": payloads.nodes[name]}
    for embedder in (payloads.nodes[name], hostile):  # the whole embedder, or a part of it
        folder = tampered_index(index, tmp_path / str(len(embedder)), embedder)
        with pytest.raises(UntrustedConfigError, match=rf"{MANIFEST_FILE}: model\.embedder.*refused") as error:
            RetrievalIndex.load(folder).build_model()
        assert name in str(error.value) or "pathlib.Path" in str(error.value)
    assert not payloads.ran()


def test_oxford_ir_search_on_a_hostile_index_is_one_line_and_runs_nothing(index, payloads, tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    folder = tampered_index(index, tmp_path, payloads.nodes["os.system"])
    query = index / "photos" / "p0.png"
    monkeypatch.setattr(sys, "argv", ["oxford-ir-search", f"index={folder}", f"query={query}",
                                      f"hydra.run.dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(SystemExit) as exit:
        search_main()
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]
    assert "model.embedder._target_='os.system' is refused" in err and "Traceback" not in err
    assert not payloads.ran()


# -- a checkpoint -------------------------------------------------------------------------------
def write_checkpoint(path: Path, hparams_part: dict | None = None, data_part: dict | None = None) -> Path:
    torch.manual_seed(0)
    kwargs = dict(
        embedder=EMBEDDER,
        loss={"_target_": "pytorch_metric_learning.losses.TripletMarginLoss", "margin": 0.1},
        distance={"_target_": "pytorch_metric_learning.distances.CosineSimilarity"},
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3},
    )
    module = RetrievalModule(**kwargs)
    hparams = dict(module.hparams)
    if hparams_part is not None:
        hparams["embedder"] = {**EMBEDDER, "backbone": hparams_part}
    torch.save(
        {
            "state_dict": module.state_dict(),
            RetrievalModule.CHECKPOINT_HYPER_PARAMS_KEY: hparams,
            "datamodule_hyper_parameters": {"benchmark": "rsynthetic", "cache": data_part or {"enabled": False}},
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    return path


def test_a_clean_checkpoint_still_loads_every_way(tmp_path):
    path = write_checkpoint(tmp_path / "clean.ckpt")
    assert isinstance(load_retrieval_checkpoint(path), RetrievalModule)
    assert isinstance(RetrievalModule.load_from_checkpoint(path), RetrievalModule)
    assert checkpoint_data_settings(path)["benchmark"] == "rsynthetic"


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_a_checkpoint_s_hyperparameters_cannot_run_code(name, payloads, tmp_path):
    path = write_checkpoint(tmp_path / "model.ckpt", hparams_part=payloads.nodes[name])
    for load in (load_retrieval_checkpoint, RetrievalModule.load_from_checkpoint):
        with pytest.raises(UntrustedConfigError, match=r"model\.ckpt: hyper_parameters\.embedder\.backbone"):
            load(path)
    assert not payloads.ran()


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_a_checkpoint_s_data_settings_cannot_run_code(name, payloads, tmp_path):
    path = write_checkpoint(tmp_path / "model.ckpt", data_part=payloads.nodes[name])
    with pytest.raises(UntrustedConfigError, match=r"model\.ckpt: datamodule_hyper_parameters\.cache\._target_"):
        checkpoint_data_settings(path)
    assert not payloads.ran()


# -- a whitening file ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_a_whitening_file_s_info_cannot_name_code(name, payloads, tmp_path):
    whitening = Whitening("pca", torch.zeros(4), torch.eye(4), torch.ones(4), {"source": payloads.nodes[name]})
    path = whitening.save(tmp_path / "w.pt")
    with pytest.raises(UntrustedConfigError, match=r"w\.pt: info\.source\._target_"):
        Whitening.load(path)
    assert not payloads.ran()


# -- a run folder's saved overrides -------------------------------------------------------------
def run_folder(tmp_path: Path, *overrides: str) -> Path:
    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(json.dumps(["experiment=quickstart", *overrides]))
    return folder


def grammar(value) -> str:
    """A value in Hydra's override grammar: ``{key:value,...}``, ``[...]``, double-quoted strings."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{grammar(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(grammar(v) for v in value) + "]"
    return json.dumps(value)


def as_override(key: str, node: dict) -> list[str]:
    """A payload as the overrides a tampered ``overrides.yaml`` would hold: the target and its arguments."""
    return [f"+{key}._target_={node['_target_']}", f"+{key}._args_={grammar(node['_args_'])}"]


@pytest.mark.parametrize("name", PAYLOAD_NAMES)
def test_a_run_folder_s_saved_overrides_cannot_run_code(name, payloads, tmp_path):
    folder = run_folder(tmp_path, *as_override("callbacks.evil", payloads.nodes[name]))
    with pytest.raises(UntrustedConfigError, match=r"overrides\.yaml: callbacks\.evil\._target_"):
        resume_overrides([f"resume={folder}"])
    # as a dict value, and in Hydra's own settings
    node = grammar(payloads.nodes[name])
    for override, match in (
        (f"+callbacks.evil={node}", r"callbacks\.evil\._target_"),
        ("hydra.job.env_set.LD_PRELOAD=/tmp/x.so", "sets Hydra's own settings"),
    ):
        folder = run_folder(tmp_path / override[:12].replace("/", "_"), override)
        with pytest.raises(UntrustedConfigError, match=match):
            resume_overrides([f"resume={folder}"])
    assert not payloads.ran()


def test_saved_overrides_that_this_run_replaces_or_deletes_are_the_user_s_to_decide(tmp_path):
    folder = run_folder(tmp_path, "+callbacks.kill._target_=tests.reliability.kill_training.KillAt", "optimizer.lr=0.1")
    argv = resume_overrides([f"resume={folder}", "~callbacks.kill"])
    assert "+callbacks.kill._target_=tests.reliability.kill_training.KillAt" in argv and "~callbacks.kill" in argv
    with pytest.raises(UntrustedConfigError):
        resume_overrides([f"resume={folder}"])
