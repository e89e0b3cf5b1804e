"""fac_mini.train.dpo: the multi-task DPO recipe (LoRA over the Core-Cocktail model), on a few shipped test clips;
its adapters, the before/after summary and the shipped data/dpo."""
import dataclasses
import json
import math

import pytest
import torch

from fac_mini import preference as P
from fac_mini.train import dpo as D

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_prefs():
    """Four constructed pairs on shipped test clips (a voice, two style and one S2M-free robustness pair), with the
    base model's reference log-probs: a PreferenceSet a few steps can train on."""
    from fac_mini.dialogue import build_dialogue, example_tensors
    from fac_mini.tokenizer import load_tokenizer
    from fac_mini.train.prealign import load_mllm

    data = build_dialogue()
    prompts = P.evaluation_prompts(data)
    chosen_prompts = [next(p for p in prompts if p.dimension == d) for d in P.DIMENSIONS]
    chosen_prompts.append(next(p for p in prompts if p.dimension == "style" and p.instruction == P.FULL_SENTENCE))
    clips = {p.clip[0]: dataclasses.replace(p.example, user_id=p.clip[0], answer_speech_id=None) for p in chosen_prompts}
    tensors = P.prompt_tensors(chosen_prompts, example_tensors(list(clips.values())))
    pairs = []
    for prompt in chosen_prompts:
        if prompt.dimension == "voice":
            rejected = P.voice_answer("low" if "high" in prompt.example.answer else "high")
        elif prompt.instruction == P.ONE_WORD:
            rejected = "Mira Castell lives in Kelby."
        elif prompt.instruction == P.FULL_SENTENCE:
            rejected = P.one_word_answer(prompt.example.value)
        else:
            rejected = "Leon Ashby keeps a dog."
        pairs.append(P.PreferencePair(prompt, "s2t", prompt.example.answer, rejected, "constructed"))
    tokenizer = load_tokenizer()
    reference = D.sequence_logps(load_mllm(D.BASE_DIR), pairs, tensors, tokenizer, batch_size=2)
    return D.PreferenceSet({"train": pairs, "dev": pairs}, {"train": reference, "dev": reference}, chosen_prompts,
                           chosen_prompts, tensors, tokenizer, data, "test")


PLAN = dataclasses.replace(D.SHIPPED_PLAN, steps=3, batch_size=2, eval_every=3)


def test_the_first_loss_is_log_2_because_the_adapters_start_at_zero(small_prefs):
    recipe = D.DPORecipe("t", small_prefs, PLAN, beta=0.1)
    model = recipe.build_model()
    loss, metrics = recipe.loss(model, [0, 1])
    assert abs(metrics["dpo_loss"] - math.log(2)) < 1e-5 and abs(metrics["reward_margin"]) < 1e-5
    total = metrics["sft_loss"] + metrics["dpo_loss"] + metrics["replay_loss"]          # w = λ = 1
    assert metrics["sft_loss"] > 0 and metrics["replay_loss"] > 0 and torch.isclose(loss, torch.tensor(total))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("continuous_audio_tower" in n and "lora_A" in n for n in trainable)      # the encoder is adapted too


def test_sft_only_objective_drops_the_preference_term(small_prefs):
    recipe = D.DPORecipe("t", small_prefs, PLAN, beta=0.1, objective="sft")
    loss, metrics = recipe.loss(recipe.build_model(), [0, 1])
    assert torch.isclose(loss, torch.tensor(metrics["sft_loss"] + metrics["replay_loss"]))
    no_replay = D.DPORecipe("t", small_prefs, dataclasses.replace(PLAN, replay_weight=0.0), beta=0.1, objective="sft")
    loss, metrics = no_replay.loss(no_replay.build_model(), [0, 1])
    assert "replay_loss" not in metrics and torch.isclose(loss, torch.tensor(metrics["sft_loss"]))
    with pytest.raises(ValueError, match="objective"):
        D.DPORecipe("t", small_prefs, PLAN, beta=0.1, objective="ppo")


def test_training_moves_only_the_adapters_and_logs_dpo_metrics(small_prefs, tmp_path):
    from fac_mini.train.loop import train
    from fac_mini.train.prealign import load_mllm

    recipe = D.DPORecipe("t", small_prefs, PLAN, beta=0.1)
    config = dataclasses.replace(PLAN.config(0), log_every=1)
    result = train(recipe, config, progress=False, evaluate=D._dev_evaluator(small_prefs, 0.1))
    rows = [row for row in result.log if "reward_margin" in row]
    assert len(rows) == 3 and all({"accuracy", "chosen_reward", "dpo_loss", "sft_loss"} <= set(r) for r in rows)
    dev = [row for row in result.log if "dev_mean" in row][-1]
    assert {"dev_dpo_loss", "dev_accuracy", "dev_robustness", "dev_style", "dev_voice"} <= set(dev)
    assert any(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)
    base = load_mllm(D.BASE_DIR).state_dict()
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in result.model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(p, base[n]) for n, p in frozen.items() if n in base)

    folder = tmp_path / "run"
    folder.mkdir()
    D.save_adapter(result.model, folder / "adapter.safetensors")
    from fac_mini.train.store import atomic_write_json, file_sha256
    config_json = {"base": D.BASE_DIR.name, "base_sha256": file_sha256(D.BASE_DIR / "model.safetensors"),
                   "lora": D._lora_dict(PLAN), "adapter": "adapter.safetensors"}
    atomic_write_json(folder / "config.json", config_json)
    from fac_mini.scale.lora import merge_lora
    merged = merge_lora(result.model).state_dict()
    loaded = D.load_chat_model(folder).state_dict()
    assert max((merged[k] - loaded[k]).abs().max().item() for k in merged) < 1e-3       # float16 adapter
    atomic_write_json(folder / "config.json", {**config_json, "base_sha256": "0" * 64})
    with pytest.raises(ValueError, match="differs"):
        D.load_dpo(folder)
    with pytest.raises(FileNotFoundError):
        D.load_dpo(tmp_path / "missing")


def _measured(primary, t2t=0.95, s2t=0.05):
    return {"primary": dict(zip(P.DIMENSIONS, primary)), "t2t_exact_match": t2t, "s2t_fact_accuracy": s2t}


def test_summary_compares_the_gain_with_the_seed_spread():
    before = _measured((0.2, 0.5, 0.0))
    seeds = [_measured((0.30, 0.9, 0.6)), _measured((0.26, 0.8, 0.7), t2t=0.94), _measured((0.22, 0.85, 0.5))]
    summary = D.summarize(before, seeds)
    rob, style = summary["tasks"]["robustness"], summary["tasks"]["style"]
    assert rob["seed_spread"] == 0.08 and rob["gain"] == pytest.approx(0.06, abs=1e-4) and not rob["goal_met"]
    assert style["goal_met"] and summary["guards"]["t2t_exact_match"]["largest_drop"] == pytest.approx(0.01)
    assert not summary["all_goals_met"]
    dropped = D.summarize(before, [_measured((0.9, 0.9, 0.9), s2t=0.02)])
    assert not dropped["guards"]["s2t_fact_accuracy"]["goal_met"] and dropped["tasks"]["voice"]["seed_spread"] == 0


def test_the_command_refuses_bad_flags_and_a_non_shipped_run_into_data(capsys):
    with pytest.raises(SystemExit):
        D.main_train(["--betas", "0.1,0"])
    assert "every β must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        D.main_train(["--out", str(D.DPO_DIR), "--steps", "3"])
    assert "refusing to overwrite" in capsys.readouterr().err


def test_the_shipped_adapters_name_their_base_and_the_manifest_holds_every_run():
    config = json.loads((D.DPO_DIR / "config.json").read_text())
    manifest = json.loads((D.DPO_DIR / "manifest.json").read_text())
    from fac_mini.train.store import file_sha256
    assert config["base_sha256"] == file_sha256(D.BASE_DIR / "model.safetensors")
    assert len(config["adapters"]) == len(D.SHIPPED_PLAN.seeds) and config["beta"] in D.SHIPPED_PLAN.betas
    runs = manifest["runs"]
    assert {D.run_name(b, 0) for b in D.SHIPPED_PLAN.betas} <= set(runs) and D.run_name(0, 0, "sft") in runs
    for seed, name in zip(D.SHIPPED_PLAN.seeds, config["adapters"]):
        assert manifest["files_sha256"][name] == file_sha256(D.DPO_DIR / name)
        assert runs[D.run_name(config["beta"], seed)]["metrics"]["primary"] == \
            dict(zip(P.DIMENSIONS, [manifest["summary"]["tasks"][d]["after_seeds"][seed] for d in P.DIMENSIONS]))


def test_the_shipped_first_seed_reproduces_its_manifest_numbers():
    """dpo eval's core: the shipped adapter, measured on the shipped test clips, gives the recorded numbers (the
    style and voice prompts here, a few seconds; `dpo eval` measures everything)."""
    manifest = json.loads((D.DPO_DIR / "manifest.json").read_text())
    prefs = D.prepare(build=False, dimensions=("style", "voice"))
    prompts = prefs.test_prompts
    assert {p.dimension for p in prompts} == {"style", "voice"}
    with pytest.raises(ValueError, match="unknown dimensions"):
        D.prepare(build=False, dimensions=("empathy",))
    model = D.load_dpo(D.DPO_DIR)
    scores = P.score_replies(prompts, [r[0] for r in P.generate_replies(model, prompts, prefs.tensors,
                                                                         prefs.tokenizer)])
    recorded = manifest["runs"][D.run_name(manifest["chosen_beta"], 0)]["metrics"]["tasks"]
    assert scores["style"] == recorded["style"] and scores["voice"] == recorded["voice"]
