"""The run's checkpoints: ``last.ckpt`` after every epoch, and a run folder that can be copied or moved.

Lightning's ``ModelCheckpoint`` (2.6) rewrites ``last.ckpt`` only when it also saved a top-k checkpoint at that
step: with ``monitor=val/mAP, save_top_k=1`` an epoch that does not improve leaves ``last.ckpt`` at the best epoch,
so a run killed later resumes from there and trains those epochs again. And when a checkpoint is restored into
another folder (a copied run folder), Lightning keeps none of the stored paths but ``best_model_path``, which still
points into the old folder, and saves the next ``last.ckpt`` as ``last-v1.ckpt`` beside the copied one, which the
next resume then picks up, stale. :class:`RunCheckpoint` fixes both, and keeps the metrics logged by the time of
each checkpoint, so that a run resumed after its last epoch (killed while it evaluated the best checkpoint or wrote
its results) reports the same final metrics as an uninterrupted one.

Two more things it does not leave to Lightning. A stop in the middle of an epoch (Ctrl-C, an error) saves nothing:
Lightning's ``save_on_exception`` would overwrite ``last.ckpt`` with a mid-epoch state that a resume does not
continue exactly, and save it as ``best-epochNNN.ckpt`` although that epoch was never validated; ``last.ckpt``
stays the end of the last whole epoch, which a resume continues exactly. And checkpoints are written by
:class:`AtomicCheckpointIO` (a temp file beside the checkpoint, fsynced, renamed over it) instead of fsspec's
transaction, which writes a temp file under ``/tmp`` and, on another file system, copies it into the final name:
a full disk then left a 0-byte or partial checkpoint under that name, named by the error as the temp file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from oxford_ir.errors import NO_ROOM, ResourceError
from oxford_ir.fs import replace_file

log = logging.getLogger(__name__)

#: the callback-state fields of ModelCheckpoint that hold paths of checkpoint files
PATH_FIELDS = ("best_model_path", "kth_best_model_path", "last_model_path")
#: a checkpoint being written is ``<name>.tmp`` beside it (:func:`oxford_ir.fs.replace_file`) until it is whole
TEMP_SUFFIX = ".tmp"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing each checkpoint whole or not at all beside its final name.

    The checkpoint is serialised in memory (as Lightning does), written to ``<name>.tmp`` in the same folder, fsynced
    and renamed over ``<name>`` (:func:`oxford_ir.fs.replace_file`): a failed write (full disk, file-size limit,
    Ctrl-C) leaves the previous file of that name as it was and no temp file, and its error names ``<name>``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            replace_file(path, buffer.getbuffer(), temp=path.with_name(path.name + TEMP_SUFFIX))
        except OSError as error:
            if error.errno is None:
                raise
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), os.fspath(path)) from error


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves ``last.ckpt`` at the end of every epoch and follows a moved run folder.

    ``restored_metrics``: the metrics logged when the checkpoint a run resumed from was saved (empty otherwise).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.restored_metrics: dict[str, float] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the parent's saves (top-k, and ``last.ckpt`` when it saved one), ``last.ckpt`` of this epoch.

        Here, not at the end of validation: the epoch's validation has run by now, and a validation in the middle
        of an epoch (``val_check_interval < 1``) must not leave a mid-epoch ``last.ckpt`` that a resume could not
        continue exactly. The parent skips a step it has saved at; so does this.
        """
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Save nothing on Ctrl-C or an error (whatever ``save_on_exception`` says): ``last.ckpt`` stays the end of
        the last whole epoch, the state a resume continues exactly, and no ``best-*`` is written for an epoch that
        was not validated. What the stop cut short is trained again by ``resume=``."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer
        if self.save_on_exception:
            log.info("RunCheckpoint: save_on_exception is ignored (a mid-epoch state does not resume exactly)")
        # checkpoints written whole or not at all, beside their final name (not through a temp file under /tmp)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            for left in Path(self.dirpath).glob(f"*.ckpt{TEMP_SUFFIX}"):  # of a process killed while it wrote
                with contextlib.suppress(OSError):
                    left.unlink()

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()} if trainer is not None else {}
        return {**super().state_dict(), "logged_metrics": logged}

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        """The parent's save (:class:`AtomicCheckpointIO`); a write that ran out of room is one line naming the
        checkpoint and the run folder to resume (:class:`~oxford_ir.errors.ResourceError`)."""
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as error:
            reason = NO_ROOM.get(errno.errorcode.get(error.errno or 0, ""))
            if reason is None:
                if error.filename is not None or error.errno is None:
                    raise
                raise OSError(error.errno, error.strerror or os.strerror(error.errno), filepath) from error
            run = Path(filepath).parent.parent if Path(filepath).parent.name == "checkpoints" else None
            then = f"continue the run with oxford-ir-train resume={run}" if run else "run the same command again"
            raise ResourceError(
                f"{reason} writing the checkpoint {filepath}: free space (or raise the limit), then {then}; the "
                "checkpoints saved before are kept and nothing half-written is left"
            ) from error

    @staticmethod
    def _link_checkpoint(trainer: pl.Trainer, filepath: str, linkpath: str) -> None:
        """``save_last="link"``: ``linkpath`` made a link to ``filepath`` (a copy where links are refused) under a
        temp name, then renamed over the old one: never missing, never a partial copy (the parent removes the old
        link first and copies in place)."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            link = Path(linkpath)
            temp = link.with_name(link.name + TEMP_SUFFIX)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            try:
                os.symlink(os.path.relpath(filepath, link.parent), temp)
                os.replace(temp, link)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                replace_file(link, Path(filepath).read_bytes(), temp=temp)
        trainer.strategy.barrier()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stored paths relative to this folder when the checkpoint was written in another one."""
        self.restored_metrics = dict(state_dict.get("logged_metrics") or {})
        stored = state_dict.get("dirpath")
        if stored and self.dirpath and Path(stored) != Path(self.dirpath):
            state_dict = moved_state(state_dict, Path(stored), Path(self.dirpath))
        super().load_state_dict(state_dict)


def moved_state(state: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """``ModelCheckpoint`` state whose files under ``old`` now live under ``new`` (a copied or moved run folder).

    A path is carried over only when its file exists in ``new``; files that do not (a new run started from another
    run's checkpoint) are dropped, with the score they held, so nothing of this run refers to another folder.
    """

    def here(path: str | None) -> str:
        if not path:
            return ""
        candidate = new / Path(path).name
        return str(candidate) if Path(path).parent == old and candidate.is_file() else ""

    moved = {**state, "dirpath": str(new)}
    for field in PATH_FIELDS:
        moved[field] = here(state.get(field))
    best_k = {here(path): score for path, score in (state.get("best_k_models") or {}).items()}
    moved["best_k_models"] = {path: score for path, score in best_k.items() if path}
    if not moved["best_model_path"]:
        moved["best_model_score"] = None
        moved["best_k_models"] = {}
        moved["kth_best_model_path"] = ""
        moved.pop("kth_value", None)  # the callback keeps its initial value (no model ranked yet)
    return moved
