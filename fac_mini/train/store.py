"""The checkpoint store: every file and folder the course writes, written so that a crash never loses data.

Three rules, used by every recipe, by ``save_released`` and by the data tooling:

- :func:`atomic_write` writes one file into a hidden temporary sibling and renames it onto the target, so the
  target is either the old file or the new one, never half of either;
- :func:`atomic_directory` does the same for a whole folder (a checkpoint with its config, weights and manifest):
  the new folder is built beside the old one and swapped in with two renames;
- the readers (:func:`read_json`, :func:`read_safetensors`, :func:`check_state_dict`) name the file, and the key
  or shape, on any missing, corrupt, truncated or mis-shaped content.

Temporaries of a killed run (``.<name>.tmp<pid>``, ``.<name>.old<pid>``) are cleaned up by the next write into
the same folder (:func:`clean_stale_temporaries`); an interrupted folder swap is rolled back there too.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

__all__ = ["file_sha256", "atomic_write", "atomic_write_text", "atomic_write_json", "atomic_directory",
           "clean_stale_temporaries", "read_json", "read_safetensors", "save_safetensors", "check_state_dict"]

_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)(?P<pid>\d+)$")


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (what every manifest of the course records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # a live process of another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temporaries(folder: Path | str) -> list[Path]:
    """Remove the temporaries that killed writers left in ``folder``; return what was removed or restored.

    A ``.<name>.tmp<pid>`` of a dead process is deleted. A ``.<name>.old<pid>`` is the previous version of a folder
    that :func:`atomic_directory` was swapping out: it is put back when ``<name>`` is missing (the swap was cut
    between its two renames), deleted otherwise. Temporaries of live processes are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cleaned = []
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if not match or _alive(int(match["pid"])):
            continue
        target = folder / match["name"]
        if match["kind"] == "old" and not target.exists():
            os.replace(entry, target)
        else:
            _remove(entry)
        cleaned.append(entry)
    return cleaned


def atomic_write(path: Path | str, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` in one rename; return ``path``.

    ``write`` is e.g. ``lambda tmp: torch.save(obj, tmp)``. If it raises (or the process dies), ``path`` keeps
    its old content and the temporary is removed (now, or by the next write into the folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path | str, data: Any, indent: int | None = 1) -> Path:
    """:func:`atomic_write` of ``data`` as JSON (with a final newline)."""
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(target: Path | str, replace: tuple[str, ...] = ("*",)) -> Iterator[Path]:
    """Build a folder in a temporary sibling and swap it in for ``target`` when the ``with`` block succeeds.

    ``with atomic_directory("data/m0") as tmp: ...write files into tmp...``. On success the old folder is renamed
    aside, the new one renamed onto ``target`` and the old one deleted; on an exception ``target`` is untouched and
    the temporary deleted. Files of the old folder that match none of the ``replace`` patterns and were not written
    anew are carried over (``save_released`` replaces its weights and config but keeps e.g. a tokenizer that lives in
    the same folder); the default ``("*",)`` replaces the whole folder.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(parent)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder; cannot write a checkpoint folder there")
    tmp = parent / f".{target.name}.tmp{os.getpid()}"
    old = parent / f".{target.name}.old{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if target.is_dir():
            for entry in target.iterdir():
                keep = not any(fnmatch.fnmatch(entry.name, pattern) for pattern in replace)
                if keep and not (tmp / entry.name).exists():
                    (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    _remove(old)


def read_json(path: Path | str, what: str = "file", hint: str = "") -> Any:
    """Parse a JSON file; ``FileNotFoundError``/``ValueError`` name the file (and ``hint``, e.g. the rebuild command)."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing{suffix}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error}){suffix}") from None


def read_safetensors(path: Path | str, hint: str = "") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file raises an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} is missing{suffix}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}){suffix}") from None


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path | str) -> Path:
    """Write ``tensors`` (contiguous CPU copies are made) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    data = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata={"format": "pt"}))


def check_state_dict(weights: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: Path | str,
                     ignore_missing: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` naming ``source`` and the keys when ``weights`` lacks keys of ``expected`` (other than
    ``ignore_missing``), has extra keys, or has a tensor whose shape differs from the model's."""
    missing = sorted(set(expected) - set(weights) - set(ignore_missing))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(expected[name].shape)}")
