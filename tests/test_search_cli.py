"""oxford-ir-search end to end: a real index on disk, queries from files, folders and lists, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from oxford_ir.cli.search import main, resolve_queries, search
from oxford_ir.errors import ConfigError, DataError, IndexFormatError
from oxford_ir.retrieval.index_build import build_index
from oxford_ir.retrieval.index_format import EMBEDDINGS_FILE, RetrievalIndex
from oxford_ir.retrieval.model_spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]
RAW_PIXELS = ModelSpec(
    embedder={
        "_target_": "oxford_ir.models.embedder.Embedder",
        "backbone": {"_target_": "oxford_ir.models.backbones.RawPixels", "grid": 4},
        "pooling": {"_target_": "oxford_ir.models.pooling.FlattenPooling"},
    }
)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[Path, Path]:
    """(photos folder, index folder): 8 random 40 x 30 photos in a float16 raw-pixel index."""
    root = tmp_path_factory.mktemp("search_cli")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    build_index(RAW_PIXELS, photos, root / "index", image_size=64, batch_size=4, num_workers=0, progress=False)
    return photos, root / "index"


def compose_search(tmp_path: Path, *overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(
            "search", overrides=[f"paths.output_dir={tmp_path / 'run'}", "extraction.device=cpu", *overrides]
        )


def run_main(monkeypatch, capsys, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["oxford-ir-search", *args, f"hydra.run.dir={tmp_path / 'run'}"])
    code = 0
    try:
        main()
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_query_finds_itself_first_with_a_table_and_a_grid(indexed, tmp_path, capsys):
    photos, index = indexed
    records, objects = search(compose_search(tmp_path, f"index={index}", f"query={photos / 'p3.png'}", "k=3"))
    out = capsys.readouterr().out
    assert out.splitlines()[:3] == [f"query 1/1: {photos / 'p3.png'}", "rank    score  path", out.splitlines()[2]]
    assert out.splitlines()[2].split()[::2] == ["1", "p3.png"]
    assert [hit["path"] for hit in records[0]["results"]][0] == "p3.png"
    assert records[0]["results"][0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert [hit["rank"] for hit in records[0]["results"]] == [1, 2, 3]
    assert objects["grids"] == [tmp_path / "run" / "results.png"]
    with Image.open(objects["grids"][0]) as grid:
        assert grid.size == (4 * 128, 128 + 14)


def test_a_folder_of_queries_in_one_pass_as_json_lines_with_paged_grids(indexed, tmp_path, capsys):
    photos, index = indexed
    cfg = compose_search(tmp_path, f"index={index}", f"query={photos}", "k=2", "output=json", "grid.rows_per_image=3")
    records, objects = search(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == records
    assert [r["query"] for r in records] == [str(photos / f"p{i}.png") for i in range(8)]
    assert all(r["results"][0]["path"] == Path(r["query"]).name for r in records)
    assert [p.name for p in objects["grids"]] == ["results.png", "results_002.png", "results_003.png"]


def test_a_query_list_with_boxes_and_comments(indexed, tmp_path):
    photos, index = indexed
    listing = tmp_path / "queries.txt"
    listing.write_text(f"# my queries\n{photos / 'p1.png'}\n\n../{tmp_path.name}/p2 copy.png 2,3,30,25\n")
    Image.open(photos / "p2.png").save(tmp_path / "p2 copy.png")
    assert resolve_queries(listing) == [(photos / "p1.png", None), (listing.parent / "p2 copy.png", (2, 3, 30, 25))]
    records, _ = search(compose_search(tmp_path, f"index={index}", f"query={listing}", "k=1", "grid.enabled=false"))
    assert records[0]["results"][0]["path"] == "p1.png"
    assert records[1]["bbox"] == [2, 3, 30, 25]
    # the crop searched: the same as the box cut out and searched as an image of its own
    crop = tmp_path / "crop.png"
    Image.open(photos / "p2.png").crop((2, 3, 30, 25)).save(crop)
    alone, _ = search(compose_search(tmp_path, f"index={index}", f"query={crop}", "k=1", "grid.enabled=false"))
    assert records[1]["results"][0]["score"] == pytest.approx(alone[0]["results"][0]["score"], abs=1e-3)
    with pytest.raises(DataError, match=r"queries.txt:1: query image .*nope.png not found"):
        listing.write_text("nope.png\n")
        resolve_queries(listing)
    with pytest.raises(ConfigError, match="bbox= applies to a single query image"):
        resolve_queries(photos, "1,2,3,4")


def test_re_ranking_and_faiss_options_reach_the_searcher(indexed, tmp_path):
    pytest.importorskip("faiss")
    photos, index = indexed
    cfg = compose_search(
        tmp_path,
        f"index={index}",
        f"query={photos / 'p5.png'}",
        "backend=faiss",
        "query_expansion.n=2",
        "database_augmentation.n=1",
        "database_augmentation.alpha=1",
        "grid.enabled=false",
    )
    records, objects = search(cfg)
    searcher = objects["searcher"]
    assert searcher.backend == "faiss" and searcher.query_expansion.n == 2
    assert searcher.database_augmentation.n == 1 and searcher.database_augmentation.alpha == 1.0
    assert records[0]["results"][0]["path"] == "p5.png"


@pytest.mark.parametrize(
    "args, msg",
    [
        (["index={tmp}/missing", "query={photos}/p0.png"], "error: no index at {tmp}/missing"),
        (["query={photos}/p0.png"], "error: index= is required"),
        (["index={index}", "query={tmp}/nope.jpg"], "error: query={tmp}/nope.jpg: no such file or folder"),
        (["index={index}", "query={tmp}/broken.jpg"], "error: cannot decode query image {tmp}/broken.jpg"),
        (["index={index}", "query={photos}/p0.png", "bbox=1,2,3"], "error: bbox='1,2,3': give a box as four numbers"),
        (["index={index}", "query={photos}/p0.png", "bbox=0,0,41,30"], "lies outside the 40 x 30 image"),
        (["index={index}", "query={photos}/p0.png", "k=0"], "error: k=0: the number of results must be"),
        (["index={index}", "query={photos}/p0.png", "output=xml"], "error: output=xml: choose table or json"),
        (["index={index}", "query={photos}/p0.png", "backend=annoy"], "error: backend='annoy': choose one of"),
        (["index={index}", "query={photos}/p0.png", "benchmark=synthetic"], "error: give either query= (search)"),
        (["index={index}", "query={photos}/p0.png", "query_expansion.n=-2"], "error: query_expansion.n=-2"),
    ],
)
def test_bad_inputs_are_one_error_line_and_leave_the_index_intact(indexed, tmp_path, monkeypatch, capsys, args, msg):
    photos, index = indexed
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    before = {p.relative_to(index): p.read_bytes() for p in index.rglob("*") if p.is_file()}
    args = [a.format(tmp=tmp_path, photos=photos, index=index) for a in args]
    code, out, err = run_main(monkeypatch, capsys, tmp_path, *args)
    assert code == 2
    assert out == ""
    lines = [line for line in err.splitlines() if not line.startswith("[")]  # log records start with a timestamp
    assert len(lines) == 1 and msg.format(tmp=tmp_path, photos=photos) in lines[0], err
    assert "Traceback" not in err
    assert {p.relative_to(index): p.read_bytes() for p in index.rglob("*") if p.is_file()} == before


def test_a_corrupt_index_is_one_error_line(indexed, tmp_path, monkeypatch, capsys):
    photos, index = indexed
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    (embeddings,) = copy.glob(f"v*/{EMBEDDINGS_FILE}")
    data = bytearray(embeddings.read_bytes())
    data[-3] ^= 0xFF
    embeddings.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError):
        RetrievalIndex.load(copy)
    code, out, err = run_main(monkeypatch, capsys, tmp_path, f"index={copy}", f"query={photos / 'p0.png'}")
    assert code == 2 and out == ""
    assert err.strip().startswith(f"error: index {copy} is corrupt") and len(err.strip().splitlines()) == 1


def test_the_console_script_with_an_unquoted_box_and_json_for_pipes(indexed, tmp_path):
    """``bbox=x1,y1,x2,y2`` as the usage writes it (Hydra alone would read a sweep), stdout pure JSON."""
    photos, index = indexed
    command = [sys.executable, "-m", "oxford_ir.cli.search", f"index={index}", f"query={photos / 'p4.png'}"]
    options = ["bbox=0,0,40,30", "k=2", "output=json", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run([*command, *options], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert record["bbox"] == [0, 0, 40, 30] and record["results"][0]["path"] == "p4.png"
    assert f"grid: {tmp_path / 'run' / 'results.png'}" in done.stderr
    # a bad value from the console script is one stderr line and no stdout: in-process in
    # test_bad_inputs_are_one_error_line_and_leave_the_index_intact (a second process here cost 5 s)
