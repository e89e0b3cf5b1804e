"""fac_mini.train.loop: the one training loop (schedule, clipping, seeded batches, evaluation with best-on-dev
selection, bit-identical resume), on a toy regression recipe small enough to run in milliseconds."""
import math

import pytest
import torch

from fac_mini.train.loop import TrainConfig, adamw, run_key, train, warmup_cosine_lr


class ToySampler:
    def __init__(self, size, batch_size, seed):
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        return torch.randint(self.size, (self.batch_size,), generator=self.generator).tolist()

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


class ToyRecipe:
    """Linear regression y = x·w* + noise; a dropout layer makes the loss draw from the global RNG too, so resume
    must restore that RNG as well as the sampler's."""
    name = "toy"

    def __init__(self, size=64):
        generator = torch.Generator().manual_seed(123)
        self.x = torch.randn(size, 8, generator=generator)
        self.y = self.x @ torch.randn(8, 1, generator=generator) + 0.1 * torch.randn(size, 1, generator=generator)
        self.evaluations = 0

    def build_model(self):
        return torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))

    def build_optimizer(self, model, config):
        return adamw(model, config)

    def build_sampler(self, config):
        return ToySampler(len(self.x), config.batch_size, config.seed)

    def loss(self, model, batch):
        return torch.nn.functional.mse_loss(model(self.x[batch]), self.y[batch])

    def evaluate(self, model):
        self.evaluations += 1
        assert not model.training
        with torch.no_grad():
            # a dev metric that is best at step 20 of 40, so selection must pick a middle checkpoint
            return {"dev": abs(self.evaluations - 2) + 0.5}

    def fingerprint(self):
        return {"x": self.x.sum().item()}


CONFIG = TrainConfig(steps=40, batch_size=8, lr=0.05, warmup=5, log_every=5, eval_every=10, checkpoint_every=7)


def weights(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [warmup_cosine_lr(step, 100, 1.0, 10, 0.1) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)        # linear warm-up, peak at step 9
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                      # then monotone decay
    assert warmup_cosine_lr(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)       # the floor at the end
    assert warmup_cosine_lr(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)       # half-way: the mean of peak and floor


def test_training_lowers_the_loss_and_logs_the_schedule():
    result = train(ToyRecipe(), CONFIG, progress=False)
    rows = [row for row in result.log if "loss" in row]
    assert [row["step"] for row in rows] == list(range(5, 41, 5))
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert rows[-1]["lr"] == round(warmup_cosine_lr(39, 40, 0.05, 5), 8)
    assert result.step == 40 and result.best_step is None and not result.model.training


def test_gradients_are_clipped():
    recipe = ToyRecipe()
    recipe.y = recipe.y * 1e4                                                   # huge gradients
    seen = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(torch.cat([p.grad.flatten() for p in self.param_groups[0]["params"]]).norm().item())
            return super().step(closure)

    recipe.build_optimizer = lambda model, config: Spy(model.parameters(), lr=config.lr)
    train(recipe, TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup=1, clip_norm=0.5), progress=False)
    assert max(seen) <= 0.5 + 1e-6


def test_best_on_dev_is_returned():
    recipe = ToyRecipe()
    result = train(recipe, CONFIG, progress=False, evaluate=recipe.evaluate, select="dev")
    assert recipe.evaluations == 4 and result.best_step == 20
    assert result.log[-1] == {"best_step": 20, "dev": 0.5}
    again = ToyRecipe()
    stopped = train(again, TrainConfig(**{**CONFIG.to_dict(), "steps": 40}), progress=False, stop_after=20,
                    evaluate=again.evaluate)
    assert all(torch.equal(a, b) for a, b in zip(weights(stopped.model).values(), weights(result.model).values()))


def test_resume_is_bit_identical(tmp_path):
    whole = train(ToyRecipe(), CONFIG, state_dir=tmp_path / "a", progress=False)
    first = train(ToyRecipe(), CONFIG, state_dir=tmp_path / "b", progress=False, stop_after=13)  # mid log window
    assert first.step == 13 and len(list((tmp_path / "b").glob("toy-*.pt"))) == 1
    resumed = train(ToyRecipe(), CONFIG, state_dir=tmp_path / "b", progress=False)
    assert resumed.step == 40 and resumed.log == whole.log and resumed.run_key == whole.run_key
    for (name, a), b in zip(weights(whole.model).items(), weights(resumed.model).values()):
        assert torch.equal(a, b), name
    restarted = train(ToyRecipe(), CONFIG, state_dir=tmp_path / "b", progress=False, resume=False, stop_after=2)
    assert restarted.step == 2


def test_a_different_run_does_not_resume_another_runs_state(tmp_path):
    train(ToyRecipe(), CONFIG, state_dir=tmp_path, progress=False, stop_after=10)
    other = TrainConfig(**{**CONFIG.to_dict(), "lr": 0.01})
    assert run_key(other, {}, 1) != run_key(CONFIG, {}, 1)
    assert train(ToyRecipe(), other, state_dir=tmp_path, progress=False, stop_after=3).step == 3


@pytest.mark.parametrize("field, value", [("steps", 0), ("steps", -5), ("batch_size", 0), ("steps", 2.5),
                                          ("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("warmup", -1),
                                          ("log_every", 0), ("min_lr_ratio", 1.5)])
def test_bad_hyper_parameters_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{**dict(steps=10, batch_size=4, lr=1e-3), field: value})


def test_threads_are_restored():
    before = torch.get_num_threads()
    train(ToyRecipe(), TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup=1), progress=False, threads=1)
    assert torch.get_num_threads() == before


class MetricRecipe(ToyRecipe):
    """Returns (loss, {"batch_mean": ...}): the loop must average such metrics over each log window."""

    def loss(self, model, batch):
        return super().loss(model, batch), {"first_index": float(batch[0])}


def test_recipe_metrics_are_averaged_per_log_window_and_survive_resume(tmp_path):
    config = TrainConfig(steps=10, batch_size=4, lr=0.05, warmup=2, log_every=5, eval_every=10, checkpoint_every=3)
    whole = train(MetricRecipe(), config, progress=False)
    sampler = ToySampler(64, 4, config.seed)
    firsts = [sampler.next_batch()[0] for _ in range(10)]
    rows = [row for row in whole.log if "loss" in row]
    assert [row["first_index"] for row in rows] == [round(sum(firsts[:5]) / 5, 5), round(sum(firsts[5:]) / 5, 5)]
    train(MetricRecipe(), config, state_dir=tmp_path, progress=False, stop_after=7)              # mid window
    resumed = train(MetricRecipe(), config, state_dir=tmp_path, progress=False)
    assert resumed.log == whole.log
