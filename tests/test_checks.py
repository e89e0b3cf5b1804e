"""fac_mini.course.checks.compare / run_check and fac_mini.set_seed."""
import numpy as np
import pytest
import torch

import fac_mini
from fac_mini.course.checks import compare, run_check


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


def test_compare_names_the_output_and_the_entry_that_differ():
    names = ("previous (the speech ids the SRH embeds)", "targets")
    ids = torch.arange(6).view(1, 6)
    ok, how = compare((ids, ids + 1), (ids, ids), names=names)
    assert not ok and how == "targets: 6 of 6 entries differ; first at (0, 0): got 1, expected 0"
    assert compare((ids + 1, ids), (ids, ids), names=names)[1].startswith("previous (the speech ids the SRH embeds): ")
    assert compare(ids, (ids, ids), names=names) == (
        False, "expected 2 outputs (previous (the speech ids the SRH embeds), targets), got a Tensor of shape (1, 6)")
    assert compare((ids, ids), (ids, ids), names=names) == (True, "all outputs match")
    ok, how = compare(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 1.5, 2.0]))
    assert not ok and how == "different: max abs diff 5.00e-01 at (1,) (got 1, expected 1.5)"
    assert compare(torch.tensor([float("nan")]), torch.tensor([0.0]))[0] is False


def test_compare_counts_list_items_by_their_name():
    tied = [["table.weight", "head.weight"]]
    assert compare([], tied, items="group") == (
        False, "expected 1 group, got 0: expected [['table.weight', 'head.weight']], got []")
    many = [["a.weight", "b.weight"], ["c.weight", "d.weight"]]
    assert compare(many, tied, items="group")[1].startswith("expected 1 group, got 2: ")
    assert compare(tied, many, items="group")[1].startswith("expected 2 groups, got 1: ")
    assert compare([["head.weight", "table.weight"]], tied, items="group") == (
        False, "group 1 of 1: got ['head.weight', 'table.weight'], expected ['table.weight', 'head.weight']")
    assert compare({"x": 1}, tied, items="group") == (False, "expected a list of 1 group, got a dict of 1 item")
    assert compare(tied, tied, items="group") == (True, "all items match")


def test_run_check_needs_names_for_several_outputs():
    with pytest.raises(ValueError, match="pass names="):
        run_check("pair", lambda x: (x, x), lambda x: (x, x), [(1,)])


def test_run_check_todo_points_into_the_same_cell(capsys):
    def stub(x):
        raise NotImplementedError("Exercise 01.1: write your code here")

    assert run_check("double", stub, lambda x: 2 * x, [(1,)]) is False
    out = capsys.readouterr().out
    assert out.startswith("[todo] double: not written yet. In this cell, replace the line `raise "
                          "NotImplementedError(...)` inside `double` with your code")
    assert "above" not in out


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
