"""M0, the pretrained text LLM: data format and masking, training, exact resume, checkpoints, shipped knowledge."""
import json

import pytest
import torch

from fac_mini import DATA_DIR
from fac_mini.course.checks import check_chat_prompt, check_qa_labels
from fac_mini.llm import IGNORE_INDEX, LLMConfig, Qwen3ForCausalLM
from fac_mini.train.m0 import (M0_CONFIG, build_m0_sequences, chat_prompt, chat_text, collate, evaluate_knowledge,
                               load_m0, qa_labels, save_m0, statement_text, train_m0)
from fac_mini.train.loop import TrainConfig
from fac_mini.train.store import file_sha256
from fac_mini.tokenizer import load_tokenizer
from fac_mini.world import QUESTIONS, HELD_OUT_QUESTION, build_world

TINY = LLMConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, rope_theta=1e6, max_position_embeddings=64)
def fast(steps, batch_size, lr, seed=0, **overrides):
    return TrainConfig(**{**dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, warmup=2, log_every=1),
                          **overrides})
SHIPPED = DATA_DIR / "m0"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def sequences(tokenizer):
    return build_m0_sequences(tokenizer)


def test_chat_format():
    assert chat_prompt("Who?") == "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    assert chat_text("Who?", "Me.") == chat_prompt("Who?") + "Me.<|im_end|>"
    assert statement_text("A fact.") == "A fact.<|im_end|>"


def test_sequences_mask_the_prompt_only(tokenizer, sequences):
    world = build_world(0)
    assert len(sequences) == len(world.statements()) + len(world.questions("train")) == 960
    statements, chats = sequences[:480], sequences[480:]
    assert all(prompt == 0 for _, prompt in statements) and all(prompt > 0 for _, prompt in chats)
    for (ids, prompt), example in zip(chats[:8], world.questions("train")[:8]):
        assert tokenizer.decode(ids[:prompt]) == chat_prompt(example.text)
        assert tokenizer.decode(ids[prompt:]) == example.answer + "<|im_end|>"
    batch = collate([statements[0], chats[0], chats[1]], tokenizer.pad_token_id)
    labels, mask = batch["labels"], batch["attention_mask"]                        # (3, T)
    assert labels.shape == batch["input_ids"].shape == mask.shape
    assert torch.equal(labels[mask == 0], torch.full_like(labels[mask == 0], IGNORE_INDEX))    # padding ignored
    assert (labels[0][mask[0] == 1] != IGNORE_INDEX).all()                      # statements: loss everywhere
    ids, prompt = chats[0]
    assert (labels[1, :prompt] == IGNORE_INDEX).all()
    assert torch.equal(labels[1, prompt:len(ids)], torch.tensor(ids[prompt:]))  # answer + <|im_end|> scored


def test_heldout_questions_never_in_training_text(tokenizer, sequences):
    training_text = "\n".join(tokenizer.decode(ids) for ids, _ in sequences)
    for question in build_world(0).questions("heldout"):
        assert question.text not in training_text
    for templates in QUESTIONS.values():          # not even the template's wording around the name
        held_out = templates[HELD_OUT_QUESTION].split("{name}")
        assert all(part.strip() not in training_text for part in held_out if len(part.strip()) > 3)


def test_qa_labels_does_not_mutate_and_checks_shapes():
    input_ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    before = input_ids.clone()
    labels = qa_labels(input_ids, torch.tensor([2, 1]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert torch.equal(input_ids, before)
    with pytest.raises(ValueError, match="prompt_lengths"):
        qa_labels(input_ids, torch.tensor([1]), torch.ones_like(input_ids))


def test_a_few_steps_lower_the_loss(tmp_path, tokenizer, sequences):
    batch = collate(sequences[::60], tokenizer.pad_token_id)
    torch.manual_seed(0)
    untrained = Qwen3ForCausalLM(TINY)
    result = train_m0(TINY, fast(12, 16, 1e-2), state_dir=tmp_path, tokenizer=tokenizer, progress=False)
    with torch.no_grad():
        before = untrained(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        after = result.model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert after < before - 0.5, (before.item(), after.item())
    assert len(result.log) == 12 and result.log[-1]["loss"] < result.log[0]["loss"]


def test_resume_is_bitwise_exact(tmp_path, tokenizer):
    config = fast(7, 8, 1e-2, seed=3, checkpoint_every=2, log_every=2)              # stop_after=3: mid log window
    kw = dict(tokenizer=tokenizer, progress=False)
    whole = train_m0(TINY, config, state_dir=tmp_path / "a", **kw)
    first = train_m0(TINY, config, state_dir=tmp_path / "b", stop_after=3, **kw)
    assert first.step == 3 and len(list((tmp_path / "b").glob("m0-*.pt"))) == 1
    resumed = train_m0(TINY, config, state_dir=tmp_path / "b", **kw)
    assert resumed.step == 7 and resumed.log == whole.log
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    again = train_m0(TINY, config, resume=False, state_dir=tmp_path / "b", stop_after=1, **kw)
    assert again.step == 1


def test_checkpoint_round_trip(tmp_path, tokenizer):
    torch.manual_seed(1)
    model = Qwen3ForCausalLM(TINY).eval()
    save_m0(model, tmp_path, log=[{"step": 1, "loss": 6.0, "lr": 1e-3}])
    loaded, loaded_tokenizer = load_m0(tmp_path)
    assert loaded.config == TINY and len(loaded_tokenizer) == 512
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert json.loads((tmp_path / "train_log.json").read_text())["rows"] == [[1, 6.0, 1e-3]]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_m0(tmp_path / "nowhere")
    torch.manual_seed(0)
    save_m0(Qwen3ForCausalLM(TINY), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=48)))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        load_m0(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=2)))
    with pytest.raises(ValueError, match=r"missing keys \['model\.layers\.1\."):
        load_m0(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_m0(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_m0(tmp_path)


def test_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match="question"):
        chat_prompt("")
    with pytest.raises(ValueError, match="batch_size"):
        train_m0(TINY, fast(1, 10_000, 1e-3), tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        train_m0(TINY, fast(0, 8, 1e-3), tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="split"):
        evaluate_knowledge(Qwen3ForCausalLM(TINY), tokenizer, split="test")


def test_self_checks(capsys):
    from fac_mini.train.m0 import chat_prompt as reference_prompt, qa_labels as reference_labels

    check_chat_prompt(reference_prompt)
    check_chat_prompt(lambda q: f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant")    # no last newline
    check_qa_labels(reference_labels)
    check_qa_labels(lambda ids, n, mask: ids.masked_fill(mask == 0, -100))              # forgot the prompt

    def in_place(ids, n, mask):
        ids.masked_fill_(torch.arange(ids.shape[1])[None] < n[:, None], -100)
        return ids.masked_fill(mask == 0, -100)

    check_qa_labels(in_place)
    lines = capsys.readouterr().out.splitlines()
    verdicts = [line.split()[0] for line in lines if line.startswith("[")]
    assert verdicts == ["[pass]", "[fail]", "[pass]", "[fail]", "[fail]"], lines
    assert "modified its inputs" in "\n".join(lines)


def test_shipped_checkpoint_matches_manifest_and_knows_the_world():
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    for name, digest in manifest["files_sha256"].items():
        assert file_sha256(SHIPPED / name) == digest, f"{name} differs from manifest.json"
    assert (SHIPPED / "model.safetensors").stat().st_size < 8_000_000
    model, tokenizer = load_m0(SHIPPED)
    assert model.config == M0_CONFIG
    recorded = manifest["metrics"]["heldout_first20"]
    result = evaluate_knowledge(model, tokenizer, "heldout", limit=20)
    assert result["n"] == 20 and set(result["per_attribute"]) == {"town", "job", "pet", "colour"}
    # a deterministic model: the same greedy answers as when it was shipped (the NLL may move in the last digits
    # on another instruction set, never by 1e-3)
    assert result["exact_match"] == recorded["exact_match"] and result["fact_accuracy"] == recorded["fact_accuracy"]
    assert result["answer_nll"] == pytest.approx(recorded["answer_nll"], abs=1e-3)
    assert manifest["metrics"]["heldout"]["n"] == 160
