"""Local paths and pyarrow filesystem URIs (s3://, gs://, file://) behind one small interface.

Everything the data package reads or writes outside Ray Data goes through here, so a shard
directory may be a local folder or a bucket prefix without the callers caring which.
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in str(location)


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix."""
    location = str(location)
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def join(location: str, *parts: str) -> str:
    """Joins path parts onto a local path or a URI."""
    location = str(location)
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return os.path.join(location, *parts)


def read_bytes(location: str) -> bytes:
    """The whole file. FileNotFoundError when it does not exist."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{location}: no such file")
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(f"{location}: not a file")
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(location: str, suffix: str = "") -> list[str]:
    """Names (not paths) of the files directly inside a directory, sorted; [] if it is missing."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def list_dirs(location: str) -> list[str]:
    """Names of the directories directly inside a directory, sorted; [] if it is missing."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def write_bytes_atomic(location: str, data: bytes) -> None:
    """Writes a file so that readers see either nothing or all of it: local files go through a
    temporary name and a rename; object stores publish an object only when it is complete."""
    fs, path = resolve(location)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def delete_file(location: str) -> None:
    fs, path = resolve(location)
    fs.delete_file(path)
