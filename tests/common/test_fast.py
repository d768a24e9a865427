"""The speed layer changes nothing but speed: flags off is the plain update, compile is the same math.

The mechanics are algorithms/common/fast.py's (EnsembleLinear, compiled_adam_step, UpdateStep): checked once;
what each script wires to them (its critics' compiled layers, its update_step's choice of what to compile, its
load_state_dict keeping the optimizer's flavour) in each script.
"""
import copy

import numpy as np
import pytest
import torch
from conftest import fast_losses, trainer_grads

import algorithms.finetune.cql as finetune
import algorithms.offline.cql as cql
from algorithms.common import fast as common_fast

VARIANTS = {  # tests/offline/test_losses.py's config variants that these tests compile
    "default": {},
    "max_target_backup": {"cql_max_target_backup": True, "backup_entropy": True},
    "lagrange_no_is_clipped": {"cql_lagrange": True, "cql_importance_sample": False, "cql_clip_diff_max": 0.1},
}


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


def make(overrides: dict, module=cql) -> cql.CQL:
    """A small one-run trainer of the module's script (the offline one by default) on the CPU."""
    torch.manual_seed(0)
    config = module.TrainConfig(cql_n_actions=4, q_n_hidden_layers=2, batch_size=16, bc_steps=2,
                                target_update_period=2, **overrides)
    return module.CQL(config, 5, 3, 1.0, torch.device("cpu"))


def test_every_flag_off_is_the_plain_update_exactly():
    buffer = small_buffer()
    plain, fast = make({}), make({})
    torch.manual_seed(1)
    metric_sum = torch.zeros(len(cql.METRIC_NAMES))
    for _ in range(6):  # crosses the behaviour-cloning phase and both target-update phases
        metrics = plain.train(buffer.sample(16, (), plain.streams))  # the stream update_step draws from
        metric_sum += torch.stack([metrics[name] for name in cql.METRIC_NAMES])
    step = fast.update_step(buffer, 16, compile=False, cudagraphs=True)  # no cuda: graphs are off
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
    linear = common_fast.EnsembleLinear.apply
    torch.manual_seed(3)
    weight = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 1, 3, dtype=torch.float64, requires_grad=True)
    for x in (torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True),  # shared by both critics
              torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)):  # one input per critic
        assert torch.autograd.gradcheck(linear, (x, weight, bias))
        assert torch.autograd.gradcheck(linear, (x, weight, None))
        expected = torch.baddbmm(bias, x.expand(2, -1, -1), weight)
        torch.testing.assert_close(linear(x, weight, bias), expected)
        torch.testing.assert_close(linear(x, weight, None), torch.bmm(x.expand(2, -1, -1), weight))


def test_a_batch_is_the_datasets_rows_at_the_drawn_indices():
    """ReplayBuffer keeps the five fields as one tensor and gathers once: the batch is still each field's rows."""
    rng = np.random.default_rng(7)
    fields = {"observations": rng.standard_normal((50, 5), dtype=np.float32),
              "actions": rng.uniform(-1, 1, (50, 3)).astype(np.float32), "rewards": rng.standard_normal(50),
              "next_observations": rng.standard_normal((50, 5)), "terminals": (rng.random(50) < 0.3).astype(bool)}
    buffer = cql.ReplayBuffer(cql.OfflineData(**fields, make_env=None, ref_min_score=None, ref_max_score=None,
                                              is_locomotion=False, source="test"), torch.device("cpu"))
    for runs in ((), (2,)):
        torch.manual_seed(3)
        batch = buffer.sample(7, runs)
        torch.manual_seed(3)
        index = torch.randint(0, 50, (*runs, 7)).numpy()
        for got, want in zip(batch, fields.values()):
            assert got.dtype == torch.float32 and got.shape == want[index].shape
            np.testing.assert_array_equal(got.numpy(), want[index].astype(np.float32))
    np.testing.assert_array_equal(buffer.rewards.numpy(), fields["rewards"].astype(np.float32))


# ------------------------------------------------------------------ one pass: the actor's objective in the penalty pass
def random_batch(gen: torch.Generator, rows: tuple = (16,)) -> tuple:
    """A batch of the small trainers' shapes (state 5, action 3) with rows (*runs, batch), drawn from gen."""
    return (torch.randn(*rows, 5, generator=gen), torch.rand(*rows, 3, generator=gen) * 1.8 - 0.9,
            torch.randn(*rows, generator=gen), torch.randn(*rows, 5, generator=gen),
            (torch.rand(*rows, generator=gen) < 0.2).float())


def gradients_and_metrics(trainer, bc: bool, penalty: bool):
    """Every parameter's gradient (one vector) and the metrics of one losses() on a fixed batch and noise."""
    batch = random_batch(torch.Generator().manual_seed(6), (*trainer.run_shape, 16))
    torch.manual_seed(6)
    noise = trainer.draw_noise(16)
    total, metrics = fast_losses(trainer, batch, noise, bc=bc, penalty=penalty)
    trainer.optimizer.zero_grad(set_to_none=True)
    total.backward()
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params]), metrics


@pytest.mark.parametrize("module", ["offline", "finetune"])
@pytest.mark.parametrize("seeds", [None, [0, 1]], ids=["one run", "2-seed stack"])
def test_compiled_critic_layers_give_the_plain_critics_gradients(module, seeds, monkeypatch):
    """EnsembleCritic's layers for torch.compile, each and both, give the plain critic's gradients and metrics in
    every phase. one_pass scores the policy's actions in the critic loss's batched pass, leaving their rows out
    of the weight gradients (without that, the actor's objective reaches the critics and the bound fails);
    sum_output makes the one-unit output layer a multiply-and-sum."""
    module = cql if module == "offline" else finetune

    def trainer(**layers: bool):
        torch.manual_seed(0)
        made = module.CQL(make({}, module).config, 5, 3, 1.0, torch.device("cpu"), seeds=seeds)
        for name, value in layers.items():
            setattr(made.critic, name, value)
        return made

    phases = [(False, True), (True, True)] + ([(False, False), (True, False)] if module is finetune else [])
    for bc, penalty in phases:
        want, want_metrics = gradients_and_metrics(trainer(), bc, penalty)
        for layers in ({"one_pass": True}, {"sum_output": True}, {"one_pass": True, "sum_output": True}):
            got, got_metrics = gradients_and_metrics(trainer(**layers), bc, penalty)
            # measured: 0 for one_pass (the same sums), 1.6e-7 with sum_output (another summation order)
            assert float((got - want).norm() / want.norm()) < 1e-6, (bc, penalty, layers)
            for name, value in want_metrics.items():
                torch.testing.assert_close(got_metrics[name], value, rtol=1e-6, atol=1e-7, msg=f"{name} {layers}")
    forward = module.EnsembleLinear.forward  # the mutation: every row trains the weights
    monkeypatch.setattr(module.EnsembleLinear, "forward",
                        staticmethod(lambda ctx, x, weight, bias, weight_rows=None: forward(ctx, x, weight, bias)))
    want, _ = gradients_and_metrics(trainer(), False, True)
    wrong, _ = gradients_and_metrics(trainer(one_pass=True), False, True)
    assert float((wrong - want).norm() / want.norm()) > 1e-3


# ------------------------------------------------------------------ compiled Adam (one run, on_nonfinite stop)
def update_deltas(trainer, updates: int = 1) -> torch.Tensor:
    """Every trained parameter's change over `updates` updates (CQL.apply_update) on fixed batches and noise."""
    gen = torch.Generator().manual_seed(4)
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    before = torch.cat([p.detach().flatten() for p in params])
    for update in range(1, updates + 1):
        batch = random_batch(gen)
        torch.manual_seed(update)
        trainer.apply_update(batch, trainer.draw_noise(16), *trainer.phase(update))  # finetune: and the penalty
    return torch.cat([p.detach().flatten() for p in params]) - before


def adam_deltas(trainer, steps: int = 5) -> torch.Tensor:
    """Every trained parameter's change over `steps` optimizer steps on the same given gradients, one vector.
    Given gradients, not the losses': after a first step that differs by rounding, a loss gradient near 0 can
    change sign, which Adam turns into a whole +-lr step (how often depends on torch's thread count)."""
    gen = torch.Generator().manual_seed(5)
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    before = torch.cat([p.detach().flatten() for p in params])
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        trainer.step_optimizer()
    return torch.cat([p.detach().flatten() for p in params]) - before


def test_compiled_adam_step_makes_the_plain_steps_updates():
    """compiled_adam_step (foreach Adam under torch.compile) moves every weight as eager Adam does, up to
    float rounding; a 1% change of one learning rate is far outside that bound."""
    plain, compiled, mutated = make({}), make({}), make({})
    compiled.step_optimizer = common_fast.compiled_adam_step(compiled.optimizer)
    assert compiled.step_optimizer is not compiled.optimizer.step
    assert all(g["foreach"] and not g["fused"] for g in compiled.optimizer.param_groups)
    mutated.optimizer.param_groups[1]["lr"] *= 1.01  # the critics' learning rate
    want = adam_deltas(plain)
    got, wrong = adam_deltas(compiled), adam_deltas(mutated)
    assert float((got - want).norm() / want.norm()) < 1e-4  # measured 1.1e-5 at 1 and 2 threads; the mutation: 1e-2
    assert float((wrong - want).norm() / want.norm()) > 1e-3


@pytest.mark.parametrize("module", ["offline", "finetune"])
def test_compile_compiles_adam_only_for_one_run_that_stops_at_non_finite_values(module, monkeypatch):
    """A stack keeps (fused) Adam uncompiled: compiled, it costs more GPU memory per seed than it saves time;
    on_nonfinite "skip" needs fused Adam's found_inf. Checkpoints keep this run's flavour either way."""
    module = cql if module == "offline" else finetune
    one_run, skipping = make({}, module), make({"on_nonfinite": "skip"}, module)
    torch.manual_seed(0)
    stack = module.CQL(one_run.config, 5, 3, 1.0, torch.device("cpu"), seeds=[0, 1])
    compiled_for = []
    with monkeypatch.context() as patch:
        patch.setattr(common_fast, "compiled_adam_step", lambda optimizer: compiled_for.append(optimizer) or "step")
        for trainer in (one_run, skipping, stack):
            trainer.update_step(None, 16, compile=True)
    assert compiled_for == [one_run.optimizer] and one_run.step_optimizer == "step"
    assert skipping.step_optimizer != "step" and stack.step_optimizer != "step"
    assert one_run.critic.one_pass and skipping.critic.one_pass and not stack.critic.one_pass  # one pass: one run
    assert one_run.critic.sum_output and stack.critic.sum_output
    plain = make({}, module)
    plain.update_step(None, 16, compile=False)
    assert not plain.critic.one_pass and not plain.critic.sum_output
    compiled = make({}, module)
    compiled.step_optimizer = common_fast.compiled_adam_step(compiled.optimizer)
    assert update_deltas(compiled).abs().max() > 0  # apply_update steps through the compiled step
    plain = make({}, module)
    plain.load_state_dict(compiled.state_dict())
    assert all(g["foreach"] is None and g["fused"] is None for g in plain.optimizer.param_groups)
    compiled.load_state_dict(plain.state_dict())
    assert all(g["foreach"] and not g["fused"] for g in compiled.optimizer.param_groups)
