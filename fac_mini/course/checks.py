"""Self-checks for the notebooks' exercises, in the spirit of nn-zero-to-hero's ``cmp()``.

Every exercise in ``notebooks/`` is a cell that defines your function, with its body to write, and ends with
``check_<name>(your_function)``. The check runs your function and the course's reference on the same seeded inputs
and prints one line per verdict: exact match, close match (with the largest difference), or a failure that says
which case, which output and what differs, with a hint. It never raises, so the notebook goes on.

``check_*`` functions print and return ``None`` (a returned value would be echoed under the cell, and nbval runs
cells without IPython's history, so a trailing ``;`` does not hide it); :func:`run_check` returns pass/fail.
"""
from __future__ import annotations

import math
import traceback
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

__all__ = ["compare", "run_check", "check_speech_tokens", "check_kv_cache_bytes"]

_PLAIN = (str, bytes, bool, int, np.integer, type(None))


def _is_plain(value: Any) -> bool:
    """Strings, integers, None, and lists/tuples of them: data whose repr says exactly what it is."""
    if isinstance(value, (tuple, list)):
        return all(_is_plain(item) for item in value)
    return isinstance(value, _PLAIN)


def _short(value: Any, limit: int = 240) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def _what(value: Any) -> str:
    """'a list of 3 items', 'a Tensor of shape (2, 5)', 'None': what the learner's function returned."""
    if isinstance(value, (tuple, list, set, dict)):
        return f"a {type(value).__name__} of {len(value)} item{'s' * (len(value) != 1)}"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def _compare_tensors(student: Any, reference: Any, atol: float, rtol: float) -> tuple[bool, str]:
    want = torch.as_tensor(reference)
    try:
        got = torch.as_tensor(student)
    except Exception:
        return False, f"expected a tensor of shape {tuple(want.shape)}, got {_what(student)}"
    if tuple(got.shape) != tuple(want.shape):
        return False, f"shape {tuple(got.shape)} but expected {tuple(want.shape)}"
    if got.dtype.is_complex != want.dtype.is_complex:
        return False, f"dtype {got.dtype} but expected {want.dtype}"
    if torch.equal(got.to(want.dtype), want):
        return True, "exact"
    if not (want.dtype.is_floating_point or got.dtype.is_floating_point):       # ids, masks, counts: exact only
        wrong = got.to(want.dtype) != want
        first = tuple(int(i) for i in wrong.nonzero()[0])
        return False, (f"{int(wrong.sum())} of {want.numel()} entries differ; first at {first}: got "
                       f"{got[first].item()!r}, expected {want[first].item()!r}")
    got64, want64 = got.double(), want.double()
    close = torch.allclose(got64, want64, atol=atol, rtol=rtol)
    difference = (got64 - want64).abs().nan_to_num(nan=math.inf)
    worst = tuple(int(i) for i in np.unravel_index(int(difference.argmax()), tuple(want.shape)))
    at = f" at {worst}" if want.dim() else ""
    return close, (f"{'close' if close else 'different'}: max abs diff {difference.max().item():.2e}{at}"
                   + ("" if close else f" (got {got64[worst].item():.6g}, expected {want64[worst].item():.6g})"))


def compare(student: Any, reference: Any, atol: float = 1e-6, rtol: float = 1e-5,
            names: Sequence[str] | None = None, items: str | None = None) -> tuple[bool, str]:
    """Compare two results (numbers, strings, arrays, tensors, or tuples/lists of them): (ok, how they compare).

    ``names``: a result made of several outputs (a tuple) names each, e.g. ``("previous", "targets")``; a
    difference is then reported under the output's name. ``items``: a result that is a list of any length says
    what one element is (a singular noun, e.g. ``"group"``); a wrong count then reads "expected 2 groups, got 0".
    Integer and boolean tensors must match exactly; float ones within ``atol + rtol·|reference|``.
    """
    if isinstance(reference, (tuple, list)):
        if names is not None:
            if len(names) != len(reference):
                raise ValueError(f"compare: {len(names)} names for {len(reference)} outputs")
            if not isinstance(student, (tuple, list)) or len(student) != len(reference):
                return False, f"expected {len(reference)} outputs ({', '.join(names)}), got {_what(student)}"
            for name, got, want in zip(names, student, reference):
                ok, how = compare(got, want, atol, rtol)
                if not ok:
                    return False, f"{name}: {how}"
            return True, "all outputs match"
        if not isinstance(student, (tuple, list)):
            return False, f"expected a list of {_plural(len(reference), items or 'item')}, got {_what(student)}"
        if _is_plain(reference) and not items:
            same = _is_plain(student) and list(student) == list(reference)
            return same, ("exact" if same else f"got {_short(student)}, expected {_short(reference)}")
        if len(student) != len(reference):
            how = f"expected {_plural(len(reference), items or 'item')}, got {len(student)}"
            if _is_plain(reference) and _is_plain(student):
                how += f": expected {_short(reference)}, got {_short(student)}"
            return False, how
        for index, (got, want) in enumerate(zip(student, reference)):
            ok, how = compare(got, want, atol, rtol)
            if not ok:
                return False, f"{items or 'item'} {index + 1} of {len(reference)}: {how}"
        return True, "all items match"
    if isinstance(reference, (torch.Tensor, np.ndarray)):
        return _compare_tensors(student, reference, atol, rtol)
    if isinstance(reference, bool) or isinstance(reference, (int, np.integer)):
        return (student == reference), ("exact" if student == reference else f"got {student!r}, expected {reference!r}")
    if isinstance(reference, (float, np.floating)):
        if not isinstance(student, (int, float, np.integer, np.floating)):
            return False, f"expected a number, got {_what(student)}"
        close = math.isclose(float(student), float(reference), rel_tol=rtol, abs_tol=atol)
        return close, (f"close (diff {abs(float(student) - float(reference)):.2e})" if close
                       else f"got {float(student):.6g}, expected {float(reference):.6g}")
    return student == reference, ("exact" if student == reference else f"got {student!r}, expected {reference!r}")


def run_check(name: str, student_fn: Callable, reference_fn: Callable, cases: Iterable[tuple],
              hint: str = "", atol: float = 1e-6, rtol: float = 1e-5, names: Sequence[str] | None = None,
              items: str | None = None) -> bool:
    """Call both functions on every case (a tuple of positional arguments); print a verdict; return pass/fail.

    A reference that returns several outputs (a tuple) needs ``names`` for them, so that a failure says which
    output is wrong; ``items`` names the elements of a list result (see :func:`compare`).
    """
    cases = list(cases)
    for index, args in enumerate(cases):
        expected = reference_fn(*args)
        if isinstance(expected, tuple) and names is None:
            raise ValueError(f"run_check({name!r}): the reference returns {len(expected)} outputs; pass names=")
        try:
            got = student_fn(*args)
        except NotImplementedError as error:       # the stub: the exercise's function and its check share a cell
            other = "" if str(error).startswith("Exercise") else f" ({error})"
            print(f"[todo] {name}: not written yet{other}. In this cell, replace the line `raise "
                  f"NotImplementedError(...)` inside `{name}` with your code, then run the cell again.")
            return False
        except Exception as error:  # show the learner's own error, briefly
            last = traceback.format_exception_only(type(error), error)[-1].strip().rstrip(".")
            print(f"[fail] {name}: case {index + 1} {_describe(args)} raised {last}.\n       Hint: {hint}")
            return False
        ok, how = compare(got, expected, atol, rtol, names=names, items=items)
        if not ok:
            print(f"[fail] {name}: case {index + 1} {_describe(args)}: {how}.\n       Hint: {hint}")
            return False
    print(f"[pass] {name}: all {len(cases)} cases match the reference.")
    return True


def _describe(args: tuple) -> str:
    parts = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            parts.append(f"tensor{tuple(arg.shape)}")
        elif isinstance(arg, np.ndarray):
            parts.append(f"array{tuple(arg.shape)}")
        else:
            parts.append(_short(arg, 60))
    return "(" + ", ".join(parts) + ")"


# --- notebook 01: the resolution mismatch ----------------------------------------------------------------
def check_speech_tokens(student_fn: Callable) -> None:
    """Exercise 01.1: tokens the LLM sees for ``duration_s`` of speech at ``frame_rate_hz``, grouped by ``group_size``."""
    from ..cost import speech_tokens

    rng = np.random.default_rng(1)
    cases = [(360.0, 25.0, 1), (360.0, 25.0, 5), (2.5, 25.0, 5), (0.04, 25.0, 5), (10.0, 12.5, 1), (0.0, 25.0, 5)]
    # Products that land a hair off a whole number of frames. ceil() without round() counts one frame too many
    # when the float product lies just above it, int() or floor() one too few when it lies just below it.
    cases += [(0.28, 25.0, 1),      # 0.28 * 25 = 7.000000000000001 -> 7 frames, not 8
              (0.28, 25.0, 7),      # ... and 1 group of 7, not 2
              (2.2, 25.0, 5),       # 2.2 * 25 = 55.00000000000001 -> 11 groups of 5, not 12
              (4.4, 25.0, 5),       # 4.4 * 25 = 110.00000000000001 -> 22 groups, not 23
              (1.16, 25.0, 1),      # 1.16 * 25 = 28.999999999999996 -> 29 frames (int() gives 28)
              (4.6, 25.0, 1),       # 4.6 * 25 = 114.99999999999999 -> 115 frames (int() gives 114)
              (0.29, 25.0, 1),      # 0.29 * 25 = 7.249999999999999 -> 8 frames (int() gives 7)
              (0.56, 12.5, 1),      # 0.56 * 12.5 = 7.000000000000001 -> 7 frames
              (2.32, 12.5, 1),      # 2.32 * 12.5 = 28.999999999999996 -> 29 frames
              (0.14, 50.0, 1),      # 0.14 * 50 = 7.000000000000001 -> 7 frames
              (0.58, 50.0, 1)]      # 0.58 * 50 = 28.999999999999996 -> 29 frames
    cases += [(float(round(rng.uniform(0.1, 400), 3)), float(rng.choice([12.5, 25.0, 50.0])), int(rng.integers(1, 8)))
              for _ in range(20)]
    run_check("speech_tokens", student_fn, speech_tokens, cases,
              hint="frames = ceil(duration_s * frame_rate_hz), with the product rounded to 9 decimals first "
                   "(0.28 * 25 is 7.000000000000001 in floating point, and must be 7 frames); the LLM then sees "
                   "ceil(frames / group_size) positions (a partial last group still costs a position).")


def check_kv_cache_bytes(student_fn: Callable) -> None:
    """Exercise 01.2: bytes of keys and values cached for ``seq_len`` positions."""
    from ..cost import kv_cache_bytes

    rng = np.random.default_rng(2)
    cases = [(1800, 36, 8, 128, 2), (9000, 36, 8, 128, 2), (1, 1, 1, 1, 4)]
    cases += [tuple(int(v) for v in (rng.integers(1, 10000), rng.integers(1, 64), rng.integers(1, 16),
                                     rng.choice([64, 128]), rng.choice([2, 4]))) for _ in range(20)]
    run_check("kv_cache_bytes", student_fn, kv_cache_bytes, cases,
                     hint="every layer stores one key AND one value vector per position and per KV head: "
                          "2 * layers * positions * kv_heads * head_dim * bytes_per_value.")


# --- notebook 05: the text LLM M0 (chat format and SFT labels) -------------------------------------------
__all__ += ["check_chat_prompt", "check_qa_labels"]


def check_chat_prompt(student_fn: Callable) -> None:
    """Exercise 05: ``chat_prompt(question)``, the released chat format up to the assistant's answer."""
    from ..train.m0 import chat_prompt
    from ..world import build_world

    questions = build_world(0).questions()
    rng = np.random.default_rng(5)
    cases = [(questions[int(i)].text,) for i in rng.choice(len(questions), size=12, replace=False)]
    cases += [("Hi?",), ("Two\nlines?",)]
    run_check("chat_prompt", student_fn, chat_prompt, cases,
              hint="'<|im_start|>user\\n' + question + '<|im_end|>\\n' + '<|im_start|>assistant\\n' "
                   "(newlines after the role and after <|im_end|>; nothing after the last newline).")


def check_qa_labels(student_fn: Callable) -> None:
    """Exercise 05: ``qa_labels(input_ids, prompt_lengths, attention_mask)``, SFT labels with the prompt masked."""
    from ..train.m0 import qa_labels

    generator = torch.Generator().manual_seed(6)
    cases = []
    for batch, length in ((1, 5), (3, 9), (4, 16), (2, 1)):
        input_ids = torch.randint(0, 512, (batch, length), generator=generator)               # (B, T)
        lengths = torch.randint(1, length + 1, (batch,), generator=generator)                # real tokens per row
        attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()           # right padding
        prompt_lengths = torch.stack([torch.randint(0, int(n) + 1, (1,), generator=generator)[0] for n in lengths])
        cases.append((input_ids, prompt_lengths, attention_mask))

    def guarded(input_ids, prompt_lengths, attention_mask):
        before = [t.clone() for t in (input_ids, prompt_lengths, attention_mask)]
        labels = student_fn(input_ids, prompt_lengths, attention_mask)
        if not all(torch.equal(a, b) for a, b in zip(before, (input_ids, prompt_lengths, attention_mask))):
            raise ValueError("your function modified its inputs in place; clone input_ids before masking")
        return labels

    run_check("qa_labels", guarded, qa_labels, cases,
              hint="start from a copy of input_ids (do not modify it); set -100 where the position index is "
                   "< prompt_lengths[b] (the prompt) and where attention_mask is 0 (padding).")


# --- notebook 03: the speech tokenizer ---------------------------------------------------------------------
__all__ += ["check_fsq_quantize"]


def check_fsq_quantize(student_fn: Callable) -> None:
    """Exercise 03.1: ``fsq_quantize(z, levels)`` - bound, round (straight-through), scale to [-1, 1].

    Both the codes and the gradient they pass back to ``z`` are compared: a plain ``round()`` gives the right
    codes but a zero gradient, so the encoder in front of it would never learn.
    """
    from ..fsq import fsq_quantize

    generator = torch.Generator().manual_seed(3)
    cases = [(torch.zeros(2, 3), [3, 3, 3]),                                   # 0 stays on level 0
             (torch.tensor([[-9.0, -0.6, -0.5, 0.5, 0.6, 9.0]]).T.repeat(1, 2), [3, 5])]
    for levels in ([3] * 8, [5, 5, 5], [7, 5, 3], [8, 5, 5, 5], [4, 6]):     # odd levels first, then even ones
        for scale in (0.5, 2.0):
            cases.append((torch.randn(4, 10, len(levels), generator=generator) * scale, levels))
    # upstream gradient dL/dcodes for the backward pass: random, so every entry of dL/dz is checked
    cases = [(z, levels, torch.randn(z.shape, generator=generator)) for z, levels in cases]

    def codes_and_gradient(fn: Callable) -> Callable:
        def run(z, levels, upstream):
            before = z.clone()
            codes = fn(z, levels)
            leaf = z.clone().requires_grad_(True)
            tracked = leaf.clone()                          # not a leaf, so an in-place change is ours to report
            traced = fn(tracked, levels)
            if not (torch.equal(z, before) and torch.equal(tracked.detach(), before)):
                raise ValueError("your function modified z in place; compute on new tensors")
            if not isinstance(traced, torch.Tensor) or traced.shape != z.shape:
                return codes, None                                      # the codes' own message says what is wrong
            if traced.requires_grad:
                (traced * upstream).sum().backward()
            gradient = leaf.grad if leaf.grad is not None else torch.zeros_like(z)   # no graph: nothing flows back
            return codes, gradient
        return run

    run_check("fsq_quantize", codes_and_gradient(student_fn), codes_and_gradient(fsq_quantize), cases,
              names=("codes", "dL/dz, the gradient your codes pass back to z (a plain round() passes none)"),
              hint="per dimension with L levels: half_l = (L - 1) * (1 + 1e-3) / 2; offset = 0.5 if L is even "
                   "else 0; shift = atanh(offset / half_l); bounded = tanh(z + shift) * half_l - offset; then "
                   "round with a straight-through estimator, bounded + (bounded.round() - bounded).detach() "
                   "(forward: the rounded value; backward: the gradient of bounded), and divide by L // 2 so the "
                   "codes lie in [-1, 1].")


# --- notebook 05: the Qwen3 block (RMSNorm, RoPE) ----------------------------------------------------------
__all__ += ["check_rms_norm", "check_apply_rotary"]


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``fac_mini.llm.RMSNorm`` as a function of (x, weight, eps)."""
    from ..llm import RMSNorm

    norm = RMSNorm(weight.shape[0], eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def _unmodified(student_fn: Callable) -> Callable:
    """Wrap ``student_fn`` so that changing an input tensor in place counts as an error."""
    def guarded(*args):
        before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        result = student_fn(*args)
        if any(isinstance(a, torch.Tensor) and not torch.equal(a, b) for a, b in zip(args, before)):
            raise ValueError("your function modified one of its inputs in place; compute on new tensors")
        return result
    return guarded


def check_rms_norm(student_fn: Callable) -> None:
    """Exercise 05.1: ``rms_norm(x, weight, eps)``, the functional form of ``fac_mini.llm.RMSNorm``."""
    generator = torch.Generator().manual_seed(7)
    cases = []
    for shape, scale in (((4,), 1.0), ((3, 8), 1.0), ((2, 5, 16), 3.0), ((2, 3, 7, 32), 0.1), ((2, 6), 1e-4)):
        x = torch.randn(*shape, generator=generator) * scale
        weight = 1 + 0.5 * torch.randn(shape[-1], generator=generator)
        cases.append((x, weight, 1e-6))
    cases.append((torch.zeros(2, 8), torch.ones(8), 1e-6))                          # all zeros: eps keeps it finite
    cases.append((torch.randn(3, 4, generator=generator) * 1e-3, torch.ones(4), 1e-2))   # eps dominates
    run_check("rms_norm", _unmodified(student_fn), _rms_norm_reference, cases,
              hint="mean of x**2 over the LAST dim only (keepdim=True), add eps INSIDE the square root, divide x "
                   "by that root, then multiply by weight; no mean subtraction (that would be LayerNorm).")


def check_apply_rotary(student_fn: Callable) -> None:
    """Exercise 05.2: ``apply_rotary(x, cos, sin)``, RoPE on head vectors (pairs (i, i + d/2), as in Qwen3)."""
    from ..llm import RotaryEmbedding, apply_rotary

    generator = torch.Generator().manual_seed(8)
    cases = []
    for batch, heads, length, head_dim, theta in ((1, 1, 1, 2, 1e4), (1, 2, 5, 8, 1e4), (2, 3, 7, 16, 1e6),
                                                  (2, 6, 11, 32, 1e6), (1, 4, 9, 64, 5e6)):
        x = torch.randn(batch, heads, length, head_dim, generator=generator)              # (B, heads, T, d)
        positions = torch.randint(0, 2000, (batch, length), generator=generator)          # (B, T)
        cos, sin = RotaryEmbedding(head_dim, theta)(positions, torch.float32)             # (B, T, d) each
        cases.append((x, cos, sin))
    run_check("apply_rotary", _unmodified(student_fn), apply_rotary, cases,
              hint="split x into halves x1 = x[..., :d/2], x2 = x[..., d/2:]; rotate_half(x) = cat(-x2, x1); the "
                   "result is x * cos + rotate_half(x) * sin, with cos and sin given a heads axis (cos[:, None] is "
                   "(B, 1, T, d)). The rotated pairs are (i, i + d/2), not neighbours (2i, 2i + 1).")


# --- notebook 02: the audio encoder (mel filterbank, window attention mask) -------------------------------
__all__ += ["check_mel_filterbank", "check_window_mask"]


def check_mel_filterbank(student_fn: Callable) -> None:
    """Exercise 02.1: ``mel_filterbank(n_mels, n_fft, sampling_rate)``, Slaney scale and normalisation."""
    from ..audio import mel_filterbank

    cases = [(128, 400, 16000), (80, 400, 16000), (40, 512, 16000), (64, 1024, 22050), (10, 256, 8000),
             (128, 2048, 44100)]
    run_check("mel_filterbank", student_fn, mel_filterbank, cases, atol=1e-6,
              hint="Slaney mel: 3f/200 below 1 kHz, 15 + 27 ln(f/1000)/ln(6.4) above; n_mels + 2 points evenly "
                   "spaced in mel from 0 to sampling_rate/2, mapped back to Hz; filter m rises from f_m to f_m+1 "
                   "and falls to f_m+2 over the n_fft//2 + 1 bin frequencies k*sampling_rate/n_fft; then multiply "
                   "filter m by 2 / (f_m+2 - f_m). Shape (n_mels, n_fft // 2 + 1).")


def check_window_mask(student_fn: Callable) -> None:
    """Exercise 02.2: ``window_mask(num_frames_50hz, window_50hz)``, the (T, T) block-diagonal boolean mask."""
    from ..encoder import window_attention_mask

    def reference(num_frames_50hz, window_50hz):
        # 2 * T mel frames make exactly T tokens at 50 Hz (whole windows are even), so the package's
        # batch mask for that one clip is the (T, T) mask asked for.
        return window_attention_mask(2 * num_frames_50hz, n_window=window_50hz)[0]

    rng = np.random.default_rng(7)
    cases = [(5, 2), (150, 100), (7, 3), (1, 1), (10, 10), (10, 20), (12, 4)]
    cases += [(int(rng.integers(1, 300)), int(rng.integers(1, 120))) for _ in range(10)]
    run_check("window_mask", student_fn, reference, cases,
              hint="token i is in window i // window_50hz; mask[i, j] is True exactly when i and j share a "
                   "window (blocks along the diagonal, not a band |i - j| < window). Return a bool tensor (T, T).")


# --- notebook 04: speech token grouping (concat as in the paper, mean as released) ------------------------
__all__ += ["check_concat_grouping", "check_mean_grouping"]


def _pad_frames(embeddings: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, T, H) -> (B, k·ceil(T/k), H), zero frames appended at the end."""
    return torch.nn.functional.pad(embeddings, (0, 0, 0, -embeddings.shape[1] % group_size))


def _concat_grouping_reference(embeddings: torch.Tensor, group_size: int, weight: torch.Tensor) -> torch.Tensor:
    from ..grouping import group_frames

    return torch.nn.functional.linear(group_frames(_pad_frames(embeddings, group_size), group_size), weight)


def _mean_grouping_reference(embeddings: torch.Tensor, group_size: int, weight: torch.Tensor) -> torch.Tensor:
    from ..grouping import mean_group

    return torch.nn.functional.linear(mean_group(_pad_frames(embeddings, group_size), group_size), weight)


def _grouping_cases(concat: bool) -> list[tuple]:
    """(embeddings (B, T, H), group_size, weight (H_out, k·H) or (H_out, H)); T is often not a multiple of k."""
    generator = torch.Generator().manual_seed(4)
    cases = []
    for batch, length, width, out, group_size in ((1, 5, 4, 4, 5), (2, 12, 6, 6, 5), (3, 7, 8, 5, 5),
                                                  (2, 3, 4, 4, 5), (1, 10, 3, 3, 1), (2, 9, 4, 6, 2),
                                                  (1, 13, 16, 16, 4), (2, 58, 12, 10, 5)):
        embeddings = torch.randn(batch, length, width, generator=generator)                  # (B, T, H)
        weight = torch.randn(out, group_size * width if concat else width, generator=generator)
        cases.append((embeddings, group_size, weight))
    return cases


def check_concat_grouping(student_fn: Callable) -> None:
    """Exercise 04.1: ``concat_grouping(embeddings, group_size, weight)``, paper eq. (1) with zero padding."""
    run_check("concat_grouping", _unmodified(student_fn), _concat_grouping_reference, _grouping_cases(True),
              atol=1e-5, hint="append -T % k zero frames (torch.nn.functional.pad(embeddings, (0, 0, 0, extra))), "
                              "reshape (B, L·k, H) -> (B, L, k·H) so group i is [e_ik, ..., e_ik+k-1] one after "
                              "the other, then apply weight (H_out, k·H) like nn.Linear: x @ weight.T, no bias.")


def check_mean_grouping(student_fn: Callable) -> None:
    """Exercise 04.2: ``mean_grouping(embeddings, group_size, weight)``, the released Linear(mean of k)."""
    run_check("mean_grouping", _unmodified(student_fn), _mean_grouping_reference, _grouping_cases(False),
              atol=1e-5, hint="pad with zero frames to a multiple of k FIRST and average all k frames of every "
                              "group, padding included (the last group's mean is divided by k, not by its real "
                              "frames), then apply weight (H_out, H) like nn.Linear: x @ weight.T, no bias.")


# --- notebook 06: parallel speech-text streams (transcript <-> 5 Hz groups) --------------------------------
__all__ += ["check_align_text_to_groups"]


def check_align_text_to_groups(student_fn: Callable) -> None:
    """Exercise 06.1: ``align_text_to_groups(text_ids, num_groups, sil_id, replace_ids)``, token i <-> group i."""
    from ..model import align_text_to_groups

    generator = torch.Generator().manual_seed(10)
    sil, eos, pad = 7, 2, 0                                                    # the course tokenizer's ids
    ids = torch.randint(8, 512, (12,), generator=generator)                   # (n,) ordinary text ids
    cases = [(ids[:9], 6, sil, ()),                                            # longer than the groups: cut
             (ids[:6], 6, sil, ()),                                            # equal
             (ids[:4], 7, sil, ()),                                            # shorter: <|sil|> padding
             (ids[:0], 5, sil, ()),                                            # empty transcript: all <|sil|>
             (ids[:5], 0, sil, ()),                                            # no groups
             (torch.tensor([30, 31, eos, 32]), 6, sil, (eos, pad)),            # eos inside -> <|sil|>
             (torch.tensor([40, pad, 41]), 2, sil, (eos, pad)),                # cut, then pad id -> <|sil|>
             (torch.randint(8, 512, (3, 5), generator=generator), 8, sil, (eos, pad)),   # (A, n): pad every row
             (torch.randint(8, 512, (2, 9), generator=generator), 4, sil, ()),           # (A, n): cut every row
             (ids, 15, 511, ())]                                               # another silence id
    run_check("align_text_to_groups", _unmodified(student_fn), align_text_to_groups, cases,
              hint="keep text_ids[..., :num_groups] (token i goes with group i; a longer transcript is cut), "
                   "append sil_id until the last dim is num_groups (F.pad(..., value=sil_id)), then set every id in "
                   "replace_ids to sil_id; work on the last dim so (n,) and (A, n) both work, and return a new tensor.")


# --- notebook 15: the released checkpoint (tied weights) ---------------------------------------------------
__all__ += ["check_tied_parameter_groups"]


class _TieCase(torch.nn.Module):
    """A module holding the given children, with a one-line repr (so a failing case prints its label)."""

    def __init__(self, label: str, **children: torch.nn.Module):
        super().__init__()
        self.label = label
        for name, child in children.items():
            self.add_module(name, child)

    def __repr__(self) -> str:
        return f"<{self.label}>"


def _tie_cases() -> list[tuple]:
    from ..llm import LLMConfig, Qwen3ForCausalLM
    from ..model import FunAudioChat, FunAudioChatConfig

    cases = [_TieCase("tiny FunAudioChat", model=FunAudioChat(FunAudioChatConfig()))]
    tied_lm = LLMConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=4, tie_word_embeddings=True)
    cases.append(_TieCase("Qwen3ForCausalLM with tie_word_embeddings", lm=Qwen3ForCausalLM(tied_lm)))
    cases.append(_TieCase("nothing tied", first=torch.nn.Linear(3, 3), second=torch.nn.Linear(3, 3)))
    twins = _TieCase("equal values, separate parameters", a=torch.nn.Linear(2, 2), b=torch.nn.Linear(2, 2))
    with torch.no_grad():
        for layer in (twins.a, twins.b):
            layer.weight.zero_()
            layer.bias.zero_()
    cases.append(twins)
    three = _TieCase("a three-way and a two-way tie", table=torch.nn.Embedding(5, 4), head=torch.nn.Linear(4, 5),
                     extra=torch.nn.Linear(4, 5), up=torch.nn.Linear(4, 4, bias=False),
                     down=torch.nn.Linear(4, 4, bias=False))
    three.head.weight = three.table.weight
    three.extra.weight = three.table.weight
    three.down.weight = three.up.weight
    cases.append(three)
    shared = torch.nn.Linear(4, 4)
    cases.append(_TieCase("one module registered twice", encoder=shared, decoder=shared))
    return [(case,) for case in cases]


def check_tied_parameter_groups(student_fn: Callable) -> None:
    """Exercise 15.1: ``tied_parameter_groups(model)``, the names that share one Parameter, first name first."""
    from ..released import tied_parameter_groups

    with torch.random.fork_rng(devices=[]):                  # build the cases without touching the caller's RNG
        torch.manual_seed(15)
        cases = _tie_cases()
    run_check("tied_parameter_groups", student_fn, tied_parameter_groups, cases, items="group",
              hint="a group is the list of names (module order) under which ONE nn.Parameter is registered, e.g. "
                   "['table.weight', 'head.weight'] when head.weight is table.weight; return a list of them. Walk "
                   "model.named_parameters(remove_duplicate=False) (the default skips every name after the "
                   "first of a shared Parameter), group the names by the identity of the Parameter (id(p) or "
                   "`is`, not equal values), keep module order, and return only the groups with 2+ names.")


# --- notebook 07: the Speech Refined Head -------------------------------------------------------------------
__all__ += ["check_ungroup", "check_teacher_forcing_ids"]


def check_ungroup(student_fn: Callable) -> None:
    """Exercise 07.1: ``ungroup(grouped, group_size)``, (B, L, k·H) -> (B, k·L, H) with slice s of p at k·p + s."""
    from ..grouping import ungroup

    generator = torch.Generator().manual_seed(7)
    cases = [(torch.arange(2 * 3 * 10, dtype=torch.float32).view(2, 3, 10), 5),
             (torch.randn(1, 4, 12, generator=generator), 3), (torch.randn(3, 1, 8, generator=generator), 1),
             (torch.randn(2, 5, 20, generator=generator), 5)]
    run_check("ungroup", student_fn, ungroup, cases,
              hint="the k·H numbers of LLM position p are k consecutive slices of width H: slice s = "
                   "columns [s·H, (s+1)·H) becomes 25 Hz position k·p + s. A reshape to (B, k·L, H) does exactly "
                   "that (row-major order); splitting the columns with a stride (s::k) does not.")


def check_teacher_forcing_ids(student_fn: Callable) -> None:
    """Exercise 07.2: ``teacher_forcing_ids(speech_labels, group_size, pad_id)`` -> (previous ids, targets)."""
    from ..srh import teacher_forcing_ids

    generator = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 9, (2, 20), generator=generator)
    labels[1, 12:] = -100                                     # a shorter reply, right-padded
    cases = [(torch.arange(10)[None], 5, 99), (labels, 5, 10), (labels, 4, 10), (labels[:, :6], 3, 10),
             (torch.randint(0, 5, (1, 8), generator=generator), 1, 7)]
    run_check("teacher_forcing_ids", student_fn, teacher_forcing_ids, cases,
              names=("previous (the speech ids the SRH embeds)", "targets (the labels it is scored on)"),
              hint="25 Hz position j predicts label j + k (token s of the NEXT group) and adds the embedding of "
                   "label j + k − 1, the token just before it: previous = labels (-100 -> pad_id) rolled by "
                   "−(k − 1) along time; targets = labels shifted left by k with the last k set to -100.")


# --- notebook 09: flow matching (the CFM path and target, Euler steps with classifier-free guidance) ------
__all__ += ["check_conditional_flow", "check_guided_euler"]


def check_conditional_flow(student_fn: Callable) -> None:
    """Exercise 09.1: ``conditional_flow(x0, x1, t, sigma_min)`` -> (x_t, u_t), CosyVoice's CFM path and target."""
    from ..flow import conditional_flow

    generator = torch.Generator().manual_seed(9)
    cases = []
    for shape, sigma_min in (((4, 2), 0.0), ((3, 6, 5), 1e-6), ((2, 7, 80), 0.1), ((5, 3), 0.3)):
        x0, x1 = torch.randn(*shape, generator=generator), 3 + torch.randn(*shape, generator=generator)
        cases.append((x0, x1, torch.rand(shape[0], generator=generator), sigma_min))
    x0, x1 = torch.randn(2, 4, 3, generator=generator), torch.randn(2, 4, 3, generator=generator)
    cases += [(x0, x1, torch.tensor([0.0, 1.0]), 0.2),             # the two ends of the path
              (x0, x1, 0.25, 0.1)]                                  # one number for the whole batch
    run_check("conditional_flow", _unmodified(student_fn), conditional_flow, cases, names=("x_t", "u_t"),
              hint="x_t = (1 − (1 − sigma_min)·t)·x0 + t·x1 and u_t = x1 − (1 − sigma_min)·x0 (the time derivative "
                   "of x_t: it does not depend on t). t is a number or one time per example, shape (batch,): "
                   "make it a tensor (torch.as_tensor) and give it trailing axes of size 1, "
                   "t.reshape(-1, *[1] * (x0.dim() - 1)), so that it broadcasts over frames and bins.")


class _ToyVelocity:
    """A velocity field for :func:`check_guided_euler`: ``(x, t) -> (v_cond, v_uncond)``, non-linear in x and
    dependent on t, so that evaluating it at the wrong point or time changes the result."""

    def __init__(self, seed: int, dim: int):
        generator = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.weight = torch.randn(dim, dim, generator=generator) / dim ** 0.5
        self.bias = torch.randn(dim, generator=generator)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(x @ self.weight) + 2 * t * self.bias, -0.5 * x + torch.cos(3 * t)

    def __repr__(self) -> str:
        return f"toy_velocity(seed={self.seed})"


def _guided_euler_reference(velocity: Callable, x0: torch.Tensor, time_span: torch.Tensor,
                            guidance: float) -> torch.Tensor:
    from ..flow import euler_solve, guided_velocity

    return euler_solve(lambda x, t: guided_velocity(*velocity(x, t), guidance), x0, time_span)


def check_guided_euler(student_fn: Callable) -> None:
    """Exercise 09.2: ``guided_euler(velocity, x0, time_span, guidance)``: Euler steps over ``time_span`` with the
    classifier-free-guided velocity ``(1 + g)·v_cond − g·v_uncond``, ``velocity(x, t) -> (v_cond, v_uncond)``."""
    from ..flow import cosine_time_span

    generator = torch.Generator().manual_seed(10)
    cases = [(_ToyVelocity(1, 3), torch.randn(2, 5, 3, generator=generator), cosine_time_span(10), 0.7),
             (_ToyVelocity(2, 4), torch.randn(1, 6, 4, generator=generator), cosine_time_span(3), 1.5),
             (_ToyVelocity(3, 2), torch.randn(8, 2, generator=generator), cosine_time_span(1), 0.7),
             (_ToyVelocity(4, 3), torch.randn(2, 4, 3, generator=generator), torch.tensor([0.0, 0.5, 0.6, 1.0]), 0.0),
             (_ToyVelocity(5, 3), torch.randn(3, 3, generator=generator), torch.tensor([0.2, 0.3, 0.7, 1.0]), 2.0)]
    run_check("guided_euler", _unmodified(student_fn), _guided_euler_reference, cases, atol=1e-5, rtol=1e-5,
              hint="start at x = x0; for each pair of neighbours (t0, t1) of time_span, call velocity(x, t0) at "
                   "the START of the step, mix v = (1 + guidance)·v_cond − guidance·v_uncond, and step "
                   "x = x + (t1 − t0)·v (the cosine span's steps are not equal: use its differences). Return the "
                   "last x; do not change x0 in place (x = x + ..., not x += ...).")


# --- notebook 10: the vocoder (overlap-add, the inverse STFT of the iSTFT head) ---------------------------
__all__ += ["check_overlap_add"]


def check_overlap_add(student_fn: Callable) -> None:
    """Exercise 10.1: ``overlap_add(spectrum, n_fft, hop_length, window)``, the centred inverse STFT from scratch:
    ``(batch, n_fft // 2 + 1, frames)`` complex -> ``(batch, (frames - 1) · hop_length)``, equal to
    ``torch.istft(spectrum, n_fft, hop_length, window=window, center=True)``."""
    def reference(spectrum, n_fft, hop_length, window):
        return torch.istft(spectrum, n_fft, hop_length, window=window, center=True)

    generator = torch.Generator().manual_seed(10)
    cases = []
    for batch, n_fft, hop, frames, window in (
            (1, 16, 4, 5, torch.hann_window(16)),
            (2, 64, 16, 12, torch.hann_window(64)),
            (1, 32, 8, 9, torch.hann_window(32) ** 0.5),               # another window: the envelope is not 1.5
            (2, 48, 24, 7, torch.hamming_window(48)),                  # 50 % overlap, a window that is never 0
            (3, 1280, 320, 10, torch.hann_window(1280))):              # the vocoders' own STFT
        spectrum = torch.complex(torch.randn(batch, n_fft // 2 + 1, frames, generator=generator),
                                 torch.randn(batch, n_fft // 2 + 1, frames, generator=generator))
        cases.append((spectrum, n_fft, hop, window))
    signal = torch.randn(2, 320 * 12, generator=generator) * 0.1       # a true STFT: istft must give the signal back
    window = torch.hann_window(1280)
    cases.append((torch.stft(signal, 1280, 320, window=window, center=True, return_complex=True), 1280, 320, window))
    run_check("overlap_add", _unmodified(student_fn), reference, cases, atol=1e-5, rtol=1e-4,
              hint="per frame j: irfft the column to n_fft samples, multiply by the window, add it into the output "
                   "at sample j·hop_length; add window² at the same place into an envelope; divide the sum by the "
                   "envelope (not by the window itself, nor its sum); finally cut n_fft // 2 samples from the start "
                   "(the centring pad) and keep (frames - 1)·hop_length samples.")


# --- notebook 14: full scale (the LoRA forward, the ZeRO-2 memory formula) --------------------------------
__all__ += ["check_lora_linear", "check_zero2_state_bytes"]


def check_lora_linear(student_fn: Callable) -> None:
    """Exercise 14.1: ``lora_linear(x, weight, lora_a, lora_b, alpha)`` -> x W^T + (alpha / r)·(x A^T) B^T."""
    from ..scale.lora import lora_linear

    generator = torch.Generator().manual_seed(14)

    def case(batch: tuple[int, ...], d_in: int, d_out: int, rank: int, alpha: float) -> tuple:
        return (torch.randn(*batch, d_in, generator=generator), torch.randn(d_out, d_in, generator=generator),
                torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator), alpha)

    cases = [case((3,), 8, 5, 2, 4.0), case((2, 4), 16, 16, 4, 8.0), case((1, 1), 6, 10, 1, 1.0),
             case((2, 3), 12, 7, 3, 5.0), case((5,), 8, 8, 8, 32.0)]
    run_check("lora_linear", student_fn, lora_linear, cases, atol=1e-5, rtol=1e-5,
              hint="keep the frozen path x W^T and add the low-rank path scaled by alpha / r, where r is the rank "
                   "(the first dimension of lora_a): first x A^T (..., r), then times B^T (..., d_out).")


def check_zero2_state_bytes(student_fn: Callable) -> None:
    """Exercise 14.2: ``zero2_state_bytes(parameters, ranks)``, bytes of weights, gradients and AdamW state per GPU."""
    from ..scale.memory import state_bytes_per_rank

    cases = [(9_424_000_000, 4), (7_500_000_000, 64), (1_000, 1), (8_000, 8), (123_456_789, 3)]
    run_check("zero2_state_bytes", student_fn, lambda psi, n: state_bytes_per_rank("zero2", psi, n), cases,
              rtol=1e-9, atol=0.5,
              hint="ZeRO-2 keeps the 2-byte bf16 weights whole on every GPU, but partitions the 2-byte bf16 "
                   "gradients and the 12 bytes of fp32 master weight, Adam m and v: 2·Ψ + (2 + 12)·Ψ / N.")


# --- notebook 11: Core-Cocktail ------------------------------------------------------------------------------
__all__ += ["check_core_cocktail_merge"]


def _merge_cases() -> list[tuple]:
    """State dicts shaped like the mini model's: LLM tensors (one float16) that the base has, and tensors the base
    lacks (speech table, SRH); every α of the sweep."""
    generator = torch.Generator().manual_seed(11)
    stage1 = {"language_model.model.layers.0.mlp.up_proj.weight": torch.randn(4, 3, generator=generator),
              "language_model.model.norm.weight": (1 + torch.randn(3, generator=generator)).half(),
              "audio_tower.embed_tokens.weight": torch.randn(5, 3, generator=generator),
              "audio_invert_tower.pre_matching.weight": torch.randn(6, 3, generator=generator)}
    base = {"language_model.model.layers.0.mlp.up_proj.weight": torch.randn(4, 3, generator=generator),
            "language_model.model.norm.weight": (1 + torch.randn(3, generator=generator)).half()}
    return [(stage1, base, alpha) for alpha in (0.0, 0.25, 0.5, 0.75, 1.0)]


def _merge_outputs(merge_fn: Callable) -> Callable:
    """Call ``merge_fn``; a changed input is an error; a dict result becomes (names, dtypes, tensors) in name order."""
    def run(stage1_state, base_state, alpha):
        before = {side + name: tensor.clone() for side, states in (("stage1:", stage1_state), ("base:", base_state))
                  for name, tensor in states.items()}
        merged = merge_fn(stage1_state, base_state, alpha)
        for side, states in (("stage1:", stage1_state), ("base:", base_state)):
            for name, tensor in states.items():
                if not torch.equal(tensor, before[side + name]):
                    raise ValueError(f"your function modified the input {side[:-1]}_state[{name!r}] in place; "
                                     "build new tensors")
        if not isinstance(merged, dict):
            return merged
        names = sorted(merged)
        return names, [str(merged[name].dtype) for name in names], [merged[name] for name in names]
    return run


def check_core_cocktail_merge(student_fn: Callable) -> None:
    """Exercise 11.1: ``merge(stage1_state, base_state, alpha)``, eq. (7) on state dicts (``fac_mini.merging``)."""
    from ..merging import core_cocktail_merge

    run_check("merge", _merge_outputs(student_fn), _merge_outputs(core_cocktail_merge), _merge_cases(),
              names=("names (every tensor of the Stage-1 model)", "dtypes", "tensors"),
              hint="α·stage1 + (1 − α)·base for every name the base has (compute in float32, cast back to the "
                   "Stage-1 dtype); a copy of the Stage-1 tensor for every name it lacks (encoder, speech table, "
                   "SRH); α = 1 is the Stage-1 model, α = 0 puts M0's LLM back; never change the inputs.")


# ----------------------------------------------------------------------------------------------------------
# Notebook 12: the DPO loss
# ----------------------------------------------------------------------------------------------------------
def _dpo_cases() -> list[tuple]:
    generator = torch.Generator().manual_seed(12)
    cases = []
    for batch, beta, scale in ((1, 0.1, 5.0), (4, 0.01, 20.0), (8, 0.5, 3.0), (3, 2.0, 1.0)):
        cases.append(tuple(-scale * torch.rand(batch, generator=generator, dtype=torch.float64) - 1
                           for _ in range(4)) + (beta,))
    # a pair the policy gets badly wrong (margin -400 nats): log(sigmoid(.)) underflows to -inf here
    cases.append((torch.tensor([-500.0, -20.0]), torch.tensor([-100.0, -25.0]), torch.tensor([-90.0, -21.0]),
                  torch.tensor([-90.0, -24.0]), 1.0))                  # float32, as a model's log-probs are
    return cases


def check_dpo_loss(student_fn: Callable) -> None:
    """Exercise 12.1: ``dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)`` ->
    (loss, chosen_rewards, rejected_rewards), the sigmoid DPO loss with trl's conventions (``fac_mini.dpo``)."""
    from ..dpo import dpo_loss

    run_check("dpo_loss", student_fn, dpo_loss, _dpo_cases(),
              names=("loss (mean over pairs)", "chosen_rewards", "rejected_rewards"),
              hint="rewards are β·(policy − reference) per pair; the loss is the mean over pairs of "
                   "−log σ(chosen_reward − rejected_reward); use F.logsigmoid (log(sigmoid(x)) is −inf for a very "
                   "negative x).")


__all__ += ["check_dpo_loss"]


# --- notebook 13: the voice chat (the streaming schedule) --------------------------------------------------
__all__ += ["check_audio_chunk_steps"]


def _chunk_step_cases() -> list[tuple]:
    """The chat's own pattern (prefill and two groups of delay bos ids speak nothing, then 5 ids a step, an eos step
    at the end), counts on and one short of a threshold, no speech, a step that speaks less than 5, and small hops
    where one step releases several chunks."""
    chat = [0, 0, 0] + [5] * 12 + [0, 0]                                      # 60 ids: chunks after 6, 9, 12; flush
    cases = [(chat, 15, 3), ([0, 0, 0, 5, 5, 5, 3], 15, 3),                    # exactly 18 ids at the last step
             ([0, 0, 0, 5, 5, 5, 2], 15, 3),                                   # 17 ids: only the flush
             ([0, 0, 0, 0], 15, 3), ([], 15, 3), ([5, 5, 5, 5, 1, 0], 15, 3),
             ([5, 5, 5, 5, 5, 5], 2, 1), ([7, 0, 3, 9], 3, 2), ([1] * 10, 4, 4), ([5] * 9, 15, 3)]
    rng = np.random.default_rng(13)
    for hop, lookahead in ((15, 3), (15, 3), (5, 3), (3, 1), (10, 2), (4, 4)):
        cases.append(([int(n) for n in rng.integers(0, 6, size=int(rng.integers(1, 40)))], hop, lookahead))
    return cases


def check_audio_chunk_steps(student_fn: Callable) -> None:
    """Exercise 13.1: ``audio_chunk_steps(ids_per_step, hop, lookahead)``, the LLM step after which each streamed
    audio chunk of a reply is ready (the streaming schedule of ``fac_mini.chat``)."""
    from ..detokenize import audio_chunk_steps

    run_check("audio_chunk_steps", student_fn, audio_chunk_steps, _chunk_step_cases(), items="chunk",
              hint="keep a running total of the spoken ids; after step i, while the total is at least "
                   "hop·(c + 1) + lookahead, chunk c (0-based) is ready after step i (a small hop can release "
                   "several chunks after one step; the look-ahead is waited for once, not once per chunk). After "
                   "the last step, if anything was spoken, one last chunk flushes the rest, at the last step's "
                   "index; steps are numbered from 0.")
