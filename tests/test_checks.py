"""fac_mini.checks.compare / run_check and fac_mini.set_seed."""
import numpy as np
import torch

import fac_mini
from fac_mini.checks import compare, run_check


def test_compare_verdicts():
    assert compare(3, 3) == (True, "exact")
    assert compare(3, 4)[0] is False
    assert compare(1.0 + 1e-9, 1.0)[0] and not compare(1.1, 1.0)[0]
    assert compare(torch.ones(2), torch.ones(2)) == (True, "exact")
    ok, how = compare(torch.ones(2, dtype=torch.float64) + 1e-9, torch.ones(2, dtype=torch.float64))
    assert ok and how.startswith("close")
    assert compare(torch.ones(3), torch.ones(2)) == (False, "shape (3,) but expected (2,)")
    assert compare(np.zeros(2), np.ones(2))[0] is False
    assert compare((1, torch.ones(1)), (1, torch.ones(1)))[0]
    assert compare([1], (1, 2))[0] is False


def test_run_check_reports_errors_without_raising(capsys):
    assert run_check("double", lambda x: 2 * x, lambda x: 2 * x, [(1,), (2,)]) is True
    assert run_check("double", lambda x: 3 * x, lambda x: 2 * x, [(1,)], hint="multiply by two") is False
    out = capsys.readouterr().out
    assert "[pass] double: all 2 cases" in out and "Hint: multiply by two" in out
    assert run_check("double", lambda x: 1 / 0, lambda x: 2 * x, [(1,)]) is False
    assert "ZeroDivisionError" in capsys.readouterr().out


def test_set_seed_makes_draws_repeat():
    generator = fac_mini.set_seed(123)
    first = (torch.rand(3), np.random.rand(), torch.rand(2, generator=generator))
    generator = fac_mini.set_seed(123)
    second = (torch.rand(3), np.random.rand(), torch.rand(2, generator=generator))
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and torch.equal(first[2], second[2])
