"""Writes that survive a kill at any moment and fail in one line.

Every file and folder visae writes goes through here. A file is written under a hidden
temporary name beside its destination, fsynced and renamed into place. A folder is built beside
its destination, fsynced, and swapped in: an atomic exchange of the two names where the kernel
offers one (Linux renameat2), else two renames that the next write of the folder repairs. So
a reader finds either the previous version or the new one, whole. An OSError (a full disk, a
read-only folder) becomes one `VisaeError` naming the file; the temporary files are removed and
the previous version stays in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from visae.errors import VisaeError

TMP_SUFFIX = ".tmp"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def tmp_path(final: Path) -> Path:
    """The temporary name a file is written under before its rename: hidden, same folder
    (a rename within one folder is atomic), recognisable so a resume can remove it."""
    return final.with_name(f".{final.name}{TMP_SUFFIX}")


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def write_error(exc: OSError, path: str | os.PathLike[str]) -> VisaeError:
    """The one-line error for a failed write of `path`."""
    if exc.errno in _DISK_FULL:
        return VisaeError(f"disk full while writing {path}")
    return VisaeError(f"cannot write {path}: {exc.strerror or exc}")


class HashingWriter:
    """A write-only file wrapper that hashes and counts the bytes going through it, so a
    file's checksum costs no second read."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.n_bytes = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.n_bytes += len(data)
        return self._f.write(data)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a kill never needs it; a power cut does)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, deepest first."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def write_file(
    final: str | os.PathLike[str], write: Callable[[HashingWriter], None]
) -> dict[str, Any]:
    """Write a file under its temporary name, fsync it, then rename it into place.

    Returns `{"bytes", "sha256"}` of what was written. On any failure the temporary file is
    removed and `final` keeps its previous content; an OSError becomes a one-line VisaeError.
    """
    final = Path(final)
    tmp = tmp_path(final)
    try:
        with open(tmp, "wb") as f:
            hw = HashingWriter(f)
            write(hw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(exc, final) from None
        raise
    return {"bytes": hw.n_bytes, "sha256": hw.sha256.hexdigest()}


def write_bytes(final: str | os.PathLike[str], data: bytes) -> dict[str, Any]:
    return write_file(final, lambda f: f.write(data))


def write_text(final: str | os.PathLike[str], text: str) -> dict[str, Any]:
    return write_bytes(final, text.encode("utf-8"))


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line to a log. A kill can leave a partial last line, which readers of such
    logs drop (see `read_lines`); a full disk is a one-line error."""
    text = line if line.endswith("\n") else line + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise write_error(exc, path) from None


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The complete lines of a log written by `append_line` (a partial last line, left by a
    kill or a full disk mid-append, is dropped)."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    return [x for x in lines[:-1] if x]


# -- folders --------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names `a` and `b` (renameat2 RENAME_EXCHANGE); False where the
    system or filesystem does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    res = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old_path(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def _stale_tmp_dirs(out: Path) -> Iterator[Path]:
    """Build folders of `out` left by writers that are no longer running."""
    prefix = f".{out.name}.tmp-"
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        try:
            pid = int(entry.name[len(prefix) :])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            yield entry
        except PermissionError:
            continue


def recover_directory(out: str | os.PathLike[str]) -> None:
    """Repair what a kill during a two-rename swap of `out` left: put the previous version
    back if the new one never arrived, and remove leftovers of dead writers."""
    out = Path(out)
    old = _old_path(out)
    if old.is_dir():
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, out)
    for stale in _stale_tmp_dirs(out):
        shutil.rmtree(stale, ignore_errors=True)


def _swap_in(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
    elif _exchange(new, out):
        shutil.rmtree(new)  # after the exchange it holds the previous version
    else:
        old = _old_path(out)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(new, out)
        shutil.rmtree(old)
    fsync_dir(out.parent)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out`; when the block succeeds it replaces `out`
    (fsynced, swapped in whole), when it fails or is interrupted it is removed and `out` is
    left as it was. An OSError inside the block becomes a one-line VisaeError."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise write_error(exc, exc.filename or out) from None
    try:
        try:
            yield tmp
            fsync_tree(tmp)
            _swap_in(tmp, out)
        except OSError as exc:
            where = Path(exc.filename) if exc.filename else out
            raise write_error(exc, _destination(where, tmp, out)) from None
        except VisaeError as exc:
            # a file written inside the folder names its temporary path: name the real one
            raise VisaeError(str(exc).replace(str(tmp), str(out))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _destination(path: Path, tmp: Path, out: Path) -> Path:
    """Where a file being built in `tmp` will live once the folder is swapped in."""
    try:
        return out / path.relative_to(tmp)
    except ValueError:
        return path
