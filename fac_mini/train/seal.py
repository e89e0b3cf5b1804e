"""The seal of the shipped data: ``data/SHA256SUMS`` lists the sha256 of every file of ``data/`` that git ships.

``python -m fac_mini data check`` (:func:`check_data`) compares ``data/`` with the seal and names *every* missing,
changed or unlisted file and every manifest that is not valid JSON; ``python -m fac_mini data seal``
(:func:`write_seal`) rewrites it after a deliberate change. A recipe that rebuilds a shipped folder refreshes the
seal's lines for that folder (:func:`refresh_seal`). The format is that of ``sha256sum``, so
``cd data && sha256sum -c SHA256SUMS`` checks it too. ``data/cache/`` (rebuilt, ignored by git) is never sealed.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import CACHE_DIR, DATA_DIR
from .store import atomic_write_text, file_sha256

__all__ = ["SEAL_NAME", "sealed_files", "read_seal", "write_seal", "refresh_seal", "check_data"]

SEAL_NAME = "SHA256SUMS"


def _is_ignored(path: Path, data_dir: Path) -> bool:
    relative = path.relative_to(data_dir)
    return (relative.parts[0] == "cache" or relative.name == SEAL_NAME or relative.name.startswith(".")
            or path.resolve().is_relative_to(CACHE_DIR.resolve()))


def sealed_files(data_dir: Path | str = DATA_DIR) -> list[str]:
    """Every file under ``data_dir`` that the seal covers (relative POSIX paths, sorted)."""
    data_dir = Path(data_dir)
    return sorted(path.relative_to(data_dir).as_posix() for path in data_dir.rglob("*")
                  if path.is_file() and not _is_ignored(path, data_dir))


def read_seal(data_dir: Path | str = DATA_DIR) -> dict[str, str]:
    """``{relative path: sha256}`` from ``data_dir/SHA256SUMS``; a malformed line raises ValueError naming it."""
    path = Path(data_dir) / SEAL_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; restore it with `git checkout -- data/{SEAL_NAME}`")
    seal = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise ValueError(f"{path} line {number} is not '<sha256>  <path>': {line!r}")
        seal[name] = digest
    return seal


def _write(data_dir: Path, seal: dict[str, str]) -> Path:
    lines = "".join(f"{digest}  {name}\n" for name, digest in sorted(seal.items()))
    return atomic_write_text(data_dir / SEAL_NAME, lines)


def write_seal(data_dir: Path | str = DATA_DIR) -> Path:
    """Seal every file of ``data_dir`` as it is now (after a deliberate rebuild); return the seal's path."""
    data_dir = Path(data_dir)
    return _write(data_dir, {name: file_sha256(data_dir / name) for name in sealed_files(data_dir)})


def refresh_seal(folder: Path | str, data_dir: Path | str = DATA_DIR) -> bool:
    """After a recipe rewrote ``folder``: if it lies inside ``data_dir`` (and not in the cache), replace the seal's
    lines for that folder with its files as they are now. Returns whether the seal was touched."""
    folder, data_dir = Path(folder).resolve(), Path(data_dir).resolve()
    if (not folder.is_relative_to(data_dir) or folder == data_dir or folder.is_relative_to(data_dir / "cache")
            or folder.is_relative_to(CACHE_DIR.resolve())):
        return False
    prefix = folder.relative_to(data_dir).as_posix() + "/"
    seal = {name: digest for name, digest in read_seal(data_dir).items() if not name.startswith(prefix)}
    seal.update({name: file_sha256(data_dir / name) for name in sealed_files(data_dir) if name.startswith(prefix)})
    _write(data_dir, seal)
    return True


def check_data(data_dir: Path | str = DATA_DIR) -> list[str]:
    """Every problem of ``data_dir`` against its seal, one line each (empty: all is well)."""
    data_dir = Path(data_dir)
    try:
        seal = read_seal(data_dir)
    except (FileNotFoundError, ValueError) as error:
        return [str(error)]
    problems = []
    for name, digest in seal.items():
        path = data_dir / name
        if not path.is_file():
            problems.append(f"missing: data/{name}")
        elif file_sha256(path) != digest:
            problems.append(f"changed: data/{name}")
    problems += [f"not in the seal: data/{name}" for name in sealed_files(data_dir) if name not in seal]
    for path in sorted(data_dir.rglob("*.json")):
        if path.is_file() and not _is_ignored(path, data_dir):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                problems.append(f"corrupt JSON: data/{path.relative_to(data_dir).as_posix()} ({error})")
    return problems
