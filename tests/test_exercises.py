"""The exercise machinery: notebooks/ is generated from solutions/, and every exercise's self-check passes the
reference answer and fails every mistake its notebook warns about."""
import contextlib
import io
import json
import math
import re
import warnings
from functools import partial

import numpy as np
import pytest
import torch

from fac_mini.course import checks
from fac_mini.course.exercises import (ANSWER_PROMPT, SOLUTIONS_DIR, check_notebooks, render, student_version,
                                       write_notebooks)

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"

# For every self-check used in a notebook: the mistakes its notebook warns about (and the other plausible ones),
# each of which the check must reject while the reference answer passes. A new exercise must add its entry here
# (test_every_exercise_has_its_mistakes enforces it). Values: {mistake: wrong function}, or
# {mistake: (wrong function, text the verdict must contain)} where the verdict has to name the culprit.
F = torch.nn.functional


def _pad_frames(embeddings, group_size):                                  # zero frames up to a multiple of k
    return F.pad(embeddings, (0, 0, 0, -embeddings.shape[1] % group_size))


def _fsq_parts(z, levels):
    levels = torch.tensor(list(levels))
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    return levels, half_l, offset, bounded


def _fsq_no_ste(z, levels):                                               # round() has zero gradient
    levels, _, _, bounded = _fsq_parts(z, levels)
    return bounded.round() / (levels // 2)


def _fsq_ste_around_everything(z, levels):                                # gradient of the identity z -> z
    levels, _, _, bounded = _fsq_parts(z, levels)
    return z + (bounded.round() / (levels // 2) - z).detach()


def _fsq_no_shift(z, levels):                                             # even L: z = 0 not on level 0
    levels = torch.tensor(list(levels))
    half_l = (levels - 1) * (1 + 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    bounded = torch.tanh(z) * half_l - offset
    return (bounded + (bounded.round() - bounded).detach()) / (levels // 2)


def _fsq_no_epsilon(z, levels):                                           # half_l = (L - 1) / 2
    levels = torch.tensor(list(levels))
    half_l = (levels - 1) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
    return (bounded + (bounded.round() - bounded).detach()) / (levels // 2)


def _fsq_divide_by_half_width(z, levels):                                 # / half_l instead of / (L // 2)
    _, half_l, _, bounded = _fsq_parts(z, levels)
    return (bounded + (bounded.round() - bounded).detach()) / half_l


def _fsq_in_place(z, levels):                                             # tanh_ changes the caller's z
    levels, half_l, offset, _ = _fsq_parts(z.detach(), levels)
    bounded = z.add_(torch.atanh(offset / half_l)).tanh_() * half_l - offset
    return (bounded + (bounded.round() - bounded).detach()) / (levels // 2)


def _rms_norm_mistake(kind):
    def rms_norm(x, weight, eps=1e-6):
        if kind == "eps outside the square root":
            return weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps)
        if kind == "no eps":
            return weight * x / x.pow(2).mean(-1, keepdim=True).sqrt()
        if kind == "mean subtracted (LayerNorm)":
            centred = x - x.mean(-1, keepdim=True)
            return weight * centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
        if kind == "statistics over every dimension":
            return weight * x * torch.rsqrt(x.pow(2).mean() + eps)
        if kind == "sum of squares instead of the mean":
            return weight * x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)
        if kind == "no weight":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        raise AssertionError(kind)
    return rms_norm


def _rotary_mistake(kind):
    def apply_rotary(x, cos, sin):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        if kind == "GPT-J neighbour pairs (2i, 2i + 1)":
            rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
        elif kind == "rotate_half with the sign on the wrong half":
            rotated = torch.cat((x2, -x1), dim=-1)
        elif kind == "halves not swapped":
            rotated = torch.cat((-x1, x2), dim=-1)
        else:
            rotated = torch.cat((-x2, x1), dim=-1)
        if kind == "cos and sin swapped":
            return x * sin[:, None] + rotated * cos[:, None]
        if kind == "cos and sin without a heads axis":
            return x * cos + rotated * sin
        return x * cos[:, None] + rotated * sin[:, None]
    return apply_rotary


def _tied_groups(model, *, remove_duplicate=False, key=id, keep_single=False, order=lambda names: names):
    groups = {}
    for name, parameter in model.named_parameters(remove_duplicate=remove_duplicate):
        groups.setdefault(key(parameter), []).append(name)
    return [order(names) for names in groups.values() if keep_single or len(names) > 1]


def _groups_by_value(model):                                              # equal values are not a tie
    groups = []
    for name, parameter in model.named_parameters(remove_duplicate=False):
        for group in groups:
            if group[0][1].shape == parameter.shape and torch.equal(group[0][1], parameter):
                group.append((name, parameter))
                break
        else:
            groups.append([(name, parameter)])
    return [[name for name, _ in group] for group in groups if len(group) > 1]


def _teacher_forcing(labels, group_size, pad_id, previous_shift=None, fill=True, target_shift=None, wrap=False):
    previous_shift = {None: -(group_size - 1), "-k": -group_size}.get(previous_shift, previous_shift)
    target_shift = group_size if target_shift is None else target_shift
    filled = labels.masked_fill(labels == -100, pad_id) if fill else labels
    previous = filled.roll(previous_shift, dims=1)
    if wrap:
        targets = labels.roll(-target_shift, dims=1)
    else:
        ignore = labels.new_full((labels.shape[0], min(target_shift, labels.shape[1])), -100)
        targets = torch.cat((labels[:, target_shift:], ignore), dim=1)
    return previous, targets


def _window_mask_mistake(kind):
    def window_mask(num_frames_50hz, window_50hz):
        query, key = torch.arange(num_frames_50hz)[:, None], torch.arange(num_frames_50hz)[None]   # (T, 1), (1, T)
        if kind == "sliding band |i - j| < w":
            return (query - key).abs() < window_50hz
        if kind == "sliding band |i - j| <= w":
            return (query - key).abs() <= window_50hz
        if kind == "i % w instead of i // w":
            return query % window_50hz == key % window_50hz
        if kind == "causal inside the window":
            return (query // window_50hz == key // window_50hz) & (query >= key)
        raise AssertionError(kind)
    return window_mask


def _align_mistake(kind):
    def align_text_to_groups(text_ids, num_groups, sil_id, replace_ids=()):
        kept = text_ids if kind == "long transcript not cut" else text_ids[..., :num_groups]
        if kind == "cut along the first dimension":
            kept = text_ids[:num_groups]
        missing = max(0, num_groups - kept.shape[-1])
        if kind == "short transcript not padded":
            aligned = kept.clone()
        elif kind == "padded with the pad id 0, not <|sil|>":
            aligned = F.pad(kept, (0, missing), value=0)
        elif kind == "<|sil|> padding in front":
            aligned = F.pad(kept, (missing, 0), value=sil_id)
        else:
            aligned = F.pad(kept, (0, missing), value=sil_id)
        if kind == "eos and pad ids left in place":
            return aligned
        if kind == "replaced in place (changes the caller's text_ids)":
            for token in replace_ids:
                kept.masked_fill_(kept == token, sil_id)
            return F.pad(kept, (0, missing), value=sil_id)
        for token in replace_ids:
            aligned = aligned.masked_fill(aligned == token, sil_id)
        return aligned
    return align_text_to_groups


def _qa_labels(input_ids, prompt_lengths, attention_mask, *, prompt=True, padding=True, inclusive=False,
               fill=-100, shift=False):
    positions = torch.arange(input_ids.shape[1])[None, :]
    in_prompt = (positions <= prompt_lengths[:, None]) if inclusive else (positions < prompt_lengths[:, None])
    masked = torch.zeros_like(in_prompt)
    if prompt:
        masked = masked | in_prompt
    if padding:
        masked = masked | (attention_mask == 0)
    labels = input_ids.long().masked_fill(masked, fill)
    if shift:                                                             # the model shifts; do not shift twice
        labels = torch.cat((labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)), dim=1)
    return labels


def _qa_labels_in_place(input_ids, prompt_lengths, attention_mask):
    positions = torch.arange(input_ids.shape[1])[None, :]
    return input_ids.masked_fill_((positions < prompt_lengths[:, None]) | (attention_mask == 0), -100)


def _speech_tokens_mistake(kind):
    def speech_tokens(duration_s, frame_rate_hz, group_size=1):
        product = duration_s * frame_rate_hz
        if kind == "no round() before the ceiling":
            return math.ceil(math.ceil(product) / group_size)
        if kind == "one ceiling of d * f / k, no round()":
            return math.ceil(product / group_size)
        if kind == "int() truncates the frames":
            return math.ceil(int(product) / group_size)
        if kind == "round() to the nearest frame":
            return math.ceil(round(product) / group_size)
        if kind == "floor division drops the partial last group":
            return math.ceil(round(product, 9)) // group_size
        if kind == "group_size ignored":
            return math.ceil(round(product, 9))
        raise AssertionError(kind)
    return speech_tokens


def _mel_mistake(kind):
    def mel_filterbank(n_mels, n_fft, sampling_rate):
        import librosa

        options = {"no Slaney normalisation (peak 1)": dict(norm=None),
                   "HTK mel scale": dict(htk=True),
                   "HTK mel scale, no normalisation": dict(htk=True, norm=None)}[kind]
        with warnings.catch_warnings():                                   # HTK leaves low filters empty
            warnings.simplefilter("ignore", UserWarning)
            return librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=n_mels, **options)
    return mel_filterbank


def _mel_linear_spacing(n_mels, n_fft, sampling_rate):                    # triangles evenly spaced in Hz
    bin_hz = np.arange(n_fft // 2 + 1) * sampling_rate / n_fft
    edges = np.linspace(0.0, sampling_rate / 2, n_mels + 2)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (bin_hz - lower) / (centre - lower), (upper - bin_hz) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)) * 2.0 / (upper - lower)


def _ungroup_slice_major(grouped, group_size):                            # all slices 0 first, then all slices 1
    batch, length, width = grouped.shape
    return grouped.reshape(batch, length, group_size, -1).transpose(1, 2).reshape(batch, length * group_size, -1)


def _ungroup_strided(grouped, group_size):                                # columns s::k, not blocks
    batch, length, width = grouped.shape
    return grouped.reshape(batch, length, -1, group_size).transpose(2, 3).reshape(batch, length * group_size, -1)


MISTAKES = {
    "check_speech_tokens": {kind: _speech_tokens_mistake(kind) for kind in (
        "no round() before the ceiling", "one ceiling of d * f / k, no round()", "int() truncates the frames",
        "round() to the nearest frame", "floor division drops the partial last group", "group_size ignored")},
    "check_kv_cache_bytes": {
        "only the keys": lambda seq_len, num_layers, num_kv_heads, head_dim, bytes_per_value=2:
            num_layers * seq_len * num_kv_heads * head_dim * bytes_per_value,
        "values counted, not bytes": lambda seq_len, num_layers, num_kv_heads, head_dim, bytes_per_value=2:
            2 * num_layers * seq_len * num_kv_heads * head_dim,
        "one layer": lambda seq_len, num_layers, num_kv_heads, head_dim, bytes_per_value=2:
            2 * seq_len * num_kv_heads * head_dim * bytes_per_value,
        "one key-value head": lambda seq_len, num_layers, num_kv_heads, head_dim, bytes_per_value=2:
            2 * num_layers * seq_len * head_dim * bytes_per_value,
    },
    "check_mel_filterbank": {**{kind: _mel_mistake(kind) for kind in (
        "no Slaney normalisation (peak 1)", "HTK mel scale", "HTK mel scale, no normalisation")},
        "filters evenly spaced in Hz, not in mel": _mel_linear_spacing},
    "check_window_mask": {kind: _window_mask_mistake(kind) for kind in (
        "sliding band |i - j| < w", "sliding band |i - j| <= w", "i % w instead of i // w",
        "causal inside the window")},
    "check_fsq_quantize": {
        "plain rounding, no tanh bound": lambda z, levels: z.round().clamp(-1, 1),
        "no straight-through estimator (round() has zero gradient)": (_fsq_no_ste, "dL/dz, the gradient"),
        "straight-through around the whole function (gradient 1)": (_fsq_ste_around_everything, "dL/dz"),
        "no atanh shift for even L": (_fsq_no_shift, "codes: different"),
        "no epsilon in half_l": _fsq_no_epsilon,
        "divided by half_l instead of L // 2": _fsq_divide_by_half_width,
        "z modified in place": (_fsq_in_place, "in place"),
    },
    "check_concat_grouping": {
        "channel-major concat, not frame-major": lambda embeddings, group_size, weight:
            F.linear(_pad_frames(embeddings, group_size).unflatten(1, (-1, group_size)).transpose(2, 3).flatten(2),
                     weight),
        "partial last group dropped": lambda embeddings, group_size, weight:
            F.linear(embeddings[:, : embeddings.shape[1] // group_size * group_size]
                     .reshape(embeddings.shape[0], -1, group_size * embeddings.shape[2]), weight),
        "zero frames in front": lambda embeddings, group_size, weight:
            F.linear(F.pad(embeddings, (0, 0, -embeddings.shape[1] % group_size, 0))
                     .reshape(embeddings.shape[0], -1, group_size * embeddings.shape[2]), weight),
        "padded by repeating the last frame": lambda embeddings, group_size, weight:
            F.linear(torch.cat([embeddings] + [embeddings[:, -1:]] * (-embeddings.shape[1] % group_size), 1)
                     .reshape(embeddings.shape[0], -1, group_size * embeddings.shape[2]), weight),
        "weight reshaped to (k·H, H_out) instead of transposed": lambda embeddings, group_size, weight:
            _pad_frames(embeddings, group_size).reshape(embeddings.shape[0], -1, group_size * embeddings.shape[2])
            @ weight.reshape(weight.shape[1], weight.shape[0]),
    },
    "check_mean_grouping": {
        "last group averaged over its real frames only": lambda embeddings, group_size, weight:
            F.linear(torch.stack([embeddings[:, g * group_size:(g + 1) * group_size].mean(1)
                                  for g in range(-(-embeddings.shape[1] // group_size))], 1), weight),
        "partial last group dropped": lambda embeddings, group_size, weight:
            F.linear(embeddings[:, : embeddings.shape[1] // group_size * group_size]
                     .unflatten(1, (-1, group_size)).mean(2), weight),
        "sum instead of mean": lambda embeddings, group_size, weight:
            F.linear(_pad_frames(embeddings, group_size).unflatten(1, (-1, group_size)).sum(2), weight),
        "strided groups (frames g, g + L, ...)": lambda embeddings, group_size, weight:
            F.linear(_pad_frames(embeddings, group_size).unflatten(1, (group_size, -1)).mean(1), weight),
        "zero frames in front": lambda embeddings, group_size, weight:
            F.linear(F.pad(embeddings, (0, 0, -embeddings.shape[1] % group_size, 0))
                     .unflatten(1, (-1, group_size)).mean(2), weight),
        "weight reshaped to (H, H_out) instead of transposed": lambda embeddings, group_size, weight:
            _pad_frames(embeddings, group_size).unflatten(1, (-1, group_size)).mean(2)
            @ weight.reshape(weight.shape[1], weight.shape[0]),
    },
    "check_rms_norm": {kind: _rms_norm_mistake(kind) for kind in (
        "eps outside the square root", "no eps", "mean subtracted (LayerNorm)", "statistics over every dimension",
        "sum of squares instead of the mean", "no weight")},
    "check_apply_rotary": {kind: _rotary_mistake(kind) for kind in (
        "GPT-J neighbour pairs (2i, 2i + 1)", "rotate_half with the sign on the wrong half", "halves not swapped",
        "cos and sin swapped", "cos and sin without a heads axis")},
    "check_chat_prompt": {
        "no newline after 'assistant'": lambda question:
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant",
        "no newline after <|im_end|>": lambda question:
            f"<|im_start|>user\n{question}<|im_end|><|im_start|>assistant\n",
        "no newline after 'user'": lambda question: f"<|im_start|>user{question}<|im_end|>\n<|im_start|>assistant\n",
        "space instead of newline": lambda question: f"<|im_start|>user {question}<|im_end|> <|im_start|>assistant ",
        "Qwen2.5's default system turn added": lambda question:
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
    },
    "check_qa_labels": {
        "prompt not masked": partial(_qa_labels, prompt=False),
        "padding not masked": partial(_qa_labels, padding=False),
        "prompt mask one too long (<=)": partial(_qa_labels, inclusive=True),
        "masked with 0, not -100": partial(_qa_labels, fill=0),
        "labels shifted by one (the model shifts them)": partial(_qa_labels, shift=True),
        "input_ids masked in place": (_qa_labels_in_place, "in place"),
    },
    "check_align_text_to_groups": {kind: _align_mistake(kind) for kind in (
        "long transcript not cut", "cut along the first dimension", "short transcript not padded",
        "padded with the pad id 0, not <|sil|>", "<|sil|> padding in front", "eos and pad ids left in place",
        "replaced in place (changes the caller's text_ids)")},
    "check_tied_parameter_groups": {
        "named_parameters() hides the aliases": (lambda model: _tied_groups(model, remove_duplicate=True),
                                                 "expected 1 group, got 0"),
        "equal values taken for a tie": _groups_by_value,
        "single names kept": (lambda model: _tied_groups(model, keep_single=True), "expected 1 group, got 94"),
        "names sorted, not in module order": lambda model: _tied_groups(model, order=sorted),
        "groups sorted by name, not in module order": lambda model: sorted(_tied_groups(model)),
    },
    "check_ungroup": {
        "strided slices (columns s::k), not blocks": _ungroup_strided,
        "slice-major order (all slices 0 first)": _ungroup_slice_major,
    },
    "check_teacher_forcing_ids": {
        "previous: the usual LM shift (label j - 1)": (partial(_teacher_forcing, previous_shift=1),
                                                       "previous (the speech ids the SRH embeds)"),
        "previous: not shifted (label j)": (partial(_teacher_forcing, previous_shift=0), "previous"),
        "previous: rolled by -k (label j + k, the target itself)": (partial(_teacher_forcing, previous_shift="-k"),
                                                                    "previous"),
        "previous: -100 not read as pad_id": (partial(_teacher_forcing, fill=False), "previous"),
        "targets: not shifted": (partial(_teacher_forcing, target_shift=0), "targets (the labels it is scored on)"),
        "targets: shifted by one, as in a text LM": (partial(_teacher_forcing, target_shift=1), "targets"),
        "targets: rolled, the last k wrap around": (partial(_teacher_forcing, wrap=True), "targets"),
    },
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
    exec("from fac_mini.course.checks import *", namespace)
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
    assert "[todo]" in output and "[pass]" not in output and "In this cell, replace the line" in output, output


def _mistakes():
    for check_name, mistakes in sorted(MISTAKES.items()):
        for mistake, entry in mistakes.items():
            wrong, says = entry if isinstance(entry, tuple) else (entry, None)
            yield check_name, mistake, wrong, says


def test_every_exercise_has_its_mistakes():
    used = {m for _, source in EXERCISES for m in re.findall(r"(check_\w+)\(", source)}
    assert used <= set(MISTAKES), f"list the mistakes of {sorted(used - set(MISTAKES))} in MISTAKES"
    assert set(MISTAKES) <= set(checks.__all__), f"no such check: {sorted(set(MISTAKES) - set(checks.__all__))}"
    few = [name for name, mistakes in MISTAKES.items() if len(mistakes) < 2]
    assert not few, f"list every mistake the notebook warns about, not one: {few}"


def pytest_generate_tests(metafunc):
    """Parametrize test_mistake_fails_its_check at collection time, after the whole module ran: the MISTAKES.update
    blocks below (one per notebook's exercises) are then included."""
    if metafunc.function.__name__ == "test_mistake_fails_its_check":
        entries = list(_mistakes())
        metafunc.parametrize("check_name, mistake, wrong, says", entries,
                             ids=[f"{name}:{mistake}" for name, mistake, _, _ in entries])


def test_mistake_fails_its_check(check_name, mistake, wrong, says, capsys):
    assert getattr(checks, check_name)(wrong) is None
    out = capsys.readouterr().out
    assert out.startswith("[fail]") and "[pass]" not in out and "Hint: " in out, out
    if says is not None:                                                 # the verdict itself, not the hint
        assert says in out.split("Hint: ")[0], f"the verdict should name the culprit ({says!r}):\n{out}"


def _speech_tokens_in_decimal(duration_s, frame_rate_hz, group_size=1):           # exact decimal arithmetic
    from decimal import Decimal

    frames = math.ceil(Decimal(repr(duration_s)) * Decimal(repr(frame_rate_hz)))
    return -(-frames // group_size)


def _fsq_in_float64(z, levels):                                                     # other dtype, other order
    levels = torch.as_tensor(levels, dtype=torch.float64)
    half_l = (levels - 1) * 1.001 / 2
    offset = (levels % 2 == 0).double() * 0.5
    bounded = half_l * torch.tanh(z.double() + torch.atanh(offset / half_l)) - offset
    return (((bounded.round() - bounded).detach() + bounded) / torch.floor(levels / 2)).float()


@pytest.mark.parametrize("check_name, answer", [("check_speech_tokens", _speech_tokens_in_decimal),
                                                ("check_fsq_quantize", _fsq_in_float64)])
def test_a_right_answer_written_differently_passes(check_name, answer, capsys):
    getattr(checks, check_name)(answer)
    assert capsys.readouterr().out.startswith("[pass]")


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
    assert check_notebooks(solutions, notebooks) == [                            # raw solution, missing student
        "solutions/03_demo.ipynb (not in the form JupyterLab saves)", "03_demo.ipynb"]
    write_notebooks(solutions, notebooks)
    assert check_notebooks(solutions, notebooks) == []
    saved = json.loads((solutions / "03_demo.ipynb").read_text())                  # normalised in place
    assert saved["metadata"]["kernelspec"]["display_name"] == "Python 3 (ipykernel)"
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


# --- notebook 09: flow matching ----------------------------------------------------------------------------
def _flow_path(x0, x1, t, sigma_min, *, sigma_in_path=True, sigma_in_target=True, swapped=False,
               target_from_path=False, broadcast=True):
    if swapped:
        x0, x1 = x1, x0
    t = torch.as_tensor(t, dtype=x0.dtype)
    if broadcast:
        t = t.reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
    else:
        t = t[:, None] if t.dim() else t
    path_sigma, target_sigma = (sigma_min if sigma_in_path else 0.0), (sigma_min if sigma_in_target else 0.0)
    x_t = (1 - (1 - path_sigma) * t) * x0 + t * x1
    u_t = x1 - x_t if target_from_path else x1 - (1 - target_sigma) * x0
    return x_t, u_t


def _flow_path_in_place(x0, x1, t, sigma_min):                       # x0 scaled in place
    t = torch.as_tensor(t, dtype=x0.dtype)
    t = t.reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
    u_t = x1 - (1 - sigma_min) * x0
    return x0.mul_(1 - (1 - sigma_min) * t).add_(t * x1), u_t


def _guided_euler(velocity, x0, time_span, guidance, *, mix="cfg", at="start", uniform=False, steps=None):
    x, pairs = x0, list(zip(time_span[:-1], time_span[1:]))
    for t0, t1 in pairs[:steps]:
        v_cond, v_uncond = velocity(x, t1 if at == "end" else t0)
        v = {"cfg": (1 + guidance) * v_cond - guidance * v_uncond,
             "interpolation": guidance * v_cond + (1 - guidance) * v_uncond,
             "sign flipped": (1 - guidance) * v_cond + guidance * v_uncond,
             "no guidance": v_cond}[mix]
        x = x + ((time_span[-1] - time_span[0]) / len(pairs) if uniform else t1 - t0) * v
    return x


def _guided_euler_in_place(velocity, x0, time_span, guidance):      # x += ... changes the caller's noise
    x = x0
    for t0, t1 in zip(time_span[:-1], time_span[1:]):
        v_cond, v_uncond = velocity(x, t0)
        x += (t1 - t0) * ((1 + guidance) * v_cond - guidance * v_uncond)
    return x


MISTAKES.update({
    "check_conditional_flow": {
        "sigma_min left out of the path": (partial(_flow_path, sigma_in_path=False), "x_t"),
        "sigma_min left out of the target": (partial(_flow_path, sigma_in_target=False), "u_t"),
        "x0 and x1 swapped (t = 0 at the data)": partial(_flow_path, swapped=True),
        "target x1 - x_t (depends on t)": (partial(_flow_path, target_from_path=True), "u_t"),
        "t given one trailing axis only, t[:, None]": partial(_flow_path, broadcast=False),
        "x0 changed in place": (_flow_path_in_place, "in place"),
    },
    "check_guided_euler": {
        "guidance as interpolation g·v_cond + (1 - g)·v_uncond": partial(_guided_euler, mix="interpolation"),
        "guidance sign flipped (1 - g)·v_cond + g·v_uncond": partial(_guided_euler, mix="sign flipped"),
        "no guidance (v_cond only)": partial(_guided_euler, mix="no guidance"),
        "velocity read at the end of the step (t1)": partial(_guided_euler, at="end"),
        "equal steps instead of the span's differences": partial(_guided_euler, uniform=True),
        "only the first step": partial(_guided_euler, steps=1),
        "x0 changed in place (x += ...)": (_guided_euler_in_place, "in place"),
    },
})


# --- notebook 10: overlap-add (the inverse STFT of the iSTFT head) -----------------------------------------
def _overlap_add_mistake(kind):
    def overlap_add(spectrum, n_fft, hop_length, window):
        if kind == "ifft of the half spectrum, real part":
            frames = torch.fft.ifft(spectrum, dim=1).real                             # n_fft // 2 + 1 samples
            n_fft = frames.shape[1]
            window = window[:n_fft]
        else:
            frames = torch.fft.irfft(spectrum, n=n_fft, dim=1)                       # (batch, n_fft, frames)
        if kind != "no synthesis window":
            frames = frames * window[:, None]
        count = frames.shape[-1]
        length = n_fft + (count - 1) * hop_length
        wave, envelope = frames.new_zeros(frames.shape[0], length), frames.new_zeros(length)
        weight = {"divided by the sum of the window, not of its square": window}.get(kind, window ** 2)
        for j in range(count):
            wave[:, j * hop_length: j * hop_length + n_fft] += frames[:, :, j]
            envelope[j * hop_length: j * hop_length + n_fft] += weight
        if kind == "no division by the window envelope":
            envelope = torch.ones_like(envelope)
        start = {"centring pad not cut (starts at sample 0)": 0}.get(kind, n_fft // 2)
        end = start + (count - 1) * hop_length
        if kind == "padding kept (full length)":
            start, end = 0, length
        return wave[:, start:end] / envelope[start:end]
    return overlap_add


MISTAKES.update({
    "check_overlap_add": {kind: _overlap_add_mistake(kind) for kind in (
        "no division by the window envelope", "divided by the sum of the window, not of its square",
        "no synthesis window", "centring pad not cut (starts at sample 0)", "padding kept (full length)",
        "ifft of the half spectrum, real part")},
})


MISTAKES.update({
    "check_lora_linear": {
        "scaled by alpha, not alpha / r": lambda x, w, a, b, alpha: x @ w.T + alpha * ((x @ a.T) @ b.T),
        "scaled by r / alpha": lambda x, w, a, b, alpha: x @ w.T + (a.shape[0] / alpha) * ((x @ a.T) @ b.T),
        "the frozen path left out": lambda x, w, a, b, alpha: (alpha / a.shape[0]) * ((x @ a.T) @ b.T),
        "no scaling": lambda x, w, a, b, alpha: x @ w.T + (x @ a.T) @ b.T,
    },
    "check_zero2_state_bytes": {
        "ZeRO-3 (weights partitioned too)": lambda psi, n: 16 * psi / n,
        "ZeRO-1 (gradients not partitioned)": lambda psi, n: 4 * psi + 12 * psi / n,
        "gradients forgotten": lambda psi, n: 2 * psi + 12 * psi / n,
        "DDP (nothing partitioned)": lambda psi, n: 16 * psi,
    },
})


def _merge_mistake(kind):
    def merge(stage1_state, base_state, alpha):
        if kind == "stage-1 state modified in place":
            for name, tensor in stage1_state.items():
                if name in base_state:
                    tensor.mul_(alpha).add_((1 - alpha) * base_state[name])
            return stage1_state
        merged = {}
        for name, tuned in stage1_state.items():
            if name not in base_state:
                if kind == "tensors the base lacks dropped":
                    continue
                merged[name] = alpha * tuned if kind == "tensors the base lacks scaled by alpha" else tuned.clone()
                continue
            a = 1 - alpha if kind == "alpha and 1 - alpha swapped" else alpha
            value = a * tuned.float() + (1 - a) * base_state[name].float()
            merged[name] = value if kind == "dtype not kept (float32 result)" else value.to(tuned.dtype)
        return merged
    return merge


MISTAKES.update({
    "check_core_cocktail_merge": {
        "alpha and 1 - alpha swapped": _merge_mistake("alpha and 1 - alpha swapped"),
        "tensors the base lacks dropped": (_merge_mistake("tensors the base lacks dropped"), "names"),
        "tensors the base lacks scaled by alpha": _merge_mistake("tensors the base lacks scaled by alpha"),
        "dtype not kept (float32 result)": (_merge_mistake("dtype not kept (float32 result)"), "dtypes"),
        "stage-1 state modified in place": (_merge_mistake("stage-1 state modified in place"), "in place"),
    },
})


def _dpo_mistake(kind):
    import torch.nn.functional as F

    def loss_fn(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1):
        chosen = beta * (policy_chosen - reference_chosen)
        rejected = beta * (policy_rejected - reference_rejected)
        if kind == "rewards without beta":
            chosen, rejected = policy_chosen - reference_chosen, policy_rejected - reference_rejected
            margin = beta * (chosen - rejected)
        else:
            margin = rejected - chosen if kind == "sign flipped (rejected - chosen)" else chosen - rejected
        if kind == "log(sigmoid(x)), which underflows":
            losses = -torch.log(torch.sigmoid(margin))
        elif kind == "beta outside the log-sigmoid":
            losses = -beta * F.logsigmoid(margin / beta)
        else:
            losses = -F.logsigmoid(margin)
        loss = losses.sum() if kind == "sum over pairs instead of the mean" else losses.mean()
        return loss, chosen.detach(), rejected.detach()
    return loss_fn


MISTAKES.update({
    "check_dpo_loss": {kind: _dpo_mistake(kind) for kind in (
        "sign flipped (rejected - chosen)", "sum over pairs instead of the mean", "rewards without beta",
        "log(sigmoid(x)), which underflows", "beta outside the log-sigmoid")},
})


def _chunk_steps_mistake(kind):
    def audio_chunk_steps(ids_per_step, hop=15, lookahead=3):
        def needed(chunk):                                                # ids chunk `chunk` (0-based) waits for
            if kind == "no look-ahead: hop·(c + 1) ids":
                return hop * (chunk + 1)
            if kind == "look-ahead per chunk: (hop + lookahead)·(c + 1)":
                return (hop + lookahead) * (chunk + 1)
            if kind == "one hop too early: hop·c + lookahead":
                return hop * chunk + lookahead
            return hop * (chunk + 1) + lookahead
        steps, total = [], 0
        for step, count in enumerate(ids_per_step):
            total += count
            ready = (lambda: total > needed(len(steps))) if kind == "> instead of >=" else \
                (lambda: total >= needed(len(steps)))
            if kind == "at most one chunk per step (if, not while)":
                if ready():
                    steps.append(step)
            else:
                while ready():
                    steps.append(step)
        if kind != "no last chunk (the flush)" and (total or kind == "a last chunk even without speech") \
                and ids_per_step:
            steps.append(len(ids_per_step) - 1)
        if kind == "steps numbered from 1":
            steps = [step + 1 for step in steps]
        return steps
    return audio_chunk_steps


MISTAKES.update({
    "check_audio_chunk_steps": {kind: _chunk_steps_mistake(kind) for kind in (
        "no look-ahead: hop·(c + 1) ids", "look-ahead per chunk: (hop + lookahead)·(c + 1)",
        "one hop too early: hop·c + lookahead", "> instead of >=", "at most one chunk per step (if, not while)",
        "no last chunk (the flush)", "a last chunk even without speech", "steps numbered from 1")},
})
