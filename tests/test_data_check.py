"""`python -m fac_mini data check` covers every shipped file of data/ and names every problem."""
import shutil
import subprocess

import pytest

from fac_mini import DATA_DIR, REPO_ROOT
from fac_mini.__main__ import main
from fac_mini.train.seal import check_data, read_seal, refresh_seal, sealed_files


@pytest.fixture()
def data_copy(tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(DATA_DIR, copy, ignore=shutil.ignore_patterns("cache"))
    return copy


def test_the_seal_covers_every_file_git_ships():
    listed = subprocess.run(["git", "ls-files", "data"], cwd=REPO_ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    shipped = {line.removeprefix("data/") for line in listed.stdout.splitlines()} - {"SHA256SUMS"}
    assert set(read_seal()) == shipped
    assert check_data() == []


def test_one_flipped_byte_in_each_kind_of_file_is_named(data_copy, capsys):
    kinds = {}                                         # one file of each kind: by folder and extension
    for name in sealed_files(data_copy):
        kinds.setdefault((name.split("/")[0], name.rsplit(".", 1)[-1]), name)
    assert len(kinds) >= 10, kinds                     # audio, metadata, manifests, configs, weights, tokenizer, ...
    for name in kinds.values():
        path = data_copy / name
        content = bytearray(path.read_bytes())
        content[len(content) // 2] ^= 0x01
        path.write_bytes(bytes(content))
    problems = check_data(data_copy)
    for name in kinds.values():
        assert f"changed: data/{name}" in problems, name
    assert main(["data", "check", "--data", str(data_copy)]) == 1
    err = capsys.readouterr().err
    assert all(name in err for name in kinds.values())


def test_missing_unlisted_and_corrupt_manifest_are_named(data_copy):
    (data_copy / "m0" / "train_log.json").unlink()
    (data_copy / "m0" / "notes.txt").write_text("not shipped")
    (data_copy / "srh_study" / "manifest.json").write_text('{"heads": ')
    problems = check_data(data_copy)
    assert "missing: data/m0/train_log.json" in problems
    assert "not in the seal: data/m0/notes.txt" in problems
    assert "changed: data/srh_study/manifest.json" in problems
    assert any(p.startswith("corrupt JSON: data/srh_study/manifest.json") for p in problems)


def test_a_broken_seal_is_reported_by_name(data_copy):
    (data_copy / "SHA256SUMS").write_text("nonsense\n")
    assert check_data(data_copy) == [f"{data_copy / 'SHA256SUMS'} line 1 is not '<sha256>  <path>': 'nonsense'"]


def test_refresh_updates_only_the_rebuilt_folder(data_copy):
    (data_copy / "m0" / "config.json").write_text("{}\n")
    (data_copy / "tokenizer" / "tokenizer_config.json").write_text("{}\n")
    assert refresh_seal(data_copy / "m0", data_copy)
    assert check_data(data_copy) == ["changed: data/tokenizer/tokenizer_config.json"]
    assert not refresh_seal(data_copy / "cache" / "runs", data_copy)
