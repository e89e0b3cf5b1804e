"""fac_mini.fsq: finite scalar quantisation against vector_quantize_pytorch (codes, ids, straight-through gradient,
implicit codebook), its level grid, and the notebook 03 self-check."""
import numpy as np
import pytest
import torch

from fac_mini.fsq import FSQ, fsq_codes_to_indices, fsq_indices_to_codes, fsq_quantize


# --- FSQ --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [[3] * 8, [8, 5, 5, 5]])  # the released 3^8 = 6561, and one with an even level
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fsq_matches_vector_quantize_pytorch(levels, dtype):
    from vector_quantize_pytorch import FSQ as ReferenceFSQ

    reference = ReferenceFSQ(levels=levels)  # dim = len(levels): no projections, codes come out unchanged
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.3, 1.0, 4.0]).repeat_interleave(200)[None, :, None]  # small, medium, saturated
    z = (torch.randn(2, 600, len(levels), generator=generator) * scales).to(dtype)
    z_student = z.clone().requires_grad_(True)
    z_reference = z.clone().requires_grad_(True)
    expected_codes, expected_indices = reference(z_reference)
    codes = fsq_quantize(z_student, levels)
    assert torch.equal(codes, expected_codes)
    assert torch.equal(fsq_codes_to_indices(codes, levels), expected_indices.long())
    # the straight-through gradient is the same too
    weights = torch.randn(z.shape, generator=generator, dtype=dtype)
    (codes * weights).sum().backward()
    (expected_codes * weights).sum().backward()
    assert torch.allclose(z_student.grad, z_reference.grad, atol=1e-12 if dtype == torch.float64 else 1e-6)
    assert torch.equal(z, z_student.detach())  # input not changed
    # the whole implicit codebook, in the same id order
    size = int(np.prod(levels))
    assert torch.equal(fsq_indices_to_codes(torch.arange(size), levels), reference.implicit_codebook.float())
    assert torch.equal(fsq_codes_to_indices(fsq_indices_to_codes(torch.arange(size), levels), levels),
                       torch.arange(size))


def test_fsq_levels_grid_and_module():
    z = torch.linspace(-6, 6, 1001)[:, None].repeat(1, 2)
    codes = fsq_quantize(z, [5, 4])
    assert sorted(set(codes[:, 0].tolist())) == [-1.0, -0.5, 0.0, 0.5, 1.0]     # odd: symmetric
    assert sorted(set(codes[:, 1].tolist())) == [-1.0, -0.5, 0.0, 0.5]          # even: one more level below 0
    assert fsq_quantize(torch.zeros(1, 2), [5, 4]).abs().sum() == 0             # 0 stays on level 0
    quantizer = FSQ([3] * 8)
    assert quantizer.codebook_size == 6561 and len(list(quantizer.parameters())) == 0
    codes, ids = quantizer(torch.randn(2, 7, 8))
    assert codes.shape == (2, 7, 8) and ids.shape == (2, 7) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 6561
    with pytest.raises(ValueError, match="last axis"):
        fsq_quantize(torch.randn(3, 5), [3] * 4)
    with pytest.raises(ValueError, match="levels"):
        FSQ([3, 1])
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        fsq_indices_to_codes(torch.tensor([9]), [3, 3])


def test_check_fsq_quantize(capsys):
    from fac_mini.course.checks import check_fsq_quantize

    assert check_fsq_quantize(fsq_quantize) is None          # checks print their verdict, they return nothing
    assert "[pass]" in capsys.readouterr().out

    def without_even_shift(z, levels):  # a plausible mistake: no offset/shift for even levels
        half = (torch.tensor(levels) - 1) * (1 + 1e-3) / 2
        bounded = torch.tanh(z) * half
        return (bounded + (bounded.round() - bounded).detach()) / (torch.tensor(levels) // 2)

    for wrong in (without_even_shift, lambda z, levels: torch.tanh(z)):
        check_fsq_quantize(wrong)
        out = capsys.readouterr().out
        assert "[fail]" in out and "[pass]" not in out
