"""Fixtures of the web tests: one real tiny index per test module, loaded, and a searcher over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from oxford_ir.retrieval.index_format import RetrievalIndex
from oxford_ir.retrieval.search import Searcher
from tests.web.tiny_index import build_tiny_index


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return build_tiny_index(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))


@pytest.fixture(scope="module")
def index(index_dir: Path) -> RetrievalIndex:
    return RetrievalIndex.load(index_dir)


@pytest.fixture(scope="module")
def searcher(index: RetrievalIndex) -> Searcher:
    return Searcher(index)
