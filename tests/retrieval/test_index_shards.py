"""Indexes built in shards (index.shard=i/N) and merged (index.merge=true) equal one index built at once; shards of
other models or settings are refused, naming both."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from oxford_ir.cli.index import index
from oxford_ir.errors import ConfigError, IndexFormatError
from oxford_ir.retrieval.exact_search import ExactSearch
from oxford_ir.retrieval.index_format import RetrievalIndex
from oxford_ir.retrieval.index_shards import SHARD_FILE, parse_shard, shards_dir
from tests.test_index_cli import compose_index


def write_varied_photos(folder, n: int) -> None:
    """Smooth colour fields of several sizes (embeddings well apart, so top-k has no near-tie)."""
    rng = np.random.default_rng(3)
    for i in range(n):
        small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
        size = [(30, 24), (24, 30), (32, 32)][i % 3]
        sub = folder / f"d{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(sub / f"p{i:02d}.png")


def test_shards_merged_equal_one_index_and_restart_on_their_own(tmp_path, capsys) -> None:
    photos = tmp_path / "photos"
    write_varied_photos(photos, 11)
    common = [f"images={photos}", "extraction.batching=shape", "index.dtype=float32"]
    whole = index(compose_index(tmp_path, *common, f"out={tmp_path / 'whole'}"))
    out = tmp_path / "sharded"
    reports = [index(compose_index(tmp_path, *common, f"out={out}", f"index.shard={i}/3")) for i in range(3)]
    assert [r.count for r in reports] == [3, 4, 4] and sum(r.attempted for r in reports) == whole.count == 11
    assert json.loads((shards_dir(out) / "1-of-3" / SHARD_FILE).read_text())["listed"] == 11
    again = index(compose_index(tmp_path, *common, f"out={out}", "index.shard=1/3"))  # restarted: nothing to do
    assert again.attempted == 0 and not again.wrote

    merged = index(compose_index(tmp_path, f"out={out}", "index.merge=true"))
    assert f"index: {out} (v000001: 11 images" in capsys.readouterr().out and merged.count == 11
    one, joined = RetrievalIndex.load(tmp_path / "whole"), RetrievalIndex.load(out)
    assert [e.path for e in joined.entries] == [e.path for e in one.entries]
    assert joined.fingerprint == one.fingerprint and joined.manifest["shards"]["count"] == 3
    np.testing.assert_allclose(joined.vectors(), one.vectors(), atol=1e-6)
    k = 5
    expected = ExactSearch(one.vectors()).search(one.vectors(), k)[1]
    np.testing.assert_array_equal(ExactSearch(joined.vectors()).search(one.vectors(), k)[1], expected)
    # the merged index is an ordinary one: an update of it embeds only what is new
    write_varied_photos(tmp_path / "more", 1)
    (tmp_path / "more" / "d0" / "p00.png").rename(photos / "new.png")
    update = index(compose_index(tmp_path, *common, f"out={out}"))
    assert update.attempted == 1 and update.kept == 11


def test_shards_of_another_model_or_split_are_refused(tmp_path) -> None:
    photos = tmp_path / "photos"
    write_varied_photos(photos, 4)
    out = tmp_path / "index"
    base = [f"images={photos}", f"out={out}"]
    with pytest.raises(ConfigError, match=r"no shards in .*index.shards; build them first"):
        index(compose_index(tmp_path, f"out={out}", "index.merge=true"))
    index(compose_index(tmp_path, *base, "index.shard=0/2"))
    with pytest.raises(ConfigError, match=r"shard\(s\) 1/2 of 2 missing .*index.shard=1/2"):
        index(compose_index(tmp_path, f"out={out}", "index.merge=true"))
    index(compose_index(tmp_path, *base, "index.shard=1/2", "backbone.channels=[8,8]"))
    with pytest.raises(IndexFormatError) as error:
        index(compose_index(tmp_path, f"out={out}", "index.merge=true"))
    message = str(error.value)
    assert f"shard {shards_dir(out) / '0-of-2'} and shard {shards_dir(out) / '1-of-2'}" in message
    assert "different model and extraction settings" in message and "channels=[8, 16]" in message
    assert "channels=[8, 8]" in message and "\n" not in message
    index(compose_index(tmp_path, *base, "index.shard=0/3"))
    with pytest.raises(ConfigError, match=r"shards of 2 different splits \(2 of 2 shards, 1 of 3 shards\); delete"):
        index(compose_index(tmp_path, f"out={out}", "index.merge=true"))
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
