"""fac_mini.train.srh_study: the SRH vs parallel-head experiment of notebook 07 (streams, model, metrics, shipped run)."""
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fac_mini.corpus import load_corpus
from fac_mini.llm import IGNORE_INDEX
from fac_mini.speech_tokenizer import load_speech_tokenizer
from fac_mini.train.srh_study import (HEADS, SpeechStreamLM, StudyConfig, collate_streams, corpus_speech_tokens,
                                      evaluate_head, generate_reply_speech, head_metrics, load_head, main_eval,
                                      read_manifest, save_head, stream_examples, summarize_metrics, train_head)
from fac_mini.tokenizer import load_tokenizer
from fac_mini.train.loop import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = StudyConfig()
BOS, EOS, PAD = CONFIG.codes, CONFIG.codes + 1, CONFIG.codes + 2


def _rows(lengths=(12, 7, 23), seed=0):
    generator = torch.Generator().manual_seed(seed)
    texts = ["bob", "alice lives in paris", "what colour does carol like best"]
    return [{"id": f"u{i}", "text": texts[i % 3], "speaker": "spk00",
             "ids": torch.randint(0, CONFIG.codes, (n,), generator=generator)} for i, n in enumerate(lengths)]


def test_stream_example_follows_the_released_streams():
    tokenizer = load_tokenizer()
    row = _rows()[0]
    example = stream_examples([row], CONFIG, tokenizer)[0]
    groups = math.ceil((12 + CONFIG.speech_delay) / CONFIG.group_size)                     # 22 ids -> 5 groups
    assert example.input_ids.tolist() == [4] + [3] * groups + [5]                          # bos AUDIO.. eos
    transcript = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
    assert len(transcript) < groups
    assert example.text_ids[1:-1].tolist() == transcript + [7] * (groups - len(transcript))   # <|sil|> padded
    speech = torch.cat((torch.full((CONFIG.speech_delay,), BOS), row["ids"]))
    speech = torch.cat((speech, torch.full((groups * 5 - len(speech),), PAD))).view(groups, 5)
    assert torch.equal(example.speech_groups[1:-1], speech)
    assert (example.speech_groups[[0, -1]] == PAD).all()
    labels = speech.masked_fill(speech == PAD, IGNORE_INDEX)
    assert torch.equal(example.speech_labels[1:-1], labels)
    assert (example.speech_labels[0] == IGNORE_INDEX).all() and (example.speech_labels[-1] == EOS).all()


@pytest.mark.parametrize("head", HEADS)
def test_batched_right_padding_equals_one_by_one(head):
    torch.manual_seed(0)
    model = SpeechStreamLM(StudyConfig(head=head)).eval()
    examples = stream_examples(_rows(), CONFIG)
    batch = collate_streams(examples)
    with torch.no_grad():
        batched = model(batch).logits
        for row, example in enumerate(examples):
            alone = model(collate_streams([example])).logits[0]
            assert torch.allclose(batched[row, :len(alone)], alone, atol=1e-5)


def test_srh_head_is_tied_to_the_speech_table_and_saved_once(tmp_path):
    torch.manual_seed(0)
    model = SpeechStreamLM(StudyConfig(head="srh"))
    assert model.speech_head.lm_head.weight is model.audio_tower.embed_tokens.weight
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["head"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("speech_head."))
    save_head(model, tmp_path / "srh")
    assert "speech_head.lm_head.weight" not in load_file(str(tmp_path / "srh" / "model.safetensors"))
    loaded = load_head("srh", tmp_path)
    assert loaded.speech_head.lm_head.weight is loaded.audio_tower.embed_tokens.weight
    batch = collate_streams(stream_examples(_rows(), CONFIG))
    with torch.no_grad():
        assert torch.equal(model.eval()(batch).logits, loaded(batch).logits)
    with pytest.raises(FileNotFoundError, match="srh train"):
        load_head("parallel", tmp_path)
    with pytest.raises(ValueError, match="head"):
        StudyConfig(head="mtp")
    with pytest.raises(ValueError, match="multiple of group_size"):
        StudyConfig(speech_delay=7)
    from safetensors.torch import save_file
    save_head(SpeechStreamLM(StudyConfig(head="parallel")), tmp_path / "parallel")
    weights = load_file(str(tmp_path / "parallel" / "model.safetensors"))
    del weights["speech_head.lm_head.weight"]                      # the parallel head's only matrix: never tied
    save_file(weights, str(tmp_path / "parallel" / "model.safetensors"))
    with pytest.raises(ValueError, match="speech_head.lm_head.weight"):
        load_head("parallel", tmp_path)


def test_head_metrics_on_known_logits():
    k, codes, pad = 2, 4, 6
    labels = torch.tensor([[0, 0, 1, 1, 2, 3, IGNORE_INDEX, IGNORE_INDEX],
                           [5, 5, 3, 3, 3, 0, 4, IGNORE_INDEX]])                         # 4 = bos, 5 = eos
    targets = torch.tensor([[1, 1, 2, 3, -1, -1, -1, -1], [3, 3, 3, 0, -1, -1, -1, -1]])   # label j + k, real only
    perfect = torch.full((2, 8, 7), -30.0).scatter(-1, targets.clamp(min=0)[..., None], 30.0)
    sums = head_metrics(perfect, labels, k, codes, pad)
    # scored: row 0 j = 0..3 (targets 1 1 2 3), row 1 j = 0..3 (3 3 3 0); sub-step = j mod 2
    assert sums["count"].tolist() == [4.0, 4.0]
    assert sums["correct"].tolist() == [4.0, 4.0]
    # previous[j] = label j + 1: row 0 -> 0 1 1 2 vs 1 1 2 3 (repeat at j = 1); row 1 -> 5 3 3 3 vs 3 3 3 0
    assert sums["repeat"].tolist() == [1.0, 2.0]
    summary = summarize_metrics(sums)
    assert summary["accuracy"] == 1.0 and summary["perplexity"] == 1.0 and summary["tokens"] == 8
    assert summary["repeat_accuracy"] == 0.375 and summary["per_sub_step"]["repeat_accuracy"] == [0.25, 0.5]
    uniform = summarize_metrics(head_metrics(torch.zeros(2, 8, 7), labels, k, codes, pad))
    assert abs(uniform["perplexity"] - 7.0) < 1e-3
    empty_step = summarize_metrics({name: value * torch.tensor([1.0, 0.0]) for name, value in sums.items()})
    assert empty_step["per_sub_step"]["accuracy"] == [1.0, None] and empty_step["per_sub_step"]["perplexity"][1] is None
    with pytest.raises(ValueError, match="no speech token"):
        summarize_metrics(head_metrics(perfect, torch.full_like(labels, IGNORE_INDEX), k, codes, pad))


def test_training_is_reproducible_and_learns():
    examples = stream_examples(_rows(), CONFIG)
    config = TrainConfig(steps=40, batch_size=3, lr=3e-3, warmup=5, log_every=10)
    first = train_head("srh", examples, config, progress=False)
    again = train_head("srh", examples, config, progress=False)
    log = first.log
    for (name, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [row["step"] for row in log] == [10, 20, 30, 40]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    with pytest.raises(ValueError, match="head="):
        train_head("naive", examples, config)


def test_batched_tokens_equal_tokenize_per_clip():
    rows = corpus_speech_tokens("test", limit=3)
    tokenizer = load_speech_tokenizer()
    test = load_corpus("test")
    for i, row in enumerate(rows):
        assert row["id"] == test[i]["id"]
        assert torch.equal(row["ids"], tokenizer.tokenize(test[i]["audio"]["array"]))


def test_shipped_run_reproduces_its_metrics_and_the_srh_wins(capsys):
    manifest = read_manifest()
    assert main_eval(["--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    for head in HEADS:
        shipped = manifest["heads"][head]
        assert {k: v for k, v in measured[head].items() if k != "parameters"} == shipped["test"]
        assert measured[head]["parameters"] == shipped["parameters"]
    srh, parallel = (manifest["heads"][h]["test"]["per_sub_step"]["accuracy"] for h in HEADS)
    assert all(s > p for s, p in zip(srh[1:], parallel[1:]))        # sub-steps that can see the previous id
    assert manifest["heads"]["srh"]["test"]["perplexity"] < manifest["heads"]["parallel"]["test"]["perplexity"]


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    examples = stream_examples(_rows(), CONFIG)
    config = TrainConfig(steps=20, batch_size=2, lr=3e-3, warmup=3, log_every=5, eval_every=5, checkpoint_every=5)
    options = dict(progress=False, eval_examples=examples[:1])
    whole = train_head("srh", examples, config, **options)
    train_head("srh", examples, config, state_dir=tmp_path, stop_after=12, **options)     # "interrupted" at 12
    assert len(list(tmp_path.glob("srh-*.pt"))) == 1
    resumed = train_head("srh", examples, config, state_dir=tmp_path, **options)
    assert resumed.log == whole.log and whole.best_step in (5, 10, 15, 20)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("head", HEADS)
def test_free_running_generation(head):
    torch.manual_seed(1)
    model = SpeechStreamLM(StudyConfig(head=head)).eval()
    example = stream_examples(_rows(), CONFIG)[2]                      # 23 ids + 10 delay -> 7 groups
    greedy = generate_reply_speech(model, example)
    assert greedy.dtype == torch.long and len(greedy) <= 5 * (7 - 2) and bool((greedy < CONFIG.codes).all())
    assert torch.equal(greedy, generate_reply_speech(model, example))              # greedy is deterministic
    draws = [generate_reply_speech(model, example, do_sample=True, generator=torch.Generator().manual_seed(3))
             for _ in range(2)]
    assert torch.equal(*draws)                                                      # seeded sampling repeats
    assert model.training is False and example.speech_groups[3:].eq(
        stream_examples(_rows(), CONFIG)[2].speech_groups[3:]).all()               # the example is not mutated


def test_parallel_greedy_generation_equals_teacher_forced_argmax():
    """Fed back its own groups, the parallel head's teacher-forced argmax is what it generated (it reads no
    previous id); checked on a model trained a little, so that it emits speech codes rather than eos."""
    examples = stream_examples(_rows(), CONFIG)
    model = train_head("parallel", examples, TrainConfig(steps=30, batch_size=3, lr=3e-3, warmup=5, log_every=10),
                       progress=False).model
    example = examples[2]
    generated = generate_reply_speech(model, example)
    assert len(generated) >= 10, "too short to test"
    first = 1 + CONFIG.speech_delay // CONFIG.group_size
    groups = example.speech_groups.clone()
    groups[first:first + len(generated) // 5] = generated[:len(generated) // 5 * 5].view(-1, 5)
    fed_back = collate_streams([dataclasses.replace(example, speech_groups=groups)])
    with torch.no_grad():
        argmax = model(fed_back).logits.argmax(-1)[0].view(-1, 5)                   # row p: group p + 1
    assert torch.equal(argmax[first - 1:first - 1 + len(generated) // 5].flatten(), generated[:len(generated) // 5 * 5])


def test_train_command_writes_a_loadable_study(tmp_path, capsys):
    from fac_mini.train.srh_study import main_train

    out = tmp_path / "study"
    assert main_train(["--steps", "4", "--batch-size", "4", "--eval-every", "2", "--out", str(out),
                       "--state-dir", str(tmp_path / "work")]) == 0
    manifest = read_manifest(out)
    assert manifest["command"].startswith("python -m fac_mini srh train --steps 4")
    assert manifest["utterances"] == {"train": 1325, "dev": 42, "test": 392}
    for head in HEADS:
        entry = manifest["heads"][head]
        assert entry["best_step"] in (2, 4) and set(entry) >= {"dev", "test", "log", "parameters"}
        assert set(manifest["files_sha256"]) >= {f"{head}/model.safetensors", f"{head}/config.json"}
        assert entry["test"] == evaluate_head(load_head(head, out), stream_examples(corpus_speech_tokens("test")))
    for head in HEADS:                                                  # one resumable state per head
        assert len(list((tmp_path / "work").glob(f"{head}-*.pt"))) == 1
