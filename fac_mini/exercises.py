"""Make the student notebooks (``notebooks/``) from the executed solutions (``solutions/``): one source of truth.

In a solution notebook, answer code sits between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` lines. The
student version replaces each such region by ``raise NotImplementedError("Exercise NN.M: ...")`` at the same
indentation, tags the cell ``raises-exception`` (nbval then accepts the error), replaces markdown cells tagged
``answer`` by a prompt for the learner's own answer, and clears every output. ``NN`` is the notebook's number,
``M`` counts the exercises in it.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from . import REPO_ROOT

__all__ = ["SOLUTIONS_DIR", "NOTEBOOKS_DIR", "student_version", "render", "write_notebooks", "check_notebooks"]

SOLUTIONS_DIR = REPO_ROOT / "solutions"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
ANSWER_PROMPT = "*Your answer:* (write it here, then compare with `solutions/`)"
_NUMBER = re.compile(r"^(\d\d)_")


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def student_version(notebook: dict, number: str) -> dict:
    """The student copy of one solution notebook (a new dict; the input is not changed)."""
    student = copy.deepcopy(notebook)
    exercise = 0
    for cell in student["cells"]:
        tags = cell.setdefault("metadata", {}).get("tags", [])
        if cell["cell_type"] == "markdown" and "answer" in tags:
            cell["source"] = ANSWER_PROMPT
            continue
        if cell["cell_type"] != "code":
            continue
        cell["outputs"] = []
        cell["execution_count"] = None
        lines = _source(cell).split("\n")
        if not any(line.strip() in (BEGIN, END) for line in lines):
            cell["source"] = "\n".join(lines)
            continue
        kept, inside = [], False
        for line_number, line in enumerate(lines):
            stripped = line.strip()
            if stripped == BEGIN:
                if inside:
                    raise ValueError(f"notebook {number}: nested {BEGIN} at line {line_number + 1} of a cell")
                inside = True
                exercise += 1
                indent = line[: len(line) - len(line.lstrip())]
                kept.append(f'{indent}raise NotImplementedError("Exercise {number}.{exercise}: write your code here")')
            elif stripped == END:
                if not inside:
                    raise ValueError(f"notebook {number}: {END} without {BEGIN} in a cell")
                inside = False
            elif not inside:
                kept.append(line)
        if inside:
            raise ValueError(f"notebook {number}: {BEGIN} without {END} in a cell")
        cell["source"] = "\n".join(kept)
        if "raises-exception" not in tags:
            cell["metadata"]["tags"] = tags + ["raises-exception"]
    student.setdefault("metadata", {})["fac_course"] = {"generated_from": f"solutions/{number}", "edit": "solutions/"}
    return student


def render(notebook: dict) -> str:
    """Notebook JSON exactly as Jupyter writes it (1-space indent, trailing newline), for stable diffs."""
    return json.dumps(notebook, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def _pairs(solutions_dir: Path, notebooks_dir: Path):
    for path in sorted(solutions_dir.glob("*.ipynb")):
        match = _NUMBER.match(path.name)
        if not match:
            raise ValueError(f"solution notebook {path.name} must be named NN_name.ipynb")
        yield path, notebooks_dir / path.name, match.group(1)


def write_notebooks(solutions_dir: Path = SOLUTIONS_DIR, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """Write every student notebook; remove student notebooks whose solution no longer exists."""
    notebooks_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source, target, number in _pairs(solutions_dir, notebooks_dir):
        target.write_text(render(student_version(json.loads(source.read_text()), number)))
        written.append(target)
    for orphan in set(notebooks_dir.glob("*.ipynb")) - set(written):
        orphan.unlink()
    return written


def check_notebooks(solutions_dir: Path = SOLUTIONS_DIR, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[str]:
    """Names of student notebooks that are missing, stale, or have no solution (empty list = in sync)."""
    stale, expected = [], set()
    for source, target, number in _pairs(solutions_dir, notebooks_dir):
        expected.add(target.name)
        want = render(student_version(json.loads(source.read_text()), number))
        if not target.is_file() or target.read_text() != want:
            stale.append(target.name)
    stale += sorted(p.name for p in notebooks_dir.glob("*.ipynb") if p.name not in expected)
    return stale
