"""The flag set and the safety rules every recipe command shares (``python -m fac_mini <recipe> train|eval``).

``train`` flags: ``--out DIR`` (artefact folder), ``--state-dir DIR`` (resumable state), ``--restart`` (ignore a
saved state), ``--steps N``, ``--threads N``, ``--force``, plus the recipe's own hyper-parameters.
``eval`` flags: ``--path DIR`` (the checkpoint, default the shipped one), ``--json``, ``--threads N``, ``--limit N``.

Safety: training never writes into ``data/`` unless the run is the full shipped recipe (every hyper-parameter at its
default) *and* ``--out`` names that recipe's shipped folder, or ``--force`` is given; any other run writes under
``data/cache/runs/<recipe>`` by default and says where. Non-positive numbers are rejected with one line, and an
unwritable ``--out`` fails before any training. The output folder is replaced atomically (weights, config, log
and manifest together), so an interrupted run leaves the old artefact untouched.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from .. import CACHE_DIR, DATA_DIR
from .store import atomic_write_json, file_sha256

if TYPE_CHECKING:
    from .loop import TrainConfig

__all__ = ["RecipeParser", "positive_int", "positive_float", "add_train_flags", "config_from_flags", "shipped_flags",
           "add_eval_flags", "output_folder",
           "versions", "write_manifest", "run_command", "RUNS_DIR"]

RUNS_DIR = CACHE_DIR / "runs"          # where non-shipped runs go by default


class RecipeParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2), with no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def add_train_flags(parser: argparse.ArgumentParser, name: str, shipped: "TrainConfig", threads: int = 1) -> None:
    """The shared ``train`` flags, with the shipped recipe's values (``shipped``) as defaults; ``name`` is the
    recipe (its runs go to ``data/cache/runs/<name>``)."""
    parser.add_argument("--steps", type=positive_int, default=shipped.steps, help="training steps (%(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=shipped.batch_size, help="(%(default)s)")
    parser.add_argument("--lr", type=positive_float, default=shipped.lr, help="peak learning rate (%(default)s)")
    parser.add_argument("--seed", type=int, default=shipped.seed, help="(%(default)s)")
    parser.add_argument("--threads", type=positive_int, default=threads,
                        help="torch CPU threads (bitwise reproduction needs the same count; shipped: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"artefact folder (default {RUNS_DIR.relative_to(DATA_DIR.parent)}/{name}; the shipped "
                             "folder only for the full shipped recipe, or with --force)")
    parser.add_argument("--state-dir", type=Path, default=CACHE_DIR / "state" / name,
                        help="resumable training state (default %(default)s)")
    parser.add_argument("--restart", action="store_true", help="ignore a saved training state and start over")
    parser.add_argument("--force", action="store_true", help="allow writing into data/ for a non-shipped run")


def config_from_flags(args: argparse.Namespace, shipped: "TrainConfig", **overrides: Any) -> "TrainConfig":
    """The run's hyper-parameters: ``shipped`` with the shared flags of ``args`` (and ``overrides``) applied."""
    return dataclasses.replace(shipped, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               **overrides)


def shipped_flags(shipped: "TrainConfig", **extra: Any) -> dict[str, Any]:
    """The flag values of the full shipped recipe (for :func:`output_folder`): its hyper-parameters, one thread."""
    return {"steps": shipped.steps, "batch_size": shipped.batch_size, "lr": shipped.lr, "seed": shipped.seed,
            "threads": 1, **extra}


def add_eval_flags(parser: argparse.ArgumentParser, shipped: Path, limit: bool = True) -> None:
    """The shared ``eval`` flags."""
    parser.add_argument("--path", type=Path, default=shipped, help="checkpoint folder (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    if limit:
        parser.add_argument("--limit", type=positive_int, default=None, help="only the first N examples")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def output_folder(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str, shipped: Path,
                  shipped_args: dict[str, Any]) -> Path:
    """Where a ``train`` run writes, by the rules of this module; exits with one line when it may not write there.

    ``shipped_args``: the flag values of the shipped recipe (``{"steps": 600, "lr": 3e-3, ...}``); a run is the
    shipped recipe when every one of them has that value.
    """
    is_shipped = all(getattr(args, key) == value for key, value in shipped_args.items())
    out = args.out if args.out is not None else RUNS_DIR / name
    if _inside(out, DATA_DIR) and not _inside(out, CACHE_DIR) and not args.force:
        if out.resolve() != shipped.resolve():
            parser.error(f"--out {out} is inside data/ but is not this recipe's shipped folder {shipped}; "
                         "choose a folder outside data/ (or add --force)")
        if not is_shipped:
            changed = [f"--{key.replace('_', '-')} {getattr(args, key)}" for key, value in shipped_args.items()
                       if getattr(args, key) != value]
            parser.error(f"refusing to overwrite the shipped {shipped} with a run that differs from the shipped "
                         f"recipe ({', '.join(changed)}); drop --out to write under {RUNS_DIR / name}, or add --force")
    try:                                                   # fail now, not after an hour of training
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.probe"):
            pass
        if out.exists() and (not out.is_dir() or not os.access(out, os.W_OK)):
            raise PermissionError(f"{out} is not a writable folder")
    except OSError as error:
        parser.error(f"cannot write to --out {out}: {error}")
    if args.out is None:
        print(f"writing to {out} (the shipped {shipped} is left untouched)", file=sys.stderr)
    return out


def versions() -> dict[str, str]:
    """The library versions a manifest records."""
    import numpy
    import torch

    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "fac_mini": __version__}


def run_command(prog: str, argv: Sequence[str]) -> str:
    """The command line of a run, as a manifest records it."""
    return " ".join([prog, *argv])


def write_manifest(folder: Path | str, name: str, command: str, files: Iterable[str], **fields: Any) -> dict:
    """Write ``folder/manifest.json``: recipe name, command, library versions, sha256 of every artefact in
    ``files`` (names inside ``folder``) and the recipe's own ``fields`` (config, metrics, seconds, ...)."""
    folder = Path(folder)
    manifest = {"name": name, "command": command, **fields, "versions": versions(),
                "files_sha256": {file: file_sha256(folder / file) for file in files}}
    atomic_write_json(folder / "manifest.json", manifest)
    return manifest
