"""fac_mini.merging: the Core-Cocktail merge (eq. 7) on state dicts, and a cross-check against mergekit's ``linear``
method on tiny Qwen3 folders written by transformers' ``save_pretrained``."""
import pytest
import torch

from fac_mini.merging import core_cocktail_merge, merge_weights_to_alpha, prefix_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def _states():
    generator = torch.Generator().manual_seed(0)
    stage1 = {"language_model.w": torch.randn(3, 4, generator=generator),
              "language_model.half": torch.randn(5, generator=generator).half(),
              "language_model.steps": torch.tensor([3, 4]),
              "audio_tower.embed": torch.randn(2, 2, generator=generator)}
    base = {"language_model.w": torch.randn(3, 4, generator=generator),
            "language_model.half": torch.randn(5, generator=generator).half(),
            "language_model.steps": torch.tensor([3, 4])}
    return stage1, base


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_merge_interpolates_shared_tensors_and_keeps_the_rest(alpha):
    stage1, base = _states()
    before = {k: v.clone() for k, v in {**stage1, **{"base." + k: v for k, v in base.items()}}.items()}
    merged = core_cocktail_merge(stage1, base, alpha)
    assert set(merged) == set(stage1)
    expected = alpha * stage1["language_model.w"] + (1 - alpha) * base["language_model.w"]
    torch.testing.assert_close(merged["language_model.w"], expected, rtol=0, atol=1e-6)
    half = (alpha * stage1["language_model.half"].float() + (1 - alpha) * base["language_model.half"].float()).half()
    assert merged["language_model.half"].dtype == torch.float16 and torch.equal(merged["language_model.half"], half)
    assert torch.equal(merged["audio_tower.embed"], stage1["audio_tower.embed"])          # no base counterpart
    assert torch.equal(merged["language_model.steps"], stage1["language_model.steps"])
    for key, value in stage1.items():                                                     # inputs untouched
        assert torch.equal(value, before[key]) and merged[key].data_ptr() != value.data_ptr()
    for key, value in base.items():
        assert torch.equal(value, before["base." + key])
    if alpha == 0.0:
        assert torch.equal(merged["language_model.w"], base["language_model.w"])
    if alpha == 1.0:
        assert torch.equal(merged["language_model.w"], stage1["language_model.w"])


def test_merge_rejects_bad_input():
    stage1, base = _states()
    for alpha in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="alpha"):
            core_cocktail_merge(stage1, base, alpha)
    with pytest.raises(ValueError, match="language_model.w"):
        core_cocktail_merge(stage1, {**base, "language_model.w": torch.zeros(4, 3)}, 0.5)
    with pytest.raises(ValueError, match="lacks"):
        core_cocktail_merge(stage1, {**base, "other": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="integer"):
        core_cocktail_merge(stage1, {**base, "language_model.steps": torch.tensor([3, 5])}, 0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        core_cocktail_merge(stage1, {**base, "language_model.w": [1.0]}, 0.5)


def test_prefix_and_weight_helpers():
    assert list(prefix_state_dict({"a": torch.zeros(1)}, "language_model.")) == ["language_model.a"]
    assert merge_weights_to_alpha(1.5, 0.5) == 0.75
    with pytest.raises(ValueError):
        merge_weights_to_alpha(0.0, 0.0)


def _tiny_qwen3(seed: int, folder):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
                         max_position_embeddings=64)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():                       # norms away from 1 so the merge of every kind of tensor is visible
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(folder)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_merge_equals_mergekit_linear_on_save_pretrained_folders(tmp_path):
    """mergekit ``linear`` (normalize: true) with weights 1.5 for M1 and 0.5 for M0 is α = 0.75 of eq. (7)."""
    from safetensors.torch import load_file
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    stage1, base = _tiny_qwen3(1, tmp_path / "m1"), _tiny_qwen3(2, tmp_path / "m0")
    config = MergeConfiguration.model_validate({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(tmp_path / "m1"), "parameters": {"weight": 1.5}},
                   {"model": str(tmp_path / "m0"), "parameters": {"weight": 0.5}}]})
    run_merge(config, str(tmp_path / "merged"), MergeOptions(copy_tokenizer=False, write_model_card=False,
                                                             quiet=True, lazy_unpickle=False))
    merged_by_mergekit = {}
    for path in sorted((tmp_path / "merged").glob("*.safetensors")):
        merged_by_mergekit.update(load_file(str(path)))
    ours = core_cocktail_merge(stage1, base, merge_weights_to_alpha(1.5, 0.5))
    assert set(merged_by_mergekit) == set(ours)
    worst = max((merged_by_mergekit[k] - ours[k]).abs().max().item() for k in ours)
    assert worst < 1e-6
    differs = max((ours[k] - stage1[k]).abs().max().item() for k in ours)
    assert differs > 1e-3                       # the merge really moved the weights (not a copy of M1)
