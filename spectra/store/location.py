"""Where a store lives: a local directory (a path or a ``file://`` URL) or any other fsspec URL
(``memory://``, ``s3://bucket/run.zarr``, ...), and the zarr store that reaches it.

Local directories get the full guarantees of docs/store.md (atomic creation by rename, an OS
lock); other URLs get what their backend allows (docs/store.md, "Stores that are not local").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

PathOrURL = str | os.PathLike


@dataclass(frozen=True)
class Location:
    """A store's address. ``local`` is the directory for local stores, None for URLs."""

    url: str  # the local path as text, or the URL as given (without a trailing slash)
    local: Path | None

    @classmethod
    def of(cls, where: PathOrURL | Location) -> Location:
        """Parse a path, a ``file://`` URL or an fsspec URL."""
        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        if not isinstance(text, str):
            raise TypeError(f"a store location must be a path or a URL; got {where!r}")
        if "://" not in text:
            path = Path(text).expanduser()
            return cls(str(path), path)
        scheme = text.split("://", 1)[0].lower()
        if scheme in ("file", "local"):
            parsed = urlparse(text)
            path = Path(unquote(parsed.netloc + parsed.path)).expanduser()
            return cls(str(path), path)
        return cls(text.rstrip("/"), None)

    @property
    def is_local(self) -> bool:
        return self.local is not None

    @property
    def protocol(self) -> str:
        """"file" for local stores, else the URL's scheme ("memory", "s3", ...)."""
        return "file" if self.local is not None else self.url.split("://", 1)[0].lower()

    @property
    def name(self) -> str:
        """The last component ("run.zarr")."""
        return self.local.name if self.local is not None else self.url.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def zarr_store(self, read_only: bool) -> Store:
        """The zarr store reaching this location (LocalStore or FsspecStore)."""
        if self.local is not None:
            return LocalStore(self.local, read_only=read_only)
        return FsspecStore.from_url(self.url, read_only=read_only)

    def filesystem(self) -> tuple[Any, str]:
        """(fsspec filesystem, path inside it), for URLs only."""
        import fsspec
        if self.local is not None:
            raise ValueError(f"{self}: a local directory has no fsspec filesystem here")
        return fsspec.core.url_to_fs(self.url)

    def exists(self) -> bool:
        """True if anything is at this location (a file, a directory, or keys under a prefix)."""
        if self.local is not None:
            return self.local.exists()
        fs, path = self.filesystem()
        return bool(fs.exists(path))

    def is_empty_or_absent(self) -> bool:
        """True if nothing is there, or an empty directory (or prefix)."""
        if self.local is not None:
            return not self.local.exists() or (self.local.is_dir() and not any(self.local.iterdir()))
        fs, path = self.filesystem()
        return not fs.exists(path) or (fs.isdir(path) and not fs.ls(path, detail=False))

    def child(self, key: str) -> Location:
        """The location of ``key`` ("a/b") inside this one."""
        if self.local is not None:
            return Location(str(self.local / key), self.local / key)
        return Location(f"{self.url}/{key}", None)
