"""Indexes built in shards (index.shard=i/N) and merged (index.merge=true) equal one index built at once; shards of
other models or settings are refused, naming both."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from oxford_ir.cli.index import index
from oxford_ir.cli.index import main as index_main
from oxford_ir.errors import ConfigError, IndexFormatError
from oxford_ir.retrieval.exact_search import ExactSearch
from oxford_ir.retrieval.index_format import RetrievalIndex
from oxford_ir.retrieval.index_shards import SHARD_FILE, parse_shard, shards_dir
from tests.test_index_cli import TINY_MODEL, compose_index
from tests.test_train import run_main


def write_varied_photos(folder, n: int) -> None:
    """Smooth colour fields of several sizes (embeddings well apart, so top-k has no near-tie)."""
    rng = np.random.default_rng(3)
    for i in range(n):
        small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        size = [(30, 24), (24, 30), (32, 32)][i % 3]
        sub = folder / f"d{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(sub / f"p{i:02d}.png")


def variant(cfg, **values):
    """A copy of a composed config with some keys changed (``index__shard`` for ``index.shard``): one composition
    per test instead of one per call."""
    copy = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(copy, key.replace("__", "."), value)
    return copy


def test_shards_merged_equal_one_index_and_restart_on_their_own(tmp_path, capsys) -> None:
    photos = tmp_path / "photos"
    write_varied_photos(photos, 11)
    common = [f"images={photos}", "extraction.batching=shape", "index.dtype=float32"]
    cfg = compose_index(tmp_path, *common, f"out={tmp_path / 'whole'}")
    whole = index(cfg)
    out = tmp_path / "sharded"
    # the README's multirun: one job per shard (here Hydra's basic launcher, one after another)
    settings = ["extraction.image_size=32", "extraction.num_workers=0", "extraction.device=cpu", "progress=false"]
    sweep = ["-m", *common, f"out={out}", "index.shard=0/2,1/2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = run_main(*sweep, *settings, *TINY_MODEL, cwd=tmp_path, entry=index_main, prog="oxford-ir-index")
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [len(RetrievalIndex.load(shards_dir(out) / f"{i}-of-2")) for i in range(2)]
    assert counts == [5, 6] and whole.count == 11
    assert json.loads((shards_dir(out) / "1-of-2" / SHARD_FILE).read_text())["listed"] == 11
    again = index(variant(cfg, out=str(out), index__shard="1/2"))  # restarted: nothing to do
    assert again.attempted == 0 and not again.wrote

    merged = index(variant(cfg, out=str(out), index__merge=True))
    assert f"index: {out} (v000001: 11 images" in capsys.readouterr().out and merged.count == 11
    one, joined = RetrievalIndex.load(tmp_path / "whole"), RetrievalIndex.load(out)
    assert [e.path for e in joined.entries] == [e.path for e in one.entries]
    assert joined.fingerprint == one.fingerprint and joined.manifest["shards"]["count"] == 2
    np.testing.assert_allclose(joined.vectors(), one.vectors(), atol=1e-6)
    k = 5
    expected = ExactSearch(one.vectors()).search(one.vectors(), k)[1]
    np.testing.assert_array_equal(ExactSearch(joined.vectors()).search(one.vectors(), k)[1], expected)
    # the merged index is an ordinary one: an update of it embeds only what is new
    write_varied_photos(tmp_path / "more", 1)
    (tmp_path / "more" / "d0" / "p00.png").rename(photos / "new.png")
    update = index(variant(cfg, out=str(out)))
    assert update.attempted == 1 and update.kept == 11


def test_shards_of_another_model_or_split_are_refused(tmp_path) -> None:
    photos = tmp_path / "photos"
    write_varied_photos(photos, 4)
    out = tmp_path / "index"
    cfg = compose_index(tmp_path, f"images={photos}", f"out={out}")
    merge = variant(cfg, index__merge=True)
    with pytest.raises(ConfigError, match=r"no shards in .*index.shards; build them first"):
        index(merge)
    index(variant(cfg, index__shard="0/2"))
    with pytest.raises(ConfigError, match=r"shard\(s\) 1/2 of 2 missing .*index.shard=1/2"):
        index(merge)
    index(variant(cfg, index__shard="1/2", backbone__channels=[8, 8]))
    with pytest.raises(IndexFormatError) as error:
        index(merge)
    message = str(error.value)
    assert f"shard {shards_dir(out) / '0-of-2'} and shard {shards_dir(out) / '1-of-2'}" in message
    assert "different model and extraction settings" in message and "channels=[8, 16]" in message
    assert "channels=[8, 8]" in message and "\n" not in message
    index(variant(cfg, index__shard="0/3"))
    with pytest.raises(ConfigError, match=r"shards of 2 different splits \(2 of 2 shards, 1 of 3 shards\); delete"):
        index(merge)
    assert not (out / "CURRENT").exists()


def test_shard_values() -> None:
    assert parse_shard("1/4") == parse_shard(" 1 / 4 ") and parse_shard("1/4").count == 4
    slurm = {"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert (parse_shard("auto", slurm).index, parse_shard("auto", slurm).count) == (2, 4)
    torchrun = parse_shard("auto", {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (torchrun.index, torchrun.count, torchrun.local_rank) == (3, 4, 1)
    for bad, match in (("4/4", "shard 4 of 4 does not exist"), ("a", "give <i>/<N>"), ("auto", "neither a SLURM")):
        with pytest.raises(ConfigError, match=match):
            parse_shard(bad, {})


def test_the_slurm_launcher_submits_one_single_gpu_job_per_shard(tmp_path) -> None:
    """``oxford-ir-index -m hydra/launcher=slurm ... index.shard=0/4,...``: the launcher resolves without a trainer."""
    from hydra import compose, initialize_config_dir

    from tests.test_index_cli import REPO

    overrides = ["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", "images=x", "out=y", "index.shard=1/4"]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("index", overrides=overrides, return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (1, 1, 1)
    assert parse_shard(cfg.index.shard) == parse_shard("1/4")


@pytest.mark.slow  # two fresh Python processes importing torch: ~20 s on 2 shared cores
def test_torchrun_processes_each_build_their_own_shard(tmp_path) -> None:
    """``torchrun --nproc-per-node 2 -m oxford_ir.cli.index ... index.shard=auto``: no process group, each process
    its own shard folder (RANK of WORLD_SIZE); merged, the index equals one built at once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    photos = tmp_path / "photos"
    write_varied_photos(photos, 7)
    common = [f"images={photos}", "extraction.batching=shape", "index.dtype=float32"]
    cfg = compose_index(tmp_path, *common, f"out={tmp_path / 'whole'}")
    index(cfg)
    settings = ["extraction.image_size=32", "extraction.num_workers=0", "extraction.device=cpu", "progress=false"]
    out = tmp_path / "sharded"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
         "oxford_ir.cli.index", *common, *settings, *TINY_MODEL, f"out={out}", "index.shard=auto",
         f"paths.data_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in shards_dir(out).iterdir()) == ["0-of-2", "1-of-2"]
    index(variant(cfg, out=str(out), index__merge=True))
    one, joined = RetrievalIndex.load(tmp_path / "whole"), RetrievalIndex.load(out)
    assert [e.path for e in joined.entries] == [e.path for e in one.entries]
    np.testing.assert_allclose(joined.vectors(), one.vectors(), atol=1e-6)
