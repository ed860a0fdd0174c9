"""A Lightning callback that SIGKILLs its own process (or Ctrl-Cs it) at a chosen point of a run (fault injection).

Added to a real ``oxford-ir-train`` subprocess with ``+callbacks.kill._target_=tests.reliability.kill_training.
KillAt +callbacks.kill.point=<point> +callbacks.kill.at=<n>`` (the test sets ``PYTHONPATH`` to the repository).
SIGKILL, not an exception: nothing of the run's own clean-up (``save_on_exception``, ``finally``) runs.
``+callbacks.kill.signal=SIGINT`` sends SIGINT to the run's whole process group instead, as Ctrl-C in a terminal
does (the main process and its DataLoader workers; the fault tests start each command in a session of its own):
the run's clean-up then runs.

Points: ``train_batch`` (after optimizer step ``at``), ``validation`` (in the middle of the validation of epoch
``at`` while fitting), ``checkpoint`` (while the ``at``-th checkpoint of the run is being saved, before its file is
written), ``final_validation`` (when the evaluation of the best checkpoint after fitting starts).
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

POINTS = ("train_batch", "validation", "checkpoint", "final_validation")


class KillAt(pl.Callback):
    def __init__(self, point: str, at: int = 0, signal: str = "SIGKILL") -> None:
        if point not in POINTS:
            raise ValueError(f"point={point!r}: one of {POINTS}")
        if signal not in ("SIGKILL", "SIGINT"):
            raise ValueError(f"signal={signal!r}: SIGKILL or SIGINT")
        self.point, self.at, self.signal = point, int(at), signal
        self.checkpoints = 0
        self.sent = False

    def _die(self) -> None:
        if self.signal == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        elif not self.sent:  # once, like one Ctrl-C: the shutdown that follows may pass the same point again
            self.sent = True
            # the group only when this run leads it: never the test runner's own group
            own_group = os.getpgid(0) == os.getpid()
            os.killpg(os.getpid(), signal.SIGINT) if own_group else os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if self.point == "train_batch" and trainer.global_step == self.at:
            self._die()

    def on_validation_batch_end(self, trainer: pl.Trainer, *args) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if self.point == "validation" and fitting and trainer.current_epoch == self.at:
            self._die()

    def on_save_checkpoint(self, trainer: pl.Trainer, *args) -> None:
        self.checkpoints += 1
        if self.point == "checkpoint" and self.checkpoints == self.at:
            self._die()

    def on_validation_start(self, trainer: pl.Trainer, *args) -> None:
        if self.point == "final_validation" and trainer.state.fn == TrainerFn.VALIDATING and trainer.global_step > 0:
            self._die()
