"""Artifact folders: atomic creation, manifest.json, integrity checks.

A compile builds everything in a hidden temporary sibling of the output folder
and renames it into place at the end, so a failed compile leaves nothing
behind. Nothing time- or host-dependent goes into the files: identical inputs
and options give byte-identical artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compiler.errors import ArtifactError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_CHUNK = 1 << 22


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path, names: list[str]) -> list[dict[str, Any]]:
    return [
        {"path": name, "bytes": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
        for name in sorted(names)
    ]


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (folder / MANIFEST).write_text(text, encoding="utf-8")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: not a kiln artifact folder")
    if not path.is_file():
        raise ArtifactError(f"{folder}: not a kiln artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: damaged manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: unknown manifest schema {manifest.get('schema') if isinstance(manifest, dict) else None!r}")
    return manifest


def check_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise when a file listed in the manifest is missing or its size/hash differ."""
    for entry in manifest.get("files", []):
        name = entry["path"]
        path = (folder / name).resolve()
        if not path.is_relative_to(folder.resolve()):
            raise ArtifactError(f"{folder}: manifest lists a file outside the artifact: {name!r}")
        if not path.is_file():
            raise ArtifactError(f"{folder}: {name} is missing")
        if path.stat().st_size != entry["bytes"] or file_digest(path) != entry["sha256"]:
            raise ArtifactError(f"{folder}: {name} does not match its sha256 in {MANIFEST} (damaged or edited)")


def check_output_location(out: Path) -> None:
    """Refuse early to overwrite something that is not a kiln artifact."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ArtifactError(f"{out}: exists and is not a folder; refusing to overwrite it")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise ArtifactError(
                f"{out}: folder is not empty and is not a kiln artifact; refusing to overwrite it",
                hint="choose another -o folder or empty this one",
            )


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` atomically.

    On any exception the temporary folder (and any parent folders this call
    created) is removed and ``out`` is left as it was.
    """
    out = Path(os.path.abspath(out))
    check_output_location(out)
    created = _make_parents(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.kiln-", dir=out.parent))
    except OSError as err:
        _remove_created(created)
        raise ArtifactError(f"{out}: cannot write the output folder ({err.strerror or err})") from None
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    if p.exists() and not p.is_dir():
        raise ArtifactError(f"{p}: is a file, cannot create the output folder inside it")
    created = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError as err:
        _remove_created(created)
        raise ArtifactError(f"{parent}: cannot create the output folder ({err.strerror or err})") from None
    return created


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _replace(tmp: Path, out: Path) -> None:
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an artifact is meant to be shared
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
