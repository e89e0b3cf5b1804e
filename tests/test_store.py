"""fac_mini.train.store: writes that never lose data, and readers that name what is wrong."""
import json
import subprocess
import sys

import pytest
import torch

from fac_mini.train.store import (atomic_directory, atomic_write, atomic_write_json, check_state_dict,
                                  clean_stale_temporaries, read_json, read_safetensors, save_safetensors)


@pytest.fixture(scope="module")
def dead_pid():
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = atomic_write_json(tmp_path / "manifest.json", {"v": 1})

    def fail(tmp):
        tmp.write_text("half a fi")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]         # no temporary left behind


def test_temporaries_of_killed_runs_are_removed_by_the_next_write(tmp_path, dead_pid):
    killed = tmp_path / f".state-abc.pt.tmp{dead_pid}"
    killed.write_bytes(b"partial")
    atomic_write_json(tmp_path / "other.json", [])
    assert not killed.exists()


def test_temporaries_of_live_writers_are_left_alone(tmp_path):
    import os

    live = tmp_path / f".state.pt.tmp{os.getppid()}"
    live.write_bytes(b"being written")
    assert clean_stale_temporaries(tmp_path) == [] and live.exists()


def test_a_failed_folder_save_leaves_the_old_folder(tmp_path):
    target = tmp_path / "m0"
    with atomic_directory(target) as folder:
        (folder / "config.json").write_text("old")
        (folder / "model.safetensors").write_text("old weights")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(target) as folder:
            (folder / "config.json").write_text("new")
            raise RuntimeError("disk full")
    assert (target / "config.json").read_text() == "old" and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0"]


def test_a_folder_save_replaces_the_whole_folder_or_carries_over_what_it_does_not_own(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"):
        (target / name).write_text(name)
    with atomic_directory(target, replace=("model*.safetensors*", "config.json")) as folder:
        (folder / "model.safetensors").write_text("one shard now")
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors", "tokenizer.json"]
    with atomic_directory(target) as folder:
        (folder / "only.txt").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["only.txt"]


def test_a_swap_cut_between_its_two_renames_is_rolled_back(tmp_path, dead_pid):
    aside = tmp_path / f".m0.old{dead_pid}"                                    # the old folder, renamed aside
    aside.mkdir()
    (aside / "config.json").write_text("old")
    (tmp_path / f".m0.tmp{dead_pid}").mkdir()                                  # the new one, never swapped in
    clean_stale_temporaries(tmp_path)
    assert (tmp_path / "m0" / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0"]


def test_readers_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config .*nowhere\.json is missing; run this"):
        read_json(tmp_path / "nowhere.json", "config", "run this")
    bad = tmp_path / "manifest.json"
    bad.write_text('{"steps": 3,')
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON"):
        read_json(bad)
    weights = tmp_path / "model.safetensors"
    save_safetensors({"w": torch.ones(64, 64)}, weights)
    weights.write_bytes(weights.read_bytes()[:-100])                          # truncated
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        read_safetensors(weights)
    weights.write_bytes(b"\x00" * 16)                                         # garbage
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        read_safetensors(weights)


def test_state_dict_check_names_keys_and_shapes():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"ckpt does not match the model: missing keys \['b'\], unexpected keys \['c'\]"):
        check_state_dict({"a": torch.zeros(2, 3), "c": torch.zeros(1)}, expected, "ckpt")
    with pytest.raises(ValueError, match=r"ckpt: a has shape \(3, 2\), the model expects \(2, 3\)"):
        check_state_dict({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, expected, "ckpt")
    check_state_dict({"a": torch.zeros(2, 3)}, expected, "ckpt", ignore_missing=("b",))


def test_save_released_cut_by_a_full_disk_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    from pathlib import Path

    import fac_mini.released as released
    import fac_mini.released.checkpoint as checkpoint

    fixture = Path(__file__).parent / "fixtures" / "released_tiny" / "checkpoint"
    model = released.load_released(fixture)
    target = tmp_path / "ckpt"
    released.save_released(model, target, max_shard_size=64000)
    (target / "tokenizer.json").write_text("{}")                              # not the saver's: must survive
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = []

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return released_save(tensors, path)

    released_save = checkpoint.save_safetensors
    monkeypatch.setattr(checkpoint, "save_safetensors", full_disk)
    with pytest.raises(OSError, match="No space left"):
        released.save_released(model, target, max_shard_size=32000)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    reloaded = released.load_released(target)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    monkeypatch.undo()
    released.save_released(model, target)                                    # one file now: old shards gone
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("recipe", ["m0", "speech_tokenizer", "srh_study"])
def test_every_shipped_loader_names_a_corrupt_file(tmp_path, recipe):
    import shutil

    from fac_mini import DATA_DIR
    from fac_mini.speech_tokenizer import SpeechTokenizer
    from fac_mini.train.m0 import load_m0
    from fac_mini.train.srh_study import load_head

    folder = tmp_path / recipe
    shutil.copytree(DATA_DIR / recipe, folder)
    load, weights_dir = {"m0": (load_m0, folder), "speech_tokenizer": (SpeechTokenizer.from_pretrained, folder),
                         "srh_study": (lambda path: load_head("srh", path), folder / "srh")}[recipe]
    weights = weights_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])           # truncated
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors file"):
        load(folder)
    (weights_dir / "config.json").write_text('{"hidden_size": ')                       # corrupt JSON
    with pytest.raises(ValueError, match=rf"{weights_dir / 'config.json'} is not valid JSON"):
        load(folder)
    (weights_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{weights_dir / 'config.json'} is missing"):
        load(folder)
