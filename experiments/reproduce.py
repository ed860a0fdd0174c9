"""``make reproduce``: the published setting in one command, next to the published numbers it should approach.

    .venv/bin/python experiments/reproduce.py                 # GPU + internet: download, train, evaluate (~2.3 h)
    .venv/bin/python experiments/reproduce.py --dry           # the same pipeline on the synthetic benchmark, CPU
    .venv/bin/python experiments/reproduce.py --estimate      # only the GPU cost estimate
    .venv/bin/python experiments/reproduce.py --plan          # only the commands it would run

Real mode (``logs/reproduce/<time>/``, data in ``--data``, default ``$OXFORD_IR_DATA`` or ``data``):

1. ``oxford-ir-data download paris6k`` and ``oxford5k``, each unless its folder is complete (``.complete.json``);
2. ``oxford-ir-train experiment=gem_resnet50 trainer=gpu logger=csv whitening=learned`` (Paris6k, ``cross`` split);
3. per scale setting (single ``[1.0]``, multi ``[1.0, 0.7071, 0.5]``, 1024 px), ``oxford-ir-eval`` with
   ``whitening=learned``: learns the whitening from the checkpoint's own training split (Paris), writes it to
   ``whitening/<ss|ms>.pt`` and evaluates Revisited Oxford with it (a check of the index path below);
4. per benchmark x scales x whitening (none, learned), ``oxford-ir-index images=benchmark:<name>``, then
   ``oxford-ir-search benchmark=<name>`` three times: plain, alpha-QE, DBA + alpha-QE;
5. one table (``table.md``, ``results.json``): E/M/H mAP of every row and the published column.

Protocol: the network trains on Paris, so every rparis6k row is on images it was trained on (marked, not
comparable), and the learned whitening comes from the Paris training images, which hold rparis6k's positives:
the project refuses that evaluation, so rparis6k has whitening=none rows only, and the refusal is run once and its
``error:`` line shown in the table.

Dry mode (``--dry``): every step really runs, on the CPU, on the synthetic benchmark: training (the quickstart
recipe, a few epochs) on the synthetic benchmark written with seed 0 (standing for Paris), evaluation on the
synthetic benchmark written with seed 1 into another folder (standing for Revisited Oxford: other files, other
photographs) and on the training data's own rsynthetic (standing for Revisited Paris: seen in training, learned
whitening refused), at the synthetic images' size instead of 1024 px.

Every step is a console script of the project run as a subprocess with its output in ``logs/<step>.log``; numbers
are read from each run's ``metrics.json``, never from logs. A rerun with the same ``--out`` skips the steps that
finished (unless a step they need ran again) and resumes an interrupted training with ``resume=``. A step counts as
finished from its own completion marker, never from its having started (:func:`finished_before`): an index whose
``CURRENT`` names a complete version (a build killed after a checkpoint leaves ``CURRENT`` naming that checkpoint,
which the rerun of the step resumes), a run's readable ``metrics.json``, a data folder's ``.complete.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: cnnimageretrieval-pytorch's README ("Networks with whitening learned end-to-end"): rSfM120k-tl-resnet50-gem-w,
#: ResNet-50 + GeM + an FC whitening layer trained end to end (embedder.whitening here), triplet loss, multi-scale
#: at 1024 px (test_e2e.py: scales [1, 2**(1/2), 1/2**(1/2)]), no post-hoc whitening, no re-ranking. It was trained
#: on retrieval-SfM-120k, not Paris6k: the number this setting should approach, not one it must match.
PUBLISHED = {"roxford5k": {"M": 64.7, "H": 39.0}}
PUBLISHED_NOTE = (
    "published: cnnimageretrieval-pytorch README, rSfM120k-tl-resnet50-gem-w (ResNet-50 GeM, triplet loss, "
    "whitening trained end to end like embedder.whitening here, multi-scale [1, √2, 1/√2] at 1024 px, no post-hoc "
    "whitening, no re-ranking), trained on retrieval-SfM-120k (about 120k images), not on Paris6k: a number to "
    "approach, not to match"
)

#: Re-ranking (Radenović et al.). alpha = 3 is Radenović et al.'s (TPAMI 2019), as conf/search.yaml says.
#: cnnimageretrieval-pytorch itself has no alpha-QE or DBA (its cirtorch/examples/test.py and test_e2e.py rank
#: with and without learned whitening only), so its code gives no n; n = 2 for both is the setting this project
#: measured on real Paris images (experiments/README.md, "Retrieval tool": DBA n=2 + aQE n=2) and the one its
#: README shows. Change with --qe-n / --dba-n.
QE_ALPHA = 3.0
DEFAULT_QE_N = 2
DEFAULT_DBA_N = 2

SCALES = {"single": [1.0], "multi": [1.0, 0.7071, 0.5]}
SCALE_KEY = {"single": "ss", "multi": "ms"}
WHITENINGS = ("none", "learned")
WHITENING_KEY = {"none": "none", "learned": "lw"}
RERANKINGS = ("none", "qe", "dba+qe")

#: the H200 measurements in experiments/README.md ("GPU", 2026-12-04, on the code before that day's work): the
#: closest measured numbers to what the real run does (see gpu_estimate for how each is used)
H200 = {
    # "training, no cache": ResNet-50 362 px bf16 channels_last, batch 10x6+4 (ours: 8x4+8), 12 workers
    "train_images_per_s": 558.0,
    # "extraction": ResNet-50 1024 px bf16 channels_last, one image size (ours: float32, the Oxford/Paris sizes)
    "extract_images_per_s": 101.0,
}
#: database images and queries (Revisited Oxford / Paris ground truth)
BENCHMARK_SIZES = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}
#: the cross split of rparis6k (data=paris_to_oxford): 2329 landmark images of 11 landmarks (junk and the 34 images
#: positive of two landmarks left out; computed with oxford_ir.benchmarks.splits.build_split from gnd_rparis6k.pkl),
#: batches of 8 landmarks x 4 images + 8 distractors, ceil(2329 / 32) = 73 batches an epoch
PARIS_TRAIN_IMAGES = 2329
PARIS_BATCH = (8 * 4, 8)
EPOCHS = 30
#: the archives' sizes (conf/data/paris_to_oxford.yaml: "2.5 GB + 1.8 GB"), and an assumed 100 Mbit/s
DOWNLOAD_GB = {"paris6k": 2.5, "oxford5k": 1.8}
ASSUMED_MB_PER_S = 12.5


# -- the plan: what each mode runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """What differs between the real run and the dry one; the pipeline is the same."""

    dry: bool
    out: Path
    #: benchmark name per role: "oxford" (evaluated, never trained on) and "paris" (the training data)
    benchmarks: dict[str, str]
    #: paths.data_dir per role
    data_dirs: dict[str, Path]
    image_size: int
    train_overrides: tuple[str, ...]
    #: extraction overrides of every oxford-ir-eval / index command (device, decoding)
    extraction: tuple[str, ...] = ()
    #: overrides of oxford-ir-eval per role (it writes the synthetic benchmark when its folder does not match)
    eval_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    qe_n: int = DEFAULT_QE_N
    dba_n: int = DEFAULT_DBA_N
    checkpoint: str = "last"


def real_setting(out: Path, data: Path, *, qe_n=DEFAULT_QE_N, dba_n=DEFAULT_DBA_N, checkpoint="last", extra=()):
    return Setting(
        dry=False,
        out=out,
        benchmarks={"oxford": "roxford5k", "paris": "rparis6k"},
        data_dirs={"oxford": data, "paris": data},
        image_size=1024,
        train_overrides=(
            "experiment=gem_resnet50",
            "trainer=gpu",
            "logger=csv",
            "whitening=learned",
            f"paths.data_dir={data}",
            *extra,
        ),
        # the published pixels: PIL decoding (bucket batching gives the exact-shape embeddings to ~1e-7)
        extraction=("extraction.decode=cpu", "extraction.num_workers=8"),
        qe_n=qe_n,
        dba_n=dba_n,
        checkpoint=checkpoint,
    )


#: the dry run's training: the quickstart recipe, shortened (3 epochs x 10 batches), on the CPU
DRY_TRAINING = (
    "experiment=quickstart",
    "logger=csv",
    "whitening=learned",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=3",
    "data.batches_per_epoch=10",
    "validate_before_training=false",
    # validation with a whitening needs a split whose training images are no evaluated query's positives
    "data.split=landmarks",
    "data.n_held_out=3",
    "data.classes_per_batch=5",
)
#: synthetic seeds: the training data (standing for Paris) and the evaluated benchmark (standing for Oxford)
DRY_SEEDS = {"paris": 0, "oxford": 1}
#: the synthetic benchmark's evaluation size (conf/data/synthetic.yaml: eval_image_size; its photos are 160 px)
DRY_IMAGE_SIZE = 128


def dry_setting(out: Path, *, qe_n=DEFAULT_QE_N, dba_n=DEFAULT_DBA_N, checkpoint="last", extra=()):
    data = {role: out / "data" / ("train" if role == "paris" else "eval") for role in ("oxford", "paris")}
    return Setting(
        dry=True,
        out=out,
        benchmarks={"oxford": "rsynthetic", "paris": "rsynthetic"},
        data_dirs=data,
        image_size=DRY_IMAGE_SIZE,
        train_overrides=(*DRY_TRAINING, f"paths.data_dir={data['paris']}", f"data.synthetic.seed={DRY_SEEDS['paris']}")
        + tuple(extra),
        extraction=("extraction.device=cpu",),
        eval_overrides={role: (f"synthetic.seed={seed}",) for role, seed in DRY_SEEDS.items()},
        qe_n=qe_n,
        dba_n=dba_n,
        checkpoint=checkpoint,
    )


@dataclass(frozen=True)
class Row:
    """One line of the table: what was evaluated and how."""

    role: str  # oxford | paris
    scales: str  # single | multi
    whitening: str  # none | learned
    reranking: str  # none | qe | dba+qe, or "-" for the refused whitening row


#: the row the published numbers correspond to: Revisited Oxford, multi-scale, no post-hoc whitening, no re-ranking
PUBLISHED_ROW = Row("oxford", "multi", "none", "none")


@dataclass(frozen=True)
class Step:
    """One command of the pipeline. ``run_dir``: its Hydra folder (``metrics.json`` there); ``done``: the step's
    completion marker (see :func:`finished_before`); ``needs``: steps that must have succeeded first."""

    name: str
    argv: tuple[str, ...]
    run_dir: Path | None = None
    done: Path | None = None
    needs: tuple[str, ...] = ()
    row: Row | None = None
    #: the step must be refused (exit status 2 with one ``error:`` line): the protocol guard it checks
    expect_refusal: bool = False


#: stands for the best checkpoint in the printed plan (its epoch is known only after training)
BEST_CKPT = "<train>/checkpoints/best-epochNNN.ckpt"


def _key(role: str, scales: str, whitening: str) -> str:
    return f"{role}-{SCALE_KEY[scales]}-{WHITENING_KEY[whitening]}"


def _list(values: Sequence[float]) -> str:
    return "[" + ",".join(str(float(v)) for v in values) + "]"


def data_steps(s: Setting) -> list[Step]:
    """Step 1: the datasets. Real: a download per dataset whose folder is not complete yet (skipped otherwise);
    dry: the two synthetic benchmarks (each reused as is when already written with the same parameters)."""
    if s.dry:
        return [
            Step(
                f"synthetic-{role}",
                ("oxford-ir-data", "synthetic", "--root", str(s.data_dirs[role] / "synthetic"), "--seed", str(seed)),
                done=s.data_dirs[role] / "synthetic" / ".complete.json",
            )
            for role, seed in sorted(DRY_SEEDS.items(), key=lambda item: item[1])
        ]
    from oxford_ir.benchmarks.download import dataset_dir, is_complete

    root = s.data_dirs["paris"]
    return [
        Step(
            f"download-{name}",
            ("oxford-ir-data", "download", name, "--root", str(root)),
            done=dataset_dir(name, root) / ".complete.json",
        )
        for name in ("paris6k", "oxford5k")
        if not is_complete(dataset_dir(name, root))
    ]


def _whitening_file(s: Setting, scales: str) -> Path:
    return s.out / "whitening" / f"{SCALE_KEY[scales]}.pt"


def _eval_argv(s: Setting, role: str, scales: str, ckpt: str, run_dir: Path) -> tuple[str, ...]:
    """``oxford-ir-eval`` of the role's benchmark with the learned whitening of the scale setting (learned from
    the checkpoint's training split and written to its file when absent, reused when present)."""
    return (
        "oxford-ir-eval",
        f"ckpt_path={ckpt}",
        f"benchmarks=[{s.benchmarks[role]}]",
        f"paths.data_dir={s.data_dirs[role]}",
        *s.eval_overrides.get(role, ()),
        f"extraction.image_size={s.image_size}",
        f"extraction.scales={_list(SCALES[scales])}",
        *s.extraction,
        "whitening=learned",
        f"whitening.file={_whitening_file(s, scales)}",
        f"hydra.run.dir={run_dir}",
    )


def _index_argv(s: Setting, role: str, scales: str, whitening: str, ckpt: str, out: Path) -> tuple[str, ...]:
    """``oxford-ir-index`` of the role's benchmark database with the checkpoint, scales and whitening."""
    white = ("whitening=learned", f"whitening.file={_whitening_file(s, scales)}") if whitening == "learned" else ()
    return (
        "oxford-ir-index",
        f"images=benchmark:{s.benchmarks[role]}",
        f"out={out}",
        f"ckpt_path={ckpt}",
        f"paths.data_dir={s.data_dirs[role]}",
        f"extraction.image_size={s.image_size}",
        f"extraction.scales={_list(SCALES[scales])}",
        *s.extraction,
        "index.dtype=float32",  # float32: exactly oxford-ir-eval's numbers (README, "Search")
        *(white or ("whitening=none",)),
        f"hydra.run.dir={s.out / 'runs' / f'index-{out.name}'}",
    )


def _rerank(s: Setting, reranking: str) -> tuple[str, ...]:
    qe = (f"query_expansion.n={s.qe_n}", f"query_expansion.alpha={QE_ALPHA:g}")
    dba = (f"database_augmentation.n={s.dba_n}", f"database_augmentation.alpha={QE_ALPHA:g}")
    return {"none": (), "qe": qe, "dba+qe": (*dba, *qe)}[reranking]


def plan(s: Setting, best_ckpt: str | Path = BEST_CKPT) -> list[Step]:
    """Every command of the pipeline, in order, without running anything. ``best_ckpt``: the checkpoint to
    evaluate (known after training; :data:`BEST_CKPT` stands for it before)."""
    out = s.out
    steps = data_steps(s)
    train_dir = out / "train"
    train = ("oxford-ir-train", *s.train_overrides, f"hydra.run.dir={train_dir}")
    steps.append(Step("train", train, train_dir, train_dir / "metrics.json", tuple(step.name for step in steps)))
    device = tuple(o for o in s.extraction if o.startswith("extraction.device="))
    for scales in SCALES:  # learn the whitening per scale setting (and evaluate the Oxford role with it)
        run_dir = out / "eval" / f"whitening-{SCALE_KEY[scales]}"
        argv = _eval_argv(s, "oxford", scales, str(best_ckpt), run_dir)
        steps.append(Step(f"whitening-{SCALE_KEY[scales]}", argv, run_dir, run_dir / "metrics.json", ("train",)))
    for role in ("oxford", "paris"):
        for scales in SCALES:
            # rparis6k with the whitening learned from the Paris training images is refused (checked once below)
            for whitening in WHITENINGS if role == "oxford" else ("none",):
                key = _key(role, scales, whitening)
                index = out / "index" / key
                needs = ("train", f"whitening-{SCALE_KEY[scales]}") if whitening == "learned" else ("train",)
                argv = _index_argv(s, role, scales, whitening, str(best_ckpt), index)
                steps.append(Step(f"index-{key}", argv, done=index / "CURRENT", needs=needs))
                for reranking in RERANKINGS:
                    name = f"{key}-{reranking.replace('+', '-')}"
                    run_dir = out / "search" / name
                    argv = (
                        "oxford-ir-search",
                        f"index={index}",
                        f"benchmark={s.benchmarks[role]}",
                        f"paths.data_dir={s.data_dirs[role]}",
                        *_rerank(s, reranking),
                        *device,
                        f"hydra.run.dir={run_dir}",
                    )
                    row = Row(role, scales, whitening, reranking)
                    steps.append(
                        Step(f"search-{name}", argv, run_dir, run_dir / "metrics.json", (f"index-{key}",), row)
                    )
    # the guard: the whitening learned from the Paris training images, evaluated on rparis6k, must be refused
    # (oxford-ir-eval checks it before it embeds anything; oxford-ir-search does the same for an index)
    argv = _eval_argv(s, "paris", "single", str(best_ckpt), out / "runs" / "refused-paris-lw")
    row = Row("paris", "single", "learned", "-")
    steps.append(Step("refused-paris-lw", argv, needs=("whitening-ss",), row=row, expect_refusal=True))
    return steps


# -- the GPU cost estimate ------------------------------------------------------------------------------------


def gpu_estimate(
    train_images_per_s: float = H200["train_images_per_s"],
    extract_images_per_s: float = H200["extract_images_per_s"],
    *,
    epochs: int = EPOCHS,
    train_images: int = PARIS_TRAIN_IMAGES,
    batch: tuple[int, int] = PARIS_BATCH,
    sizes: dict[str, tuple[int, int]] = BENCHMARK_SIZES,
    n_multi: int = len(SCALES["multi"]),
    download_gb: float = sum(DOWNLOAD_GB.values()),
    mb_per_s: float = ASSUMED_MB_PER_S,
) -> dict[str, Any]:
    """Seconds of each part of the real run on one H200, from the measured throughputs (images/s).

    Extraction counts forward passes: a multi-scale image is ``n_multi`` passes (an upper bound: the smaller
    scales have 1/2 and 1/4 of the pixels), a single-scale one 1. Parts: training steps; validation after every
    epoch and of the best checkpoint at the end (Revisited Oxford, multi-scale, as gem_resnet50 does, and with
    whitening=learned the Paris training images the whitening is learned from at every validation); learning
    the whitening (the Paris training images once per scale setting) with the Revisited Oxford evaluation of the
    same oxford-ir-eval run; indexing (Oxford with and without whitening, Paris without, both scale settings);
    the queries of the 3 searches of every index.
    """
    landmarks, distractors = batch
    batches = math.ceil(train_images / landmarks)
    (oxf_db, oxf_q), (par_db, par_q) = sizes["roxford5k"], sizes["rparis6k"]
    passes = 1 + n_multi  # single + multi
    counts = {
        "training": epochs * batches * (landmarks + distractors),
        "validation": (epochs + 1) * (oxf_db + oxf_q + train_images) * n_multi,
        "whitening": (train_images + oxf_db + oxf_q) * passes,
        "indexing": oxf_db * passes * 2 + par_db * passes,
        "queries": len(RERANKINGS) * (oxf_q * passes * 2 + par_q * passes),
    }
    seconds = {
        part: n / (train_images_per_s if part == "training" else extract_images_per_s) for part, n in counts.items()
    }
    lines = [
        f"training    {epochs} epochs x {batches} batches (ceil({train_images} / {landmarks})) x "
        f"{landmarks + distractors} images = {counts['training']:,} images / {train_images_per_s:g} images/s "
        f"= {seconds['training']:,.0f} s",
        f"validation  ({epochs} + 1) x ({oxf_db + oxf_q} Oxford + {train_images} Paris for the whitening) x "
        f"{n_multi} scales = {counts['validation']:,} passes / {extract_images_per_s:g} images/s "
        f"= {seconds['validation']:,.0f} s",
        f"whitening   ({train_images} Paris + {oxf_db + oxf_q} Oxford) x (1 + {n_multi}) = {counts['whitening']:,} "
        f"passes = {seconds['whitening']:,.0f} s",
        f"indexing    {oxf_db} x (1 + {n_multi}) x 2 whitenings + {par_db} x (1 + {n_multi}) = "
        f"{counts['indexing']:,} passes = {seconds['indexing']:,.0f} s",
        f"queries     {len(RERANKINGS)} searches x ({oxf_q} x {passes} x 2 + {par_q} x {passes}) = "
        f"{counts['queries']:,} passes = {seconds['queries']:,.0f} s",
    ]
    gpu = sum(seconds.values())
    download = download_gb * 1000 / mb_per_s
    return {
        "counts": counts,
        "seconds": seconds,
        "gpu_s": gpu,
        "download_s": download,
        "total_s": gpu + download,
        "lines": lines,
        "summary": f"GPU {gpu / 3600:.1f} h ({gpu:,.0f} s) + download {download_gb:g} GB "
        f"({download / 60:.0f} min at an assumed {mb_per_s * 8:g} Mbit/s) = {(gpu + download) / 3600:.1f} h",
    }


def format_estimate(estimate: dict[str, Any]) -> str:
    return "\n".join(
        [
            "Estimated cost of the real run on one H200 (throughputs measured in experiments/README.md, 'GPU': "
            f"training {H200['train_images_per_s']:g} images/s ('no cache' row), extraction at 1024 px "
            f"{H200['extract_images_per_s']:g} images/s; bf16 there, float32 extraction here):",
            *(f"  {line}" for line in estimate["lines"]),
            f"  total: {estimate['summary']}; plus about 30 process starts and cuDNN plans (minutes)",
        ]
    )


# -- running ----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # ok | done (an earlier run) | refused | failed | skipped
    seconds: float = 0.0
    message: str = ""
    returncode: int | None = None


def executable(name: str) -> str:
    """The console script of this environment (beside its python), else the one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def error_line(text: str) -> str:
    """The ``error:`` line a command printed last, else its last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1]


def finished_before(step: Step) -> bool:
    """Whether ``step`` finished in an earlier run, told by its own completion marker ``step.done``, never by its
    having started: an index folder's ``CURRENT`` must name a version that loads and is complete (an index build
    killed after a checkpoint leaves ``CURRENT`` naming that checkpoint, ``complete: false``, which lacks images:
    the step runs again and resumes it); any other marker (``metrics.json``, ``.complete.json``, written last and
    whole by their commands) must hold a JSON object."""
    marker = step.done
    if marker is None or not marker.is_file():
        return False
    if marker.name == "CURRENT":
        from oxford_ir.errors import OxfordIRError
        from oxford_ir.retrieval.index_format import RetrievalIndex

        try:
            return RetrievalIndex.load(marker.parent, mmap=True, warn_incomplete=False).complete
        except (OxfordIRError, OSError, ValueError):
            return False
    try:
        return isinstance(json.loads(marker.read_bytes()), dict)
    except (OSError, ValueError):
        return False


def run_step(step: Step, log_dir: Path, reuse: bool = True) -> Outcome:
    """Run ``step``, its output into ``log_dir/<name>.log``; with ``reuse``, a step that finished before
    (:func:`finished_before`) is not run again ("done")."""
    argv = list(step.argv)
    if reuse and finished_before(step):
        return Outcome("done", message=f"finished before ({step.done.name} complete)")
    if step.name == "train" and (step.run_dir / "checkpoints" / "last.ckpt").exists():
        argv = ["oxford-ir-train", f"resume={step.run_dir}"]  # an interrupted training continues in its folder
    log = log_dir / f"{step.name}.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        handle.write("$ " + " ".join(argv) + "\n")
        handle.flush()
        proc = subprocess.run([executable(argv[0]), *argv[1:]], cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    message = error_line(log.read_text(errors="replace"))
    if step.expect_refusal:
        if proc.returncode == 2 and message.startswith("error:"):
            return Outcome("refused", seconds, message, proc.returncode)
        return Outcome("failed", seconds, f"expected a refusal, got exit status {proc.returncode}", proc.returncode)
    if proc.returncode != 0:
        return Outcome("failed", seconds, f"exit status {proc.returncode}: {message}", proc.returncode)
    return Outcome("ok", seconds, "", 0)


def chosen_checkpoint(train_dir: Path, which: str = "last") -> Path:
    """``last.ckpt`` of the training run, or with ``which="best"`` its ``best-epochNNN.ckpt`` (the newest when
    several)."""
    folder = train_dir / "checkpoints"
    if which == "last":
        return folder / "last.ckpt"
    found = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{folder}: no best-*.ckpt (did training validate?); use --checkpoint last")
    return found[-1]


def run_plan(
    steps: list[Step], log_dir: Path, jobs: int, outcomes: dict[str, Outcome], total: int | None = None
) -> None:
    """Run ``steps`` in order, ``jobs`` at a time, each once every step it needs succeeded (a step whose need failed
    is skipped); prints one line per step."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = [step for step in steps if step.name not in outcomes]
    total = total or len(steps)
    good = ("ok", "done")
    running: dict[Any, Step] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            for step in list(pending):
                if len(running) >= max(1, jobs):
                    break
                failed = [n for n in step.needs if n in outcomes and outcomes[n].status not in good]
                if failed:
                    outcomes[step.name] = Outcome("skipped", message=f"{failed[0]} did not succeed")
                    pending.remove(step)
                    _report(step, outcomes[step.name], len(outcomes), total)
                elif all(n in outcomes for n in step.needs if n in {s.name for s in steps}):
                    # a finished step is reused only when nothing it needs ran again
                    reuse = all(outcomes[n].status == "done" for n in step.needs if n in outcomes)
                    running[pool.submit(run_step, step, log_dir, reuse)] = step
                    pending.remove(step)
            if not running:
                if pending:  # nothing can start: a step needs one that is not in the plan
                    for step in pending:
                        outcomes[step.name] = Outcome("skipped", message=f"needs {', '.join(step.needs)}")
                    pending.clear()
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                step = running.pop(future)
                outcomes[step.name] = future.result()
                _report(step, outcomes[step.name], len(outcomes), total)


def _report(step: Step, outcome: Outcome, number: int, total: int) -> None:
    what = f"{outcome.status} ({outcome.seconds:.1f} s)" if outcome.seconds else outcome.status
    detail = f": {outcome.message}" if outcome.message and outcome.status != "done" else ""
    print(f"[{number:>2}/{total}] {step.name:<28} {what}{detail}", flush=True)


# -- the table ----------------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path | None, benchmark: str) -> dict[str, float] | None:
    """E/M/H mAP in percent from a run's ``metrics.json``, or None."""
    path = None if run_dir is None else run_dir / "metrics.json"
    if path is None or not path.exists():
        return None
    metrics = json.loads(path.read_text())["metrics"]
    values = {p: metrics.get(f"{benchmark}/{p}/mAP") for p in "EMH"}
    return None if any(v is None for v in values.values()) else {p: 100 * v for p, v in values.items()}


def row_labels(s: Setting, row: Row) -> dict[str, str]:
    """How a row is named in the table: benchmark (with the seen-in-training mark), scales, whitening, re-ranking."""
    name = s.benchmarks[row.role]
    if s.dry:
        if row.role == "paris":
            benchmark = f"{name} (training data, as rparis6k; trained on it: not comparable)"
        else:
            benchmark = f"{name} (seed {DRY_SEEDS['oxford']}, as roxford5k)"
    else:
        benchmark = name if row.role == "oxford" else f"{name} (trained on Paris: not comparable)"
    rerank = {
        "none": "none",
        "qe": f"αQE n={s.qe_n}",
        "dba+qe": f"DBA n={s.dba_n} + αQE n={s.qe_n}",
        "-": "-",
    }[row.reranking]
    scales = f"{row.scales} {_list(SCALES[row.scales])}"
    return {"benchmark": benchmark, "scales": scales, "whitening": row.whitening, "reranking": rerank}


def published_cell(s: Setting, row: Row) -> str:
    """The published numbers on the row they correspond to (Revisited Oxford, multi-scale, no post-hoc whitening,
    no re-ranking); "n/a (synthetic)" there in the dry run; empty elsewhere."""
    if row != PUBLISHED_ROW:
        return ""
    return "n/a (synthetic)" if s.dry else " / ".join(f"{p} {v:.1f}" for p, v in PUBLISHED["roxford5k"].items())


def build_rows(s: Setting, steps: list[Step], outcomes: dict[str, Outcome]) -> list[dict[str, Any]]:
    rows = []
    for step in steps:
        if step.row is None:
            continue
        outcome = outcomes.get(step.name, Outcome("not run"))
        values = read_metrics(step.run_dir, s.benchmarks[step.row.role]) if outcome.status in ("ok", "done") else None
        status = outcome.status if values is not None or outcome.status not in ("ok", "done") else "failed"
        note = outcome.message
        if step.expect_refusal:
            note = (
                "not evaluated: the whitening is learned from the Paris training images, which hold these queries' "
                f"positives; the project refuses it ({'refused' if status == 'refused' else 'NOT refused'}: "
                f"{outcome.message})"
            )
        elif values is None and not note:
            note = "no metrics.json"
        rows.append(
            {
                "key": asdict(step.row),
                **row_labels(s, step.row),
                "E": None if values is None else values["E"],
                "M": None if values is None else values["M"],
                "H": None if values is None else values["H"],
                "published": published_cell(s, step.row),
                "status": status,
                "note": note if status != "ok" and status != "done" else "",
                "run_dir": None if step.run_dir is None else str(step.run_dir),
            }
        )
    return rows


def whitening_checks(s: Setting, steps: list[Step]) -> dict[str, dict[str, float] | None]:
    """E/M/H mAP of the oxford-ir-eval runs that learned the whitening (they evaluate the Oxford role with it)."""
    return {
        step.name: read_metrics(step.run_dir, s.benchmarks["oxford"])
        for step in steps
        if step.name.startswith("whitening-")
    }


def format_table(s: Setting, rows: list[dict[str, Any]], checks: dict[str, Any] | None = None) -> str:
    """The Markdown table: a row per benchmark x scales x whitening x re-ranking, E/M/H mAP, published; then the
    footnotes, the rows' notes (refusals, failures) and the whitening runs' own evaluation (a check of the index
    path: the learned-whitening rows without re-ranking should give the same numbers)."""
    title = "published (cnnimageretrieval-pytorch)" if not s.dry else "published"
    lines = [
        f"| benchmark | scales | whitening | re-ranking | E mAP | M mAP | H mAP | {title} |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        cells = [f"{row[p]:.2f}" for p in "EMH"] if row["M"] is not None else [row["status"], "", ""]
        published = row["published"] + (" (a)" if row["published"] and not s.dry else "")
        lines.append(
            f"| {row['benchmark']} | {row['scales']} | {row['whitening']} | {row['reranking']} | "
            + " | ".join(cells)
            + f" | {published} |"
        )
    notes = [f"- {row['benchmark']}, {row['scales']}, {row['whitening']}: {row['note']}" for row in rows if row["note"]]
    chosen = {
        "last": "the last epoch's",
        "best": "the best by val/mAP, the Medium mAP of the held-out landmarks of the training data's rsynthetic"
        if s.dry
        else "the best by val/mAP, which is Revisited Oxford's Medium mAP: chosen on the evaluated benchmark, so "
        "optimistic (--checkpoint last avoids it)",
    }[s.checkpoint]
    footer = ["", f"mAP in % (Revisited protocol, junk ignored); image size {s.image_size} px; checkpoint: {chosen}"]
    if s.dry:
        footer.append(
            "dry run: the synthetic benchmark on the CPU, a shortened quickstart training; its numbers say only that "
            "every step ran"
        )
    else:
        footer.append(f"(a) {PUBLISHED_NOTE}")
    found = {name: values for name, values in (checks or {}).items() if values}
    if found:
        footer.append(
            "check, oxford-ir-eval with the learned whitening (E/M/H): "
            + "; ".join(
                f"{name.removeprefix('whitening-')} " + " / ".join(f"{values[p]:.2f}" for p in "EMH")
                for name, values in found.items()
            )
        )
    return "\n".join([*lines, *footer, *notes])


def write_results(s: Setting, steps, outcomes, rows, table: str, wall_s: float, estimate) -> dict[str, Any]:
    results = {
        "mode": "dry" if s.dry else "real",
        "out": str(s.out),
        "wall_s": wall_s,
        "published": {
            "values": PUBLISHED,
            "row": asdict(PUBLISHED_ROW),
            "note": PUBLISHED_NOTE,
        },
        "rows": rows,
        "whitening_checks": whitening_checks(s, steps),
        "steps": [
            {"name": step.name, "argv": list(step.argv), **asdict(outcomes.get(step.name, Outcome("not run")))}
            for step in steps
        ],
        "gpu_estimate": {k: v for k, v in estimate.items() if k != "lines"},
    }
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "table.md").write_text(table + "\n")
    (s.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


# -- the command ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="the synthetic benchmark on the CPU (minutes)")
    parser.add_argument("--out", type=Path, help="output folder (default: logs/reproduce/[dry-]<time>)")
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("OXFORD_IR_DATA", "data")), help="data folder (real mode)"
    )
    parser.add_argument("--estimate", action="store_true", help="print the GPU cost estimate and exit")
    parser.add_argument("--plan", action="store_true", help="print the commands and exit")
    parser.add_argument("--jobs", type=int, help="steps run at once (default: 2 dry, 1 real)")
    parser.add_argument("--qe-n", type=int, default=DEFAULT_QE_N, help="alpha-QE neighbours (default 2)")
    parser.add_argument("--dba-n", type=int, default=DEFAULT_DBA_N, help="DBA neighbours (default 2)")
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="last",
        help="last (default: the published protocol selects nothing on the test set) or best by val/mAP",
    )
    parser.add_argument(
        "--train-override", action="append", default=[], metavar="KEY=VALUE", help="extra oxford-ir-train override"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    estimate = gpu_estimate()
    print(format_estimate(estimate), flush=True)
    if args.estimate:
        return 0
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = (args.out or REPO / "logs" / "reproduce" / (f"dry-{stamp}" if args.dry else stamp)).resolve()
    options = {"qe_n": args.qe_n, "dba_n": args.dba_n, "checkpoint": args.checkpoint, "extra": args.train_override}
    s = dry_setting(out, **options) if args.dry else real_setting(out, args.data.resolve(), **options)
    steps = plan(s)
    if args.plan:
        print("\n".join(" ".join(step.argv) for step in steps))
        return 0
    print(f"\n{'dry run' if s.dry else 'real run'}: {len(steps)} steps into {out}", flush=True)
    started = time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    jobs = args.jobs or (2 if s.dry else 1)
    first = [step for step in steps if step.name.startswith(("download-", "synthetic-")) or step.name == "train"]
    run_plan(first, out / "logs", jobs, outcomes, total=len(steps))
    if outcomes["train"].status in ("ok", "done"):
        try:
            best = chosen_checkpoint(out / "train", s.checkpoint)
            print(f"evaluating {best}", flush=True)
            steps = plan(s, best)
        except FileNotFoundError as error:
            outcomes["train"] = Outcome("failed", message=str(error))
    run_plan(steps, out / "logs", jobs, outcomes)
    wall = time.perf_counter() - started
    rows = build_rows(s, steps, outcomes)
    table = format_table(s, rows, whitening_checks(s, steps))
    write_results(s, steps, outcomes, rows, table, wall, estimate)
    print(f"\n{table}\n\nwall time {wall / 60:.1f} min; {out / 'table.md'}, {out / 'results.json'}")
    bad = [name for name, o in outcomes.items() if o.status not in ("ok", "done", "refused")]
    if bad:
        print(f"{len(bad)} step(s) did not succeed: {', '.join(bad)} (logs in {out / 'logs'})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
