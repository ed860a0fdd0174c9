"""experiments/reproduce.py (``make reproduce``): the commands of the real run, the table and its published column,
the GPU estimate against a hand computation, the skipped download, the step runner; and (slow) the dry run end to
end."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import reproduce as rp

REPO = Path(__file__).resolve().parents[1]


def _complete(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / ".complete.json").write_text(json.dumps({"files": []}))


def _steps(steps: list[rp.Step]) -> dict[str, rp.Step]:
    return {step.name: step for step in steps}


def test_the_real_plan_runs_exactly_these_commands(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    steps = _steps(rp.plan(rp.real_setting(out, data), best_ckpt="BEST.ckpt"))

    assert steps["download-paris6k"].argv == ("oxford-ir-data", "download", "paris6k", "--root", str(data))
    assert steps["download-oxford5k"].argv == ("oxford-ir-data", "download", "oxford5k", "--root", str(data))
    assert steps["train"].argv == (
        "oxford-ir-train",
        "experiment=gem_resnet50",
        "trainer=gpu",
        "logger=csv",
        "whitening=learned",
        f"paths.data_dir={data}",
        f"hydra.run.dir={out / 'train'}",
    )
    assert steps["train"].needs == ("download-paris6k", "download-oxford5k")
    assert steps["whitening-ms"].argv == (
        "oxford-ir-eval",
        "ckpt_path=BEST.ckpt",
        "benchmarks=[roxford5k]",
        f"paths.data_dir={data}",
        "extraction.image_size=1024",
        "extraction.scales=[1.0,0.7071,0.5]",
        "extraction.decode=cpu",
        "extraction.num_workers=8",
        "whitening=learned",
        f"whitening.file={out / 'whitening' / 'ms.pt'}",
        f"hydra.run.dir={out / 'eval' / 'whitening-ms'}",
    )
    assert steps["index-oxford-ss-lw"].argv == (
        "oxford-ir-index",
        "images=benchmark:roxford5k",
        f"out={out / 'index' / 'oxford-ss-lw'}",
        "ckpt_path=BEST.ckpt",
        f"paths.data_dir={data}",
        "extraction.image_size=1024",
        "extraction.scales=[1.0]",
        "extraction.decode=cpu",
        "extraction.num_workers=8",
        "index.dtype=float32",
        "whitening=learned",
        f"whitening.file={out / 'whitening' / 'ss.pt'}",
        f"hydra.run.dir={out / 'runs' / 'index-oxford-ss-lw'}",
    )
    assert steps["index-oxford-ss-lw"].needs == ("train", "whitening-ss")
    assert steps["index-paris-ms-none"].argv[-2:] == (
        "whitening=none",
        f"hydra.run.dir={out / 'runs/index-paris-ms-none'}",
    )
    assert steps["search-oxford-ms-lw-dba-qe"].argv == (
        "oxford-ir-search",
        f"index={out / 'index' / 'oxford-ms-lw'}",
        "benchmark=roxford5k",
        f"paths.data_dir={data}",
        "database_augmentation.n=2",
        "database_augmentation.alpha=3",
        "query_expansion.n=2",
        "query_expansion.alpha=3",
        f"hydra.run.dir={out / 'search' / 'oxford-ms-lw-dba-qe'}",
    )
    assert steps["search-paris-ss-none-qe"].argv[2:5] == (
        "benchmark=rparis6k",
        f"paths.data_dir={data}",
        "query_expansion.n=2",
    )
    # rparis6k never with the learned whitening, except the one run that must be refused
    assert not [n for n in steps if n.startswith(("index-paris", "search-paris")) and "-lw" in n]
    # ... which oxford-ir-eval checks before it embeds anything
    refused = steps["refused-paris-lw"]
    assert refused.expect_refusal and refused.needs == ("whitening-ss",)
    assert refused.argv == (
        "oxford-ir-eval",
        "ckpt_path=BEST.ckpt",
        "benchmarks=[rparis6k]",
        f"paths.data_dir={data}",
        "extraction.image_size=1024",
        "extraction.scales=[1.0]",
        "extraction.decode=cpu",
        "extraction.num_workers=8",
        "whitening=learned",
        f"whitening.file={out / 'whitening' / 'ss.pt'}",
        f"hydra.run.dir={out / 'runs' / 'refused-paris-lw'}",
    )
    # 2 downloads, train, 2 whitening runs, 6 indexes x 3 searches, the refusal
    assert len(steps) == 2 + 1 + 2 + 6 * 4 + 1
    assert sum(step.row is not None for step in steps.values()) == 6 * 3 + 1


def test_the_download_is_skipped_when_the_data_folders_are_complete(tmp_path):
    data = tmp_path / "data"
    _complete(data, "paris6k")
    (data / "oxford5k").mkdir()  # present but unfinished: no marker
    names = [step.name for step in rp.plan(rp.real_setting(tmp_path / "out", data))]
    assert "download-paris6k" not in names and "download-oxford5k" in names

    _complete(data, "oxford5k")
    steps = rp.plan(rp.real_setting(tmp_path / "out", data))
    assert not [step for step in steps if step.name.startswith("download-")]
    assert steps[0].name == "train" and steps[0].needs == ()


def test_the_dry_plan_uses_two_synthetic_folders_and_the_cpu(tmp_path):
    out = tmp_path / "out"
    steps = _steps(rp.plan(rp.dry_setting(out), best_ckpt="BEST.ckpt"))
    assert steps["synthetic-paris"].argv[-4:] == ("--root", str(out / "data/train/synthetic"), "--seed", "0")
    assert steps["synthetic-oxford"].argv[-4:] == ("--root", str(out / "data/eval/synthetic"), "--seed", "1")
    train = steps["train"].argv
    assert "experiment=quickstart" in train and "whitening=learned" in train
    assert f"paths.data_dir={out / 'data/train'}" in train
    assert steps["whitening-ss"].argv[3:5] == (f"paths.data_dir={out / 'data/eval'}", "synthetic.seed=1")
    assert steps["refused-paris-lw"].argv[3:5] == (f"paths.data_dir={out / 'data/train'}", "synthetic.seed=0")
    assert f"paths.data_dir={out / 'data/eval'}" in steps["index-oxford-ms-lw"].argv
    assert f"paths.data_dir={out / 'data/train'}" in steps["index-paris-ms-none"].argv
    assert "extraction.image_size=128" in steps["index-paris-ms-none"].argv
    assert all("extraction.device=cpu" in s.argv for n, s in steps.items() if n.startswith(("index", "search")))


def _fake_run(tmp_path: Path, dry: bool):
    """A plan whose searches all 'finished' with hand-made metrics: E 50%, M 40%, H 20% (+1 per row index)."""
    s = rp.dry_setting(tmp_path / "out") if dry else rp.real_setting(tmp_path / "out", tmp_path / "data")
    steps = rp.plan(s, best_ckpt="BEST.ckpt")
    outcomes = {}
    for number, step in enumerate(step for step in steps if step.row is not None and not step.expect_refusal):
        step.run_dir.mkdir(parents=True)
        name = s.benchmarks[step.row.role]
        metrics = {f"{name}/{p}/mAP": v + number / 100 for p, v in (("E", 0.5), ("M", 0.4), ("H", 0.2))}
        (step.run_dir / "metrics.json").write_text(json.dumps({"metrics": metrics, "index": "x"}))
        outcomes[step.name] = rp.Outcome("ok", 1.0)
    outcomes["refused-paris-lw"] = rp.Outcome("refused", 1.0, "error: whitening.source overlaps rparis6k", 2)
    return s, steps, outcomes


def test_the_table_puts_the_published_numbers_on_their_row_and_marks_paris(tmp_path):
    s, steps, outcomes = _fake_run(tmp_path, dry=False)
    rows = rp.build_rows(s, steps, outcomes)
    table = rp.format_table(s, rows)
    lines = [line for line in table.splitlines() if line.startswith("| r")]
    assert len(lines) == 19
    published = [line for line in lines if "64.7" in line]
    assert published == [
        "| roxford5k | multi [1.0,0.7071,0.5] | none | none | 56.00 | 46.00 | 26.00 | M 64.7 / H 39.0 (a) |"
    ]
    assert lines[0] == "| roxford5k | single [1.0] | none | none | 50.00 | 40.00 | 20.00 |  |"
    assert "| roxford5k | single [1.0] | learned | DBA n=2 + αQE n=2 | 55.00 | 45.00 | 25.00 |  |" in lines
    paris = [line for line in lines if "rparis6k" in line]
    assert len(paris) == 7 and all("(trained on Paris: not comparable)" in line for line in paris)
    assert [line for line in paris if "learned" in line] == [
        "| rparis6k (trained on Paris: not comparable) | single [1.0] | learned | - | refused |  |  |  |"
    ]
    assert "error: whitening.source overlaps rparis6k" in table and "(a) published: cnnimageretrieval-pytorch" in table
    assert "checkpoint: the last epoch's" in table  # the default: nothing is selected on the test set
    best = rp.format_table(dataclasses.replace(s, checkpoint="best"), rows)
    assert "chosen on the evaluated benchmark" in best

    results = rp.write_results(s, steps, outcomes, rows, table, 12.5, rp.gpu_estimate())
    assert (s.out / "table.md").read_text() == table + "\n"
    saved = json.loads((s.out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    row = next(r for r in saved["rows"] if r["published"])
    assert (row["E"], row["M"], row["H"]) == pytest.approx((56.0, 46.0, 26.0))
    assert row["key"] == {"role": "oxford", "scales": "multi", "whitening": "none", "reranking": "none"}
    assert saved["published"]["values"] == {"roxford5k": {"M": 64.7, "H": 39.0}}


def test_the_dry_table_says_the_published_column_does_not_apply(tmp_path):
    s, steps, outcomes = _fake_run(tmp_path, dry=True)
    del outcomes["search-oxford-ss-lw-qe"]  # a step that never ran shows as such
    table = rp.format_table(s, rp.build_rows(s, steps, outcomes))
    assert (
        "| rsynthetic (seed 1, as roxford5k) | multi [1.0,0.7071,0.5] | none | none | 56.00 | 46.00 | 26.00 "
        "| n/a (synthetic) |" in table
    )
    assert table.count("n/a (synthetic)") == 1 and "64.7" not in table
    assert "| rsynthetic (seed 1, as roxford5k) | single [1.0] | learned | αQE n=2 | not run |  |  |  |" in table
    seen = [line for line in table.splitlines() if "training data" in line and line.startswith("|")]
    assert len(seen) == 7 and all("not comparable" in line for line in seen)


def test_a_run_that_writes_no_metrics_is_a_failed_row(tmp_path):
    s = rp.real_setting(tmp_path / "out", tmp_path / "data")
    steps = [step for step in rp.plan(s) if step.name == "search-oxford-ss-none-none"]
    rows = rp.build_rows(s, steps, {"search-oxford-ss-none-none": rp.Outcome("ok", 1.0)})
    assert (rows[0]["status"], rows[0]["M"], rows[0]["note"]) == ("failed", None, "no metrics.json")


def test_the_gpu_estimate_matches_a_hand_computation():
    estimate = rp.gpu_estimate()
    # training: 30 epochs x ceil(2329 / 32) = 73 batches x (32 + 8) images at 558 images/s
    assert estimate["counts"]["training"] == 30 * 73 * 40 == 87_600
    # validation: 31 evaluations (30 epochs + the best checkpoint) of Revisited Oxford, each learning the whitening
    # from the Paris training images first, 3 scales
    assert estimate["counts"]["validation"] == 31 * (4993 + 70 + 2329) * 3 == 687_456
    # whitening: (Paris training images + Oxford images) x (1 + 3) passes
    assert estimate["counts"]["whitening"] == (2329 + 5063) * 4 == 29_568
    # indexing: Oxford with and without whitening, Paris without, 1 + 3 passes each
    assert estimate["counts"]["indexing"] == 4993 * 4 * 2 + 6322 * 4 == 65_232
    assert estimate["counts"]["queries"] == 3 * (70 * 4 * 2 + 70 * 4) == 2_520
    expected_gpu = 87_600 / 558 + (687_456 + 29_568 + 65_232 + 2_520) / 101
    assert estimate["gpu_s"] == pytest.approx(expected_gpu) and math.isclose(expected_gpu, 7927.0, abs_tol=1)
    assert estimate["download_s"] == pytest.approx(4300 / 12.5)
    assert estimate["total_s"] == pytest.approx(expected_gpu + 344)
    assert "GPU 2.2 h (7,927 s)" in estimate["summary"]
    # other inputs: every part scales as stated
    small = rp.gpu_estimate(100, 10, epochs=2, train_images=64, batch=(32, 8), n_multi=2, download_gb=1, mb_per_s=10)
    assert small["seconds"]["training"] == 2 * 2 * 40 / 100
    assert small["seconds"]["validation"] == 3 * (5063 + 64) * 2 / 10
    assert small["seconds"]["indexing"] == (4993 * 3 * 2 + 6322 * 3) / 10
    assert small["download_s"] == 100


def test_estimate_prints_only_the_estimate(capsys):
    assert rp.main(["--estimate"]) == 0
    printed = capsys.readouterr().out
    assert "training    30 epochs x 73 batches" in printed and "total: GPU 2.2 h" in printed
    assert "steps into" not in printed and "wall time" not in printed


def test_the_runner_skips_what_needs_a_failed_step_and_checks_refusals(tmp_path):
    def python(code: str) -> tuple[str, ...]:
        return (sys.executable, "-c", code)

    refusal = "import sys; print('error: refused, as it must be', file=sys.stderr); sys.exit(2)"
    steps = [
        rp.Step("a", python("print('fine')")),
        rp.Step("b", python("import sys; print('boom'); sys.exit(3)"), needs=("a",)),
        rp.Step("c", python("print('never')"), needs=("b",)),
        rp.Step("d", python(refusal), needs=("a",), expect_refusal=True),
        rp.Step("e", python("print('not refused')"), needs=("a",), expect_refusal=True),
        rp.Step("f", python("raise SystemExit(1)"), done=tmp_path / "marker"),
        # finished before, but what it needs ran again: runs again; needs only finished steps: reused
        rp.Step("g", python("print('again')"), done=tmp_path / "marker", needs=("a",)),
        rp.Step("h", python("raise SystemExit(1)"), done=tmp_path / "marker", needs=("f",)),
    ]
    (tmp_path / "marker").write_text("{}")  # a completion marker: a whole JSON object, like metrics.json
    outcomes: dict[str, rp.Outcome] = {}
    rp.run_plan(steps, tmp_path / "logs", 2, outcomes)
    assert {name: o.status for name, o in outcomes.items()} == {
        "a": "ok",
        "b": "failed",
        "c": "skipped",
        "d": "refused",
        "e": "failed",
        "f": "done",
        "g": "ok",
        "h": "done",
    }
    assert outcomes["b"].message == "exit status 3: boom"
    assert outcomes["d"].message == "error: refused, as it must be"
    assert outcomes["e"].message == "expected a refusal, got exit status 0"
    assert (tmp_path / "logs" / "a.log").read_text().endswith("fine\n")


def test_the_best_checkpoint_is_the_newest_best_file(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="best-"):
        rp.chosen_checkpoint(tmp_path, "best")
    for name in ("last.ckpt", "best-epoch001.ckpt", "best-epoch004.ckpt"):
        (folder / name).write_text(name)
    assert rp.chosen_checkpoint(tmp_path, "best").name == "best-epoch004.ckpt"
    assert rp.chosen_checkpoint(tmp_path).name == "last.ckpt"  # the default


def _set_complete(index: Path, complete: bool) -> None:
    """Mark the live version of ``index`` as a checkpoint of an interrupted build (``complete: false``), as a build
    killed after a checkpoint leaves it, or as complete again."""
    manifest = index / (index / "CURRENT").read_text().strip() / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "complete": complete}))


def test_a_step_is_done_from_its_completion_marker_not_from_having_started(tmp_path):
    from tests.web.tiny_index import build_tiny_index

    index = build_tiny_index(tmp_path / "tiny")
    step = rp.Step("index-x", ("true",), done=index / "CURRENT")
    assert rp.finished_before(step)
    _set_complete(index, False)  # killed after a checkpoint: CURRENT names a version that lacks images
    assert not rp.finished_before(step)
    (index / "CURRENT").write_text("v9")  # damaged
    assert not rp.finished_before(step)
    (index / "CURRENT").unlink()  # killed before its first checkpoint
    assert not rp.finished_before(step)
    metrics = tmp_path / "run" / "metrics.json"
    run = rp.Step("search-x", ("true",), done=metrics)
    assert not rp.finished_before(run)
    metrics.parent.mkdir()
    for text, finished in (("", False), ('{"metrics": {"a": ', False), ("[]", False), ('{"metrics": {}}', True)):
        metrics.write_text(text)
        assert rp.finished_before(run) is finished, text


def test_a_rerun_after_an_index_build_killed_at_a_checkpoint_resumes_the_index_then_searches(tmp_path):
    """``make reproduce`` killed while an index step had written a checkpoint: the rerun builds the index again
    (the real build resumes from its checkpoint) instead of taking it as done, and the searches then succeed."""
    from tests.web.tiny_index import build_tiny_index

    index = build_tiny_index(tmp_path / "tiny")
    _set_complete(index, False)
    manifest = f"{index}/{(index / 'CURRENT').read_text().strip()}/manifest.json"
    finish = f"import json, pathlib; p = pathlib.Path({manifest!r}); p.write_text(json.dumps({{**json.loads(p.read_text()), 'complete': True}}))"  # noqa: E501
    search = (
        f"import json, sys; sys.exit(0 if json.load(open({manifest!r}))['complete'] else 'lacks 48 of the 152 images')"  # noqa: E501
    )
    searched = tmp_path / "search" / "metrics.json"
    steps = [
        rp.Step("index-x", (sys.executable, "-c", finish), done=index / "CURRENT"),
        rp.Step("search-x", (sys.executable, "-c", search), done=searched, needs=("index-x",)),
    ]
    outcomes: dict[str, rp.Outcome] = {}
    rp.run_plan(steps, tmp_path / "logs", 1, outcomes)
    assert {name: o.status for name, o in outcomes.items()} == {"index-x": "ok", "search-x": "ok"}
    again: dict[str, rp.Outcome] = {}
    rp.run_plan(steps[:1], tmp_path / "logs", 1, again)
    assert again["index-x"].status == "done"  # complete now: not built a third time


@pytest.mark.slow
def test_the_dry_run_runs_every_step_end_to_end(tmp_path):
    out = tmp_path / "dry"
    proc = subprocess.run(
        [sys.executable, "experiments/reproduce.py", "--dry", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert len(rows) == 19
    numbers = [row for row in rows if row["status"] in ("ok", "done")]
    assert len(numbers) == 18
    assert all(0 <= row[p] <= 100 for row in numbers for p in "EMH")
    learned = [row for row in numbers if row["key"]["role"] == "oxford" and row["whitening"] == "learned"]
    assert len(learned) == 6
    seen = [row for row in rows if row["key"]["role"] == "paris"]
    assert len(seen) == 7 and all("not comparable" in row["benchmark"] for row in seen)
    refused = [row for row in seen if row["whitening"] == "learned"]
    assert [row["status"] for row in refused] == ["refused"] and "error:" in refused[0]["note"]
    table = (out / "table.md").read_text()
    assert table.count("n/a (synthetic)") == 1
    assert all(check for check in results["whitening_checks"].values())
    assert "total: GPU" in proc.stdout and "wall time" in proc.stdout
