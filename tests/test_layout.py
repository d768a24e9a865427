"""The finetune script against CORL's finetune script, and the two scripts' shared copies.

* initialisation: CORL finetune's scheme (every layer of actor and critics orthogonal with gain
  sqrt(2), zero biases; without orthogonal_init only the output layers change, xavier with gain
  1e-2), in one run and in a seed stack; the offline script keeps CORL offline's scheme;
* evaluation seeded from the run's seed, as CORL's eval_actor(..., seed=config.seed); eval_seed fixes it;
* eval/success_rate only in the online phase, offline_iter / online_iter 0-based;
* the helpers that both scripts carry are the same text, and the copies that had drifted agree.
"""
import ast
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import metrics_rows
from test_finetune import GOAL_ENV  # a scripted goal task: success in info

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as offline_cql
from tools.rollouts import random_transitions, write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[1]
S, A = 7, 3
SQRT2 = math.sqrt(2.0)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


# ------------------------------------------------------------------ initialisation
def layers(trainer, run=None):
    """(name, W as (fan_out, fan_in), bias, is output layer) of every layer of the actor and of each critic;
    for a stack, of run `run`. The critics' first layer is the combined [s, a] matrix."""
    out = []
    if run is None:
        linears = [m for m in trainer.actor.net if isinstance(m, torch.nn.Linear)]
        actor = [(lin.weight, lin.bias) for lin in linears]
    else:
        actor = [(w[run].T, b[run, 0]) for w, b in zip(trainer.actor.weights, trainer.actor.biases)]
    for i, (w, b) in enumerate(actor):
        out.append((f"actor layer {i}", w.detach(), b.detach(), i == len(actor) - 1))
    n_seeds = 1 if run is None else len(trainer.seeds)
    weights, biases = list(trainer.critic.weights), list(trainer.critic.biases)
    for critic in range(2):
        member = critic * n_seeds + (run or 0)  # critic-major: member c * n_seeds + i is critic c of run i
        for i, (w, b) in enumerate(zip(weights, biases)):
            out.append((f"critic {critic} layer {i}", w[member].T.detach(), b[member, 0].detach(),
                        i == len(weights) - 1))
    return out


def build(module, seeds=None, **overrides):
    torch.manual_seed(0)
    config = module.TrainConfig(q_n_hidden_layers=2, **overrides)
    return module.CQL(config, S, A, 1.0, torch.device("cpu"), seeds=seeds)


def xavier_bound(w, gain):
    fan_out, fan_in = w.shape
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


@pytest.mark.parametrize("seeds", [None, [3, 8]], ids=["one run", "stack"])
def test_finetune_orthogonal_init_is_corl_finetune_scheme(seeds):
    trainer = build(finetune_cql, seeds)
    for run in ([None] if seeds is None else range(len(seeds))):
        for name, w, b, _ in layers(trainer, run):
            singular = torch.linalg.svdvals(w.double())
            torch.testing.assert_close(singular, torch.full_like(singular, SQRT2), rtol=0, atol=1e-5, msg=name)
            assert torch.count_nonzero(b) == 0, name
    # The target critics start as copies of the critics.
    for got, want in zip(trainer.target_critic.parameters(), trainer.critic.parameters()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("seeds", [None, [3, 8]], ids=["one run", "stack"])
def test_finetune_without_orthogonal_init_changes_only_the_output_layers(seeds):
    trainer = build(finetune_cql, seeds, orthogonal_init=False)
    for run in ([None] if seeds is None else range(len(seeds))):
        for name, w, b, last in layers(trainer, run):
            fan_in = w.shape[1]
            default_bound = 1.0 / math.sqrt(fan_in)  # PyTorch's nn.Linear default, weight and bias
            assert b.abs().max() <= default_bound and torch.count_nonzero(b) == b.numel(), name  # bias untouched
            if last:  # xavier-uniform, gain 1e-2
                assert w.abs().max() <= xavier_bound(w, 1e-2), name
                assert float(w.std()) == pytest.approx(xavier_bound(w, 1e-2) / math.sqrt(3), rel=0.15), name
            else:  # PyTorch's default, not orthogonal
                assert default_bound / 2 < w.abs().max() <= default_bound, name
                singular = torch.linalg.svdvals(w.double())
                assert float(singular.max() / singular.min()) > 1.1, name  # orthogonal: all equal


def test_offline_keeps_corl_offline_scheme():
    """CORL offline: critics orthogonal, gain sqrt(2) inside and 1e-2 at the output, zero biases; the actor
    never orthogonal (CORL does not pass orthogonal_init on): default layers, a 1e-2 xavier output, zero bias."""
    trainer = build(offline_cql)
    for name, w, b, last in layers(trainer):
        if name.startswith("critic"):
            singular = torch.linalg.svdvals(w.double())
            torch.testing.assert_close(singular, torch.full_like(singular, 1e-2 if last else SQRT2),
                                       rtol=1e-5, atol=0, msg=name)
            assert torch.count_nonzero(b) == 0, name
        elif last:
            assert w.abs().max() <= xavier_bound(w, 1e-2) and torch.count_nonzero(b) == 0, name
        else:
            assert w.abs().max() <= 1.0 / math.sqrt(w.shape[1]) and torch.count_nonzero(b) == b.numel(), name


def test_finetune_init_gives_corl_finetune_initial_q_and_log_std_spread():
    """With CORL finetune's init the critics' initial Q values spread by O(0.1-1) and the actor's log-std
    varies across states; CORL offline's 1e-2 output layers keep both nearly constant."""
    gen = torch.Generator().manual_seed(5)
    obs, actions = torch.randn(256, S, generator=gen), torch.rand(256, A, generator=gen) * 2 - 1
    spread = {}
    for label, module in (("finetune", finetune_cql), ("offline", offline_cql)):
        trainer = build(module)
        with torch.no_grad():
            q = trainer.critic(obs, actions)
            log_std = trainer.actor.mean_log_std(obs)[1]
        spread[label] = (float(q.std()), float(log_std.std()))
    assert spread["finetune"][0] > 0.1 and spread["offline"][0] < 0.02, spread
    assert spread["finetune"][1] > 0.1 and spread["offline"][1] < 0.02, spread


# ------------------------------------------------------------------ evaluation seeding
class SeedEchoEnv(gym.Env):
    """One-step episodes whose reward is a draw of the env's random generator at reset: an episode's
    return tells which seed its reset had."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.start = float(self.np_random.uniform())
        return np.array([self.start]), {}

    def step(self, action):
        return np.array([self.start]), self.start, True, False, {}


ECHO_ENV = "SeedEchoParityTest-v0"
if ECHO_ENV not in gym.registry:
    gym.register(ECHO_ENV, entry_point=SeedEchoEnv, max_episode_steps=5)


def echo_return(seed: int, n_episodes: int) -> float:
    """The mean return of episodes seeded seed, seed + 1, ...: what CORL's seeding gives here."""
    return float(np.mean([gym.utils.seeding.np_random(seed + i)[0].uniform() for i in range(n_episodes)]))


def eval_means(summary_or_dir):
    rows = metrics_rows(summary_or_dir)
    return [r["eval_return_mean"] for r in rows if "eval_return_mean" in r]


def echo_run(tmp_path, *extra):
    config = finetune_cql.parse_config([f"--env={ECHO_ENV}", "--offline_iterations=0", "--online_iterations=8",
                                        "--warmup_steps=8", "--eval_freq=4", "--log_freq=4", "--n_episodes=3",
                                        "--cql_alpha_online=0", "--batch_size=4", "--wandb_mode=disabled",
                                        f"--log_dir={tmp_path}", *extra])
    return finetune_cql.train(config)


def test_evaluation_is_seeded_from_the_run_seed_as_corl(tmp_path):
    one = echo_run(tmp_path / "one", "--seed=5")
    assert eval_means(one["run_dir"]) == pytest.approx([echo_return(5, 3)] * 2)  # each evaluation: the same starts
    echo_run(tmp_path / "stack", "--seeds=0,1")
    dirs = sorted(Path(tmp_path / "stack").iterdir(), key=lambda d: int(d.name.split("-")[-2]))
    assert [eval_means(d) for d in dirs] == [pytest.approx([echo_return(s, 3)] * 2) for s in (0, 1)]
    assert echo_return(0, 3) != pytest.approx(echo_return(1, 3))  # runs of different seeds: different starts


def test_eval_seed_fixes_the_episodes_of_every_run(tmp_path):
    echo_run(tmp_path, "--seeds=0,1", "--eval_seed=9")
    for run_dir in Path(tmp_path).iterdir():
        assert eval_means(run_dir) == pytest.approx([echo_return(9, 3)] * 2)


# ------------------------------------------------------------------ success rate online only, 0-based counters
def test_success_rate_is_logged_in_the_online_phase_only(tmp_path):
    arrays = random_transitions(GOAL_ENV, 64, seed=0)
    path = write_d4rl_hdf5(tmp_path / "goal.hdf5", arrays, {"env_id": GOAL_ENV})
    config = finetune_cql.parse_config([f"--env={path}", "--offline_iterations=16", "--online_iterations=16",
                                        "--eval_freq=8", "--log_freq=8", "--n_episodes=2", "--batch_size=8",
                                        "--cql_n_actions=2", "--wandb_mode=disabled", f"--log_dir={tmp_path}"])
    summary = finetune_cql.train(config)
    rows = metrics_rows(summary["run_dir"])
    evals = [r for r in rows if "eval_return_mean" in r]
    assert [r["step"] for r in evals] == [8, 16, 24, 32]
    assert ["eval/success_rate" in r for r in evals] == [False, False, True, True]
    assert ["eval/regret" in r for r in evals] == [False, False, True, True]
    assert [r.get("offline_iter", r.get("online_iter")) for r in evals] == [7, 15, 7, 15]
    assert any("train/is_success" in r for r in rows)  # a goal task: training episodes report success


# ------------------------------------------------------------------ the two scripts' shared copies
def top_level_sources(path: Path) -> dict:
    """name -> source of every top-level function and class, and of every method (Class.method)."""
    text = path.read_text()
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = ast.get_source_segment(text, node)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    out[f"{node.name}.{item.name}"] = ast.get_source_segment(text, item)
    return out


# Copied on purpose (one file per algorithm variant) and meant to stay the same text.
SHARED = [
    "ConfigError", "DatasetError", "_read_scalar", "parse_value", "check_bounds", "run_seeds", "parse_config",
    "RunFault", "OfflineData", "d4rl_cache_dir",
    "download_file", "read_d4rl_hdf5", "qlearning_transitions", "flatten_observation", "_make_gym_env",
    "_load_minari", "check_dataset_matches_env", "return_range", "TanhGaussianActor", "EnsembleLinear",
    "ActorStack.__init__", "ActorStack.mean_log_std", "ActorStack.member", "EnsembleCritic",
    "CQL.draw_noise", "CQL.update_target", "CQL.parameters_finite", "CQL.load_state_dict", "CQL._run_layout",
    "CQL._adam_indices", "CQL.load_run_state_dicts", "UpdateStep.__call__", "UpdateStep.take_means",
    "UpdateStep.run_metric_sum", "UpdateStep.take_run_means", "actor_weights", "Evaluator.close", "write_atomic",
    "RunLogger.log", "RunLogger.close", "make_run_dir", "set_rng_states", "checkpoint_files", "keep_lines", "set_seed",
    "resolve_device", "main", "StrictLoader", "check_limits", "check_d4rl_attrs", "actions_outside_line",
    "EvaluationWorkerError", "StackRecord", "run_config", "write_run_records", "Evaluator.start_worker",
    "Evaluator.replace_dead_worker", "Evaluator.receive",
    "WriteError", "write_error", "lock_run_dir", "releasing_run_dir_locks", "WandbGuard", "run_dir_field",
    "last_checkpoint_note", "CQL.compile_optimizer_step", "CQL.fuse_critic_layers",
]


def test_shared_helpers_are_identical_copies():
    offline = top_level_sources(ROOT / "algorithms/offline/cql.py")
    finetune = top_level_sources(ROOT / "algorithms/finetune/cql.py")
    for name in SHARED:
        assert name in offline and name in finetune, name
        assert offline[name] == finetune[name], f"{name} differs between the two scripts"
    # Deliberately different: each script's init_linear is its CORL script's scheme.
    assert offline["init_linear"] != finetune["init_linear"]


@pytest.mark.parametrize("module", [offline_cql, finetune_cql], ids=["offline", "finetune"])
def test_equal_episode_returns_with_normalize_reward_is_a_one_line_dataset_error(module, tmp_path, capsys):
    arrays = random_transitions("Hopper-v4", 300, seed=1, max_episode_steps=50)
    arrays["rewards"][:] = 0.0  # every episode returns 0: no return range to rescale by
    path = write_d4rl_hdf5(tmp_path / "flat.hdf5", arrays, {"env_id": "Hopper-v4"})
    with pytest.raises(SystemExit) as stop:
        module.main([f"--env={path}", "--normalize_reward=true", "--wandb_mode=disabled", f"--log_dir={tmp_path}",
                     "--batch_size=8"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "every episode has return 0.0" in err and "normalize_reward false" in err, err


@pytest.mark.parametrize("module", [offline_cql, finetune_cql], ids=["offline", "finetune"])
def test_background_evaluation_of_an_env_without_a_spec_is_a_config_error(module):
    env = SeedEchoEnv()  # built directly: no spec to rebuild it from in a worker process
    actor = module.TanhGaussianActor(1, 1, 1.0)
    args = (env, SeedEchoEnv, 2, 0, np.zeros(1), np.ones(1), actor, True)
    with pytest.raises(module.ConfigError, match="field 'background_eval': the eval env has no Gymnasium spec"):
        module.Evaluator(*args, *(() if module is offline_cql else (False,)))
