"""Make the student notebooks (``notebooks/``) from the executed solutions (``solutions/``): one source of truth.

In a solution notebook, answer code sits between ``### BEGIN SOLUTION`` and ``### END SOLUTION`` lines. The
student version replaces each such region by ``raise NotImplementedError("Exercise NN.M: ...")`` at the same
indentation, tags the cell ``raises-exception`` (nbval then accepts the error), replaces markdown cells tagged
``answer`` by a prompt for the learner's own answer, and clears every output. ``NN`` is the notebook's number,
``M`` counts the exercises in it.

Both kinds of notebook are stored in the form JupyterLab 4 saves them (:func:`normalise_notebook`), so opening,
trusting and saving a notebook leaves ``git status`` clean. What JupyterLab changes when it saves a notebook that
``nbconvert --execute`` wrote: the kernelspec (rewritten from the running kernel), every number (through JavaScript,
where 10.0 is 10: widget and tqdm state), consecutive stream outputs of one name (merged on load, with ``\r`` and
``\b`` applied like a terminal), ``nbformat_minor`` (at least 5) and the transient cell metadata ``trusted``;
nbclient's ``execution`` timestamps are dropped too, so re-executing a notebook does not touch every cell.
``python -m fac_mini exercises`` normalises ``solutions/`` in place and writes ``notebooks/``; ``--check`` fails
when either is not as it would write it.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import nbformat

from .. import REPO_ROOT

__all__ = ["SOLUTIONS_DIR", "NOTEBOOKS_DIR", "normalise_notebook", "student_version", "render", "write_notebooks",
           "check_notebooks"]

SOLUTIONS_DIR = REPO_ROOT / "solutions"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
ANSWER_PROMPT = "*Your answer:* (write it here, then compare with `solutions/`)"
_NUMBER = re.compile(r"^(\d\d)_")


KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def _js_numbers(value):
    """JSON values as they come back from a JavaScript round trip: integral floats become ints."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, dict):
        return {key: _js_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_js_numbers(item) for item in value]
    return value


def _terminal_text(text: str, current: str = "", index: int = 0) -> tuple[str, int]:
    """JupyterLab's processText: write ``text`` into ``current`` at ``index``; \\b, \\r and \\n move the cursor."""
    position, start = index, 0
    while True:
        stops = [i for i in (text.find(c, start) for c in "\n\b\r") if i >= 0]
        stop = min(stops) if stops else -1
        chunk = text[start:] if stop < 0 else text[start:stop]
        current = current[:position] + chunk + current[position + len(chunk):]
        position += len(chunk)
        if stop < 0:
            return current, position
        start, char = stop + 1, text[stop]
        if char == "\b" and position > 0 and current[position - 1] != "\n":
            current, position = current[:position - 1] + current[position + 1:], position - 1
        elif char == "\r":
            while position > 0 and current[position - 1] != "\n":
                position -= 1
        elif char == "\n":
            current += "\n"
            position = len(current)


def _merge_streams(outputs: list) -> list:
    merged, index = [], 0
    for output in outputs:
        text = output.get("text")
        if output.get("output_type") == "stream":
            text = "".join(text) if isinstance(text, list) else text
            last = merged[-1] if merged else None
            if last is not None and last.get("output_type") == "stream" and last["name"] == output["name"]:
                last["text"], index = _terminal_text(text, last["text"], index)
                continue
            output = dict(output)
            output["text"], index = _terminal_text(text)
        merged.append(output)
    return merged


def normalise_notebook(notebook: dict) -> dict:
    """A copy of ``notebook`` (nbformat 4 dict) in the form JupyterLab 4 saves it."""
    notebook = _js_numbers(copy.deepcopy(notebook))
    notebook.setdefault("metadata", {})["kernelspec"] = dict(KERNELSPEC)
    notebook["nbformat"], notebook["nbformat_minor"] = 4, max(5, notebook.get("nbformat_minor", 5))
    for cell in notebook["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        cell.get("metadata", {}).pop("trusted", None)
        if cell["cell_type"] == "code":
            cell["outputs"] = _merge_streams(cell["outputs"])
    return notebook


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
    student["metadata"].pop("widgets", None)             # saved widget state belongs to the executed solution
    return student


def render(notebook: dict) -> str:
    """Notebook JSON exactly as JupyterLab saves it (normalised, nbformat's layout, trailing newline)."""
    text = nbformat.writes(nbformat.from_dict(normalise_notebook(notebook)), version=nbformat.NO_CONVERT)
    return text if text.endswith("\n") else text + "\n"


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
        text = source.read_text(encoding="utf-8")
        if text != render(json.loads(text)):
            text = render(json.loads(text))
            source.write_text(text, encoding="utf-8")                        # the form JupyterLab saves
        solution = json.loads(text)
        target.write_text(render(student_version(solution, number)), encoding="utf-8")
        written.append(target)
    for orphan in set(notebooks_dir.glob("*.ipynb")) - set(written):
        orphan.unlink()
    return written


def check_notebooks(solutions_dir: Path = SOLUTIONS_DIR, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[str]:
    """Names of student notebooks that are missing, stale, or have no solution (empty list = in sync)."""
    stale, expected = [], set()
    for source, target, number in _pairs(solutions_dir, notebooks_dir):
        expected.add(target.name)
        text = source.read_text(encoding="utf-8")
        solution = json.loads(text)
        if text != render(solution):
            stale.append(f"{source.parent.name}/{source.name} (not in the form JupyterLab saves)")
        want = render(student_version(solution, number))
        if not target.is_file() or target.read_text(encoding="utf-8") != want:
            stale.append(target.name)
    stale += sorted(p.name for p in notebooks_dir.glob("*.ipynb") if p.name not in expected)
    return stale
