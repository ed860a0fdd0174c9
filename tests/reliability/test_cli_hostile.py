"""Every console script against hostile input: one ``error:`` line naming the key or file, exit status 2, no traceback.

A table of bad values per entry point (missing paths, a folder where a file belongs, a text file or a truncated or
foreign checkpoint, a folder that is not an index, bad boxes and ``k``, values of the wrong type, malformed ground
truth). Each case runs the console script's ``main()`` in this process (``run_main`` of tests/test_train.py: real
Hydra, real argparse, what the installed script does, without ~5 s of imports per case); a few run the installed
script in a subprocess, where the whole of stderr is what a user sees. Most cases run in the default suite; the
slower ones (a case that reaches ``Trainer.fit`` or writes data first) and the subprocesses are marked ``slow``.

Hydra's own errors (an unknown key ``foo=1``, an unknown group option ``backbone=nope``) are Hydra's short message
and its hint, exit status 1 and no traceback: they are checked as such.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

import oxford_ir.cli.data
import oxford_ir.cli.evaluate
import oxford_ir.cli.index
import oxford_ir.cli.search
import oxford_ir.cli.serve
import oxford_ir.cli.train
from oxford_ir.errors import ConfigError, user_error_in
from tests.reliability.processes import environment, script
from tests.test_train import REPO, TINY, TINY_SCRATCH, run_main

ENTRIES = {
    "train": oxford_ir.cli.train.main,
    "eval": oxford_ir.cli.evaluate.main,
    "index": oxford_ir.cli.index.main,
    "search": oxford_ir.cli.search.main,
    "serve": oxford_ir.cli.serve.main,
    "data": oxford_ir.cli.data.main,
}
#: a user error is shown as it is, without its traceback
QUIET = {"HYDRA_FULL_ERROR": "0", "OXFORD_IR_DEBUG": "0"}
MODEL = ("backbone=scratch", "backbone.channels=[8,16]")
#: what every case of an entry point adds before its own arguments (Hydra commands also get hydra.run.dir)
BASE = {
    "train": (*TINY, *TINY_SCRATCH, "logger=none", "paths.data_dir={data}"),
    "eval": (*MODEL, "benchmarks=[synthetic]", "extraction.device=cpu", "extraction.num_workers=0",
             "paths.data_dir={data}"),
    "index": (*MODEL, "extraction.device=cpu", "extraction.num_workers=0", "extraction.image_size=32",
              "progress=false", "paths.data_dir={data}"),
    "search": ("extraction.device=cpu", "grid.enabled=false", "paths.data_dir={data}"),
    "serve": ("port=0", "extraction.device=cpu"),
    "data": (),
}  # fmt: skip


@dataclass(frozen=True)
class Case:
    """``entry`` run with ``args``: it must fail with one ``error:`` line holding every string of ``names``."""

    entry: str
    args: tuple[str, ...]
    names: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.entry}:{' '.join(self.args)}".replace("{", "").replace("}", "")


def case(entry: str, *args: str, names: str | tuple[str, ...], fast: bool = False):
    """A case of the table; ``fast`` ones (a few per entry point and kind of input) run in the default suite."""
    names = (names,) if isinstance(names, str) else names
    value = Case(entry, args, names)
    return pytest.param(value, id=value.id, marks=[] if fast else [pytest.mark.slow])


CASES = [
    # -- oxford-ir-train: config values of every kind, checkpoints
    case("train", "optimizer.lr=abc", names=("optimizer.lr='abc'", "expected a number"), fast=True),
    case("train", "optimizer.lr=-1", names=("optimizer:", "lr=-1", "Invalid learning rate"), fast=True),
    case("train", "optimizer.lr=1e300", names=("optimizer.lr=1e+300", "learning rate of at most 10"), fast=True),
    case("train", "optimizer.lr=inf", names=("optimizer.lr=inf", "finite number")),
    case("train", "optimizer.lr=-inf", names=("optimizer.lr=-inf", "finite number")),
    case("train", "optimizer.lr=nan", names=("optimizer.lr=nan", "finite number")),
    case("train", "optimizer.weight_decay=1e39", names=("optimizer.weight_decay=1e+39", "float32")),
    case("train", "loss.margin=inf", names=("loss.margin=inf", "finite number"), fast=True),
    case("train", "data.image_size=-1", names=("data.image_size=-1", "size of at least 1")),
    case("train", "data.classes_per_batch=-4", names=("data.classes_per_batch", "-4", "positive")),
    case("train", "optimizer=sgd", "optimizer.momentum=abc", names="optimizer.momentum='abc'"),
    case("train", "optimizer=adamw", "+optimizer.betas=[0.9]", names=("optimizer.betas=[0.9]", "2 numbers")),
    case("train", "optimizer=adamw", "+optimizer.betas=[0.9,2.0]", names=("optimizer:", "betas", "Invalid beta")),
    case("train", "+optimizer.foo=1", names=("optimizer.foo", "has no parameter 'foo'"), fast=True),
    case("train", "optimizer.weight_decay=-1", names=("optimizer:", "weight_decay")),
    case("train", "loss.margin=abc", names=("loss.margin='abc'", "expected a number"), fast=True),
    case("train", "miner=triplet_hard", "miner.margin=abc", names="miner.margin='abc'"),
    case("train", "scheduler=step", "scheduler.scheduler.step_size=abc", names="step_size='abc'", fast=True),
    case("train", "scheduler=step", "scheduler.scheduler.step_size=2.5", names=("step_size=2.5", "whole number")),
    case("train", "data.classes_per_batch=abc", names="data.classes_per_batch"),
    case("train", "model.backbone_lr=-1", names="model.backbone_lr"),
    case("train", "trainer.max_epochs=abc", names="trainer.max_epochs='abc'"),
    case("train", "trainer.max_epochs=-1", names=("trainer.max_epochs=-1", "forever")),
    case("train", "ckpt_path={text}", names=("text.ckpt", "corrupt or truncated"), fast=True),
    case("train", "ckpt_path={truncated}", names=("truncated.ckpt", "corrupt or truncated")),
    case("train", "ckpt_path={other}", names=("other.ckpt", "does not fit the configured model"), fast=True),
    case("train", "ckpt_path={photos}", names=("ckpt_path=", "no such checkpoint file")),
    case("train", "resume={missing}", names=("{missing}", "not a run folder")),
    # -- oxford-ir-eval
    case("eval", "ckpt_path={missing}", names=("checkpoint not found", "missing")),
    case("eval", "ckpt_path={photos}", names=("checkpoint not found", "photos")),
    case("eval", "ckpt_path={text}", names=("text.ckpt", "corrupt or truncated"), fast=True),
    case("eval", "ckpt_path={truncated}", names=("truncated.ckpt", "corrupt or truncated"), fast=True),
    case("eval", "ckpt_path={foreign}", names=("foreign.ckpt", "not written by RetrievalModule"), fast=True),
    case("eval", "kappas=[0]", names=("kappas=[0]", ">= 1"), fast=True),
    case("eval", "kappas=abc", names="kappas='abc'"),
    case("eval", "extraction.image_size=abc", names="extraction.image_size='abc'"),
    case("eval", "extraction.scales=[-1]", names="extraction.scales=[-1]"),
    case("eval", "extraction.batch_size=0", names="extraction.batch_size=0"),
    case("eval", "benchmarks=[nope]", names=("benchmarks=['nope']", "unknown")),
    case("eval", "embedder.projection_dim=abc", names="embedder.projection_dim='abc'"),
    case("eval", "embedder.projection_dim=-4", names=("embedder.projection_dim=-4", "size of at least 1")),
    case("eval", "extraction.image_size=-1", names="extraction.image_size=-1"),
    case("eval", "benchmarks=[oxford5k]", "paths.data_dir={badgt}", names=("tower_1_good.txt:2:", "x y z"), fast=True),
    case(
        "eval",
        "benchmarks=[oxford5k]",
        "paths.data_dir={badbox}",
        names=("oxford5k: query 'tower_000001'", "box 1,1,7,5 does not overlap the 1 x 5000 image"),
        fast=True,
    ),
    # -- oxford-ir-index
    case("index", "images={missing}", "out={tmp}/ix", names=("images=", "missing")),
    case("index", "images={photos}", "out={text}", names=("out=", "is a file")),
    case("index", "images={photos}", "out={notindex}", names=("out=", "no index"), fast=True),
    case("index", "images={photos}", "out={tmp}/ix", "ckpt_path={truncated}", names="truncated.ckpt"),
    case("index", "images={photos}", "out={tmp}/ix", "ckpt_path={foreign}", names="foreign.ckpt"),
    case("index", "images={photos}", "out={tmp}/ix", "ckpt_path={missing}", names="ckpt_path="),
    case("index", "images={photos}", "out={tmp}/ix", "extraction.batch_size=abc", names="extraction.batch_size"),
    case(
        "index",
        "images=benchmark:oxford5k",
        "out={tmp}/ix",
        "paths.data_dir={badgt}",
        names="tower_1_good.txt:2:",
    ),
    # -- oxford-ir-search
    case("search", "index={index}", "query={photo}", "bbox=1,2,3", names=("bbox=", "four numbers"), fast=True),
    case("search", "index={index}", "query={photo}", "bbox=-5,-5,10,10", names=("p0.png", "outside")),
    case("search", "index={index}", "query={photo}", "bbox=10,10,5,5", names=("bbox=", "empty")),
    case("search", "index={index}", "query={photo}", "k=0", names="k=0", fast=True),
    case("search", "index={index}", "query={photo}", "k=-1", names="k=-1"),
    case("search", "index={index}", "query={photo}", "k=abc", names="k='abc'", fast=True),
    case("search", "index={notindex}", "query={photo}", names=("notindex", "not an index"), fast=True),
    case("search", "index={text}", "query={photo}", names=("text.ckpt", "not an index folder")),
    case("search", "index={index}", "query={missing}", names=("query=", "no such file")),
    case("search", "index={index}", "query={truncated}", names=("truncated.ckpt", "cannot decode")),
    case("search", "index={index}", "benchmark=oxford5k", "paths.data_dir={badgt}", names="good.txt:2:", fast=True),
    case("search", "index={index}", "benchmark=oxford5k", "paths.data_dir={badbox}", names="does not overlap"),
    # -- oxford-ir-serve
    case("serve", "index={notindex}", names=("notindex", "not an index"), fast=True),
    case("serve", "index={text}", names="text.ckpt"),
    case("serve", "index={index}", "k=0", names="k=0", fast=True),
    case("serve", "index={index}", "k=abc", names="not a number"),
    case("serve", "index={index}", "port=-1", names="port=-1"),
    # -- oxford-ir-data
    case("data", "verify", "synthetic", "--root", "{missing}", names=("synthetic", "missing"), fast=True),
    case("data", "verify", "oxford5k", "--root", "{badgt}", names=("tower_1_good.txt:2:", "'x y z'"), fast=True),
    case(
        "data",
        "verify",
        "oxford5k",
        "--root",
        "{unknownquery}",
        names=("tower_1_query.txt:1: query image 'tower_000099' is not in",),
        fast=True,
    ),
    case("data", "verify", "oxford5k", "--root", "{badgt}", "--gt-file", "{text}", names="form", fast=True),
    case("data", "synthetic", "--root", "{text}", names=("text.ckpt", "is a file"), fast=True),
    case("data", "synthetic", "--landmarks", "abc", "--root", "{tmp}/s", names=("--landmarks", "'abc'"), fast=True),
    case("data", "synthetic", "--image-size", "0", "--root", "{tmp}/s", names=("--image-size", "got 0"), fast=True),
    case("data", "download", "oxford5k", "--root", "{text}", names=("text.ckpt", "not a file"), fast=True),
    case("data", "download", "nowhere", names=("invalid choice", "nowhere"), fast=True),
    case("data", "cache", "synthetic", "--root", "{data}", "--eval-size", "-3", names=("--eval-size", "-3"), fast=True),
]

#: Hydra's own refusals: (entry, argument, the key it names); the first three run in the default suite
HYDRA_CASES = [
    pytest.param("train", "foo=1", "foo", id="train:foo=1"),
    pytest.param("train", "backbone=nope", "backbone", id="train:backbone=nope"),
    pytest.param("serve", "foo=1", "foo", id="serve:foo=1"),
    pytest.param("eval", "foo=1", "foo", id="eval:foo=1", marks=pytest.mark.slow),
    pytest.param("index", "pooling=nope", "pooling", id="index:pooling=nope", marks=pytest.mark.slow),
    pytest.param("search", "foo=1", "foo", id="search:foo=1", marks=pytest.mark.slow),
]


# -- the files the cases point at -----------------------------------------------------------------------------------
def _write_bad_ground_truth(folder: Path, *, good: str = "tower_000000\nx y z\n", query: str = "tower_000001") -> None:
    """An oxford5k folder whose gt text files hold ``good`` (line 2 is garbage by default) and ``query``."""
    names = [f"tower_{i:06d}" for i in range(4)]
    (folder / "jpg").mkdir(parents=True)
    for name in names:
        Image.new("RGB", (8, 6), (90, 80, 70)).save(folder / "jpg" / f"{name}.jpg")
    (folder / "imlist.txt").write_text("\n".join(names) + "\n")
    gt = folder / "gt_files_170407"
    gt.mkdir()
    (gt / "tower_1_query.txt").write_text(f"oxc1_{query} 1 1 7 5\n")
    (gt / "tower_1_good.txt").write_text(good)
    (gt / "tower_1_ok.txt").write_text("")
    (gt / "tower_1_junk.txt").write_text("")


def _module_checkpoint(path: Path, *overrides: str) -> None:
    """A checkpoint of a RetrievalModule composed with ``overrides`` (the file layout ``load_retrieval_checkpoint``
    reads), without training it."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    module = instantiate(cfg.model)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from oxford_ir.retrieval.index_build import build_index
    from oxford_ir.retrieval.model_spec import ModelSpec

    raw_pixels = ModelSpec(
        embedder={
            "_target_": "oxford_ir.models.embedder.Embedder",
            "backbone": {"_target_": "oxford_ir.models.backbones.RawPixels", "grid": 4},
            "pooling": {"_target_": "oxford_ir.models.pooling.FlattenPooling"},
        }
    )
    root = tmp_path_factory.mktemp("hostile")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    build_index(raw_pixels, photos, root / "index", image_size=64, batch_size=4, num_workers=0, progress=False)
    _module_checkpoint(root / "other.ckpt", "backbone=scratch", "backbone.channels=[8,32]")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 0.1}}, root / "foreign.ckpt")
    whole = (root / "other.ckpt").read_bytes()
    (root / "truncated.ckpt").write_bytes(whole[: len(whole) // 2])
    (root / "text.ckpt").write_text("a note, not a checkpoint\n")
    (root / "notindex").mkdir()
    (root / "notindex" / "notes.txt").write_text("mine\n")
    _write_bad_ground_truth(root / "badgt" / "oxford5k")
    _write_bad_ground_truth(root / "unknownquery" / "oxford5k", good="tower_000000\n", query="tower_000099")
    _write_bad_ground_truth(root / "badbox" / "oxford5k", good="tower_000000\n")  # then its query replaced:
    Image.new("RGB", (1, 5000), (90, 80, 70)).save(root / "badbox" / "oxford5k" / "jpg" / "tower_000001.jpg")
    (root / "data").mkdir()
    return {
        "tmp": root, "photos": photos, "photo": photos / "p0.png", "index": root / "index",
        "other": root / "other.ckpt", "foreign": root / "foreign.ckpt", "truncated": root / "truncated.ckpt",
        "text": root / "text.ckpt", "notindex": root / "notindex", "missing": root / "missing",
        "badgt": root / "badgt", "unknownquery": root / "unknownquery", "data": root / "data",
        "badbox": root / "badbox",
    }  # fmt: skip


def _arguments(entry: str, args: tuple[str, ...], files: dict[str, Path], run: Path) -> list[str]:
    filled = [a.format(**files) for a in (*BASE[entry], *args)]
    return filled if entry == "data" else [*filled, f"hydra.run.dir={run}"]


def _run(entry: str, args: tuple[str, ...], files: dict[str, Path], tmp_path: Path, env: dict | None = None):
    arguments = _arguments(entry, args, files, tmp_path / "run")
    return run_main(*arguments, cwd=tmp_path, env={**QUIET, **(env or {})}, entry=ENTRIES[entry],
                    prog=f"oxford-ir-{entry}")  # fmt: skip


def assert_one_error_line(result: subprocess.CompletedProcess, names: tuple[str, ...]) -> None:
    tail = result.stderr[-3000:]
    assert result.returncode == 2, tail
    assert "Traceback" not in result.stderr, tail
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, tail
    for name in names:
        assert name in lines[0], lines[0]


# -- the table --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_one_error_line(bad: Case, files: dict[str, Path], tmp_path: Path) -> None:
    result = _run(bad.entry, bad.args, files, tmp_path)
    assert_one_error_line(result, tuple(n.format(**files) for n in bad.names))


@pytest.mark.parametrize(("entry", "argument", "key"), HYDRA_CASES)
def test_hydra_refusals_stay_short(entry: str, argument: str, key: str, files, tmp_path: Path) -> None:
    """Hydra's message for an unknown key or option: a few lines naming it and the hint, exit 1, no traceback."""
    result = _run(entry, (argument,), files, tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"'{key}'" in result.stderr or f"{key}=" in result.stderr, result.stderr
    assert "Set the environment variable HYDRA_FULL_ERROR=1" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 15, result.stderr


@pytest.mark.slow
def test_debug_variable_shows_the_traceback(files: dict[str, Path], tmp_path: Path) -> None:
    """HYDRA_FULL_ERROR=1 asks for the traceback: the user error leaves main() as an exception (a real process
    prints its traceback), the ConfigError among its causes."""
    with pytest.raises(Exception) as raised:
        _run("train", ("optimizer.lr=abc",), files, tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert isinstance(user_error_in(raised.value), ConfigError)
    assert "optimizer.lr='abc'" in str(user_error_in(raised.value))


# -- the installed scripts, in processes of their own ------------------------------------------------------------------
SUBPROCESS_CASES = [
    pytest.param(
        "train", ("optimizer.lr=abc",), ("optimizer.lr='abc'",), id="train:optimizer.lr=abc", marks=pytest.mark.slow
    ),
    pytest.param(
        "train",
        ("trainer.max_epochs=-1",),
        ("trainer.max_epochs=-1",),
        id="train:trainer.max_epochs=-1",
        marks=pytest.mark.slow,
    ),  # fmt: skip
    pytest.param("eval", ("ckpt_path={truncated}",), ("truncated.ckpt",), id="eval:ckpt", marks=pytest.mark.slow),
    pytest.param("index", ("images={photos}", "out={notindex}"), ("no index",), id="index:out", marks=pytest.mark.slow),
    pytest.param(
        "search", ("index={index}", "query={photo}", "bbox=1,2,3"), ("bbox=",), id="search:bbox", marks=pytest.mark.slow
    ),  # fmt: skip
    pytest.param("serve", ("index={notindex}",), ("not an index",), id="serve:index", marks=pytest.mark.slow),
    pytest.param(
        "data",
        ("verify", "oxford5k", "--root", "{badgt}"),
        ("tower_1_good.txt:2:",),
        id="data:verify",
        marks=pytest.mark.slow,
    ),  # fmt: skip
]


@pytest.mark.parametrize(("entry", "args", "names"), SUBPROCESS_CASES)
def test_console_script_prints_one_error_line(entry: str, args, names, files, tmp_path: Path) -> None:
    """The whole of stderr of the installed script: exactly one ``error:`` line and no traceback."""
    arguments = _arguments(entry, args, files, tmp_path / "run")
    result = subprocess.run(
        [script(f"oxford-ir-{entry}"), *arguments], cwd=tmp_path, env=environment(**QUIET),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert_one_error_line(result, tuple(n.format(**files) for n in names))
