"""The exercise machinery: notebooks/ is generated from solutions/, and every exercise's self-check passes the
reference answer and fails a deliberately wrong one."""
import contextlib
import io
import json
import math
import re

import numpy as np
import pytest
import torch

from fac_mini import checks
from fac_mini.exercises import (ANSWER_PROMPT, SOLUTIONS_DIR, check_notebooks, render, student_version,
                                write_notebooks)

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"

# For every self-check used in a notebook: a plausible wrong answer that the check must reject.
# A new exercise must add its entry here (test_every_exercise_has_a_wrong_answer enforces it).
WRONG_ANSWERS = {
    "check_ungroup": lambda grouped, group_size:                            # strided slices, not blocks
        grouped.reshape(grouped.shape[0], grouped.shape[1], -1, group_size).transpose(2, 3)
        .reshape(grouped.shape[0], grouped.shape[1] * group_size, -1),
    "check_teacher_forcing_ids": lambda labels, group_size, pad_id: (        # the usual LM shift: label j - 1
        labels.masked_fill(labels == -100, pad_id).roll(1, dims=1),
        __import__("torch").cat((labels[:, group_size:], labels.new_full((labels.shape[0], group_size), -100)), 1)),
    "check_speech_tokens": lambda duration_s, frame_rate_hz, group_size=1: int(duration_s * frame_rate_hz) // group_size,
    "check_kv_cache_bytes": lambda seq_len, num_layers, num_kv_heads, head_dim, bytes_per_value=2:
        num_layers * seq_len * num_kv_heads * head_dim * bytes_per_value,   # forgot the values (only keys)
    "check_mel_filterbank": lambda n_mels, n_fft, sampling_rate:            # forgot the Slaney normalisation
        __import__("librosa").filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=n_mels, norm=None),
    "check_window_mask": lambda num_frames_50hz, window_50hz:               # a sliding band, not 2-s blocks
        (torch.arange(num_frames_50hz)[:, None] - torch.arange(num_frames_50hz)[None]).abs() < window_50hz,
    "check_rms_norm": lambda x, weight, eps=1e-6:
        weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps),        # eps outside the square root
    "check_apply_rotary": lambda x, cos, sin:                                 # neighbour pairs (2i, 2i+1), GPT-J style
        x * cos[:, None] + torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2) * sin[:, None],
    "check_chat_prompt": lambda question:                                    # no newline after "assistant"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant",
    "check_qa_labels": lambda input_ids, prompt_lengths, attention_mask:      # forgot to mask the prompt
        input_ids.masked_fill(attention_mask == 0, -100),
    "check_concat_grouping": lambda embeddings, group_size, weight:          # channel-major concat, not frame-major
        torch.nn.functional.linear(torch.nn.functional.pad(embeddings, (0, 0, 0, -embeddings.shape[1] % group_size))
                                   .unflatten(1, (-1, group_size)).transpose(2, 3).flatten(2), weight),
    "check_mean_grouping": lambda embeddings, group_size, weight:            # last group averaged over real frames only
        torch.nn.functional.linear(torch.stack([embeddings[:, g * group_size:(g + 1) * group_size].mean(1) for g in
                                                range(-(-embeddings.shape[1] // group_size))], 1), weight),
    "check_align_text_to_groups": lambda text_ids, num_groups, sil_id, replace_ids=():   # forgot to cut a long transcript
        torch.nn.functional.pad(text_ids, (0, max(0, num_groups - text_ids.shape[-1])), value=sil_id),
    "check_fsq_quantize": lambda z, levels:                                  # plain rounding, no tanh bound
        z.round().clamp(-1, 1),
    "check_tied_parameter_groups": lambda model: [                          # named_parameters() hides the aliases
        names for names in {id(p): [n for n, q in model.named_parameters() if q is p]
                            for _, p in model.named_parameters()}.values() if len(names) > 1],
}


def _exercise_cells():
    for path in sorted(SOLUTIONS_DIR.glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "code" and BEGIN in source:
                yield path.name, source


EXERCISES = list(_exercise_cells())


def _run(source: str) -> str:
    namespace = {"math": math, "np": np, "torch": torch}
    exec("from fac_mini.checks import *", namespace)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(source, namespace)
    return output.getvalue()


def test_notebooks_are_in_sync_with_solutions():
    assert check_notebooks() == [], "run `python -m fac_mini exercises` and commit notebooks/"


def test_there_are_exercises():
    assert len(EXERCISES) >= 2


@pytest.mark.parametrize("name, source", EXERCISES, ids=[f"{n}:{i}" for i, (n, _) in enumerate(EXERCISES)])
def test_reference_answer_passes_its_check(name, source):
    assert re.search(r"check_\w+\(", source), f"{name}: an exercise cell must end with its self-check"
    output = _run(source)
    assert "[pass]" in output and "[fail]" not in output and "[todo]" not in output, output


@pytest.mark.parametrize("name, source", EXERCISES, ids=[f"{n}:{i}" for i, (n, _) in enumerate(EXERCISES)])
def test_student_stub_reports_todo_without_crashing(name, source):
    number = name[:2]
    student = student_version({"cells": [{"cell_type": "code", "source": source, "metadata": {}, "outputs": [],
                                          "execution_count": 1}], "metadata": {}}, number)
    output = _run(student["cells"][0]["source"])
    assert "[todo]" in output and "[pass]" not in output


def test_every_exercise_has_a_wrong_answer():
    used = {m for _, source in EXERCISES for m in re.findall(r"(check_\w+)\(", source)}
    assert used <= set(WRONG_ANSWERS), f"add wrong answers for {sorted(used - set(WRONG_ANSWERS))}"


@pytest.mark.parametrize("check_name", sorted(WRONG_ANSWERS))
def test_wrong_answer_fails_its_check(check_name, capsys):
    assert getattr(checks, check_name)(WRONG_ANSWERS[check_name]) is None
    out = capsys.readouterr().out
    assert "[fail]" in out and "[pass]" not in out


def test_student_version_replaces_solutions_tags_and_clears():
    notebook = {"metadata": {}, "cells": [
        {"cell_type": "code", "metadata": {}, "execution_count": 3, "outputs": [{"output_type": "stream"}],
         "source": "def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\ncheck(f)"},
        {"cell_type": "markdown", "metadata": {"tags": ["answer"]}, "source": "**Answers.** 42"},
        {"cell_type": "code", "metadata": {}, "execution_count": 4, "outputs": [{"output_type": "stream"}],
         "source": "print(1)"},
    ]}
    before = json.dumps(notebook)
    student = student_version(notebook, "07")
    assert json.dumps(notebook) == before                                  # input untouched
    first, answer, plain = student["cells"]
    assert first["source"] == ('def f(x):\n    raise NotImplementedError("Exercise 07.1: write your code here")\n'
                               '\ncheck(f)')
    assert first["metadata"]["tags"] == ["raises-exception"] and first["outputs"] == []
    assert first["execution_count"] is None and plain["outputs"] == [] and "tags" not in plain["metadata"]
    assert answer["source"] == ANSWER_PROMPT


@pytest.mark.parametrize("source, message", [
    ("### BEGIN SOLUTION\nx = 1", "without ### END SOLUTION"),
    ("x = 1\n### END SOLUTION", "without ### BEGIN SOLUTION"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION", "nested"),
])
def test_malformed_markers_are_reported(source, message):
    with pytest.raises(ValueError, match=message):
        student_version({"metadata": {}, "cells": [{"cell_type": "code", "metadata": {}, "source": source}]}, "01")


def test_write_and_check_detect_drift(tmp_path):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    cell = {"cell_type": "code", "metadata": {}, "execution_count": 1, "outputs": [],
            "source": "### BEGIN SOLUTION\nx = 1\n### END SOLUTION"}
    (solutions / "03_demo.ipynb").write_text(json.dumps({"metadata": {}, "nbformat": 4, "nbformat_minor": 5,
                                                         "cells": [cell]}))
    assert check_notebooks(solutions, notebooks) == ["03_demo.ipynb"]            # missing
    write_notebooks(solutions, notebooks)
    assert check_notebooks(solutions, notebooks) == []
    target = notebooks / "03_demo.ipynb"
    target.write_text(target.read_text().replace("Exercise 03.1", "Exercise 03.9"))
    assert check_notebooks(solutions, notebooks) == ["03_demo.ipynb"]            # stale
    write_notebooks(solutions, notebooks)
    (notebooks / "99_orphan.ipynb").write_text(render({"cells": []}))
    assert check_notebooks(solutions, notebooks) == ["99_orphan.ipynb"]          # no solution
    write_notebooks(solutions, notebooks)
    assert not (notebooks / "99_orphan.ipynb").exists()
    with pytest.raises(ValueError, match="must be named NN_name.ipynb"):
        (solutions / "demo.ipynb").write_text("{}")
        check_notebooks(solutions, notebooks)
