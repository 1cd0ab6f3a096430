"""Output locations: a local path, or a URI that pyarrow's filesystem layer understands.

A Ray job's working directory on a cluster is a scratch copy on the head node, not the user's
disk, so an experiment can write its run directory to shared storage instead: a URI such as
``s3://bucket/prefix`` (add ``?region=us-west-2`` to skip the bucket's region lookup),
``gs://bucket/prefix`` or ``file:///mnt/shared/runs``, resolved
with :meth:`pyarrow.fs.FileSystem.from_uri`. A plain path (no ``scheme://``) stays a local path.

Every file is written whole, never appended to, and readers never see a partial file:

* on a local filesystem (plain paths and ``file://``) the bytes go to a temporary file in the
  target's directory, then ``os.replace`` renames it over the target, which is atomic on POSIX;
* on any other filesystem the bytes go in one output stream that is closed once. On object stores
  (S3, GCS, Azure) an object becomes visible only when its upload completes (one PUT, or the
  final "complete" call of a multipart upload), so readers see the old object or the new one,
  and a temporary object plus a rename would gain nothing: a "rename" there is a copy and a
  delete, not atomic. (A filesystem that shows files while they are written, such as HDFS, has
  no such guarantee: use a local path or an object store.)

One filesystem object is kept per (scheme, host, query) in each process, so repeated writes to
one bucket reuse its connection settings, and pyarrow's in-memory ``mock://`` filesystem keeps
its files for the life of the process (useful in tests).
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ROOT_FS: dict[str, pafs.FileSystem] = {}


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True when ``location`` is written ``scheme://...`` (including ``file://``)."""
    return isinstance(location, str) and bool(_URI.match(location))


def local_path(location: str | os.PathLike[str]) -> Path | None:
    """The local path of a plain path or a ``file://`` URI; None for any other URI."""
    if not is_uri(location):
        return Path(location)
    parts = urlsplit(str(location))
    if parts.scheme.lower() != "file":
        return None
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file URI {location!r} names host {parts.netloc!r}; use file:///absolute/path")
    return Path(unquote(parts.path))


@functools.lru_cache(maxsize=256)
def _resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    fs, path = pafs.FileSystem.from_uri(uri)
    parts = urlsplit(uri)
    root = urlunsplit((parts.scheme.lower(), parts.netloc, "", parts.query, ""))
    return _ROOT_FS.setdefault(root, fs), path


def filesystem(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``location`` and the path within it.

    Local locations give a :class:`pyarrow.fs.LocalFileSystem` and an absolute path.

    Raises:
        pyarrow.ArrowInvalid: an unknown URI scheme.
        OSError: the filesystem cannot be opened (e.g. S3 region lookup without network or
            credentials; a missing HDFS client library).
    """
    path = local_path(location)
    if path is not None:
        return pafs.LocalFileSystem(), str(path.absolute())
    return _resolve_uri(str(location))


def join(location: str | os.PathLike[str], *names: str) -> str | Path:
    """``location`` extended by path components; a URI stays a URI (its ``?query`` is kept last),
    a plain path becomes a :class:`~pathlib.Path`."""
    if not is_uri(location):
        return Path(location, *names)
    parts = urlsplit(str(location))
    path = posixpath.join(parts.path.rstrip("/") or "/", *names)
    return f"{parts.scheme}://{parts.netloc}{path}" + (f"?{parts.query}" if parts.query else "")


def exists(location: str | os.PathLike[str]) -> bool:
    """True when a file or directory exists at ``location``."""
    path = local_path(location)
    if path is not None:
        return path.exists()
    fs, p = filesystem(location)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def make_dirs(location: str | os.PathLike[str]) -> None:
    """Create the directory ``location`` and its parents (nothing on object stores needs it, but
    pyarrow creates a directory marker there, harmless)."""
    path = local_path(location)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        return
    fs, p = filesystem(location)
    fs.create_dir(p, recursive=True)


def make_unique_dir(parent: str | os.PathLike[str], name: str) -> str | Path:
    """Create ``<parent>/<name>`` (``<name>-2``, ``-3``, ... when taken) and return it.

    Locally the creation is exclusive (``mkdir``), so two processes never share a directory; on
    other filesystems a name is taken when anything exists under it.

    Returns:
        A :class:`~pathlib.Path` for a plain path, else a URI string.

    Raises:
        NotADirectoryError: ``parent`` exists and is a file.
        PermissionError, OSError: ``parent`` cannot be created or written.
    """
    path = local_path(parent)
    if path is not None:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(str(parent))
        path.mkdir(parents=True, exist_ok=True)
        for k in range(1, 10_000):
            candidate = join(parent, name if k == 1 else f"{name}-{k}")
            try:
                local_path(candidate).mkdir()
                return candidate
            except FileExistsError:
                continue
        raise FileExistsError(f"{parent}/{name}")
    fs, p = filesystem(parent)
    if fs.get_file_info(p).type == pafs.FileType.File:
        raise NotADirectoryError(str(parent))
    for k in range(1, 10_000):
        candidate = join(parent, name if k == 1 else f"{name}-{k}")
        cfs, cp = filesystem(candidate)
        if cfs.get_file_info(cp).type == pafs.FileType.NotFound:
            cfs.create_dir(cp, recursive=True)
            return candidate
    raise FileExistsError(f"{parent}/{name}")


def write_bytes(location: str | os.PathLike[str], data: bytes | memoryview | pa.Buffer) -> None:
    """Replace the file at ``location`` with ``data`` so that no reader sees a partial file.

    Local: temporary file ``.<name>.tmp-<pid>`` in the same directory, then ``os.replace``
    (atomic on POSIX); the temporary file is removed if writing fails. Elsewhere: one output
    stream, closed once (atomic on object stores, see the module docstring).

    Raises:
        OSError: the file cannot be written.
    """
    path = local_path(location)
    if path is not None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    fs, p = filesystem(location)
    stream = fs.open_output_stream(p)
    stream.write(data)  # an exception here leaves the stream unclosed: the upload never completes
    stream.close()


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    """The whole content of the file at ``location``.

    Raises:
        FileNotFoundError, OSError: no such file, or it cannot be read.
    """
    path = local_path(location)
    if path is not None:
        return path.read_bytes()
    fs, p = filesystem(location)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_table(table: pa.Table, location: str | os.PathLike[str]) -> None:
    """Write ``table`` as one Parquet file at ``location`` with :func:`write_bytes` (never a
    partial file).

    Raises:
        OSError: the file cannot be written.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(location, sink.getvalue())
