"""algorithms/finetune/cql.py's speed layer changes nothing but speed: flags off is the plain update
across the offline -> online switch, compile is the same math, the ring's size and cql_alpha are read
from the device, background evaluation equals foreground evaluation, checkpoints carry what it needs."""
import copy
from functools import partial
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import metrics_rows

import algorithms.finetune.cql as cql
from algorithms.common.runs import load_state_file, write_state_file

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def make(**overrides) -> cql.CQL:
    torch.manual_seed(0)
    values = dict(cql_n_actions=4, q_n_hidden_layers=2, batch_size=16, bc_steps=2, target_update_period=2,
                  cql_alpha=5.0)
    config = cql.TrainConfig(**{**values, **overrides})
    return cql.CQL(config, 5, 3, 1.0, CPU)


def small_ring(n_data: int = 40, capacity: int = 42) -> cql.ReplayBuffer:
    rng = np.random.default_rng(0)
    buffer = cql.ReplayBuffer(capacity, 5, 3, CPU)
    buffer.load_dataset({"observations": rng.standard_normal((n_data, 5)),
                         "actions": rng.uniform(-0.99, 0.99, (n_data, 3)), "rewards": rng.standard_normal(n_data),
                         "next_observations": rng.standard_normal((n_data, 5)),
                         "terminals": (rng.random(n_data) < 0.1).astype(np.float32)})
    return buffer


def online_row(rng: np.random.Generator):
    return (rng.standard_normal(5), rng.uniform(-1, 1, 3), float(rng.standard_normal()), rng.standard_normal(5),
            float(rng.random() < 0.2))


def trainer_tensors(trainer: cql.CQL):
    return [*trainer.actor.parameters(), *trainer.critic.parameters(), *trainer.target_critic.parameters(),
            trainer.log_alpha, trainer.log_alpha_prime]


# ------------------------------------------------------------------ flags off == plain update
@pytest.mark.parametrize("online_alpha", [2.0, 0.0])  # 0: the skipped-penalty phase after the switch
def test_every_flag_off_is_the_plain_update_exactly_across_the_switch(online_alpha):
    runs = []
    for fast in (False, True):
        trainer, buffer = make(), small_ring()
        step = trainer.update_step(buffer, 16, compile=False, cudagraphs=True) if fast else None  # no cuda
        metric_sum = torch.zeros(len(cql.METRIC_NAMES))
        rng = np.random.default_rng(3)
        torch.manual_seed(1)
        for i in range(8):  # behaviour cloning, both target-update phases, the switch, a ring that wraps
            if i == 4:
                trainer.cql_alpha = online_alpha
            if i >= 4:
                buffer.add(*online_row(rng))
            if fast:
                step()
            else:
                metrics = trainer.train(buffer.sample(16, (), trainer.streams))  # update_step's stream
                metric_sum += torch.stack([metrics[name] for name in cql.METRIC_NAMES])
        means = step.take_means(8) if fast else dict(zip(cql.METRIC_NAMES, (metric_sum / 8).tolist()))
        runs.append((trainer, buffer, means))
    (plain, plain_buffer, plain_means), (fast, fast_buffer, fast_means) = runs
    assert fast.total_it == plain.total_it == 8 and fast_buffer.size == plain_buffer.size == 42
    assert fast_buffer.pointer == plain_buffer.pointer == 2  # wrapped over the two oldest dataset rows
    for a, b in zip(trainer_tensors(plain), trainer_tensors(fast)):
        assert torch.equal(a, b)
    assert fast_means == plain_means
    if online_alpha == 0.0:  # the last four updates skipped the penalty, the first four did not
        assert plain_means["cql_q1_rand"] != 0.0 and plain.phase(9)[2] is False


def test_losses_read_cql_alpha_and_the_ring_size_from_the_device():
    """What a captured CUDA graph relies on: values that change are read from device tensors."""
    trainer, buffer = make(), small_ring(n_data=2, capacity=6)
    torch.manual_seed(0)
    batch, noise = buffer.sample(16), trainer.draw_noise(16)
    trainer.cql_alpha_tensor.fill_(3.0)  # behind the Python value's back: the losses still see it
    _, metrics = trainer.losses(batch, noise, False, True)
    assert float(metrics["cql_min_qf1_loss"] / metrics["cql_qf1_diff"]) == pytest.approx(3.0, rel=1e-5)
    trainer.cql_alpha = 0.5
    assert float(trainer.cql_alpha_tensor) == 0.5 and trainer.phase(1)[2] is True
    trainer.cql_alpha = 0.0
    assert trainer.phase(1)[2] is False  # SAC: a phase of its own, the penalty not computed
    assert make(cql_lagrange=True, cql_alpha=0.0).phase(1)[2] is True  # Lagrange still tunes alpha'

    def rewards_drawn():
        return set(buffer.sample(256)[2].tolist())

    assert rewards_drawn() == set(buffer.storage["rewards"][:2].tolist())
    for value in [10.0, 11.0, 12.0]:
        buffer.add(np.zeros(5), np.zeros(3), value, np.zeros(5), 0.0)
    assert int(buffer.size_tensor) == buffer.size == 5 and {10.0, 11.0, 12.0} < rewards_drawn()
    buffer.size_tensor.fill_(2)  # behind the Python value's back: sampling still follows the tensor
    assert rewards_drawn() == set(buffer.storage["rewards"][:2].tolist())
    buffer.size = 3  # as tools/make_dataset.py sets it when it refills a buffer
    assert int(buffer.size_tensor) == 3 and 12.0 not in rewards_drawn()


# ------------------------------------------------------------------ compile == eager
def grads(trainer: cql.CQL):
    return [p.grad if p.grad is not None else torch.zeros_like(p)
            for p in [*trainer.actor.parameters(), *trainer.critic.parameters(), trainer.log_alpha,
                      trainer.log_alpha_prime]]


def test_compiled_losses_and_gradients_equal_eager_and_follow_cql_alpha():
    """float32 on the CPU; compilation may reorder sums, so equality is up to 1e-5 relative. One variant
    that takes most branches (Lagrange, max target backup, entropy backup, importance sampling)."""
    eager = make(cql_lagrange=True, cql_target_action_gap=0.5, cql_max_target_backup=True, backup_entropy=True,
                 use_automatic_entropy_tuning=True)
    compiled = copy.deepcopy(eager)
    compiled.losses = torch.compile(compiled.losses)
    buffer = small_ring()
    torch.manual_seed(2)
    batch, noise = buffer.sample(16), eager.draw_noise(16)
    for cql_alpha in (5.0, 1.5):  # the second value reaches the compiled losses through the device tensor
        results = []
        for trainer in (eager, compiled):
            trainer.cql_alpha = cql_alpha
            total, metrics = trainer.losses(batch, noise, False, True)
            trainer.optimizer.zero_grad(set_to_none=True)
            total.backward()
            results.append((metrics, grads(trainer)))
        (want_metrics, want_grads), (got_metrics, got_grads) = results
        for name in cql.METRIC_NAMES:
            torch.testing.assert_close(got_metrics[name], want_metrics[name], rtol=1e-5, atol=1e-5, msg=name)
        for i, (want, got) in enumerate(zip(want_grads, got_grads)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"grad {i}")
        ratio = got_metrics["cql_min_qf1_loss"] / (got_metrics["alpha_prime"] * (got_metrics["cql_qf1_diff"] - 0.5))
        assert float(ratio) == pytest.approx(cql_alpha, rel=1e-4)


# ------------------------------------------------------------------ evaluation
class SeededGoalEnv(gym.Env):
    """Observation [step, kind]; an episode's kind is its reset seed mod 3 (without a seed, the next kind):
    kind 0 terminates at step 4 with info['success'] True at that step only; kind 1 runs into the
    registered time limit of 6, success False; kind 2 terminates at step 2, success False.
    Reward: 0.1 * step + action, so that returns tell actors apart."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self.kind, self.t = -1, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.kind, self.t = (seed % 3 if seed is not None else (self.kind + 1) % 3), 0
        return np.array([0.0, self.kind]), {}

    def step(self, action):
        self.t += 1
        end = {0: 4, 2: 2}.get(self.kind)
        info = {"success": self.kind == 0 and self.t == 4}
        return np.array([float(self.t), self.kind]), 0.1 * self.t + float(action[0]), self.t == end, False, info


GOAL_ENV = "SeededGoalFinetuneSpeedTest-v0"
if GOAL_ENV not in gym.registry:
    gym.register(GOAL_ENV, entry_point=SeededGoalEnv, max_episode_steps=6)


def _decisive_actor() -> cql.TanhGaussianActor:
    torch.manual_seed(0)
    actor = cql.TanhGaussianActor(2, 1, 1.0)
    with torch.no_grad():
        actor.net[-1].weight.mul_(100)  # actions far from 0, so that weights show in the returns
    return actor


def test_background_evaluation_returns_what_foreground_evaluation_returns():
    actor = _decisive_actor()
    mean, std = np.array([1.0, 0.5]), np.array([2.0, 1.0])
    results = {}
    for background in (False, True):
        evaluator = cql.Evaluator(gym.make(GOAL_ENV), lambda: gym.make(GOAL_ENV), 4,
                                  partial(cql.evaluate, sparse_reward=False), (7, mean, std), actor, background)
        evaluator.submit(10, cql.actor_weights(actor))
        snapshot = {k: v.clone() for k, v in actor.state_dict().items()}
        with torch.no_grad():  # a later change of the weights must not reach a submitted evaluation
            actor.net[0].weight.add_(1.0)
        evaluator.submit(20, cql.actor_weights(actor))
        assert sorted(evaluator.pending) == ([10, 20] if background else [])
        results[background] = evaluator.collect(wait=True)
        assert not evaluator.pending
        evaluator.close()
        actor.load_state_dict(snapshot)
    assert [r[0] for r in results[True]] == [r[0] for r in results[False]] == [10, 20]
    for (_, (returns, successes, reported)), (_, (bg_returns, bg_successes, bg_reported)) in zip(results[False],
                                                                                                  results[True]):
        np.testing.assert_array_equal(bg_returns, returns)
        np.testing.assert_array_equal(bg_successes, successes)
        assert reported and bg_reported
        # Seeds 7..10 are kinds 1, 2, 0, 1: only the third episode reaches the goal.
        assert successes.tolist() == [False, False, True, False]
    assert not np.array_equal(results[False][0][1][0], results[False][1][1][0])

    # The same numbers as a plain loop over one env: episode 2 (seed 9, kind 0) ends at step 4.
    env, ret, done = gym.make(GOAL_ENV), 0.0, False
    obs, _ = env.reset(seed=9)
    while not done:
        action = actor.act(torch.as_tensor((obs - mean) / std, dtype=torch.float32)[None])[0].numpy()
        obs, reward, terminated, truncated, info = env.step(action)
        ret, done = ret + reward, terminated or truncated
    assert info["success"] and results[False][0][1][0][2] == pytest.approx(ret, rel=1e-6)


def _goal_run(tmp_path, *extra):
    config = cql.parse_config([f"--env={GOAL_ENV}", "--offline_iterations=0", "--online_iterations=24",
                               "--warmup_steps=12", "--eval_freq=8", "--log_freq=8", "--cql_alpha_online=0",
                               "--batch_size=16", "--n_episodes=3", "--eval_seed=3", "--wandb_mode=disabled",
                               f"--log_dir={tmp_path}", *extra])
    return cql.train(config)


def test_background_evaluation_in_a_run_logs_the_rows_of_a_foreground_run(tmp_path):
    fg = _goal_run(tmp_path / "fg", "--background_eval=false")
    bg = _goal_run(tmp_path / "bg", "--background_eval=true")
    evals = {name: sorted((r for r in metrics_rows(s["run_dir"]) if "eval_return_mean" in r), key=lambda r: r["step"])
             for name, s in [("fg", fg), ("bg", bg)]}
    assert [r["step"] for r in evals["fg"]] == [8, 16, 24]
    assert evals["bg"] == evals["fg"]  # returns, success rates (kinds 0, 1, 2: 1/3), regret, counters
    assert [r["eval/success_rate"] for r in evals["fg"]] == [pytest.approx(1 / 3)] * 3
    assert evals["fg"][-1]["eval/regret"] == pytest.approx(2 / 3) and evals["fg"][-1]["online_iter"] == 23  # 0-based
    assert bg["eval_returns"] == fg["eval_returns"] and bg["updates"] == fg["updates"] == 12
    assert fg["load_seconds"] > 0 and fg["eval_seconds"] > 0


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_keeps_this_runs_adam_flavour_both_ways():
    """Adam takes capturable/fused from a loaded state: a CPU run's checkpoint must still go on
    under CUDA graphs (capturable), and a graph run's checkpoint in a plain run."""
    buffer = small_ring()
    capturable = cql.CQL(make().config, 5, 3, 1.0, CPU, capturable=True)  # fused and capturable Adam
    capturable.train(buffer.sample(16))
    plain = make()
    plain.load_state_dict(capturable.state_dict())
    assert all(not g["capturable"] and not g["fused"] for g in plain.optimizer.param_groups)
    plain.train(buffer.sample(16))
    capturable.load_state_dict(plain.state_dict())
    assert all(g["capturable"] and g["fused"] for g in capturable.optimizer.param_groups)
    capturable.train(buffer.sample(16))
    assert capturable.total_it == 3


@pytest.mark.parametrize("layout", ["run state", "top level (checkpoints before 2026-12)"])
def test_resume_runs_the_evaluations_a_checkpoint_had_not_finished(tmp_path, layout):
    """A background run's checkpoint carries the weights of its unfinished evaluations (in its run
    state, as the offline script's; older checkpoints kept them at the top level and still load); a run
    that continues from it evaluates them first, so that scores and regret miss nothing."""
    first = _goal_run(tmp_path / "first", f"--checkpoints_path={tmp_path / 'ck'}", "--background_eval=false")
    evals = {r["step"]: r for r in metrics_rows(first["run_dir"]) if "eval_return_mean" in r}
    # As if the evaluation at step 24 had still been running when checkpoint_24.pt was written.
    path = Path(first["run_dir"]) / "checkpoint_24.pt"
    state = load_state_file(path)
    assert state["run"]["pending_evaluations"] == {} and "pending_evaluations" not in state  # foreground
    pending = {24: {k: v.cpu() for k, v in state["actor"].items()}}
    if layout == "run state":
        state["run"]["pending_evaluations"] = pending
    else:
        del state["run"]["pending_evaluations"]
        state["pending_evaluations"] = pending
    state["progress"]["eval_success_rates"] = state["progress"]["eval_success_rates"][:-1]
    write_state_file(path, state)
    resumed = _goal_run(tmp_path / "resumed", f"--load_model={path}", "--online_iterations=32")
    resumed_evals = {r["step"]: r for r in metrics_rows(resumed["run_dir"]) if "eval_return_mean" in r}
    assert sorted(resumed_evals) == [24, 32]
    assert resumed_evals[24] == evals[24]  # the same weights, the same episodes, the same regret
    assert resumed_evals[32]["eval/regret"] == pytest.approx(2 / 3) and resumed["updates"] == 20
