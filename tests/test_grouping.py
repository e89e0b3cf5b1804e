"""fac_mini.grouping: padding, masks, mean vs concat grouping, ungroup/regroup, backbone cost."""
import pytest
import torch

from fac_mini.grouping import (ConcatGrouping, MeanGrouping, group_frames, group_mask_to_frame_mask,
                               group_speech_ids, mean_group, pad_to_multiple, ungroup)

PAD = 6563
K = 5


def test_group_speech_ids_pads_to_multiple_and_masks_groups():
    ids = torch.arange(12)[None].repeat(2, 1)                        # (2, 12): 12 = 2 groups + 2 tokens
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 5:] = 0                                                  # row 1 has exactly one full group
    grouped, group_mask = group_speech_ids(ids, K, PAD, attention_mask=mask)
    assert grouped.shape == (2, 3, K) and group_mask.dtype == torch.bool
    assert torch.equal(grouped[0, 0], torch.arange(5))
    assert torch.equal(grouped[0, 2], torch.tensor([10, 11] + [PAD] * 3))
    assert group_mask.tolist() == [[True, True, True], [True, False, False]]
    exact, exact_mask = group_speech_ids(torch.arange(10)[None], K, PAD)  # already a multiple: no padding
    assert exact.shape == (1, 2, K) and exact_mask.all()


def test_pad_to_multiple_lengths_and_mask():
    for length in range(1, 12):
        padded, mask = pad_to_multiple(torch.zeros(1, length, dtype=torch.long), K, PAD)
        assert padded.shape[1] % K == 0 and padded.shape[1] - length < K
        assert mask.sum().item() == length and (padded[0, length:] == PAD).all()


def test_mean_grouping_equals_manual_loop():
    torch.manual_seed(0)
    grouping = MeanGrouping(embed_dim=6, hidden_size=4, group_size=K)
    embeddings = torch.randn(2, 3 * K, 6)
    out = grouping(embeddings)                                       # (2, 3, 4)
    for b in range(2):
        for g in range(3):
            total = torch.zeros(6)
            for s in range(K):
                total += embeddings[b, g * K + s]
            assert torch.allclose(out[b, g], grouping.output_matching.weight @ (total / K), atol=1e-6)
    assert grouping.output_matching.bias is None


def test_concat_with_k_copies_of_w_over_k_equals_mean():
    """Concat grouping contains mean grouping: W_c = [W/k, ..., W/k] turns the concatenation into the mean."""
    torch.manual_seed(1)
    mean, concat = MeanGrouping(6, 4, K), ConcatGrouping(6, 4, K)
    with torch.no_grad():
        concat.output_matching.weight.copy_(torch.cat([mean.output_matching.weight / K] * K, dim=1))
    embeddings = torch.randn(3, 2 * K, 6)
    assert (concat(embeddings) - mean(embeddings)).abs().max().item() < 1e-6
    shuffled = embeddings.view(3, 2, K, 6)[:, :, torch.randperm(K)].reshape(3, 2 * K, 6)
    assert (mean(shuffled) - mean(embeddings)).abs().max().item() < 1e-6       # the mean ignores order ...
    with torch.no_grad():
        concat.output_matching.weight.normal_()
    assert (concat(shuffled) - concat(embeddings)).abs().max().item() > 1e-3   # ... a general W_c does not


def test_ungroup_inverts_group_and_orders_positions():
    grouped = torch.randn(2, 3, K * 4)                               # (B, L, k·H)
    frames = ungroup(grouped, K)                                     # (B, k·L, H)
    assert frames.shape == (2, 3 * K, 4)
    assert torch.equal(frames[1, 2 * K + 3], grouped[1, 2, 3 * 4:4 * 4])  # position k·p + s = slice s of p
    assert torch.equal(group_frames(frames, K), grouped)
    assert torch.equal(ungroup(group_frames(frames, K), K), frames)
    assert torch.equal(mean_group(frames, K), grouped.view(2, 3, K, 4).mean(2))
    mask = torch.tensor([[1, 1, 0]])
    assert group_mask_to_frame_mask(mask, K).tolist() == [[1] * K + [1] * K + [0] * K]


def test_bad_inputs_raise_and_inputs_not_mutated():
    with pytest.raises(ValueError, match="group_size"):
        group_speech_ids(torch.zeros(1, 5, dtype=torch.long), 0, PAD)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        group_speech_ids(torch.zeros(5, dtype=torch.long), K, PAD)
    with pytest.raises(ValueError, match="integer"):
        group_speech_ids(torch.zeros(1, 5), K, PAD)
    with pytest.raises(ValueError, match="must match"):
        group_speech_ids(torch.zeros(1, 5, dtype=torch.long), K, PAD, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="multiple of group_size"):
        MeanGrouping(4, 4, K)(torch.randn(1, 7, 4))
    with pytest.raises(ValueError, match="multiple of group_size"):
        ConcatGrouping(4, 4, K)(torch.randn(1, 7, 4))
    with pytest.raises(ValueError, match="multiple of group_size"):
        ungroup(torch.randn(1, 2, 7), K)
    ids, embeddings = torch.arange(7)[None], torch.randn(1, 10, 4)
    ids_copy, embeddings_copy = ids.clone(), embeddings.clone()
    group_speech_ids(ids, K, PAD)
    MeanGrouping(4, 4, K)(embeddings)
    ConcatGrouping(4, 4, K)(embeddings)
    assert torch.equal(ids, ids_copy) and torch.equal(embeddings, embeddings_copy)
