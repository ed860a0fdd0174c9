"""``make reproduce RECIPE=<name>``: a published recipe end to end, its table printed beside the published numbers.

    .venv/bin/python experiments/recipes.py --recipe cirtorch_sfm120k_r101            # GPU + internet
    .venv/bin/python experiments/recipes.py --recipe gldv2_r50_arcface --dry          # the same steps, CPU, miniatures
    .venv/bin/python experiments/recipes.py --recipe dinov2_vitl14 --plan             # the commands only
    .venv/bin/python experiments/recipes.py --estimate                                # GPU-hours of every recipe

Recipes (each a ``conf/experiment`` file, whose comment carries the numbers it should approach, or for the
off-the-shelf model a set of ``oxford-ir-eval`` overrides):

- ``cirtorch_sfm120k_r101`` / ``cirtorch_sfm120k_r50``: cnnimageretrieval-pytorch's training (ResNet-101/50 + GeM on
  retrieval-SfM-120k, pool-mined tuples, contrastive loss), evaluated multi-scale with a learned whitening;
- ``gldv2_r50_arcface``: a DELG-global-like ResNet-50 + GeM trained with ArcFace on GLDv2-clean;
- ``dinov2_vitl14``: DINOv2 ViT-L/14 from timm, off the shelf (no training), its CLS token.

Real mode (``logs/recipes/<recipe>-<time>/``, data in ``--data``): ``oxford-ir-data download`` of what the recipe
needs (GLDv2: ``--gldv2-parts``, all 500 by default), ``oxford-ir-train experiment=<recipe> trainer=gpu logger=csv``
(an interrupted training resumes with ``resume=`` on a rerun), then ``oxford-ir-eval`` of its last checkpoint on
Revisited Oxford and Paris at 1024 px, multi-scale; the table (``table.md``, ``results.json``) shows E/M/H mAP
beside the published M/H. Dry mode (``--dry``) runs the same commands on the CPU: the training data is the
miniature of its real format (SfM-120k written in its layout, GLDv2 fetched by the real downloader from a ``file://``
mirror), the backbone a random-initialised small timm model, a few steps, and the synthetic ``rsynthetic`` stands
for both Revisited benchmarks; its numbers say only that every step runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from reproduce import H200, REPO, Outcome, Step, run_plan  # experiments/, beside this script

#: Revisited Oxford / Paris database + queries, embedded once per scale by the evaluation
EVAL_IMAGES = (4993 + 70) + (6322 + 70)
#: cnnimageretrieval-pytorch's multi-scale test (test.py --multiscale '[1, 1/2**(1/2), 2**(1/2)]')
MULTI_SCALE = "[1.0,0.7071,1.4142]"
#: forward cost relative to the measured ResNet-50 (H200 rows of experiments/README.md), from the models' FLOPs at
#: the same input size (timm's model cards: ResNet-50 4.1, ResNet-101 7.8 GMACs at 224 px; ViT-L/14 at 1024 px
#: about 17x a ResNet-50's 1024 px pass, attention over 5,329 tokens included): scaled, not measured
COST = {"resnet50": 1.0, "resnet101": 7.8 / 4.1, "vit_large_patch14_dinov2": 17.0}


@dataclass(frozen=True)
class Recipe:
    name: str
    #: one line: what is trained how
    what: str
    #: the published numbers it should approach, and where they come from
    published: dict[str, dict[str, float]]
    source: str
    #: ``oxford-ir-data download`` targets of the real run (gldv2 gets --parts)
    downloads: tuple[str, ...]
    #: oxford-ir-train overrides (None: evaluated off the shelf with ``model``)
    train: tuple[str, ...] | None
    #: oxford-ir-eval overrides naming the model when there is no training
    model: tuple[str, ...] = ()
    whitening: str = "none"
    #: the training's dry-mode overrides and the miniature it reads (sfm120k | gldv2 | none)
    dry_train: tuple[str, ...] = ()
    dry_model: tuple[str, ...] = ()
    miniature: str = "none"
    #: the GPU estimate: training images an epoch, epochs, images embedded for mining an epoch, the backbone's cost
    estimate: dict[str, Any] = field(default_factory=dict)


#: a random-initialised small timm CNN and the CPU sizes of the dry runs
DRY_CNN = ("backbone.name=resnet10t", "backbone.weights=none", "data.image_size=48", "data.eval_image_size=64")
DRY_TRAINING = (
    "trainer=default", "trainer.accelerator=cpu", "trainer.max_epochs=1", "data.num_workers=0",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "validate_before_training=false",
    "data.eval_batch_size=8", "data.extra_eval_benchmarks=[]",
)  # fmt: skip

#: the cirtorch recipes' dry training: the miniature's val part validates, a small pool
CIRTORCH_DRY = (*DRY_CNN, "data.eval_benchmark=null", "data.pool.qsize=12", "data.pool.poolsize=60",
                "data.pool.tuples_per_batch=2")  # fmt: skip

RECIPES = {
    "cirtorch_sfm120k_r101": Recipe(
        "cirtorch_sfm120k_r101",
        "ResNet-101 + GeM on retrieval-SfM-120k, pool-mined tuples (2,000 queries, 22,000 pool, 5 negatives), "
        "contrastive loss (margin 0.85), Adam 5e-7; multi-scale 1024 px + learned whitening",
        {"roxford5k": {"M": 65.4, "H": 40.1}, "rparis6k": {"M": 76.7, "H": 55.2}},
        "cnnimageretrieval-pytorch README, rSfM120k-tl-resnet101-gem (multi-scale, learned whitening)",
        ("sfm120k", "oxford5k", "paris6k"),
        ("experiment=cirtorch_sfm120k_r101",),
        whitening="learned",
        dry_train=CIRTORCH_DRY,
        miniature="sfm120k",
        estimate={"train_images": 2000 * 7, "epochs": 100, "mined": 2000 + 22000, "backbone": "resnet101"},
    ),
    "cirtorch_sfm120k_r50": Recipe(
        "cirtorch_sfm120k_r50",
        "the same with ResNet-50",
        {"roxford5k": {"M": 64.7, "H": 39.0}},
        "cnnimageretrieval-pytorch README, rSfM120k-tl-resnet50-gem-w (its ResNet-50 row: whitening learned end to "
        "end, not post hoc; the Paris numbers are not cited here)",
        ("sfm120k", "oxford5k", "paris6k"),
        ("experiment=cirtorch_sfm120k_r50",),
        whitening="learned",
        dry_train=CIRTORCH_DRY,
        miniature="sfm120k",
        estimate={"train_images": 2000 * 7, "epochs": 100, "mined": 2000 + 22000, "backbone": "resnet50"},
    ),
    "gldv2_r50_arcface": Recipe(
        "gldv2_r50_arcface",
        "ResNet-50 + GeM + 2048-d projection on GLDv2-clean with ArcFace (shuffled batches); single scale 1024 px",
        {"roxford5k": {"M": 73.6, "H": 51.0}, "rparis6k": {"M": 85.7, "H": 71.5}},
        "DELG (Cao et al., ECCV 2020), global feature, R50, GLDv2-clean (its multi-scale setting; trained far longer)",
        ("gldv2", "oxford5k", "paris6k"),
        ("experiment=gldv2_r50_arcface",),
        dry_train=(
            *DRY_CNN,
            "data.eval_benchmark=null",
            "data.benchmark=gldv2:min3:val6",
            "data.classes_per_batch=4",
            "data.images_per_class=3",
            "data.batches_per_epoch=4",
        ),  # fmt: skip
        miniature="gldv2",
        estimate={"train_images": 1_580_470, "epochs": 10, "mined": 0, "backbone": "resnet50"},
    ),
    "dinov2_vitl14": Recipe(
        "dinov2_vitl14",
        "DINOv2 ViT-L/14 (timm, LVD-142M weights) off the shelf: the CLS token, 1024 px, multi-scale",
        {"roxford5k": {"M": 75.1, "H": 54.0}, "rparis6k": {"M": 92.7, "H": 83.5}},
        "as reported by later papers evaluating DINOv2 ViT-L off the shelf (their resolutions and scales vary)",
        ("oxford5k", "paris6k"),
        None,
        model=(
            "backbone=timm",
            "backbone.name=vit_large_patch14_dinov2.lvd142m",
            "backbone.pool_tokens=cls",
            "pooling=avg",
        ),  # fmt: skip
        dry_model=(
            "backbone=timm",
            "backbone.name=vit_tiny_patch16_224",
            "backbone.weights=none",
            "backbone.img_size=64",
            "backbone.pool_tokens=cls",
            "pooling=avg",
        ),  # fmt: skip
        estimate={"train_images": 0, "epochs": 0, "mined": 0, "backbone": "vit_large_patch14_dinov2"},
    ),
}


def gpu_hours(recipe: Recipe) -> dict[str, float]:
    """Hours on one H200 from the measured ResNet-50 throughputs (:data:`reproduce.H200`: training at 362 px,
    extraction at 1024 px), scaled by the backbone's cost (:data:`COST`) and, for 362 px mining, by the pixels."""
    e, cost = recipe.estimate, COST[recipe.estimate["backbone"]]
    train_rate = H200["train_images_per_s"] / cost
    extract_1024 = H200["extract_images_per_s"] / cost
    extract_362 = extract_1024 * (1024 / 362) ** 2
    validation_per_epoch = (4993 + 70) / extract_1024 if e["epochs"] else 0.0  # ROxf, single scale, every epoch
    seconds = {
        "training": e["epochs"] * e["train_images"] / train_rate,
        "mining": e["epochs"] * e["mined"] / extract_362,
        "validation": e["epochs"] * validation_per_epoch,
        "evaluation": EVAL_IMAGES * 3 / extract_1024,
    }
    return {part: s / 3600 for part, s in seconds.items()} | {"total": sum(seconds.values()) / 3600}


# -- the steps ----------------------------------------------------------------------------------------------------
def dry_data(recipe: Recipe, data: Path) -> tuple[str, ...]:
    """Write the recipe's miniature under ``data``; the download step's arguments that fetch it (GLDv2: the real
    downloader from the miniature's ``file://`` mirror), or none."""
    if recipe.miniature == "sfm120k":
        from oxford_ir.benchmarks.miniature_sfm120k import write_miniature_sfm120k
        from oxford_ir.benchmarks.sfm120k import FOLDER

        if not (data / FOLDER).is_dir():
            write_miniature_sfm120k(data / FOLDER)
        return ()
    if recipe.miniature == "gldv2":
        from oxford_ir.benchmarks.miniature_gldv2 import write_miniature_gldv2

        mirror = write_miniature_gldv2(data.parent / "mirror", landmarks=30)
        return ("--parts", f"0-{mirror.parts - 1}", "--base-url", mirror.folder.as_uri(), "--no-progress")
    return ()


def plan(recipe: Recipe, out: Path, data: Path, dry: bool, gldv2_parts: str) -> list[Step]:
    steps: list[Step] = []
    downloads = ("gldv2",) if dry and recipe.miniature == "gldv2" else (() if dry else recipe.downloads)
    for name in downloads:
        extra = dry_data(recipe, data) if dry else (("--parts", gldv2_parts) if name == "gldv2" else ())
        steps.append(Step(f"download-{name}", ("oxford-ir-data", "download", name, "--root", str(data), *extra)))
    if dry and recipe.miniature == "sfm120k":
        dry_data(recipe, data)
    needs = tuple(step.name for step in steps)
    benchmarks = "[rsynthetic]" if dry else "[roxford5k,rparis6k]"
    common = (f"paths.data_dir={data}", f"benchmarks={benchmarks}")
    sizes = ("extraction.image_size=64", "extraction.device=cpu", "synthetic.preset=tiny") if dry else (
        "extraction.image_size=1024", f"extraction.scales={MULTI_SCALE}")  # fmt: skip
    model: tuple[str, ...] = recipe.dry_model if dry else recipe.model
    if recipe.train is not None:
        train_dir = out / "train"
        dry_eval = (
            ("data.eval_benchmark=rsynthetic", "+data.synthetic.preset=tiny") if recipe.miniature == "none" else ()
        )
        overrides = (*DRY_TRAINING, *recipe.dry_train, *dry_eval) if dry else ("trainer=gpu",)
        argv = ("oxford-ir-train", *recipe.train, "logger=csv", f"paths.data_dir={data}", *overrides,
                f"hydra.run.dir={train_dir}")  # fmt: skip
        steps.append(Step("train", argv, run_dir=train_dir, done=train_dir / "metrics.json", needs=needs))
        needs = ("train",)
        model = (f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",)
        if recipe.whitening == "learned":
            model += ("whitening=learned", f"whitening.file={out / 'whitening.pt'}")
    eval_dir = out / "eval"
    argv = ("oxford-ir-eval", *model, *common, *sizes, f"hydra.run.dir={eval_dir}")
    steps.append(Step("eval", argv, run_dir=eval_dir, done=eval_dir / "metrics.json", needs=needs))
    return steps


# -- the table ----------------------------------------------------------------------------------------------------
def table(recipe: Recipe, eval_dir: Path, dry: bool) -> tuple[str, dict[str, Any]]:
    path = eval_dir / "metrics.json"
    metrics = json.loads(path.read_text())["metrics"] if path.is_file() else {}
    lines = [
        f"# {recipe.name}: {recipe.what}",
        "",
        "| benchmark | E mAP | M mAP | H mAP | published M | published H |",
        "|---|---|---|---|---|---|",
    ]
    rows = {}
    for benchmark in ("rsynthetic",) if dry else ("roxford5k", "rparis6k"):
        got = {p: metrics.get(f"{benchmark}/{p}/mAP") for p in "EMH"}
        published = {} if dry else recipe.published.get(benchmark, {})
        rows[benchmark] = {"measured": got, "published": published}
        cells = [f"{100 * v:.1f}" if v is not None else "-" for v in got.values()]
        shown = [f"{published[p]:.1f}" if p in published else "-" for p in "MH"]
        label = f"{benchmark} (synthetic, stands for both)" if dry else benchmark
        lines.append(f"| {label} | " + " | ".join(cells + shown) + " |")
    lines += ["", f"published: {recipe.source}" + (" (not comparable with a dry run)" if dry else "")]
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES))
    parser.add_argument("--dry", action="store_true", help="the same steps on the CPU, on the miniatures")
    parser.add_argument("--plan", action="store_true", help="print the commands only")
    parser.add_argument("--estimate", action="store_true", help="print the GPU-hours of every recipe")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None, help="data folder (real mode; default data/)")
    parser.add_argument("--gldv2-parts", default="all", help="GLDv2 TARs to download (real mode), e.g. 0-99")
    args = parser.parse_args(argv)
    if args.estimate:
        print(
            "| recipe | training | mining | validation | evaluation | total (H200 hours) |\n|---|---|---|---|---|---|"
        )
        for recipe in RECIPES.values():
            h = gpu_hours(recipe)
            print(f"| {recipe.name} | " + " | ".join(f"{h[k]:.2f}" for k in list(h)) + " |")
        return 0
    if args.recipe is None:
        parser.error("--recipe is required (or --estimate)")
    recipe = RECIPES[args.recipe]
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = (args.out or REPO / "logs" / "recipes" / f"{recipe.name}{'-dry' if args.dry else ''}-{stamp}").resolve()
    data = (out / "data" if args.dry else (args.data or REPO / "data")).resolve()
    steps = plan(recipe, out, data, args.dry, args.gldv2_parts)
    if args.plan:
        print("\n".join(" ".join(step.argv) for step in steps))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    outcomes: dict[str, Outcome] = {}
    run_plan(steps, out / "logs", 1, outcomes)
    text, rows = table(recipe, out / "eval", args.dry)
    hours = gpu_hours(recipe)
    text += f"\n\nestimated on one H200 (scaled from the measured ResNet-50 throughputs): {hours['total']:.1f} h"
    (out / "table.md").write_text(text + "\n")
    results = {"recipe": recipe.name, "dry": args.dry, "rows": rows, "wall_s": time.perf_counter() - started,
               "steps": {name: outcome.status for name, outcome in outcomes.items()}, "estimate_h": hours}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    print(f"run folder: {out}")
    return 0 if all(o.status in ("ok", "done") for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
