"""Post-hoc whitening: the closed-form fits against their definitions and a NumPy port of the published code,
the file, the test-time path, the training sample and the protocol guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from oxford_ir.benchmarks.benchmark import Benchmark
from oxford_ir.errors import CheckpointError, ConfigError, DataError
from oxford_ir.extraction.embedding import embed_batch
from oxford_ir.extraction.whitening import (
    Whitened,
    Whitening,
    content_sha256,
    fit_learned,
    fit_pca,
    shrink,
    whitening_file,
)
from oxford_ir.extraction.whitening_source import (
    WhiteningSettings,
    check_disjoint,
    fit_whitening,
    whitening_sample,
)


def correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n x d float64 vectors with very unequal, correlated variances (what whitening is for)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.3


def pairs_of(labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    q, p = [], []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            if labels[i] == labels[j]:
                q.append(i)
                p.append(j)
    return torch.tensor(q), torch.tensor(p)


def clustered(n_classes: int, per_class: int, d: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Images of ``n_classes`` landmarks: a class centre plus correlated within-class noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g, dtype=torch.float64) * 2
    labels = np.repeat(np.arange(n_classes), per_class)
    noise = correlated(len(labels), d, seed + 1)
    return centres[torch.from_numpy(labels)] + noise, labels


def whitenlearn_reference(x: np.ndarray, qidxs: np.ndarray, pidxs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cnnimageretrieval-pytorch's whitenlearn (cirtorch/utils/whiten.py), columns are vectors, as published."""
    m = x[:, qidxs].mean(axis=1, keepdims=True)
    df = x[:, qidxs] - x[:, pidxs]
    s = np.dot(df, df.T) / df.shape[1]
    p = np.linalg.inv(np.linalg.cholesky(s))
    df = np.dot(p, x - m)
    d = np.dot(df, df.T)
    eigval, eigvec = np.linalg.eig(d)
    order = eigval.argsort()[::-1]
    eigvec = eigvec[:, order]
    return m, np.dot(eigvec.T, p)


def pcawhitenlearn_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cnnimageretrieval-pytorch's pcawhitenlearn."""
    n = x.shape[1]
    m = x.mean(axis=1, keepdims=True)
    xc = x - m
    xcov = np.dot(xc, xc.T)
    xcov = (xcov + xcov.T) / (2 * n)
    eigval, eigvec = np.linalg.eig(xcov)
    order = eigval.argsort()[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    return m, np.dot(np.linalg.inv(np.sqrt(np.diag(eigval))), eigvec.T)


def whitenapply_reference(x: np.ndarray, m: np.ndarray, p: np.ndarray) -> np.ndarray:
    y = np.dot(p, x - m)
    return y / (np.linalg.norm(y, ord=2, axis=0, keepdims=True) + 1e-6)


def test_learned_whitening_whitens_the_pair_differences_and_orders_by_variance():
    x, labels = clustered(6, 40, 8)
    q, p = pairs_of(labels)
    w = fit_learned(x, q, p)
    projection, mean = w.projection.double(), w.mean.double()
    differences = (x[q] - x[p]).numpy()
    s = sum(np.outer(d, d) for d in differences) / len(differences)  # by hand, pair by pair
    assert np.allclose(projection.numpy() @ s @ projection.numpy().T, np.eye(8), atol=1e-4)
    assert torch.allclose(mean, x[q].mean(0), atol=1e-6)
    # the whitened images' covariance is diagonal, with the stored variances, largest first
    y = (x - mean) @ projection.T
    covariance = (y.T @ y / len(x)).numpy()
    assert np.allclose(covariance, np.diag(w.variances.double().numpy()), rtol=1e-3, atol=1e-3)
    assert bool((w.variances[:-1] >= w.variances[1:]).all())


def test_learned_and_pca_whitening_equal_the_published_code():
    x, labels = clustered(5, 30, 6, seed=3)
    q, p = pairs_of(labels)
    columns = x.numpy().T
    for ours, (m, proj) in (
        (fit_learned(x, q, p), whitenlearn_reference(columns, q.numpy(), p.numpy())),
        (fit_pca(x), pcawhitenlearn_reference(columns)),
    ):
        reference = whitenapply_reference(columns, m, proj).T
        mine = ours.apply(x.float()).double().numpy()
        # eigenvectors are defined up to sign: compare the similarities, which are what retrieval uses
        assert np.allclose(mine @ mine.T, reference @ reference.T, atol=1e-4)
        assert np.allclose(np.abs(mine), np.abs(reference), atol=1e-4)


def test_pca_whitening_gives_unit_covariance():
    x = correlated(500, 7)
    w = fit_pca(x)
    y = (x - w.mean.double()) @ w.projection.double().T
    assert np.allclose((y.T @ y / len(x)).numpy(), np.eye(7), atol=1e-4)


def test_shrinkage_makes_a_small_sample_whitenable_and_is_what_gets_whitened():
    x, labels = clustered(3, 3, 12)  # 9 pairs of 12-dimensional vectors: S is singular
    q, p = pairs_of(labels)
    with pytest.raises(DataError, match="whitening.shrinkage"):
        fit_learned(x, q, p, shrinkage=0.0)
    with pytest.raises(DataError, match="whitening.dim"):
        fit_pca(x[:5], shrinkage=0.0)
    w = fit_learned(x, q, p, shrinkage=0.2)
    d = x[q] - x[p]
    s = d.T @ d / len(q)
    shrunk = 0.8 * s + 0.2 * torch.trace(s) / 12 * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(shrink(s, 0.2), shrunk)
    projection = w.projection.double()
    assert torch.allclose(projection @ shrunk @ projection.T, torch.eye(12, dtype=torch.float64), atol=1e-4)
    assert torch.isfinite(w.apply(x.float())).all()


def test_dimension_reduction_keeps_the_leading_rows():
    x, labels = clustered(6, 20, 8)
    q, p = pairs_of(labels)
    full, reduced = fit_learned(x, q, p), fit_learned(x, q, p, dim=3)
    assert reduced.output_dim == 3 and reduced.input_dim == 8
    assert torch.allclose(reduced.projection.abs(), full.projection[:3].abs(), atol=1e-5)
    assert reduced.apply(x.float()).shape == (len(x), 3)
    with pytest.raises(ConfigError, match="whitening.dim=9"):
        fit_learned(x, q, p, dim=9)


def test_whitening_file_round_trip_and_refusals(tmp_path):
    x, labels = clustered(4, 10, 5)
    w = fit_learned(x, *pairs_of(labels)).with_info(model_fingerprint="a" * 64, note="x")
    path = w.save(tmp_path / "w.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]  # no temporary file left
    back = Whitening.load(path, model_fingerprint="a" * 64, kind="learned")
    assert torch.equal(back.projection, w.projection) and back.info == w.info
    with pytest.raises(ConfigError, match="learned for another model"):
        Whitening.load(path, model_fingerprint="b" * 64)
    with pytest.raises(ConfigError, match="not the pca one"):
        Whitening.load(path, kind="pca")
    with pytest.raises(ConfigError, match="whitening file not found"):
        Whitening.load(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a file of torch")
    with pytest.raises(CheckpointError, match="bad.pt"):
        Whitening.load(tmp_path / "bad.pt")
    torch.save({"state_dict": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="not a whitening file"):
        Whitening.load(tmp_path / "ckpt.pt")


def test_a_damaged_whitening_file_is_refused_never_used(tmp_path):
    """16 bytes flipped inside the stored values, a NaN written with a valid checksum, a file without a checksum:
    each is one line naming the file (the code before the checksum loaded all three, and evaluated with them)."""
    x, labels = clustered(4, 10, 5)
    w = fit_learned(x, *pairs_of(labels)).with_info(model_fingerprint="a" * 64)
    path = w.save(tmp_path / "w.pt")
    raw = bytearray(path.read_bytes())
    start = bytes(raw).find(w.projection.float().numpy().tobytes())
    assert start > 0  # torch stores tensors uncompressed: the values are in the file as they are
    raw[start : start + 16] = bytes(b ^ 0xFF for b in raw[start : start + 16])
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="flipped.pt is damaged: its content does not match the sha256"):
        Whitening.load(flipped)

    data = torch.load(path, weights_only=True)
    data["mean"][2] = float("nan")
    data["sha256"] = content_sha256(data)  # the damage happened before the checksum was computed
    torch.save(data, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="nan.pt: the whitening's mean hold NaN or infinite values"):
        Whitening.load(tmp_path / "nan.pt")

    old = {k: v for k, v in torch.load(path, weights_only=True).items() if k != "sha256"}
    torch.save({**old, "version": 1}, tmp_path / "v1.pt")
    with pytest.raises(CheckpointError, match="v1.pt is a whitening file of version 1 without a checksum"):
        Whitening.load(tmp_path / "v1.pt")


def test_whitening_file_lives_beside_the_checkpoint():
    assert whitening_file("learned", None, "/r/checkpoints/best-epoch003.ckpt", None) == Path(
        "/r/checkpoints/best-epoch003.whitening-learned.pt"
    )
    assert whitening_file("pca", "/x/w.pt", "/r/c.ckpt", None) == Path("/x/w.pt")
    assert whitening_file("pca", None, None, Path("/run")) == Path("/run/whitening-pca.pt")
    with pytest.raises(ConfigError, match="whitening.file"):
        whitening_file("learned", None, None, None)


class GeMNet(nn.Module):
    """A tiny network with a GeM power, as the extraction path sees an embedder."""

    power = 3.0
    embedding_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x)).clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)
        return F.normalize(y, dim=1)


def test_whitened_model_whitens_the_multiscale_vector_after_the_power_mean():
    torch.manual_seed(0)
    net = GeMNet().eval()
    x, labels = clustered(4, 10, 4)
    w = fit_learned(x, *pairs_of(labels), shrinkage=0.1)
    images = torch.randn(3, 3, 20, 24)
    whitened = Whitened(net, w).eval()
    with torch.no_grad():
        for scales in ([1.0], [1.0, 0.7071, 0.5]):
            expected = w.apply(embed_batch(net, images, scales))
            assert torch.allclose(embed_batch(whitened, images, scales), expected, atol=1e-6)
        assert torch.allclose(whitened(images), w.apply(net(images)), atol=1e-6)
    assert whitened.embedding_dim == 4
    wrong = fit_pca(torch.randn(50, 6, dtype=torch.float64))
    with pytest.raises(ConfigError, match="expects 6-dimensional embeddings, but the model gives 4"):
        Whitened(net, wrong)


def test_bf16_autocast_does_not_round_the_whitening():
    x, labels = clustered(4, 10, 6)
    w = fit_learned(x, *pairs_of(labels), shrinkage=0.1)
    v = F.normalize(torch.randn(5, 6), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = w.apply(v)
    assert inside.dtype == torch.float32 and torch.equal(inside, w.apply(v))


def test_training_sample_pairs_images_of_one_landmark_only():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 4])  # landmarks 0, 1, 2 (2 has one image); 3 and 4 are distractors
    paths = [Path(f"/d/img{i}.jpg") for i in range(len(labels))]
    settings = WhiteningSettings("learned")
    sample = whitening_sample(paths, labels, 3, settings, "test")
    pairs = {
        (sample.paths[q].name, sample.paths[p].name) for q, p in zip(sample.queries, sample.positives, strict=True)
    }
    assert pairs == {
        ("img0.jpg", "img1.jpg"),
        ("img0.jpg", "img2.jpg"),
        ("img1.jpg", "img2.jpg"),
        ("img3.jpg", "img4.jpg"),
    }
    assert [p.name for p in sample.paths] == [f"img{i}.jpg" for i in range(5)]  # no distractor, no lone image
    few = whitening_sample(paths, labels, 3, WhiteningSettings("learned", max_pairs=2, seed=1), "test")
    again = whitening_sample(paths, labels, 3, WhiteningSettings("learned", max_pairs=2, seed=1), "test")
    assert len(few.queries) == 2 and few.paths == again.paths and np.array_equal(few.queries, again.queries)
    pca = whitening_sample(paths, labels, 3, WhiteningSettings("pca", max_pairs=3, seed=0), "test")
    assert len(pca.paths) == 6 and len(pca.queries) == 0
    with pytest.raises(DataError, match="no two images of one landmark"):
        whitening_sample(paths[5:], labels[5:], 3, settings, "test")


def test_fit_whitening_records_its_settings():
    x, labels = clustered(3, 6, 4)
    sample = whitening_sample(
        [Path(f"{i}.jpg") for i in range(len(labels))], labels, 3, WhiteningSettings("learned"), "t"
    )
    w = fit_whitening(WhiteningSettings("learned", shrinkage=0.3), x, sample)
    assert w.kind == "learned" and w.info["settings"]["shrinkage"] == 0.3


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"kind": "zca"}, "whitening.kind='zca'"),
        ({"kind": "learned", "dim": 0}, "whitening.dim=0"),
        ({"kind": "learned", "shrinkage": 2}, "whitening.shrinkage=2"),
        ({"kind": "learned", "max_pairs": "all"}, "whitening.max_pairs='all'"),
        ({"kind": "learned", "dims": 4}, "whitening.dims: unknown key"),
    ],
)
def test_bad_settings_are_named(node, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        WhiteningSettings.from_config(node)
    assert WhiteningSettings.from_config({"kind": "none"}) is None


def test_source_images_overlapping_an_evaluated_benchmark_are_refused(tmp_path):
    folder = tmp_path / "jpg"
    gnd = [{"bbx": None, "easy": [0], "hard": [1], "junk": [2]}]
    benchmark = Benchmark("b", tmp_path, "revisited", ["a", "b", "c", "d"], ["q"], gnd, tmp_path, folder)
    check_disjoint([folder / "d.jpg"], [benchmark], "w")  # a database image no query evaluates: fine
    for name in ("q", "a", "b", "c"):
        with pytest.raises(ConfigError, match="learned from 1 images that b evaluates"):
            check_disjoint([folder / f"{name}.jpg"], [benchmark], "w")


def test_a_sample_restricted_to_the_embedded_images_keeps_their_pairs():
    labels = np.array([0, 0, 0, 1, 1])
    sample = whitening_sample([Path(f"{i}.jpg") for i in range(5)], labels, 2, WhiteningSettings("learned"), "s")
    part = sample.restrict(np.array([True, False, True, True, True]), "shortened")
    pairs = {(part.paths[q].name, part.paths[p].name) for q, p in zip(part.queries, part.positives, strict=True)}
    assert pairs == {("0.jpg", "2.jpg"), ("3.jpg", "4.jpg")} and part.description == "s (shortened)"
