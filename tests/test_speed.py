"""The speed layer changes nothing but speed: flags off is the plain update, compile is the same math."""
import copy

import numpy as np
import pytest
import torch
from test_losses import VARIANTS, trainer_grads

import algorithms.offline.cql as cql


def small_buffer(n: int = 500, seed: int = 0) -> cql.ReplayBuffer:
    rng = np.random.default_rng(seed)
    data = cql.OfflineData(
        observations=rng.standard_normal((n, 5), dtype=np.float32),
        actions=rng.uniform(-0.99, 0.99, (n, 3)).astype(np.float32),
        rewards=rng.standard_normal(n, dtype=np.float32),
        next_observations=rng.standard_normal((n, 5), dtype=np.float32),
        terminals=(rng.random(n) < 0.1).astype(np.float32),
        make_env=None, ref_min_score=None, ref_max_score=None, is_locomotion=False, source="test")
    return cql.ReplayBuffer(data, torch.device("cpu"))


def make(overrides: dict) -> cql.CQL:
    torch.manual_seed(0)
    config = cql.TrainConfig(cql_n_actions=4, q_n_hidden_layers=2, batch_size=16, bc_steps=2,
                             target_update_period=2, **overrides)
    return cql.CQL(config, 5, 3, 1.0, torch.device("cpu"))


def test_every_flag_off_is_the_plain_update_exactly():
    buffer = small_buffer()
    plain, fast = make({}), make({})
    torch.manual_seed(1)
    metric_sum = torch.zeros(len(cql.METRIC_NAMES))
    for _ in range(6):  # crosses the behaviour-cloning phase and both target-update phases
        metrics = plain.train(buffer.sample(16))
        metric_sum += torch.stack([metrics[name] for name in cql.METRIC_NAMES])
    step = cql.UpdateStep(fast, buffer, 16, compile=False, cudagraphs=True)  # no cuda: graphs are off
    torch.manual_seed(1)
    for _ in range(6):
        step()
    assert fast.total_it == plain.total_it == 6
    for a, b in zip(plain.state_dict()["critic"].values(), fast.state_dict()["critic"].values()):
        assert torch.equal(a, b)
    for a, b in zip(plain.actor.parameters(), fast.actor.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(plain.target_critic.parameters(), fast.target_critic.parameters()):
        assert torch.equal(a, b)
    assert step.take_means(6) == dict(zip(cql.METRIC_NAMES, (metric_sum / 6).tolist()))


@pytest.mark.parametrize("variant", ["default", "lagrange_no_is_clipped", "max_target_backup"])
def test_compiled_losses_and_gradients_equal_eager(variant):
    """float32 on the CPU; compilation may reorder sums, so equality is up to 1e-5 relative."""
    eager = make(VARIANTS[variant])
    compiled = copy.deepcopy(eager)
    compiled.losses = torch.compile(compiled.losses)
    buffer = small_buffer()
    torch.manual_seed(2)
    batch, noise = buffer.sample(16), eager.draw_noise(16)
    for trainer in (eager, compiled):
        total, metrics = trainer.losses(batch, noise, False)
        trainer.optimizer.zero_grad(set_to_none=True)
        total.backward()
        trainer.metrics = metrics
    for name in cql.METRIC_NAMES:
        torch.testing.assert_close(compiled.metrics[name], eager.metrics[name], rtol=1e-5, atol=1e-5, msg=name)
    for group, grads in trainer_grads(eager).items():
        for i, (want, got) in enumerate(zip(grads, trainer_grads(compiled)[group])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{group}[{i}]")


def test_ensemble_linear_gradients_match_numerical_ones():
    torch.manual_seed(3)
    weight = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 1, 3, dtype=torch.float64, requires_grad=True)
    for x in (torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True),  # shared by both critics
              torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)):  # one input per critic
        assert torch.autograd.gradcheck(cql.EnsembleLinear.apply, (x, weight, bias))
        assert torch.autograd.gradcheck(cql.EnsembleLinear.apply, (x, weight, None))
        expected = torch.baddbmm(bias, x.expand(2, -1, -1), weight)
        torch.testing.assert_close(cql.EnsembleLinear.apply(x, weight, bias), expected)
        torch.testing.assert_close(cql.EnsembleLinear.apply(x, weight, None), torch.bmm(x.expand(2, -1, -1), weight))
