"""algorithms/finetune/cql.py's training envs (algorithms/common/envs.py's TrainingEnv): a failing training env
(an exception in step, a non-finite observation, MuJoCo's unstable simulation) ends its episode as
truncated, is counted and never reaches the replay buffer, and one that keeps failing stops the run."""
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import metrics_rows

import algorithms.finetune.cql as cql
from algorithms.common import envs
from algorithms.common.runs import checkpoint_files, load_state_file

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


class FaultyEnv(gym.Env):
    """Observations (step in the episode, episode, 0.5), reward 1, never terminal (the registered time limit
    of 10 truncates). Its n-th call of step (counted over all episodes) raises if n is in raise_at or
    n >= raise_from, and observes NaN if n is in nan_at."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self, raise_at=(), nan_at=(), raise_from=None):
        self.raise_at, self.nan_at, self.raise_from = tuple(raise_at), tuple(nan_at), raise_from
        self.calls, self.t, self.episode = 0, 0, -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.episode = 0, self.episode + 1
        return np.array([0.0, self.episode, 0.5]), {}

    def step(self, action):
        self.calls += 1
        if self.calls in self.raise_at or (self.raise_from is not None and self.calls >= self.raise_from):
            raise RuntimeError(f"simulator blew up\nat call {self.calls}")  # two lines: the report takes one
        self.t += 1
        obs = np.array([self.t, self.episode, 0.5])
        if self.calls in self.nan_at:
            obs[0] = np.nan
        return obs, 1.0, False, False, {}


FAULTS = {"raise": {"raise_at": (13, 27)}, "nan": {"nan_at": (13, 27)}, "always": {"raise_from": 15}}
for fault, kwargs in FAULTS.items():
    gym.register(f"Faulty{fault.capitalize()}-v0", entry_point="test_finetune_envs:FaultyEnv", kwargs=kwargs,
                 max_episode_steps=10)

ONLINE = ["--offline_iterations=0", "--online_iterations=40", "--warmup_steps=30", "--batch_size=8",
          "--cql_n_actions=2", "--n_episodes=1", "--eval_freq=40", "--log_freq=10", "--cql_alpha_online=0",
          "--wandb_mode=disabled", "--device=cpu"]


@pytest.mark.parametrize("fault, argv", [("raise", []), ("nan", []), ("raise", ["--seeds=1,2"])],
                         ids=["exception", "nan observation", "exception, stack"])
def test_a_failing_env_step_ends_its_episode_is_counted_and_stays_out_of_the_buffer(fault, argv, tmp_path, capsys):
    summary = cql.train(cql.parse_config([f"--env=Faulty{fault.capitalize()}-v0", *ONLINE, *argv,
                                          f"--checkpoints_path={tmp_path}"]))
    stacked = bool(argv)
    dirs = [Path(d) for d in summary["run_dirs"]] if stacked else [Path(summary["run_dir"])]
    for i, run_dir in enumerate(dirs):
        episodes = [r for r in metrics_rows(run_dir) if "train/episode_return" in r]
        # calls 1-10, 11-12 (13 fails), 14-23, 24-26 (27 fails), 28-37: the failed steps end their episodes
        assert [(r["step"], r["train/episode_length"]) for r in episodes] == [(10, 10), (13, 2), (23, 10), (27, 3),
                                                                              (37, 10)]
        assert [r.get("train/env_errors") for r in episodes] == [None, 1, None, 2, None]
        assert (summary["runs"][i] if stacked else summary)["env_errors"] == 2
        replay = load_state_file(run_dir / "replay_40.pt")
        for key in cql.BUFFER_FIELDS:
            assert torch.isfinite(replay[key]).all(), key
        assert not replay["terminals"].any()  # a failed step is no terminal, and it is not stored
        if stacked:  # rings move together: the failed step's row repeats the run's newest one
            assert replay["n_added"] == 40
            for key in cql.BUFFER_FIELDS:
                for failed in (12, 26):
                    assert torch.equal(replay[key][failed], replay[key][failed - 1]), key
        else:
            assert replay["n_added"] == 38
            assert replay["observations"][:, 0].tolist() == [*range(10), 0, 1, *range(10), 0, 1, 2, *range(10), 0, 1, 2]
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(dirs), warnings  # once per run, the first time
    assert re.match(r"warning: the training env of seed \d failed in iteration 13 \((RuntimeError: simulator blew "
                    r"up at call 13|non-finite observation \(\[nan 1\. 0\.5\]\))\): the episode ends there as "
                    r"truncated", warnings[0]), warnings[0]
    assert f"the training env failed {' + '.join(['2'] * len(dirs))} steps" in out


def test_an_env_that_keeps_failing_stops_with_exit_3_naming_the_last_good_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cql.main(["--env=FaultyAlways-v0", *ONLINE, "--checkpoint_freq=10", f"--checkpoints_path={tmp_path}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not tqdm's
    assert exit_info.value.code == 3 and len(err) == 1, err
    assert re.fullmatch(r"error: the training env of seed 0 failed 5 steps in a row \(the last in iteration 19: "
                        r"RuntimeError: simulator blew up at call 19; env_errors_in_a_row 5\); last good checkpoint: "
                        r".*/checkpoint_10\.pt", err[0]), err[0]
    (run_dir,) = tmp_path.iterdir()
    assert [p.name for p in checkpoint_files(run_dir)] == ["checkpoint_10.pt"]


def test_env_errors_in_a_row_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cql.main(["--env=FaultyRaise-v0", *ONLINE, "--env_errors_in_a_row=0", f"--log_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == ["error: field 'env_errors_in_a_row' must be > 0, got 0"], err


def test_mujoco_instability_is_a_failed_step_though_the_observation_is_finite():
    """MuJoCo resets an unstable simulation and goes on (a finite observation of a fresh simulation):
    step_env reads its warning counters, one step at a time."""
    env = gym.make("Hopper-v4")
    env.reset(seed=0)
    base = env.unwrapped
    base.set_state(base.data.qpos, np.full_like(base.data.qvel, 1e30))
    result = envs.step_env(env, np.zeros(3, np.float32), False)
    assert result.error is not None and "MuJoCo found the simulation unstable (BADQVEL" in result.error
    assert (result.next_obs, result.terminated, result.truncated) == (None, False, True)
    assert np.isfinite(result.reset_obs).all()
    after = envs.step_env(env, np.zeros(3, np.float32), False)  # the next step, healthy, is not flagged
    assert after.error is None and np.isfinite(after.next_obs).all()
