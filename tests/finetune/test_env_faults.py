"""Envs that go wrong mid-run in ways a failed step does not cover, through algorithms/finetune/cql.py: a training
env whose observations change shape (algorithms/common/envs.py's TrainingEnv.check_shape) and an eval env that
raises in the in-process evaluator (algorithms/common/evaluation.py, background_eval false) each stop the run
with one line naming the env or run and the last good checkpoint, exit 3."""
import re

import gymnasium as gym
import numpy as np
import pytest

import algorithms.finetune.cql as cql

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


class ToyEnv(gym.Env):
    """Observations (step in the episode, 0.5, 0.5), reward 1, never terminal (the registered time limit of 10
    truncates). From its n-th call of step on (counted over all episodes), n = grow_from, its observations have a
    fourth entry; from n = raise_from on, step raises."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self, grow_from=None, raise_from=None):
        self.grow_from, self.raise_from = grow_from, raise_from
        self.calls, self.t = 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0, 0.5, 0.5]), {}

    def step(self, action):
        self.calls += 1
        if self.raise_from is not None and self.calls >= self.raise_from:
            raise RuntimeError(f"eval env broke\nat call {self.calls}")  # two lines: the report takes one
        self.t += 1
        obs = [self.t, 0.5, 0.5] + ([0.5] if self.grow_from is not None and self.calls >= self.grow_from else [])
        return np.array(obs, dtype=np.float64), 1.0, False, False, {}


for env_id, kwargs in {"ToyCalm-v0": {}, "ToyGrowing-v0": {"grow_from": 15}, "ToyBreaking-v0": {"raise_from": 1}
                       }.items():
    gym.register(env_id, entry_point="test_env_faults:ToyEnv", kwargs=kwargs, max_episode_steps=10)

ONLINE = ["--offline_iterations=0", "--online_iterations=40", "--warmup_steps=30", "--batch_size=8",
          "--cql_n_actions=2", "--n_episodes=1", "--log_freq=10", "--checkpoint_freq=10", "--cql_alpha_online=0",
          "--wandb_mode=disabled", "--device=cpu"]


def error_lines(capsys) -> list:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not tqdm's


def test_an_observation_that_changes_shape_mid_run_stops_with_exit_3_naming_the_env_and_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cql.main(["--env=ToyGrowing-v0", *ONLINE, "--eval_freq=40", f"--checkpoints_path={tmp_path}"])
    err = error_lines(capsys)
    assert exit_info.value.code == 3 and len(err) == 1, err
    assert re.fullmatch(r"error: the training env of seed 0 \(ToyGrowing-v0\) gave an observation of shape \(4,\) in "
                        r"iteration 15, expected \(3,\) \(its observation space\); last good checkpoint: "
                        r".*/checkpoint_10\.pt", err[0]), err[0]


def test_a_training_env_whose_reset_changes_shape_stops_the_same_way():
    env = cql.TrainingEnv(gym.make("ToyGrowing-v0", grow_from=None), seed=3,
                          last_good_checkpoint=lambda: "; no checkpoint written")
    env.env.unwrapped.reset = lambda **kwargs: (np.zeros(5), {})
    with pytest.raises(cql.strict.RunFault, match=re.escape(
            "the training env of seed 3 (ToyGrowing-v0) gave an observation of shape (5,) at its reset with seed 7, "
            "expected (3,) (its observation space); no checkpoint written")):
        env.reset(7)


def test_an_eval_env_raising_in_the_in_process_evaluator_stops_with_exit_3_naming_the_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cql.main(["--env=ToyCalm-v0", "--eval_env=ToyBreaking-v0", *ONLINE, "--eval_freq=20",
                  "--background_eval=false", f"--checkpoints_path={tmp_path}"])
    err = error_lines(capsys)
    assert exit_info.value.code == 3 and len(err) == 1, err
    (run_dir,) = tmp_path.iterdir()
    assert re.fullmatch(rf"error: evaluation of update 20 of {re.escape(run_dir.name)} failed in the trainer: "
                        rf"RuntimeError: eval env broke at call 1; last good checkpoint: "
                        rf"{re.escape(str(run_dir))}/checkpoint_10\.pt", err[0]), err[0]
