"""Where corpora, outputs and checkpoints live: a local path or an object-storage URI (s3://,
gs://, any pyarrow filesystem URI), through one small set of functions. Ray-free (pyarrow.fs).

Every write goes to a temporary name beside the target and is moved into place when complete
(`atomic_output`): on a local disk a rename, on object storage a server-side copy, so a reader
never sees half a file. What needs a POSIX folder (a lock, TensorBoard logs) says so with
`require_posix`, in one line, before any work starts.

    with atomic_output("s3://bucket/out/summary.json") as handle:
        handle.write(b"{}")
    for info in listdir("s3://bucket/out"): ...
"""

from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

TMP_PREFIX = ".tmp-"


def is_uri(path) -> bool:
    """True for an object-storage (or any non-local) URI such as s3://bucket/key."""
    return "://" in str(path) and not str(path).startswith("file://")


def filesystem(path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).absolute())


def join(base, *names: str) -> str:
    """base / names, for a local path or a URI (a URI keeps its scheme)."""
    base = str(base)
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *names)
    return str(Path(base, *names))


def name_of(path) -> str:
    """The last component of a path or URI."""
    return posixpath.basename(str(path).rstrip("/")) if is_uri(path) else Path(path).name


def parent_of(path) -> str:
    path = str(path)
    if is_uri(path):
        scheme, _, rest = path.partition("://")
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(path).absolute().parent)


def info(path) -> pafs.FileInfo:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner)


def exists(path) -> bool:
    return info(path).type != pafs.FileType.NotFound


def is_dir(path) -> bool:
    return info(path).type == pafs.FileType.Directory


def is_file(path) -> bool:
    return info(path).type == pafs.FileType.File


def listdir(path) -> list[pafs.FileInfo]:
    """The entries of a folder (not recursive), sorted by name; [] when it does not exist."""
    fs, inner = filesystem(path)
    found = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(found, key=lambda f: f.base_name)


def full_path(path, inner: str) -> str:
    """A path returned by the filesystem of `path` (bucket/key), as a path or URI again."""
    path = str(path)
    if is_uri(path):
        return f"{path.partition('://')[0]}://{inner}"
    return inner


def makedirs(path) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)


def delete(path) -> None:
    """Delete a file or a whole folder; nothing when it does not exist."""
    fs, inner = filesystem(path)
    kind = fs.get_file_info(inner).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif kind == pafs.FileType.File:
        fs.delete_file(inner)


def read_bytes(path) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as handle:
        return handle.read()


@contextmanager
def open_input(path):
    """A seekable binary handle of a file (local or remote)."""
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as handle:
        yield handle


def _tmp_name(inner: str) -> str:
    head, tail = posixpath.split(inner)
    return posixpath.join(head, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{tail}")


@contextmanager
def atomic_output(path):
    """A binary stream to write `path` through: the bytes go to a temporary name beside it, moved
    over `path` when the block ends without error and removed otherwise."""
    fs, inner = filesystem(path)
    parent = posixpath.dirname(inner)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = _tmp_name(inner)
    try:
        with fs.open_output_stream(tmp) as handle:
            yield handle
        fs.move(tmp, inner)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_output(path) as handle:
        handle.write(data)


def copy_tree(src, dst) -> None:
    """Copy a folder (or file) between any two filesystems, e.g. a checkpoint to s3:// and back."""
    src_fs, src_inner = filesystem(src)
    dst_fs, dst_inner = filesystem(dst)
    if src_fs.get_file_info(src_inner).type == pafs.FileType.Directory:
        dst_fs.create_dir(dst_inner, recursive=True)
    pafs.copy_files(src_inner, dst_inner, source_filesystem=src_fs, destination_filesystem=dst_fs)


def fingerprint_entries(path) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of a file, or of every file under a folder: what identifies its
    content cheaply on object storage (an object's mtime changes with every write)."""
    fs, inner = filesystem(path)
    top = fs.get_file_info(inner)
    if top.type == pafs.FileType.File:
        entries = [top]
    elif top.type == pafs.FileType.Directory:
        entries = [f for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                   if f.type == pafs.FileType.File]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    out = []
    for f in sorted(entries, key=lambda e: e.path):
        mtime = f.mtime_ns if f.mtime_ns is not None else 0
        out.append((posixpath.relpath(f.path, inner) if f.path != inner else f.base_name, int(f.size or 0),
                    int(mtime)))
    return out


def require_posix(path, what: str) -> None:
    """Refuse, in one line, a URI where a POSIX folder is needed (a lock, a log writer)."""
    if path is not None and is_uri(path):
        raise ValueError(f"{what} must be a local or shared POSIX folder, not {path} (object storage cannot hold "
                         "it); see docs/reliability.md, 'Object storage'")


def local_path(path) -> str:
    """The local path of a file:// URI or a plain path (unchanged); a URI is refused."""
    require_posix(path, "this path")
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def same_location(a, b) -> bool:
    """Whether two paths or URIs name the same file or folder."""
    a, b = str(a), str(b)
    if is_uri(a) or is_uri(b):
        return a.rstrip("/") == b.rstrip("/")
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return Path(a).resolve() == Path(b).resolve()
