"""Many image paths held compactly: one root and a numpy str array of names relative to it.

A list of 1.6 million ``Path`` objects costs hundreds of MB and seconds to build, and every DataLoader worker
forked from the process that holds it copies the pages its reference counts touch. A :class:`PathArray` is two
objects whatever its length: the names live in one numpy array (no per-name Python object, nothing a worker's
reads write to), and a ``Path`` is made only for the image asked for. It is a ``Sequence[Path]``: indexing by a
position gives a ``Path``, by a slice, a boolean mask or an index array another ``PathArray``; iterating gives
``Path`` objects; it equals a list of the same paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: names turned into Paths at a time while iterating
_CHUNK = 1 << 16


class PathArray(Sequence[Path]):
    """``root / names[i]`` for each ``i`` (see the module docstring), or ``root / names[index[i]]`` with an ``index``:
    a selection of a collection's rows (``PathArray(collection.root, collection.paths, rows)``) copies no name, only
    the row numbers (8 bytes a row, not the 128 of a 32-character name). ``names`` is kept as given when it is a numpy
    str array already (a :class:`~oxford_ir.benchmarks.collection.Collection`'s ``paths``: no copy)."""

    def __init__(
        self, root: str | os.PathLike, names: Sequence[str] | np.ndarray, index: np.ndarray | None = None
    ) -> None:
        self.root = Path(root)
        names = names if isinstance(names, np.ndarray) and names.dtype.kind == "U" else np.asarray(names, dtype=str)
        if names.ndim != 1:
            raise ValueError(f"names must be one-dimensional, got shape {names.shape}")
        self.names = names
        self.index = None if index is None else np.asarray(index, dtype=np.int64).reshape(-1)

    @classmethod
    def of(cls, paths: Sequence[str | os.PathLike] | PathArray) -> PathArray:
        """``paths`` as a :class:`PathArray`: itself when it is one, else rooted at the folder they share (none when
        they mix absolute and relative paths)."""
        if isinstance(paths, PathArray):
            return paths
        strings = [os.fspath(p) for p in paths]
        if not strings:
            return cls("", np.zeros(0, dtype=str))
        try:
            root = os.path.commonpath([os.path.dirname(s) or "." for s in strings])
        except ValueError:  # absolute and relative paths mixed
            root = ""
        if not root or root == ".":
            return cls("", strings)
        return cls(root, [os.path.relpath(s, root) for s in strings])

    def __len__(self) -> int:
        return len(self.names) if self.index is None else len(self.index)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            row = index if self.index is None else self.index[index]
            return self.root / str(self.names[row])
        if self.index is None:
            if isinstance(index, slice):
                return PathArray(self.root, self.names[index])  # a view
            return PathArray(self.root, self.names, np.arange(len(self.names))[index])
        return PathArray(self.root, self.names, self.index[index])

    def __iter__(self) -> Iterator[Path]:
        root = self.root
        for start in range(0, len(self), _CHUNK):
            chunk = (
                self.names[start : start + _CHUNK]
                if self.index is None
                else self.names[self.index[start : start + _CHUNK]]
            )
            for name in chunk.tolist():
                yield root / name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PathArray):
            return len(self) == len(other) and list(self) == list(other)
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and list(self) == [Path(p) for p in other]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PathArray({len(self)} paths under {str(self.root) or '.'!r})"
