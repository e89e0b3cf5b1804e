"""fac_mini.course.bench: the DRSR benchmark runs and reports its keys; the analytic cost model behaves (no timing limits)."""
import json

import pytest
import torch

from fac_mini.course.bench import (MINI_BACKBONE, MINI_SRH, RELEASED_BACKBONE, RELEASED_SRH, DRSRModel, bench_drsr,
                                   cost_vs_group_size, main_bench, shape_of, srh_parameters, training_flops)
from fac_mini.cost import QWEN3_8B
from fac_mini.llm import LLMConfig, Qwen3Model

TINY_BACKBONE = LLMConfig(vocab_size=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
TINY_SRH = LLMConfig(vocab_size=1, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=1, num_key_value_heads=1, head_dim=16)
CONTRACT_KEYS = ("baseline_25hz_s", "drsr_5hz_s", "ratio", "flops_ratio_mini", "flops_ratio_8b")


def test_bench_times_both_models_on_the_same_audio(monkeypatch):
    """The baseline's backbone reads every 25 Hz token, DRSR's one position per group of 5 (counted on the backbone's
    width, 32, apart from the SRH's 16); the times reported are the medians of the step times it lists."""
    import statistics

    inputs = []
    original = Qwen3Model.forward

    def counting_forward(self, *args, inputs_embeds=None, **kwargs):
        inputs.append(tuple(inputs_embeds.shape[1:]))
        return original(self, *args, inputs_embeds=inputs_embeds, **kwargs)

    monkeypatch.setattr(Qwen3Model, "forward", counting_forward)
    result = bench_drsr(seconds=1.0, batch=1, repeats=2, warmup=1, threads=1, backbone=TINY_BACKBONE, srh=TINY_SRH)
    assert result["speech_tokens"] == 25 and result["llm_positions_drsr"] == 5
    backbone = [positions for positions, width in inputs if width == TINY_BACKBONE.hidden_size]
    assert sorted(backbone) == [5, 5, 5, 25, 25, 25]                                # warm-up + 2 timed, each model
    assert result["baseline_25hz_s"] == statistics.median(result["baseline_times_s"])
    assert result["drsr_5hz_s"] == statistics.median(result["drsr_times_s"])
    json.dumps(result)                                                                # JSON-ready


def test_analytic_flops_ratio_agrees_with_the_flop_counter():
    """The benchmark's analytic FLOPs ratio against PyTorch's FLOP counter on the same two models (matmuls of
    forward + backward). The counter does not count the attention scores, so compare at a short sequence."""
    from torch.utils.flop_counter import FlopCounterMode

    from fac_mini.course.bench import Baseline25Hz, DRSRModel, _flops_ratio

    speech_ids = torch.randint(0, 6561, (1, 100), generator=torch.Generator().manual_seed(0))
    counted = {}
    for name, model in (("baseline", Baseline25Hz(MINI_BACKBONE)), ("drsr", DRSRModel(MINI_BACKBONE, MINI_SRH))):
        with FlopCounterMode(display=False) as counter:
            model(speech_ids).backward()
        counted[name] = counter.get_total_flops()
    measured = counted["drsr"] / counted["baseline"]
    assert measured == pytest.approx(_flops_ratio(100, 5, MINI_BACKBONE, MINI_SRH), rel=0.03)
    assert 0.25 < measured < 0.4


def test_thread_setting_is_restored():
    before = torch.get_num_threads()
    assert bench_drsr(seconds=0.4, repeats=1, warmup=0, threads=1, backbone=TINY_BACKBONE, srh=TINY_SRH)["threads"] == 1
    assert torch.get_num_threads() == before


def test_command_line_prints_one_json_object(capsys):
    assert main_bench(["drsr", "--json", "--seconds", "0.4", "--repeats", "1", "--warmup", "0",
                       "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    result = json.loads(out)
    assert set(CONTRACT_KEYS) <= set(result) and result["ratio"] == result["drsr_5hz_s"] / result["baseline_25hz_s"]


def test_parameter_formula_matches_the_modules():
    assert shape_of(MINI_BACKBONE).non_embedding_parameters == sum(
        p.numel() for p in Qwen3Model(MINI_BACKBONE, with_embeddings=False).parameters())
    assert shape_of(RELEASED_BACKBONE).non_embedding_parameters == QWEN3_8B.non_embedding_parameters
    drsr = DRSRModel(TINY_BACKBONE, TINY_SRH)
    srh_own = sum(p.numel() for name, p in drsr.srh.named_parameters() if name != "lm_head.weight")
    assert srh_parameters(TINY_BACKBONE, TINY_SRH) == srh_own
    assert 400e6 < srh_parameters(RELEASED_BACKBONE, RELEASED_SRH) < 600e6               # the released ~0.53 B
    assert 12 < shape_of(MINI_BACKBONE).non_embedding_parameters / srh_parameters(MINI_BACKBONE, MINI_SRH) < 20


def test_analytic_cost_decreases_with_group_size():
    rows = cost_vs_group_size(range(1, 11), seconds=60.0)
    assert [row["group_size"] for row in rows] == list(range(1, 11))
    steps = [row["relative_step_flops"] for row in rows]
    backbone = [row["relative_backbone_flops"] for row in rows]
    assert steps[0] == backbone[0] == 1.0
    assert all(a > b for a, b in zip(steps, steps[1:])) and all(a > b for a, b in zip(backbone, backbone[1:]))
    assert rows[4]["llm_positions"] == 300 and backbone[4] < 0.21                     # 1500 tokens / 5
    assert 0.2 < steps[4] < 0.5                                                       # SRH keeps 25 Hz work
    mini = training_flops(200, 5, MINI_BACKBONE, MINI_SRH)["step_flops"] / training_flops(
        200, 1, MINI_BACKBONE, MINI_SRH)["step_flops"]
    assert mini < 0.5


def test_cost_vs_group_size_can_measure_at_a_tiny_size():
    rows = cost_vs_group_size([1, 5], seconds=0.6, backbone=TINY_BACKBONE, srh=TINY_SRH, measure=True,
                              repeats=1, warmup=0, threads=1)
    assert all(row["step_s"] > 0 for row in rows)
    with pytest.raises(ValueError, match="group_sizes"):
        cost_vs_group_size([0])
