"""fac_mini.scale: the 2-process FSDP2 dry run (one subprocess run shared by the module), packing, the training
step's loss normalisation, the memory arithmetic and its CPU validation, LoRA with peft."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fac_mini.model import FunAudioChat, FunAudioChatConfig
from fac_mini.released import count_parameters, load_released
from fac_mini.scale import memory
from fac_mini.scale.dry_run import dry_run_config
from fac_mini.scale.fsdp import RELEASE_RECIPE, Sharding, build_model, release_optimizer, train_step
from fac_mini.scale.packing import collate_rows, pack_dialogues, scored_token_counts, synthetic_dialogues
from fac_mini.srh import teacher_forcing_ids

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def dry_run_process(request):
    """``python -m fac_mini scale dry-run --json`` started when the module's first test starts: its processes run
    while the other tests of this module do (its tests are last in the file). Not started when no selected test
    needs it."""
    if not any("dry_run" in item.fixturenames for item in request.session.items):
        yield None
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fac_mini", "scale", "dry-run", "--json"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process
    if process.poll() is None:
        process.kill()
        process.communicate()


# ----------------------------------------------------------------------------------------------------------
# Packing and the loss normalisation
# ----------------------------------------------------------------------------------------------------------
def test_pack_dialogues_first_fit_decreasing():
    assert pack_dialogues([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    lengths = [7, 1, 3, 8, 2, 5, 4, 4]
    rows = pack_dialogues(lengths, 8)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 8 for row in rows)
    assert len(rows) == math.ceil(sum(lengths) / 8)                  # optimal here: 34 positions in 5 rows
    with pytest.raises(ValueError, match="longer than cutoff"):
        pack_dialogues([3, 9], 8)


def test_collate_rows_restarts_positions_and_counts_scored_tokens():
    config = dry_run_config()
    dialogues = synthetic_dialogues(config, 6, 0, 1, (3, 6), (4, 7))
    rows = pack_dialogues([len(d) for d in dialogues], 64)
    batch = collate_rows([[dialogues[i] for i in row] for row in rows], 64, config)
    first = rows[0]
    second_start = len(dialogues[first[0]])
    assert batch["position_ids"][0, second_start] == 0 and batch["position_ids"][0, second_start - 1] > 0
    assert batch["speech_ids"].shape[0] == 2 * len(dialogues)
    assert int(batch["feature_exist_mask"].sum()) == len(dialogues)
    torch.manual_seed(0)
    out = FunAudioChat(config)(**batch)
    text = int((out.text_labels[:, 1:] != -100).sum())
    _, targets = teacher_forcing_ids(out.speech_labels, config.discrete.group_size)
    assert scored_token_counts(config, batch) == (text, int((targets != -100).sum()))
    assert text > 0 and int((targets != -100).sum()) > 0


def test_train_step_micro_batches_equal_one_batch():
    """Re-weighting each micro-batch's mean by its share of the scored tokens: two halves == the whole."""
    config = dry_run_config()
    dialogues = synthetic_dialogues(config, 8, 1, 1, (3, 6), (4, 7))
    rows = [[dialogues[i] for i in row] for row in pack_dialogues([len(d) for d in dialogues], 64)][:4]
    torch.manual_seed(0)
    initial = FunAudioChat(config).state_dict()
    results, states = [], []
    for parts in ([rows], [rows[:2], rows[2:]]):
        model = build_model(config, None, Sharding(), initial)
        optimizer = release_optimizer(model, RELEASE_RECIPE, lr=1e-3)
        batches = [collate_rows(part, 64, config) for part in parts]
        results.append(train_step(model, optimizer, batches, config, lr=1e-3))
        states.append(model.state_dict())
    assert abs(results[0].loss - results[1].loss) < 1e-5
    assert (results[0].text_tokens, results[0].speech_tokens) == (results[1].text_tokens, results[1].speech_tokens)
    assert max(float((states[0][k] - states[1][k]).abs().max()) for k in states[0]) < 1e-5
    # a plain mean of the two halves' losses is a different objective (what the weighting avoids)
    model = FunAudioChat(config)
    model.load_state_dict(initial)
    with torch.no_grad():
        naive = sum(float(model(**collate_rows(part, 64, config)).loss) for part in (rows[:2], rows[2:])) / 2
    assert abs(naive - results[0].loss) > 1e-4


# ----------------------------------------------------------------------------------------------------------
# Memory and FLOPs arithmetic
# ----------------------------------------------------------------------------------------------------------
def test_state_bytes_reproduce_the_zero_paper():
    """ZeRO (Rajbhandari et al. 2019), Figure 1: Ψ = 7.5 B on N = 64 GPUs -> 120, 31.4, 16.6 and 1.88 GB."""
    psi = 7.5e9
    expected = {"ddp": 120, "zero1": 31.4, "zero2": 16.6, "zero3": 1.875}
    for engine, gigabytes in expected.items():
        assert memory.state_bytes_per_rank(engine, psi, 64) / 1e9 == pytest.approx(gigabytes, rel=5e-3)
    assert memory.state_bytes_per_rank("lora", 10, 1, trained=2) == 2 * 8 + 16 * 2
    with pytest.raises(ValueError):
        memory.state_bytes_per_rank("zero4", psi, 8)


@pytest.mark.parametrize("rows", [1, 2, 5, 7, 64, 6565])
@pytest.mark.parametrize("ranks", [2, 3, 8])
def test_fsdp2_shard_rows_follow_torch_chunk(rows, ranks):
    chunks = torch.chunk(torch.empty(rows), ranks)
    expected = [chunk.numel() for chunk in chunks] + [0] * (ranks - len(chunks))
    assert [memory.fsdp2_shard_rows(rows, ranks, rank) for rank in range(ranks)] == expected


def test_towers_of_the_released_model():
    llm, srh, encoder = memory.towers()
    counts = count_parameters()
    assert (llm.parameters, srh.parameters, encoder.parameters) == (
        counts["language_model"], counts["audio_invert_tower"], counts["continuous_audio_tower"])
    assert (llm.layers, llm.hidden, srh.layers, encoder.layers) == (36, 4096, 28, 32)
    # 6 N (N: 6.95 B in blocks + 0.62 B lm_head) + attention at T = 2048: about 49 GFLOP per LLM position
    flops = memory.training_flops_per_token(llm.matmul_parameters, llm.layers, llm.heads, llm.head_dim, 2048)
    assert flops / 1e9 == pytest.approx(49.0, rel=0.01)
    assert memory.mfu(1000, 1e12, 989e12) == pytest.approx(1000 / 989)


def test_grouping_saves_training_flops_at_full_scale():
    cost = memory.frame_rate_cost()
    assert cost["positions_25hz"] == 5 * cost["positions_5hz"] == 10240
    assert 0.2 < cost["ratio"] < 0.6


# ----------------------------------------------------------------------------------------------------------
# LoRA with peft
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_setup():
    from fac_mini.scale.lora import add_lora, course_lora_config

    config = dry_run_config()
    dialogues = synthetic_dialogues(config, 4, 2, 1, (3, 6), (4, 7))
    rows = [[dialogues[i] for i in row] for row in pack_dialogues([len(d) for d in dialogues], 64)]
    batch = collate_rows(rows, 64, config)
    torch.manual_seed(0)
    base = FunAudioChat(config).eval()
    reference = base(**batch)
    initial = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = add_lora(base, course_lora_config(rank=4, alpha=8))
    return config, batch, reference, initial, peft_model


def test_lora_at_init_leaves_outputs_identical(lora_setup):
    config, batch, reference, _, peft_model = lora_setup
    out = peft_model(**batch)
    assert torch.equal(out.text_logits, reference.text_logits)
    assert torch.equal(out.speech_logits, reference.speech_logits)


def test_lora_trains_only_adapters_and_speech_modules(lora_setup):
    from fac_mini.scale.lora import trainable_parameters

    *_, peft_model = lora_setup
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or ".modules_to_save." in n for n in names)
    assert not any("continuous_audio_tower" in n or "embed_tokens" in n for n in names)
    counts = trainable_parameters(peft_model)
    assert 0 < counts["trainable"] < counts["total"]


def test_lora_save_reload_merge_and_released_export(lora_setup, tmp_path):
    from peft import PeftModel

    from fac_mini.scale.lora import save_merged_released

    config, batch, _, initial, peft_model = lora_setup
    with torch.no_grad():                                   # a trained adapter: B != 0
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    with torch.no_grad():
        adapted = peft_model(**batch)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh = FunAudioChat(config).eval()
    fresh.load_state_dict(initial)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).text_logits, adapted.text_logits)
    save_merged_released(reloaded, tmp_path / "merged")
    merged = load_released(tmp_path / "merged")
    with torch.no_grad():
        out = merged(**batch)
    assert float((out.text_logits - adapted.text_logits).abs().max()) <= 1e-5
    assert float((out.speech_logits - adapted.speech_logits).abs().max()) <= 1e-5
    assert float((out.loss - adapted.loss).abs()) <= 1e-5
    assert not torch.equal(out.text_logits, lora_setup[2].text_logits)            # the merge changed the model


# ----------------------------------------------------------------------------------------------------------
# The GPU script, in its tiny CPU mode (and for real when a CUDA GPU is present)
# ----------------------------------------------------------------------------------------------------------
def test_scale_gpu_check_tiny_mode_runs_both_scenarios(capsys):
    from fac_mini.scale.gpu_check import main

    assert main(["--tiny", "--steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "tiny" and result["device"] == "cpu"
    for name in ("lora", "fsdp2_truncated"):
        run = result[name]
        assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1 and all(math.isfinite(x) for x in run["losses"])
        assert run["predicted_gb"]["total"] > 0 and run["peak_gb"] is None       # no CUDA allocator on a CPU
    assert result["lora"]["trained_parameters"] < result["lora"]["parameters"]
    assert result["fsdp2_truncated"]["trained_parameters"] == result["fsdp2_truncated"]["parameters"]


@pytest.mark.bf16_cpu
def test_scale_gpu_check_tiny_mode_in_bf16_takes_the_gpu_precision_path():
    from fac_mini.scale.gpu_check import run_scale_gpu_check

    result = run_scale_gpu_check(tiny=True, steps=1, bf16=True)
    assert result["dtype"] == "bfloat16"
    for name in ("lora", "fsdp2_truncated"):
        assert all(math.isfinite(x) for x in result[name]["losses"])


def test_scale_gpu_check_without_cuda_exits_2(capsys):
    from fac_mini.scale.gpu_check import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_step_flops_lora_saves_the_weight_gradients():
    from fac_mini.scale.gpu_check import step_flops

    config = FunAudioChatConfig.released_8b()
    llm, srh, _ = memory.towers(config)
    full, lora = step_flops(config, 2048, 0, 2048, False), step_flops(config, 2048, 0, 2048, True)
    # 6N -> 4N for the LLM (2048 positions) and the SRH (5 x 2048); the attention term is the same
    assert full - lora == pytest.approx(2 * (llm.matmul_parameters * 2048 + srh.matmul_parameters * 5 * 2048))
    with_audio = step_flops(config, 2048, 1000, 2048, True) - lora      # the frozen encoder: forward only
    assert with_audio == pytest.approx((step_flops(config, 2048, 1000, 2048, False) - full) / 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_scale_gpu_check_on_the_gpu():
    from fac_mini.scale.gpu_check import TARGETS, run_scale_gpu_check

    result = run_scale_gpu_check()
    for row in result["memory"]:
        assert abs(row["relative_error"]) <= TARGETS["memory_relative_error"]


def test_lora_parameter_count_equals_peft(lora_setup):
    from fac_mini.scale.lora import lora_parameter_count, trainable_parameters

    config, *_, peft_model = lora_setup
    assert lora_parameter_count(config, rank=4)["trained"] == trainable_parameters(peft_model)["trainable"]


def test_lora_linear_equals_peft_lora_layer():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    layer = torch.nn.Sequential(torch.nn.Linear(12, 7, bias=False))
    wrapped = get_peft_model(layer, LoraConfig(r=3, lora_alpha=5, target_modules=["0"]))
    lora = wrapped.base_model.model[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()
    x = torch.randn(2, 4, 12)
    from fac_mini.scale.lora import lora_linear

    with torch.no_grad():
        expected = wrapped(x)
        got = lora_linear(x, lora.base_layer.weight, lora.lora_A["default"].weight, lora.lora_B["default"].weight, 5)
    assert torch.allclose(got, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The torchrun entry point, as one process (world size 1 over gloo)
# ----------------------------------------------------------------------------------------------------------
def test_launch_trains_checkpoints_resumes_and_exports(tmp_path, monkeypatch, capsys):
    from fac_mini.released import save_released
    from fac_mini.scale.dry_run import free_port
    from fac_mini.scale.launch import main

    torch.manual_seed(0)
    save_released(FunAudioChat(dry_run_config()), tmp_path / "start")
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    common = ["--checkpoint", str(tmp_path / "start"), "--out", str(tmp_path / "run"), "--micro-batch", "1",
              "--cutoff", "600", "--lr", "1e-3", "--save-every", "2", "--steps", "3"]
    assert main(common) == 0
    first = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["step"] for row in first] == [1, 2, 3] and (tmp_path / "run" / "step-2" / ".metadata").is_file()
    exported = load_released(tmp_path / "run" / "released").state_dict()
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert main(common + ["--resume"]) == 0                      # continues from step-2: only step 3 again
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["step"] for row in again] == [3] and again[0]["loss"] == first[2]["loss"]
    resumed = load_released(tmp_path / "run" / "released").state_dict()
    assert all(torch.equal(exported[k], resumed[k]) for k in exported)


def test_launch_refuses_to_start_without_torchrun(monkeypatch):
    from fac_mini.scale.launch import main

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit):
        main(["--checkpoint", "anywhere"])


# ----------------------------------------------------------------------------------------------------------
# The dry run (COURSE.md §6): one subprocess for every scenario
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dry_run(dry_run_process):
    try:
        out, err = dry_run_process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        dry_run_process.kill()
        raise
    assert dry_run_process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_dry_run_contract_and_fp32_parity(dry_run):
    assert dry_run["world_size"] == 2 and dry_run["backend"] == "gloo"
    assert dry_run["loss_diff"] <= 1e-5
    assert dry_run["max_param_diff"] <= 1e-5
    # the comparison means something: the weights moved 100x more than the engines disagree
    assert dry_run["max_param_change"] >= 1e-4 and dry_run["max_param_change"] >= 100 * dry_run["max_param_diff"]
    losses = dry_run["reference_losses"]
    assert len(losses) == dry_run["steps"] and all(math.isfinite(x) for x in losses)


def test_dry_run_gradient_accumulation_with_zero2_semantics(dry_run):
    accumulation = dry_run["accumulation"]
    assert accumulation["micro_batches"] == 2 and accumulation["reshard_after_forward"] is False
    assert accumulation["loss_diff"] <= 1e-5 and accumulation["max_param_diff"] <= 1e-5


def test_dry_run_bf16_smoke_step(dry_run):
    bf16 = dry_run["bf16"]
    assert bf16["finite"] and bf16["master_dtypes"] == ["float32"] and bf16["compute_dtypes"] == ["bfloat16"]
    assert all(math.isfinite(x) for x in bf16["losses"]) and bf16["relative_loss_diff"] < 0.05


def test_dry_run_dcp_resume_is_bit_identical(dry_run):
    resume = dry_run["dcp_resume"]
    assert resume["resume_at"] == 2 and len(resume["losses"]) == dry_run["steps"] - 2
    assert resume["bit_identical"] is True and resume["max_param_diff"] == 0.0
    assert resume["losses"] == dry_run["parity"]["losses"][2:]


def test_dry_run_lora_under_fsdp2(dry_run):
    lora = dry_run["lora"]
    assert lora["loss_diff"] <= 1e-5 and lora["max_param_diff"] <= 1e-5
    assert lora["frozen_max_change"] == 0.0          # the encoder and the embedding tables did not move


def test_dry_run_memory_prediction_equals_what_each_rank_holds(dry_run):
    ranks = dry_run["memory"]
    assert len(ranks) == 2
    for rank in ranks:
        assert rank["held"] == rank["predicted"]
    # the two ranks' shards add up to the whole model (each float32 parameter once)
    total = sum(rank["held"]["parameters"] for rank in ranks)
    assert total == 4 * count_parameters(dry_run_config())["total"] == 4 * dry_run["parameters"]


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 (optional: requirements-deepspeed.txt)
# ----------------------------------------------------------------------------------------------------------
def test_deepspeed_zero2_config_mirrors_the_release():
    from fac_mini.scale.deepspeed import zero2_config

    config = zero2_config(6, 1, 4)
    assert config["train_batch_size"] == 24 == RELEASE_RECIPE.global_batch and config["bf16"]["enabled"]
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is False and zero["reduce_bucket_size"] == 5e8
    assert zero["contiguous_gradients"] and zero["round_robin_gradients"]


def test_deepspeed_dry_run_without_deepspeed_says_how_to_install(capsys):
    import importlib.util

    from fac_mini.scale.deepspeed import main

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed")
    assert main(["--json"]) == 2
    assert "requirements-deepspeed.txt" in capsys.readouterr().err


def test_deepspeed_zero2_dry_run_matches_the_reference():
    pytest.importorskip("deepspeed")
    done = subprocess.run([sys.executable, "-m", "fac_mini.scale.deepspeed", "--json"], cwd=ROOT, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["loss_diff"] <= 1e-5 and result["max_param_diff"] <= 1e-5
    assert result["bf16"]["relative_loss_diff"] < 0.05
    assert all(held == result["predicted_fp32_zero2_bytes"] for held in result["held_bytes"])
