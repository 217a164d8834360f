"""Which checkpoints a reload may load (model roots), and the durable "current" pointer.

    check_model_path("/models/realign/cycles/v0003/train/final", ["/models"])  # -> the real path, or ModelPathError
    point_link("/models/current", "/models/realign/cycles/v0003/train/final")  # atomic: never missing
    read_link("/models/current")                                              # -> the checkpoint it names

The pointer is a symbolic link (ServeConfig.current_link, e.g. /models/current): a folder path that
every loader opens as the checkpoint itself. A promotion writes a new link under a temporary name
in the same folder, then renames it over the old one (os.replace: atomic on POSIX), and fsyncs the
folder: a reader sees the old link or the new one, never none, and a crash leaves one of the two.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from opsft.data import storage


class ModelPathError(ValueError):
    """A reload path that is refused: `status` 400 (not a usable path) or 403 (outside every root)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status


def default_roots(model: str | None, current_link: str | None = None) -> list[str]:
    """The folder holding the configured model (or the current link): where its successors live.
    A hub id has none (reloads are refused until model_roots names one)."""
    base = model or current_link
    if base is None:  # the embedded default model
        from opsft.models import opsft_home

        return [str(opsft_home() / "models")]
    if storage.is_uri(base):
        return [storage.parent_of(base)]
    path = Path(base)
    if path.is_absolute():
        return [str(path.parent)]
    return [str(path.absolute().parent)] if path.exists() else []


def _uri_parts(uri: str) -> tuple[str, list[str]]:
    scheme, _, rest = uri.partition("://")
    return scheme.lower(), rest.rstrip("/").split("/")


def check_model_path(model: str, roots: list[str]) -> str:
    """What a reload of `model` loads: a local path resolved (symlinks, '..') to a real path inside
    one of `roots`, or an object-store URI under a root that is a URI prefix. Raises ModelPathError."""
    text = (model or "").strip()
    where = ", ".join(roots) if roots else "none configured (set model_roots)"
    if not text:
        raise ModelPathError(400, "empty model path: give the absolute path of a checkpoint folder")
    if "\x00" in text:
        raise ModelPathError(400, "the model path holds a NUL byte")
    if storage.is_uri(text):
        scheme, parts = _uri_parts(text)
        if any(p in ("", ".", "..") for p in parts):
            raise ModelPathError(400, f"{text!r}: a URI with an empty, '.' or '..' segment is refused")
        for root in roots:
            if storage.is_uri(root):
                root_scheme, root_parts = _uri_parts(root)
                if scheme == root_scheme and parts[:len(root_parts)] == root_parts:
                    return f"{scheme}://{'/'.join(parts)}"
        raise ModelPathError(403, f"{text!r} is under no model root ({where}): a reload loads only checkpoints "
                                  "under ServeConfig.model_roots")
    if not os.path.isabs(text):
        raise ModelPathError(400, f"{text!r} is a relative path (or a hub id): give the absolute path of a "
                                  f"checkpoint folder under a model root ({where})")
    real = os.path.realpath(text)  # symlinks and '..' resolved: the folder that would really be opened
    for root in roots:
        if not storage.is_uri(root) and Path(real).is_relative_to(os.path.realpath(root)):
            return real
    shown = "" if real == text.rstrip("/") else f" (it resolves to {real})"
    raise ModelPathError(403, f"{text!r}{shown} is outside the model roots ({where}): a reload loads only "
                              "checkpoints under ServeConfig.model_roots")


def read_link(link: str) -> str | None:
    """The checkpoint the pointer names (resolved to a real path), or None when there is no pointer.
    A pointer to a checkpoint that is gone raises: serving the configured model instead would undo
    a promotion silently."""
    if not os.path.lexists(link):
        return None
    if os.path.islink(link):
        target = os.readlink(link)
        if storage.is_uri(target):
            return target
    real = os.path.realpath(link)
    if not os.path.exists(real):
        raise FileNotFoundError(f"current_link {link} names {real}, which does not exist: point it at a "
                                f"checkpoint (ln -sfn <checkpoint> {link}) or remove it to serve the configured "
                                "model")
    return real


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point_link(link: str, target: str) -> None:
    """Make the symlink `link` name `target`, atomically: a new link under a temporary name in the
    same folder, renamed over the old one, the folder fsynced. An existing `link` that is not a
    symlink (a real folder) is left alone and raises IsADirectoryError."""
    link = os.path.abspath(link)
    folder, name = os.path.split(link)
    if os.path.isdir(link) and not os.path.islink(link):
        raise IsADirectoryError(f"current_link {link} is a folder, not a symlink: move it aside (the service "
                                "then links it to the promoted checkpoint)")
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.symlink(target if storage.is_uri(target) else os.path.abspath(target), tmp)
    try:
        _fsync_dir(folder)
        os.replace(tmp, link)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
