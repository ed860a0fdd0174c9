"""Readers for every published form of the Oxford / Paris ground truth, by the form's shape.

Three forms circulate, and all of them end up as the same :class:`~oxford_ir.benchmarks.gt_record.GroundTruth`:

- the original text files (``gt_files_170407/``): ``<landmark>_<n>_query.txt`` holds
  ``oxc1_<image> x1 y1 x2 y2`` (Paris files have no ``oxc1_`` prefix), and
  ``_good.txt`` / ``_ok.txt`` / ``_junk.txt`` list one image name a line
  (:mod:`~oxford_ir.benchmarks.gt_text_files`);
- the ``gnd_<name>.pkl`` pickles of the Revisited Oxford/Paris code, for both the
  original (``ok``/``junk``) and the revisited (``easy``/``hard``/``junk``) protocol,
  opened by a restricted unpickler (:mod:`~oxford_ir.benchmarks.gnd_pickle`);
- the per-landmark JSON of the original project,
  ``{landmark: {"good": [...], "ok": [...], "junk": [...], "query": [...]}}``
  (:mod:`~oxford_ir.benchmarks.landmark_json`).

Text and JSON ground truth name images, which index into the dataset's image list (:func:`read_image_list`);
what every form checks, and how its errors name the place in the file, is in :mod:`~oxford_ir.benchmarks.gt_record`.
"""

from __future__ import annotations

from pathlib import Path

from oxford_ir.benchmarks.gnd_pickle import read_gnd_pickle
from oxford_ir.benchmarks.gt_record import GroundTruth
from oxford_ir.benchmarks.gt_text_files import read_gt_files, read_name_lines
from oxford_ir.benchmarks.landmark_json import read_landmark_json
from oxford_ir.errors import DataError, GroundTruthError
from oxford_ir.images import IMAGE_EXTENSIONS

IMLIST_NAME = "imlist.txt"
IMAGE_FOLDER = "jpg"


def read_image_list(dataset_dir: str | Path) -> tuple[list[str], Path]:
    """Database image names of a dataset folder and where they came from.

    ``imlist.txt`` when present (the published order), else the sorted names of the
    images in ``jpg/``. Raises :class:`DataError` when there is neither.
    """
    dataset_dir = Path(dataset_dir)
    listing = dataset_dir / IMLIST_NAME
    if listing.is_file():
        lines = read_name_lines(listing)
        if not lines:
            raise GroundTruthError(f"{listing}: the image list is empty; it lists one image name per line")
        first: dict[str, int] = {}
        for number, name in lines:
            if name in first:
                raise GroundTruthError(
                    f"{listing}:{number}: {name!r} is listed again (first on line {first[name]}); every image is "
                    "listed once"
                )
            first[name] = number
        return [name for _, name in lines], listing
    image_dir = dataset_dir / IMAGE_FOLDER
    names = (
        sorted({p.stem for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS})
        if image_dir.is_dir()
        else []
    )
    if not names:
        raise DataError(
            f"{dataset_dir}: no {IMLIST_NAME} and no images in {image_dir}; the text and JSON ground truth need "
            "the image list. Download the dataset (oxford-ir-data download <dataset> --root <data dir>)"
        )
    return names, image_dir


def read_ground_truth(path: str | Path, dataset_dir: str | Path | None = None) -> GroundTruth:
    """Read any form by its shape: a ``.pkl``, a ``.json``, or a folder of gt text files.

    Text and JSON ground truth index into the image list of ``dataset_dir`` (default:
    the folder holding ``path``), see :func:`read_image_list`.
    """
    path = Path(path)
    if not path.exists():
        raise GroundTruthError(f"{path}: ground-truth file not found")
    if path.is_file() and path.suffix.lower() == ".pkl":
        return read_gnd_pickle(path)
    if (path.is_file() and path.suffix.lower() == ".json") or path.is_dir():
        imlist, source = read_image_list(dataset_dir if dataset_dir is not None else path.parent)
        if path.is_dir():
            return read_gt_files(path, imlist, source)
        return read_landmark_json(path, imlist, source)
    raise GroundTruthError(
        f"{path}: unknown ground-truth form; give a gnd_<name>.pkl, a per-landmark .json or a folder of gt text files"
    )
