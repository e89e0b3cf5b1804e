"""Every recipe command has the same flag set and the same safety rules (fac_mini.train.cli)."""
import argparse
import json
import os

import pytest

from fac_mini import DATA_DIR
from fac_mini.__main__ import main
from fac_mini.train.cli import RUNS_DIR, output_folder

RECIPES = {"m0": "m0", "speech-tokenizer": "speech_tokenizer", "srh": "srh_study"}


def run(capsys, *argv):
    """-> (exit status, stdout, stderr) of ``python -m fac_mini *argv``, in-process."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("command", RECIPES)
@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--steps", "-5"), ("--batch-size", "0"),
                                         ("--lr", "0"), ("--lr", "-1e-3"), ("--threads", "0"), ("--steps", "x")])
def test_non_positive_numbers_are_rejected_in_one_line(capsys, command, flag, value):
    status, out, err = run(capsys, command, "train", f"{flag}={value}")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and f"argument {flag}: expected a positive" in err and "Traceback" not in err


@pytest.mark.parametrize("command", RECIPES)
def test_eval_rejects_a_non_positive_limit(capsys, command):
    status, _, err = run(capsys, command, "eval", "--limit", "0")
    assert status == 2 and err.count("\n") == 1 and "argument --limit: expected a positive integer, got 0" in err


@pytest.mark.parametrize("command, folder", RECIPES.items())
def test_a_changed_recipe_never_overwrites_shipped_data(capsys, command, folder):
    before = {path: path.stat().st_mtime_ns for path in (DATA_DIR / folder).rglob("*")}
    status, _, err = run(capsys, command, "train", "--steps", "3", "--out", str(DATA_DIR / folder))
    assert status == 2 and err.count("\n") == 1
    assert f"refusing to overwrite the shipped {DATA_DIR / folder}" in err and "--steps 3" in err
    status, _, err = run(capsys, command, "train", "--out", str(DATA_DIR / "somewhere"))
    assert status == 2 and "is inside data/ but is not this recipe's shipped folder" in err
    assert before == {path: path.stat().st_mtime_ns for path in (DATA_DIR / folder).rglob("*")}


@pytest.mark.parametrize("command", RECIPES)
def test_an_unwritable_out_fails_before_training(capsys, command, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, _, err = run(capsys, command, "train", "--out", str(blocker / "out"))
    assert status == 2 and f"cannot write to --out {blocker / 'out'}" in err


def test_runs_go_to_the_cache_by_default_and_say_so(capsys):
    parser = argparse.ArgumentParser(prog="x")
    args = argparse.Namespace(out=None, force=False, steps=3)
    assert output_folder(parser, args, "m0", DATA_DIR / "m0", {"steps": 600}) == RUNS_DIR / "m0"
    assert f"writing to {RUNS_DIR / 'm0'}" in capsys.readouterr().err
    shipped = argparse.Namespace(out=DATA_DIR / "m0", force=False, steps=600)
    assert output_folder(parser, shipped, "m0", DATA_DIR / "m0", {"steps": 600}) == DATA_DIR / "m0"
    forced = argparse.Namespace(out=DATA_DIR / "m0", force=True, steps=3)
    assert output_folder(parser, forced, "m0", DATA_DIR / "m0", {"steps": 600}) == DATA_DIR / "m0"
    assert os.access(DATA_DIR / "m0", os.W_OK)


@pytest.mark.parametrize("command, key", [("m0", "exact_match"), ("speech-tokenizer", "cer"), ("srh", "srh")])
def test_eval_json_prints_one_object(capsys, command, key):
    status, out, _ = run(capsys, command, "eval", "--json", "--limit", "4")
    assert status == 0 and out.count("\n") == 1 and key in json.loads(out)


@pytest.mark.parametrize("command", RECIPES)
def test_every_recipe_has_the_shared_flag_set(capsys, command):
    status, out, _ = run(capsys, command, "train", "--help")
    assert status == 0
    for flag in ("--out", "--state-dir", "--restart", "--steps", "--threads", "--force"):
        assert flag in out, flag
    status, out, _ = run(capsys, command, "eval", "--help")
    for flag in ("--path", "--json", "--threads", "--limit"):
        assert flag in out, flag
