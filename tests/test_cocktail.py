"""fac_mini.train.cocktail: every arm sees the same batches, stages start from the given weights and train the whole
model, the recovery arithmetic, the command's guards, and the shipped manifest's consistency."""
import json

import pytest
import torch

from fac_mini.train.cocktail import (ALPHAS, COCKTAIL_DIR, SHIPPED_PLAN, CocktailPlan, SkippingSampler, _summary,
                                     main_train, recovery)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stage2_continues_the_batches_of_stage1():
    """Stage 1 (N1 batches) then Stage 2 (skip N1) draw exactly the batches of one run over N1 + N2 steps."""
    one_stage = SkippingSampler(50, 8, seed=0)
    whole = [one_stage.next_batch() for _ in range(30)]
    stage1 = SkippingSampler(50, 8, seed=0)
    first = [stage1.next_batch() for _ in range(20)]
    stage2 = SkippingSampler(50, 8, seed=0, skip=20)
    second = [stage2.next_batch() for _ in range(10)]
    assert first + second == whole
    assert SkippingSampler(50, 8, seed=1, skip=20).next_batch() != second[0]


def test_plan_schedules():
    plan = SHIPPED_PLAN
    stage1 = plan.config(plan.stage1_steps, plan.high_lr, True)
    stage2 = plan.config(plan.stage2_steps, plan.low_lr, False)
    assert stage1.lr == 10 * stage2.lr and stage1.min_lr_ratio == stage2.min_lr_ratio == 0.1   # as in the paper
    assert plan.total_steps == plan.stage1_steps + plan.stage2_steps
    assert stage2.eval_every == stage2.steps and stage1.eval_every == plan.eval_every
    assert CocktailPlan(stage1_steps=7).config(7, 1e-3, True).warmup == 1


def test_recovery_is_the_share_of_the_loss_won_back():
    assert recovery(81.77, 74.73, 70.19) == pytest.approx(0.3921, abs=1e-4)          # DrVoice
    assert recovery(0.011, 0.05, 0.2) == pytest.approx((0.05 - 0.2) / (0.011 - 0.2), abs=1e-4)   # NLL: lower is better
    assert recovery(0.9, 0.95, 0.9) is None


def test_the_command_rejects_the_generic_step_and_lr_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main_train(["--steps", "5"])
    assert exit_info.value.code == 2 and "--stage1-steps" in capsys.readouterr().err


def test_a_stage_starts_from_its_state_and_trains_the_whole_model():
    from fac_mini.dialogue import build_dialogue, collate_dialogue, example_tensors
    from fac_mini.tokenizer import load_tokenizer
    from fac_mini.train.cocktail import StageRecipe
    from fac_mini.train.loop import TrainConfig, train
    from fac_mini.train.prealign import build_mllm, part_of

    torch.manual_seed(0)
    start = build_mllm().state_dict()
    examples = [e for e in build_dialogue()["heldout_text_facts"] if e.answer_speech_id.startswith("test-")][:2]
    tensors = example_tensors(examples)
    recipe = StageRecipe("stage-test", examples, tensors, load_tokenizer(), start, skip=0)
    built = recipe.build_model()
    assert all(torch.equal(built.state_dict()[k], v) for k, v in start.items())
    assert all(p.requires_grad for p in built.parameters())
    model = train(recipe, TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup=1), progress=False).model
    moved = {part_of(n) for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert {"llm", "encoder", "adapter"} <= moved
    assert collate_dialogue(examples, tensors, load_tokenizer(), model.config)["labels"].shape[0] == 2


@pytest.mark.skipif(not (COCKTAIL_DIR / "manifest.json").is_file(), reason="data/cocktail not built yet")
def test_the_shipped_manifest_is_consistent():
    from fac_mini.train.prealign import load_mllm

    manifest = json.loads((COCKTAIL_DIR / "manifest.json").read_text())
    runs = manifest["runs"]
    expected = {"prealigned", "low_lr_only", "high_lr_only"} | {f"{stage}_a{a:g}" for a in ALPHAS
                                                                for stage in ("merge", "stage2")}
    assert set(runs) == expected
    assert _summary(runs, manifest["m0_t2t"]) == manifest["summary"]
    assert runs["merge_a0"]["metrics"]["t2t"]["exact_match"] == runs["prealigned"]["metrics"]["t2t"]["exact_match"]
    assert all(runs[f"stage2_a{a:g}"]["steps"] == runs["low_lr_only"]["steps"] == runs["high_lr_only"]["steps"]
               for a in ALPHAS)                                                 # equal total steps
    model = load_mllm(COCKTAIL_DIR)
    weight = model.language_model.lm_head.weight
    assert torch.equal(weight, weight.half().float())                          # stored in float16
