"""Preparing the next training batches in the background: order, errors, passes, Lightning, the datamodule's
wiring, and (on CUDA) the side stream against the synchronous path.

On the CPU the same thread runs without streams, which is what the CPU tests exercise; the stream and event
handling is checked by the CUDA tests.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import Dataset

from oxford_ir.benchmarks.synthetic import SYNTHETIC_TINY, write_synthetic_benchmark
from oxford_ir.data.batch_augment import CropBatch
from oxford_ir.data.datamodule import RetrievalDataModule
from oxford_ir.data.prefetch import DevicePrefetchLoader, ReadyBatch
from oxford_ir.errors import DataError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Numbers(Dataset):
    """Item i is the tensor [i]; ``broken`` items raise a DataError naming them (as a corrupt image does)."""

    def __init__(self, n: int, broken: tuple[int, ...] = ()) -> None:
        self.n, self.broken = n, broken

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i in self.broken:
            raise DataError(f"cannot decode image {i}.jpg")
        return torch.tensor([i])


def doubled(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, str]:
    time.sleep(0.002)  # some work, so that the thread really runs ahead
    return batch.to(device) * 2, threading.current_thread().name


def prefetch_threads() -> int:
    """Live prefetch threads, once dropped iterators are collected (an error's traceback can keep one in a cycle)."""
    gc.collect()
    time.sleep(0.05)
    return sum(t.name == "oxford-ir-prefetch" and t.is_alive() for t in threading.enumerate())


def test_without_prepare_it_is_a_plain_dataloader():
    loader = DevicePrefetchLoader(Numbers(6), batch_size=2)
    assert not loader.prefetches and loader.device == torch.device("cpu")
    assert [b.tolist() for b in loader] == [[[0], [1]], [[2], [3]], [[4], [5]]]


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_are_prepared_in_the_background_in_order(workers):
    assert prefetch_threads() == 0
    loader = DevicePrefetchLoader(
        Numbers(10), batch_size=2, num_workers=workers, persistent_workers=workers > 0, prepare=doubled, depth=2
    )
    assert loader.prefetches and len(loader) == 5
    for _ in range(2):  # two passes (epochs) over the same loader, persistent workers reused
        ready = list(loader)
        assert all(isinstance(r, ReadyBatch) for r in ready)
        values = [r.wait() for r in ready]
        assert [v[0].flatten().tolist() for v in values] == [[0, 2], [4, 6], [8, 10], [12, 14], [16, 18]]
        assert {v[1] for v in values} == {"oxford-ir-prefetch"}  # prepared off the consuming thread
        assert ready[0].to("cpu") is ready[0]  # Lightning's batch_to_device leaves it alone
    assert prefetch_threads() == 0  # each pass's thread ended with it


def test_an_error_is_raised_at_its_batch_turn_and_earlier_batches_arrive():
    def prepare(batch, device):
        if int(batch[0]) == 4:
            raise DataError("cannot decode image 4.jpg")
        return batch

    loader = DevicePrefetchLoader(Numbers(10), batch_size=2, prepare=prepare, depth=3)
    batches = iter(loader)
    assert next(batches).wait().tolist() == [[0], [1]]
    assert next(batches).wait().tolist() == [[2], [3]]
    with pytest.raises(DataError, match="4.jpg"):
        next(batches)
    # an error in a DataLoader worker (the dataset) likewise, at its batch's turn
    loader = DevicePrefetchLoader(Numbers(8, broken=(5,)), batch_size=2, num_workers=1, prepare=doubled, depth=3)
    batches = iter(loader)
    assert next(batches).wait()[0].tolist() == [[0], [2]]
    assert next(batches).wait()[0].tolist() == [[4], [6]]
    with pytest.raises(DataError, match="5.jpg"):
        next(batches)


def test_a_new_pass_closes_the_previous_one():
    loader = DevicePrefetchLoader(Numbers(40), batch_size=2, prepare=doubled, depth=2)
    first = iter(loader)
    next(first)
    second = iter(loader)  # Lightning starts the next epoch without finishing this one (limit_train_batches)
    with pytest.raises(StopIteration):
        next(first)
    assert next(second).wait()[0].tolist() == [[0], [2]]
    del first, second
    loader.close()
    assert prefetch_threads() == 0


def test_bad_depth_is_refused():
    with pytest.raises(ValueError, match="depth"):
        DevicePrefetchLoader(Numbers(2), prepare=doubled, depth=0)


# -- Lightning and the datamodule ---------------------------------------------------------------------------------
class _Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append((images.clone(), labels.clone()))
        return (images.mean() * self.weight).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path: Path, accelerator: str = "cpu", **options) -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        **options,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prefetch")
    write_synthetic_benchmark(root / "synthetic", **{k: v for k, v in SYNTHETIC_TINY.items() if k != "photo_long_side"})
    return root


def make(data_dir: Path, **overrides) -> RetrievalDataModule:
    options = {
        "data_dir": data_dir,
        "benchmark": "synthetic",
        "split": "seed",
        "image_size": 24,
        "eval_image_size": 32,
        "classes_per_batch": 3,
        "images_per_class": 2,
        "distractors_per_batch": 2,
        "batches_per_epoch": 3,
        "num_workers": 0,
        **overrides,
    }
    dm = RetrievalDataModule(**options)
    dm.prepare_data()
    return dm


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_the_datamodule_prepares_batches_for_the_training_device(data_dir, decode):
    """On the CPU the workers finish their batches (decode=cpu) or the hook decodes (decode=gpu); the prefetcher
    starts only for CUDA. Every way gives the same images: the augmentation depends on the seeds only."""
    dm = make(data_dir, decode=decode)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DevicePrefetchLoader) and not loader.prefetches and loader.device.type == "cpu"
    batch = next(iter(loader))
    images, labels = dm.on_after_batch_transfer(batch.to("cpu") if decode == "gpu" else batch, 0)
    assert images.shape == (8, 3, 24, 24) and images.dtype == torch.float32 and labels.shape == (8,)
    # the same batch finished by the background thread (what CUDA does, here on the CPU)
    prepare = dm._train_decoder.prepare if decode == "gpu" else dm._batch_augmentation.prepare
    raw = dm.train_dataloader("meta")  # any non-CPU device: the workers leave the batch raw
    assert not raw.prefetches
    first = next(iter(raw))
    assert isinstance(first, CropBatch) or decode == "gpu"
    ready = next(
        iter(
            DevicePrefetchLoader(
                raw.dataset, batch_size=8, sampler=raw.sampler, collate_fn=raw.collate_fn, prepare=prepare
            )
        )
    )
    again, again_labels = dm.on_after_batch_transfer(ready, 0)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_lightning_trains_on_prefetched_batches(data_dir, tmp_path, decode):
    """The prefetching loader through a Lightning fit (forced on the CPU): the module receives the batches the
    plain path makes, in order, over two epochs; overfit_batches rebuilds the loader with its sampler replaced."""
    reference = make(data_dir, decode=decode)
    plain = _Recorder()
    _trainer(tmp_path / "plain", max_epochs=2).fit(plain, datamodule=reference)

    class Prefetching(RetrievalDataModule):
        def train_dataloader(self):
            loader = super().train_dataloader("meta")  # raw batches, as for CUDA
            prepare = self._train_decoder.prepare if self._gpu_decode else self._batch_augmentation.prepare
            return DevicePrefetchLoader(
                loader.dataset,
                batch_size=loader.batch_size,
                sampler=loader.sampler,
                drop_last=True,
                collate_fn=loader.collate_fn,
                prepare=prepare,
                device="cpu",
            )

    dm = Prefetching(**{**make(data_dir, decode=decode).hparams})
    module = _Recorder()
    trainer = _trainer(tmp_path / "prefetch", max_epochs=2)
    trainer.fit(module, datamodule=dm)
    assert isinstance(trainer.train_dataloader, DevicePrefetchLoader) and trainer.train_dataloader.prefetches
    assert len(module.seen) == len(plain.seen) == 6
    for (images, labels), (ref_images, ref_labels) in zip(module.seen, plain.seen, strict=True):
        assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images)
    overfit = _Recorder()
    _trainer(tmp_path / "overfit", max_epochs=1, overfit_batches=1).fit(overfit, datamodule=dm)
    assert len(overfit.seen) == 1 and overfit.seen[0][0].shape == (8, 3, 24, 24)


# -- CUDA ------------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_cuda_prefetched_batches_equal_the_synchronous_ones(data_dir, decode):
    """The side stream, its event and record_stream: batches prepared ahead while the current stream is busy
    equal those prepared on the current stream by the hook."""
    dm = make(data_dir, decode=decode, batches_per_epoch=6, num_workers=1)
    dm.setup("fit")
    loader = dm.train_dataloader("cuda")
    assert loader.prefetches and loader.device.type == "cuda"
    raw = dm.train_dataloader("meta")  # the same batches, left raw
    busy = torch.randn(4096, 4096, device="cuda")
    for ready, batch in zip(loader, raw, strict=True):
        assert isinstance(ready, ReadyBatch)
        for _ in range(8):  # keep the current stream busy: the prepared batch must still be waited for correctly
            busy = (busy @ busy).tanh_()
        images, labels = dm.on_after_batch_transfer(ready, 0)
        expected, expected_labels = dm.on_after_batch_transfer(batch.to("cuda"), 0)
        assert images.device.type == "cuda" and torch.equal(labels, expected_labels)
        torch.testing.assert_close(images, expected, atol=2e-3, rtol=0)  # a race would differ by whole levels
    torch.cuda.synchronize()


def _slow_on_the_side_stream(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The batch's sum, written only after a long chain of kernels on the (side) stream."""
    busy = torch.randn(2048, 2048, device=device)
    for _ in range(30):
        busy = busy @ busy
        busy = busy / busy.norm()
    out = torch.zeros(1 << 20, device=device)
    return out.add_(busy[0, 0] * 0).add_(batch.to(device, non_blocking=True).sum().float())


@needs_cuda
def test_cuda_the_consumer_stream_waits_for_the_side_stream():
    """wait() orders the consumer's stream after the side stream's work: read at once, every value is final."""
    loader = DevicePrefetchLoader(
        Numbers(12), batch_size=3, pin_memory=True, prepare=_slow_on_the_side_stream, device="cuda"
    )
    sums = []
    for ready in loader:
        sums.append(ready.wait()[-1].item())  # read on the current stream right after wait()
    assert sums == [float(3 * i + 3) for i in range(0, 12, 3)]


@needs_cuda
def test_cuda_fit_with_prefetching(data_dir, tmp_path):
    dm = make(data_dir, num_workers=1)
    module = _Recorder()
    trainer = _trainer(tmp_path, accelerator="gpu", max_epochs=1)
    trainer.fit(module, datamodule=dm)
    assert trainer.train_dataloader.prefetches and len(module.seen) == 3
    assert all(images.device.type == "cuda" and images.shape == (8, 3, 24, 24) for images, _ in module.seen)
