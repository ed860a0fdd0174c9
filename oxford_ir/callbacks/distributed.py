"""Close the process group of spawned DDP workers in step, before they exit.

With ``strategy=ddp_spawn`` on gloo, a worker that leaves the process group to interpreter
shutdown while its peer is still tearing down aborts now and then ("terminate called without
an active exception", seen with torch 2.14 about one run in two). A barrier followed by an
explicit ``destroy_process_group`` at teardown removes the race. Processes of the subprocess
launcher (``strategy=ddp``) and SLURM tasks live on after ``fit`` (``train`` validates the best
checkpoint next), so their group is left alone here and closed at the end of the run by
:func:`oxford_ir.cli.run_folder.distributed_scope`.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher


class SpawnedProcessGroupTeardown(pl.Callback):
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        launcher = getattr(trainer.strategy, "launcher", None)
        if isinstance(launcher, _MultiProcessingLauncher) and dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
