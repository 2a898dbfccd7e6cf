"""Files edge: each bundle is a release folder; `current` is a symlink swapped atomically.

A SIGKILL at any point leaves `current` pointing at a complete release (old or new), never a mix of
a new haproxy.cfg with old map files.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from flowproxy.core.render import CRT_LIST, Bundle
from flowproxy.errors import ApplyIOError

log = logging.getLogger(__name__)
KEEP_RELEASES = 5


def read_bundle(folder: Path) -> Bundle | None:
    """The files of a release folder, or None when it is missing or incomplete."""
    try:
        files = {"haproxy.cfg": (folder / "haproxy.cfg").read_bytes()}
        if (folder / CRT_LIST).exists():
            files[CRT_LIST] = (folder / CRT_LIST).read_bytes()
        for sub, pattern in (("maps", "*.map"), ("certs", "*.pem")):
            for path in sorted((folder / sub).glob(pattern)):
                files[f"{sub}/{path.name}"] = path.read_bytes()
    except OSError:
        return None
    return Bundle(files)


def stage(haproxy_dir: Path, bundle: Bundle) -> Path:
    """Write the bundle into releases/<digest>/ (fsynced) and return that folder."""
    releases = haproxy_dir / "releases"
    target = releases / bundle.digest[:16]
    existing = read_bundle(target)
    if existing is not None and dict(existing.files) == dict(bundle.files):
        return target
    tmp = releases / f".tmp-{uuid.uuid4().hex}"
    try:
        for name, data in bundle.files.items():
            path = tmp / name
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Owner only: certificates carry private keys, and nothing else here is anyone else's business.
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ApplyIOError(f"cannot write release {target}: {exc}; the running config is unchanged. "
                           "Check free space and permissions of the data folder.") from exc
    return target


def activate(link: Path, release: Path) -> Path | None:
    """Point `link` at `release` atomically; return the previous target (None if there was none)."""
    previous = link.resolve() if link.is_symlink() else None
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}")
    try:
        tmp.symlink_to(os.path.relpath(release, link.parent))
        tmp.replace(link)
        _fsync_dir(link.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ApplyIOError(f"cannot switch {link} to {release}: {exc}; the running config is unchanged") from exc
    return previous


def prune(haproxy_dir: Path, keep: int = KEEP_RELEASES) -> None:
    """Drop old releases, never the current one; a few stay for inspection and rollback."""
    releases = haproxy_dir / "releases"
    current = (haproxy_dir / "current").resolve()
    folders = sorted((p for p in releases.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in folders[:-keep]:
        if old.resolve() != current:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
