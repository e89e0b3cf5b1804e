"""fac_mini.flow: the CFM path and loss (cross-checked against Meta's flow_matching), the Euler/CFG solver
(against flow_matching's ODESolver and torchdiffeq), the Gaussian loss floor, and the detokenizer's structure."""
import math

import pytest
import torch

from fac_mini.flow import (SIGMA_MIN, FlowConfig, FlowDetokenizer, PreLookahead, cfm_loss, chunk_mask,
                           conditional_flow, cosine_time_span, euler_solve, gaussian_cfm_floor, guided_velocity,
                           load_flow, save_flow)

TINY = FlowConfig(vocab_size=17, dim=32, depth=2, heads=2, lookahead_channels=16, chunk_frames=6)


def test_path_matches_flow_matching_cond_ot():
    from flow_matching.path import CondOTProbPath

    generator = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 7, 3, generator=generator), torch.randn(5, 7, 3, generator=generator)
    t = torch.rand(5, generator=generator)
    reference = CondOTProbPath().sample(x_0=x0, x_1=x1, t=t)        # sigma_min = 0 in flow_matching
    x_t, u_t = conditional_flow(x0, x1, t, sigma_min=0.0)
    torch.testing.assert_close(x_t, reference.x_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(u_t, reference.dx_t, rtol=0, atol=1e-6)
    # CosyVoice's sigma_min: the path ends at x1 exactly, and the target is the time derivative of the path
    x_t, u_t = conditional_flow(x0, x1, torch.ones(5))
    torch.testing.assert_close(x_t, x1 + SIGMA_MIN * x0)
    eps = 1e-3
    ahead, _ = conditional_flow(x0, x1, t + eps)
    behind, _ = conditional_flow(x0, x1, t - eps)
    torch.testing.assert_close((ahead - behind) / (2 * eps), conditional_flow(x0, x1, t)[1], rtol=1e-3, atol=1e-3)


def test_path_broadcasts_a_number_and_rejects_bad_times():
    x0, x1 = torch.zeros(2, 3), torch.ones(2, 3)
    x_t, _ = conditional_flow(x0, x1, 0.25)
    torch.testing.assert_close(x_t, torch.full((2, 3), 0.25))
    with pytest.raises(ValueError, match="broadcast"):
        conditional_flow(x0, x1, torch.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        conditional_flow(x0, torch.ones(2, 4), 0.5)


def test_cfm_loss_is_cosyvoice_normalisation():
    generator = torch.Generator().manual_seed(1)
    predicted, target = torch.randn(2, 4, 3, generator=generator), torch.randn(2, 4, 3, generator=generator)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    squared = sum(float(((predicted[b, f] - target[b, f]) ** 2).sum()) for b in range(2) for f in range(4) if mask[b, f])
    assert float(cfm_loss(predicted, target, mask)) == pytest.approx(squared / (5 * 3), rel=1e-6)
    with pytest.raises(ValueError, match="no frame"):
        cfm_loss(predicted, target, torch.zeros(2, 4, dtype=torch.bool))


def test_cosine_time_span_values():
    span = cosine_time_span(10)
    expected = [1 - math.cos(math.pi / 2 * i / 10) for i in range(11)]
    assert span.tolist() == pytest.approx(expected, abs=1e-7)
    assert span[1] == pytest.approx(0.0123, abs=1e-4) and span[5] == pytest.approx(0.2929, abs=1e-4)
    with pytest.raises(ValueError):
        cosine_time_span(0)


def _field(x, t):                                    # a velocity that depends on both x and t
    return torch.sin(3 * x) * (1 + t) - 0.5 * x * t ** 2


def test_euler_matches_torchdiffeq_and_flow_matching_on_the_cosine_grid():
    import torchdiffeq
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    class Field(ModelWrapper):
        def __init__(self):
            super().__init__(None)

        def forward(self, x, t, **extras):
            return _field(x, t)

    x0 = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    span = cosine_time_span(10).double()
    ours = euler_solve(_field, x0, span)
    theirs = torchdiffeq.odeint(lambda t, x: _field(x, t), x0, span, method="euler")[-1]
    meta = ODESolver(velocity_model=Field()).sample(x_init=x0, step_size=None, method="euler", time_grid=span)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, meta, rtol=0, atol=1e-12)
    trajectory = euler_solve(_field, x0, span, trajectory=True)
    assert trajectory.shape == (11, 4, 6) and torch.equal(trajectory[-1], ours) and torch.equal(trajectory[0], x0)


def test_guided_velocity_formula_and_solver_with_cfg():
    import torchdiffeq

    v_cond, v_uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert float(guided_velocity(v_cond, v_uncond, 0.7)) == pytest.approx(1.7 * 2 - 0.7 * 1)
    assert torch.equal(guided_velocity(v_cond, v_uncond, 0.0), v_cond)

    def cond(x, t):
        return _field(x, t)

    def uncond(x, t):
        return -x

    def guided(x, t):
        return guided_velocity(cond(x, t), uncond(x, t), 0.7)

    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    span = cosine_time_span(10).double()
    torch.testing.assert_close(euler_solve(guided, x0, span),
                               torchdiffeq.odeint(lambda t, x: guided(x, t), x0, span, method="euler")[-1],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_gaussian_floor_is_the_loss_of_the_optimal_velocity(s):
    """The best possible velocity, E[u | x_t, t] (closed form for Gaussians), has loss s·π/2 per dimension."""
    generator = torch.Generator().manual_seed(4)
    n, m = 400_000, 3.0
    x0 = torch.randn(n, generator=generator, dtype=torch.float64)
    x1 = m + s * torch.randn(n, generator=generator, dtype=torch.float64)
    t = torch.rand(n, generator=generator, dtype=torch.float64)
    x_t, u = conditional_flow(x0, x1, t, sigma_min=0.0)
    # Cov(u, x_t | t) = t s² − (1 − t), Var(x_t | t) = (1 − t)² + t² s², E[u] = m, E[x_t] = t m
    best = m + (t * s ** 2 - (1 - t)) / ((1 - t) ** 2 + t ** 2 * s ** 2) * (x_t - t * m)
    loss = float(((best - u) ** 2).mean())
    assert loss == pytest.approx(gaussian_cfm_floor(s), rel=0.02)
    assert gaussian_cfm_floor(s) == pytest.approx(s * math.pi / 2)


def test_lookahead_sees_exactly_three_future_ids():
    torch.manual_seed(0)
    layer = PreLookahead(8, 16, 3)
    x = torch.randn(1, 20, 8)
    changed = x.clone()
    changed[0, 10] += 1.0
    moved = (layer(changed) - layer(x)).abs().sum(-1)[0] > 0
    assert moved.nonzero().flatten().tolist() == list(range(7, 13))      # outputs t with t - 2 <= 10 <= t + 3


def test_chunk_mask_and_chunk_causal_velocity():
    mask = chunk_mask(7, 3)
    assert mask[0].tolist() == [True, True, True, False, False, False, False]
    assert mask[4].tolist() == [True] * 6 + [False]
    torch.manual_seed(0)
    model = FlowDetokenizer(TINY).eval()
    for block in model.blocks:                    # leave AdaLN-Zero so the blocks are not the identity
        torch.nn.init.normal_(block.modulation.weight, std=0.1)
    x = torch.randn(1, 18, 80)
    mu, cond, spk, t = torch.randn(1, 18, 80), torch.zeros(1, 18, 80), torch.randn(1, 80), torch.tensor([0.3])
    base = model.velocity(x, t, mu, spk, cond)
    later = x.clone()
    later[:, 12:] += 1.0                          # the third chunk (frames 12..17)
    moved = model.velocity(later, t, mu, spk, cond)
    torch.testing.assert_close(moved[:, :12], base[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(moved[:, 12:], base[:, 12:])


def _batch(generator):
    ids = torch.randint(0, TINY.vocab_size, (3, 9), generator=generator)
    id_mask = torch.ones(3, 9, dtype=torch.bool)
    id_mask[2, 6:] = False
    return {"speech_ids": ids, "id_mask": id_mask, "mel": torch.randn(3, 18, 80, generator=generator),
            "speaker": torch.rand(3, 256, generator=generator)}


def test_loss_trains_every_part_and_is_seeded():
    torch.manual_seed(0)
    model = FlowDetokenizer(TINY)
    batch = _batch(torch.Generator().manual_seed(5))
    first = model.loss(**batch, generator=torch.Generator().manual_seed(6))
    again = model.loss(**batch, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and first.item() > 0
    first.backward()
    assert model.embed.weight.grad.abs().sum() > 0 and model.speaker_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="frames"):
        model.loss(batch["speech_ids"], batch["id_mask"], batch["mel"][:, :10], batch["speaker"])


def test_generate_guidance_uses_the_unconditional_branch_and_keeps_the_prompt():
    torch.manual_seed(0)
    model = FlowDetokenizer(TINY).eval()
    torch.nn.init.normal_(model.final_modulation.weight, std=0.1)
    ids, speaker = torch.randint(0, 17, (1, 6)), torch.rand(1, 256)
    noise = torch.randn(1, 12, 80)
    plain = model.generate(ids, speaker, noise=noise, guidance=0.0)
    guided = model.generate(ids, speaker, noise=noise, guidance=0.7)
    assert plain.shape == (1, 12, 80) and not torch.allclose(plain, guided)
    # by hand: Euler on (1 + g) v_cond - g v_uncond in the normalised space
    mu, spk, zeros = model.token_condition(ids), model.speaker_condition(speaker), torch.zeros(1, 12, 80)
    span, x = cosine_time_span(10), noise.clone()
    with torch.no_grad():
        for t0, t1 in zip(span[:-1], span[1:]):
            v = 1.7 * model.velocity(x, t0[None], mu, spk, zeros) - 0.7 * model.velocity(x, t0[None], zeros,
                                                                                         torch.zeros(1, 80), zeros)
            x = x + (t1 - t0) * v
    torch.testing.assert_close(guided, model.denormalise(x), rtol=1e-5, atol=1e-5)
    prompt = torch.randn(1, 4, 80)
    with_prompt = model.generate(ids, speaker, noise=noise, prompt_mel=prompt)
    assert torch.equal(with_prompt[:, :4], prompt)
    trajectory = model.generate(ids, speaker, noise=noise, trajectory=True, steps=3)
    assert trajectory.shape == (4, 1, 12, 80)


def test_save_load_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = FlowDetokenizer(TINY)
    model.mel_mean.fill_(-5.0)
    save_flow(model, tmp_path / "flow")
    loaded = load_flow(tmp_path / "flow")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_flow(tmp_path / "missing")
    (tmp_path / "flow" / "config.json").write_text('{"dim": 32, "bogus": 1}')
    with pytest.raises(ValueError, match="not a flow config"):
        load_flow(tmp_path / "flow")
