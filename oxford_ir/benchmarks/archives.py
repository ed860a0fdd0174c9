"""Unpacking a downloaded tar (any compression) or zip archive safely.

Every member is checked before anything is written (no absolute paths, no ``..``, no links pointing outside the
target folder, no device files), and an extraction happens in a hidden staging folder beside its target that is
moved into place only when it succeeded (with one rename when the target folder is new): an interrupted run, also
one killed with SIGKILL, never leaves half an archive in place. A truncated or corrupt archive is a
:class:`CorruptArchiveError`, which downloading the archive again may cure.
"""

from __future__ import annotations

import filecmp
import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from oxford_ir.errors import DownloadError


class CorruptArchiveError(DownloadError):
    """The archive cannot be read (truncated, or not an archive at all): downloading it again may help."""


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, flatten: bool = False) -> list[Path]:
    """Unpack a tar (any compression) or zip ``archive`` into ``dest``; return the files placed there.

    Every member is checked before anything is written: absolute paths, ``..``, links
    pointing outside ``dest`` and device files are refused with :class:`DownloadError`
    naming the archive and member. Members are unpacked into a temporary folder next to
    ``dest`` and moved into place only when all of them succeeded. ``flatten`` moves
    every file to the top of ``dest`` (two different files with the same name are refused).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DownloadError(f"archive not found: {archive}")
    is_zip = zipfile.is_zipfile(archive)
    unreadable = "cannot read {} as a tar or zip archive ({}): it is truncated or not an archive (a server error page?)"
    try:
        handle = zipfile.ZipFile(archive) if is_zip else tarfile.open(archive, "r:*")  # noqa: SIM115 - closed below
    except _CORRUPT as error:
        raise CorruptArchiveError(unreadable.format(archive, error)) from None
    with handle:
        try:
            members = handle.infolist() if is_zip else handle.getmembers()
        except _CORRUPT as error:
            raise CorruptArchiveError(unreadable.format(archive, error)) from None
        for member in members:
            name = member.filename if is_zip else member.name
            why = _zip_member_problem(member) if is_zip else _tar_member_problem(member, dest, flatten)
            if why is not None:
                raise DownloadError(
                    f"refusing to extract {archive}: member {name!r} {why}; nothing was extracted. "
                    "The archive is not the official one or was tampered with: delete it and download it again"
                )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _staging_folder(dest)
        try:
            try:
                if is_zip or not hasattr(tarfile, "data_filter"):
                    handle.extractall(tmp, members=members)  # every member was checked above
                else:
                    handle.extractall(tmp, members=members, filter="data")
            except _CORRUPT as error:
                raise CorruptArchiveError(f"cannot extract {archive}: it is truncated or corrupt ({error})") from None
            except tarfile.FilterError as error:  # a chain of links that only escapes once earlier members exist
                raise DownloadError(
                    f"refusing to extract {archive}: member {error.tarinfo.name!r} is unsafe ({error}); "
                    f"nothing was extracted into {dest}"
                ) from None
            except OSError as error:
                raise DownloadError(
                    f"cannot extract {archive} into {dest.parent}: {error}; free disk space or fix the permissions, "
                    "then re-run"
                ) from None
            return _flatten_into(tmp, dest, archive) if flatten else _merge_into(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


#: what reading a damaged archive raises (gzip.BadGzipFile is an OSError, so this is checked first)
_CORRUPT = (
    tarfile.ReadError,
    tarfile.CompressionError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)


def _unsafe_path(name: str) -> str | None:
    """Why an archive member name would land outside the target folder, or None."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "climbs out of the target folder with '..'"
    return None


def _tar_member_problem(member: tarfile.TarInfo, dest: Path, flatten: bool) -> str | None:
    """Why ``member`` must not be extracted into ``dest``, or None."""
    why = _unsafe_path(member.name)
    if why is None and (member.ischr() or member.isblk() or member.isfifo()):
        why = "is a device file or pipe"
    if why is None and member.issym():
        resolved = os.path.normpath(os.path.join(os.path.dirname(member.name), member.linkname))
        if flatten:
            why = f"is a symbolic link (to {member.linkname!r}), which cannot be flattened"
        elif member.linkname.startswith("/") or resolved == ".." or resolved.startswith("../"):
            why = f"is a symbolic link pointing outside the target folder ({member.linkname!r})"
        elif not hasattr(tarfile, "data_filter"):
            why = "is a symbolic link, which this Python (no tarfile.data_filter) cannot check safely"
    if why is None and member.islnk() and _unsafe_path(member.linkname):
        why = f"is a hard link pointing outside the target folder ({member.linkname!r})"
    if why is None and hasattr(tarfile, "data_filter"):
        try:
            tarfile.data_filter(member, str(dest))
        except tarfile.FilterError as error:
            why = f"is unsafe ({error})"
    return why


def _zip_member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why ``info`` must not be extracted, or None."""
    why = _unsafe_path(info.filename)
    mode = info.external_attr >> 16
    if why is None and stat.S_ISLNK(mode):
        why = "is a symbolic link, which is not extracted from zip files"
    if why is None and (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)):
        why = "is a device file or pipe"
    return why


def _staging_folder(dest: Path) -> Path:
    """A new hidden folder beside ``dest`` (``.<name>.extract-<pid>-<random>``, removed by the next run when left
    behind), with the permissions of the user's umask (``mkdtemp`` would make it 0700, and it may become ``dest``)."""
    while True:
        folder = dest.parent / f".{dest.name}.extract-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _merge_into(src: Path, dest: Path) -> list[Path]:
    """Move the tree ``src`` into ``dest``, replacing files of the same name (a re-run re-extracts).

    A new ``dest`` is ``src`` renamed, in one step: it never exists half-filled."""
    if not dest.exists() and not dest.is_symlink():
        os.replace(src, dest)
        return sorted(p for p in dest.rglob("*") if p.is_file() or p.is_symlink())
    placed: list[Path] = []
    dest.mkdir(exist_ok=True)
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_symlink() or (target.exists() and not target.is_dir()):
                raise DownloadError(
                    f"cannot extract into {dest}: {target} is a file and the archive has a folder there; "
                    "move it away and re-run"
                )
            placed.extend(_merge_into(entry, target))
        else:
            if target.is_dir() and not target.is_symlink():
                raise DownloadError(
                    f"cannot extract into {dest}: {target} is a folder and the archive has a file there; "
                    "move it away and re-run"
                )
            os.replace(entry, target)
            placed.append(target)
    return placed


def _flatten_into(src: Path, dest: Path, archive: Path) -> list[Path]:
    """Move every regular file below ``src`` to the top of ``dest``."""
    chosen: dict[str, Path] = {}
    for folder, subfolders, files in os.walk(src):
        subfolders.sort()  # archive order is arbitrary; walk in name order so that errors are reproducible
        for name in sorted(files):
            path = Path(folder) / name
            if name in chosen:
                if not filecmp.cmp(chosen[name], path, shallow=False):
                    first, second = (p.relative_to(src).as_posix() for p in (chosen[name], path))
                    raise DownloadError(
                        f"cannot flatten {archive}: {first!r} and {second!r} are different files with the same name; "
                        "set flatten: false for this entry in the sources file"
                    )
                continue
            chosen[name] = path
    # a new dest is filled beside it and renamed into place in one step; an existing one (a second archive into
    # the same folder, or a re-run) receives the files one by one
    fresh = not dest.exists() and not dest.is_symlink()
    target = _staging_folder(dest) if fresh else dest
    try:
        for name in sorted(chosen):
            os.replace(chosen[name], target / name)
        if fresh:
            os.replace(target, dest)
    finally:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
    return [dest / name for name in sorted(chosen)]
