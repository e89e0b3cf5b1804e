"""fac_mini.generate against greedy generations recorded from the official implementation on the tiny checkpoint
(tests/fixtures/released_tiny/generate_expected.json; how it was made: the fixture README)."""
import json

import pytest
from released_tiny import BATCHES, FIXTURE

from fac_mini.generate import generate_s2m, generate_s2t
from fac_mini.released import load_released

GOLDEN = json.loads((FIXTURE / "generate_expected.json").read_text())
CASES = GOLDEN["cases"]
BATCH_ONE = ["s2m_greedy", "s2m_greedy_penalty", "s2m_greedy_redraw", "s2t_greedy"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official():
    return load_released(FIXTURE / "checkpoint")


def _generate(model, case):
    """The course's generation with the settings the official run was given (greedy: do_sample=False)."""
    sp_gen_kwargs = case["sp_gen_kwargs"]
    generate = generate_s2t if sp_gen_kwargs["disable_speech"] else generate_s2m
    assert (GOLDEN["eos_token_id"], GOLDEN["pad_token_id"]) == (model.config.text_eos_token_id,
                                                                model.config.text_pad_token_id)
    return generate(model, BATCHES[case["batch"]], case["max_new_tokens"], sp_gen_kwargs=sp_gen_kwargs,
                    **case["generate_kwargs"])


def test_the_recorded_runs_exercise_the_loop_rules():
    """The goldens cover: text eos stopping, a speech eos group rewriting the text token to <|audio_eos|>
    (292) and text going on after speech ended, the re-draw path, and padding in a batch."""
    penalty, redraw = CASES["s2m_greedy_penalty"], CASES["s2m_greedy_redraw"]
    for case in (penalty, redraw):
        text, speech = case["text_ids"][0], case["speech_ids"][0]
        assert speech[-5:] == [97] * 5 and 97 not in speech[:-5]             # one eos group, the last one
        assert text[len(speech) // 5] == 292 and text[-1] == 282 and len(text) < case["max_new_tokens"]
    assert CASES["s2m_greedy"]["text_ids"][0][-1] == 282
    assert not redraw["sp_gen_kwargs"]["only_crq_sampling"] and redraw["generate_kwargs"]["repetition_penalty"] > 1
    assert BATCHES["infer_left"]["attention_mask"][1, 0] == 0


@pytest.mark.parametrize("name", BATCH_ONE + ["s2t_greedy_left"])
def test_generation_equals_the_official_one(official, name):
    case = CASES[name]
    out = _generate(official, case)
    assert out.text_ids.tolist() == case["text_ids"]
    assert out.speech_ids.tolist() == case["speech_ids"]


def test_left_padded_s2m_equals_the_official_one_where_padding_does_not_reach(official):
    """Text of both rows and the speech of the unpadded row. The padded row's speech depends on the SRH, which
    (as released) attends to the left-padding positions, whose LLM states depend on the device in the official
    code (next test)."""
    case = CASES["s2m_greedy_left"]
    assert case["text_ids"] == CASES["s2m_greedy_left_cuda_rule"]["text_ids"]
    out = _generate(official, case)
    assert out.text_ids.tolist() == case["text_ids"]
    assert out.speech_ids[0].tolist() == case["speech_ids"][0]


def test_left_padded_s2m_equals_the_official_one_with_the_cuda_rule_for_fully_masked_rows(official):
    """The official run with transformers' CUDA rule for fully masked query rows (they attend to every key, which
    is what fac_mini does on every device; on CPU the official code attends uniformly instead)."""
    case = CASES["s2m_greedy_left_cuda_rule"]
    out = _generate(official, case)
    assert out.text_ids.tolist() == case["text_ids"]
    assert out.speech_ids.tolist() == case["speech_ids"]
