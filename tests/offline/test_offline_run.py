"""A short offline run end to end, checkpoints, and every bad input's one-line error."""
import errno
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import OFFLINE_SCRIPT, metrics_rows, refuse_temporary_files

import algorithms.offline.cql as cql
from algorithms.common import runs
from algorithms.common.runs import load_state_file
from tools.rollouts import random_transitions, write_d4rl_hdf5

SMALL = ["--batch_size=32", "--cql_n_actions=4", "--n_episodes=2", "--wandb_mode=disabled", "--log_freq=50"]


def test_short_run_writes_metrics_checkpoint_and_score_and_the_checkpoint_loads(hopper_hdf5, tmp_path):
    config = cql.parse_config(["--env", str(hopper_hdf5), "--max_timesteps=200", "--eval_freq=100",
                               f"--checkpoints_path={tmp_path}", "--max_episode_steps=50", *SMALL])
    summary = cql.train(config)
    run_dir = Path(summary["run_dir"])
    assert summary["eval_seconds"] > 0 and summary["load_seconds"] > 0
    rows = metrics_rows(run_dir)
    train_rows = [r for r in rows if "qf1_loss" in r]
    eval_rows = [r for r in rows if "d4rl_normalized_score" in r]
    assert [r["step"] for r in train_rows] == [50, 100, 150, 200]
    assert [r["step"] for r in eval_rows] == [100, 200]
    for name in ["policy_loss", "alpha_loss", "alpha", "log_pi", "qf2_loss", "average_qf1", "average_target_q",
                 "cql_std_q1", "cql_q1_rand", "cql_q2_next_actions", "cql_min_qf1_loss", "cql_qf2_diff",
                 "alpha_prime", "alpha_prime_loss"]:
        assert all(np.isfinite(r[name]) for r in train_rows), name
    assert summary["last_score"] == eval_rows[-1]["d4rl_normalized_score"]
    assert sorted(p.name for p in run_dir.glob("checkpoint_*.pt")) == ["checkpoint_100.pt", "checkpoint_200.pt"]
    saved = cql.parse_config(["--config_path", str(run_dir / "config.yaml")])
    assert saved == config  # the saved config reloads to the same config

    # load_model restores every network, alpha and the update counter; training continues from there.
    state = load_state_file(run_dir / "checkpoint_200.pt")
    resumed = cql.CQL(config, 11, 3, 1.0, torch.device("cpu"))
    cql.load_checkpoints([str(run_dir / "checkpoint_200.pt")], resumed, "load_model")
    assert resumed.total_it == 200
    for name, value in state["actor"].items():
        assert torch.equal(resumed.actor.state_dict()[name], value)
    assert torch.equal(resumed.log_alpha.detach(), state["log_alpha"])
    more = cql.parse_config(["--env", str(hopper_hdf5), "--max_timesteps=220", "--eval_freq=100",
                             f"--load_model={run_dir / 'checkpoint_200.pt'}", f"--log_dir={tmp_path / 'more'}",
                             "--max_episode_steps=50", *SMALL])
    assert cql.train(more)["updates"] == 220


def test_checkpoint_from_another_config_is_refused(hopper_hdf5, tmp_path):
    config = cql.TrainConfig(q_n_hidden_layers=2)
    trainer = cql.CQL(config, 11, 3, 1.0, torch.device("cpu"))
    path = tmp_path / "ck.pt"
    cql.save_checkpoint(path, trainer, np.zeros(11), np.ones(11))
    other = cql.CQL(cql.TrainConfig(q_n_hidden_layers=3), 11, 3, 1.0, torch.device("cpu"))
    with pytest.raises(cql.ConfigError, match="load_model.*does not fit"):
        cql.load_checkpoints([str(path)], other, "load_model")


def _hopper(max_episode_steps: int = 40):
    import gymnasium as gym

    return gym.make("Hopper-v4", max_episode_steps=max_episode_steps)


def _decisive_actor():
    torch.manual_seed(0)
    actor = cql.TanhGaussianActor(11, 3, 1.0)
    with torch.no_grad():
        actor.net[-1].weight.mul_(100)  # actions that matter, so that episodes differ in length
    return actor


def test_evaluation_is_seeded_and_matches_a_plain_episode_loop():
    import gymnasium as gym

    actor = _decisive_actor()
    envs = gym.vector.SyncVectorEnv([_hopper] * 3)
    first = cql.evaluate(envs, actor, 5, np.zeros(11), np.ones(11))
    second = cql.evaluate(envs, actor, 5, np.zeros(11), np.ones(11))
    np.testing.assert_array_equal(first, second)
    # Episode i is seeded seed + i: one env run alone with seed 6 repeats episode 1, and the return
    # equals a plain episode loop (rewards after an episode's end are not counted).
    alone = cql.evaluate(gym.vector.SyncVectorEnv([_hopper]), actor, 6, np.zeros(11), np.ones(11))
    env = _hopper()
    obs, _ = env.reset(seed=6)
    plain_return, done = 0.0, False
    while not done:
        action = actor.act(torch.as_tensor(obs[None], dtype=torch.float32))[0].numpy()
        obs, reward, terminated, truncated, _ = env.step(action)
        plain_return, done = plain_return + reward, terminated or truncated
    assert alone[0] == pytest.approx(first[1], rel=1e-6) == pytest.approx(plain_return, rel=1e-6)
    assert len(set(first.tolist())) == 3  # different seeds, different episodes


def test_background_evaluation_returns_what_foreground_evaluation_returns():
    actor = _decisive_actor()
    mean, std = np.full(11, 0.1), np.full(11, 2.0)
    results = {}
    for background in (False, True):
        evaluator = cql.Evaluator(_hopper(), _hopper, 3, cql.evaluate, (7, mean, std), actor, background)
        evaluator.submit(10, cql.actor_weights(actor))
        snapshot = {k: v.clone() for k, v in actor.state_dict().items()}
        with torch.no_grad():  # a later change of the weights must not reach a submitted evaluation
            actor.net[0].weight.add_(1.0)
        evaluator.submit(20, cql.actor_weights(actor))
        results[background] = evaluator.collect(wait=True)
        evaluator.close()
        actor.load_state_dict(snapshot)
    (step_a, fg_a), (step_b, fg_b) = results[False]
    assert [s for s, _ in results[True]] == [step_a, step_b] == [10, 20]
    np.testing.assert_array_equal(results[True][0][1], fg_a)
    np.testing.assert_array_equal(results[True][1][1], fg_b)
    assert not np.array_equal(fg_a, fg_b)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, message", [
    (["--no_such_key=1"], "unknown option '--no_such_key'"),
    (["--normalize=notabool"], "field 'normalize' expects true or false, got 'notabool'"),
    (["--load_model=None"], "field 'load_model' expects a str"),
    (["--batch_size=1.5"], "field 'batch_size' expects an integer"),
    (["--seed=abc"], "field 'seed' expects an integer"),
    (["--qf_lr=fast"], "field 'qf_lr' expects a number"),
    (["--qf_lr=nan"], "field 'qf_lr' expects a number, not NaN"),
    (["--batch_size=0"], "field 'batch_size' must be > 0"),
    (["--n_episodes=0"], "field 'n_episodes' must be > 0"),
    (["--policy_lr=-1e-4"], "field 'policy_lr' must be > 0"),
    (["--cql_n_actions=0"], "field 'cql_n_actions' must be > 0"),
    (["--cql_clip_diff_min=1", "--cql_clip_diff_max=0"], "'cql_clip_diff_min' \\(1.0\\) > 'cql_clip_diff_max'"),
    (["--wandb_mode=loud"], "field 'wandb_mode' must be online, offline or disabled"),
    (["--discount=1.5"], "field 'discount' must be in"),
    (["seed=3"], "expected --key=value"),
    (["--seed"], "option '--seed' needs a value"),
])
def test_bad_command_line_gives_one_line_error(argv, message):
    with pytest.raises(cql.ConfigError, match=message) as error:
        cql.parse_config(argv)
    assert "\n" not in str(error.value)


def test_good_command_line_values_convert():
    config = cql.parse_config(["--normalize=False", "--max_timesteps=1e6", "--checkpoints_path=None",
                               "--cql_clip_diff_min=-inf", "--seed", "3", "--eval_env=Hopper-v4"])
    assert config.normalize is False and config.max_timesteps == 1_000_000 and config.checkpoints_path is None
    assert config.cql_clip_diff_min == -np.inf and config.seed == 3 and config.eval_env == "Hopper-v4"


@pytest.mark.parametrize("text, message", [
    ("batch_size: 256\nbogus: 1\n", "unknown key 'bogus'"),
    ("normalize: maybe\n", "field 'normalize' expects true or false"),
    ("name: 5\n", "field 'name' expects a string"),
    ("batch_size: [1]\n", "field 'batch_size' expects an integer"),
    ("- a\n- b\n", "expected a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_config_file_names_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(cql.ConfigError, match=message) as error:
        cql.parse_config(["--config_path", str(path)])
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_config_file_values_and_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy_lr: 1e-4\ncql_clip_diff_min: -.inf\nnormalize_reward: true\nseed: 1\n")
    config = cql.parse_config(["--config_path", str(path), "--seed=7"])
    assert config.policy_lr == 1e-4 and config.normalize_reward is True and config.seed == 7


def _bad_files(tmp_path: Path, hopper_hdf5: Path):
    arrays = random_transitions("Hopper-v4", 300, seed=1)
    attrs = {"env_id": "Hopper-v4"}
    missing = dict(arrays)
    del missing["actions"]
    nan = {k: v.copy() for k, v in arrays.items()}
    nan["rewards"][17] = np.nan
    short = dict(arrays, actions=arrays["actions"][:-5])
    truncated = tmp_path / "truncated.hdf5"
    truncated.write_bytes(hopper_hdf5.read_bytes()[:5000])
    return [
        (tmp_path / "absent.hdf5", "dataset file .*absent.hdf5: not found"),
        (write_d4rl_hdf5(tmp_path / "missing.hdf5", missing, attrs), "missing key\\(s\\) actions"),
        (write_d4rl_hdf5(tmp_path / "nan.hdf5", nan, attrs), "'rewards' has non-finite values \\(first at row 17\\)"),
        (write_d4rl_hdf5(tmp_path / "short.hdf5", short, attrs), "'actions' has 295 rows, rewards has 300"),
        (truncated, "truncated.hdf5: not a readable HDF5 file"),
        (write_d4rl_hdf5(tmp_path / "noenv.hdf5", arrays), "set eval_env"),
    ]


def test_bad_dataset_files_give_one_line_errors(tmp_path, hopper_hdf5):
    for path, message in _bad_files(tmp_path, hopper_hdf5):
        with pytest.raises(cql.DatasetError, match=message) as error:
            cql.load_dataset(cql.TrainConfig(env=str(path) if path.exists() else "x", dataset_path=None)
                             if path.exists() else cql.TrainConfig(env="hopper-random-v2", dataset_path=str(path)))
        assert "\n" not in str(error.value), path


def test_dimension_mismatch_and_unknown_envs(hopper_hdf5, tmp_path):
    with pytest.raises(cql.DatasetError, match="observations have 11 dims, the eval env HalfCheetah-v4 has 17"):
        cql.train(cql.TrainConfig(env=str(hopper_hdf5), eval_env="HalfCheetah-v4", wandb_mode="disabled",
                                  log_dir=str(tmp_path)))
    with pytest.raises(cql.DatasetError, match="eval env 'NoSuchEnv-v0': not a registered Gymnasium env"):
        cql.load_dataset(cql.TrainConfig(env=str(hopper_hdf5), eval_env="NoSuchEnv-v0"))
    with pytest.raises(cql.DatasetError, match="env 'hopper-mediocre-v2': not a known D4RL dataset"):
        cql.load_dataset(cql.TrainConfig(env="hopper-mediocre-v2"))


def test_script_exits_2_with_one_line_on_bad_input(tmp_path):
    result = subprocess.run([sys.executable, OFFLINE_SCRIPT, "--normalize=notabool"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: command line: field 'normalize' expects true or false, got 'notabool'"
    result = subprocess.run([sys.executable, OFFLINE_SCRIPT,
                             f"--env={tmp_path / 'absent.hdf5'}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "absent.hdf5" in result.stderr


def test_help_lists_fields_with_their_comments():
    result = subprocess.run([sys.executable, OFFLINE_SCRIPT, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "--cql_max_target_backup" in result.stdout and "max over cql_n_actions" in result.stdout


BAD_INPUTS = [  # (what, argv after the dataset argument, expected message); the README's table lists these
    ("unknown config key", ["--bogus=1"], "unknown option '--bogus'"),
    ("wrong type", ["--batch_size=many"], "field 'batch_size' expects an integer"),
    ("not a boolean", ["--normalize=notabool"], "field 'normalize' expects true or false"),
    ("None for a path", ["--load_model=None"], "field 'load_model' expects a str"),
    ("batch_size 0", ["--batch_size=0"], "field 'batch_size' must be > 0"),
    ("n_episodes 0", ["--n_episodes=0"], "field 'n_episodes' must be > 0"),
    ("negative learning rate", ["--qf_lr=-3e-4"], "field 'qf_lr' must be > 0"),
    ("cql_n_actions 0", ["--cql_n_actions=0"], "field 'cql_n_actions' must be > 0"),
    ("clip min > max", ["--cql_clip_diff_min=2", "--cql_clip_diff_max=1"], "'cql_clip_diff_min' \\(2.0\\) >"),
    ("ref_min_score >= ref_max_score", ["--ref_min_score=100", "--ref_max_score=100"],
     "fields 'ref_min_score' \\(100.0\\) >= 'ref_max_score' \\(100.0\\): the return that scores 0 must be below"),
    ("ref_max_score below the file's ref_min_score", ["--ref_max_score=-30"],
     "hopper-random-tiny.hdf5: fields 'ref_min_score' \\(-20.272305\\) >= 'ref_max_score' \\(-30.0\\) "
     "\\(ref_max_score from the config\\)"),
    ("on_nonfinite not stop or skip", ["--on_nonfinite=maybe"],
     "field 'on_nonfinite' must be stop or skip, got 'maybe'"),
    ("dataset larger than buffer_size", ["--buffer_size=10"],
     "field 'buffer_size' \\(10\\) is smaller than the dataset"),
    ("dimension mismatch with the env", ["--eval_env=HalfCheetah-v4"], "observations have 11 dims, the eval env"),
    ("unknown eval env id", ["--eval_env=NoSuchEnv-v9"], "'NoSuchEnv-v9': not a registered Gymnasium env"),
    ("checkpoint missing", ["--load_model=/nonexistent/ck.pt"], "field 'load_model': checkpoint file .* not found"),
    ("log_dir a file", ["--log_dir=/dev/null"], "field 'log_dir': cannot create the run directory /dev/null/"),
    ("checkpoints_path under a file", ["--checkpoints_path=/dev/null/runs"],
     "field 'checkpoints_path': cannot create the run directory /dev/null/runs/.* \\(Not a directory\\)"),
    ("negative seed", ["--seed=-1"], "field 'seed' must be in \\[0, 4294967295\\], got -1"),
    ("seed past numpy's range", ["--seed=4294967296"], "field 'seed' must be in \\[0, 4294967295\\]"),
    ("a negative seed in a stack", ["--seeds=3,-2"], "field 'seeds' lists a seed outside \\[0, 4294967295\\]: -2"),
    ("a stack too large for one process", ["--seeds=100000000000"],
     "field 'seeds': at most 1024 runs in one process, got 100000000000"),
    # numbers that parse but overflow int64 or make no sense downstream: upper limits (LIMITS)
    ("batch_size 1e100", ["--batch_size=1e100"], "field 'batch_size' must be at most 1048576, got 1000000000000"),
    ("buffer_size past int64", [f"--buffer_size={2**63}"],
     "field 'buffer_size' must be at most 1000000000, got 9223372036854775808"),
    ("cql_n_actions past memory", ["--cql_n_actions=1e9"], "field 'cql_n_actions' must be at most 10000, got"),
    ("n_episodes past int64", ["--n_episodes=1e19"], "field 'n_episodes' must be at most 10000, got"),
    ("q_n_hidden_layers a million", ["--q_n_hidden_layers=1_000_000"], "field 'q_n_hidden_layers' must be at most 100"),
    ("max_timesteps past int64", ["--max_timesteps=1e19"], "field 'max_timesteps' must be at most 1000000000000"),
    ("eval_freq 1e100", ["--eval_freq=1e100"], "field 'eval_freq' must be at most 1000000000000"),
    ("log_freq past int64", [f"--log_freq={2**64}"], "field 'log_freq' must be at most 1000000000000"),
    ("checkpoint_freq 1e13", ["--checkpoint_freq=1e13"], "field 'checkpoint_freq' must be at most 1000000000000"),
    ("keep_checkpoints 1e100", ["--keep_checkpoints=1e100"], "field 'keep_checkpoints' must be at most"),
    ("max_episode_steps 1e100", ["--max_episode_steps=1e100"], "field 'max_episode_steps' must be at most"),
    ("target_update_period 1e100", ["--target_update_period=1e100"], "field 'target_update_period' must be at most"),
    ("bc_steps past int64", ["--bc_steps=1e19"], "field 'bc_steps' must be at most 1000000000000"),
    ("learning rate above 1", ["--policy_lr=2"], "field 'policy_lr' must be at most 1, got 2.0"),
    # floats that are infinite or past float32 where that means nothing (the clip bounds may be inf)
    ("infinite learning rate", ["--qf_lr=inf"], "field 'qf_lr' expects a finite number within float32's range"),
    ("cql_alpha past float32", ["--cql_alpha=1e39"], "field 'cql_alpha' expects a finite number within float32"),
    ("infinite cql_temp", ["--cql_temp=.inf"], "field 'cql_temp' expects a finite number"),
    ("infinite reward_scale", ["--reward_scale=-inf"], "field 'reward_scale' expects a finite number"),
    ("reward_bias 1e308", ["--reward_bias=1e308"], "field 'reward_bias' expects a finite number"),
    ("infinite cql_target_action_gap", ["--cql_target_action_gap=inf"], "field 'cql_target_action_gap' expects a fin"),
    ("infinite alpha_multiplier", ["--alpha_multiplier=inf"], "field 'alpha_multiplier' expects a finite number"),
    ("policy_log_std_multiplier 1e300", ["--policy_log_std_multiplier=-1e300"],
     "field 'policy_log_std_multiplier' expects a finite number"),
    ("infinite ref_min_score", ["--ref_min_score=-inf"], "field 'ref_min_score' expects a finite number"),
    ("rewards that overflow float32 once scaled", ["--normalize_reward=true", "--reward_scale=1e38"],
     "fields 'reward_scale' \\(1e\\+38\\) and 'reward_bias' \\(-1\\): dataset file .*hopper-random-tiny.hdf5's "
     "rewards overflow float32"),
    # strings with characters that cannot work downstream
    ("name with '/'", ["--name=me/cql"], "field 'name' starts the run directory's name .*: no '/', got 'me/cql'"),
    ("wandb project with '/'", ["--project=me/cql"], "field 'project': a wandb project name cannot hold /"),
    ("device meta", ["--device=meta"], "field 'device' must be auto, cpu, cuda or cuda:N, got 'meta'"),
    ("device mps", ["--device=mps"], "field 'device' must be auto, cpu, cuda or cuda:N, got 'mps'"),
    # output paths that cannot be created
    ("checkpoints_path under /proc", ["--checkpoints_path=/proc/cql-runs"],
     "field 'checkpoints_path': cannot create the run directory /proc/cql-runs/CQL-"),
    ("log_dir under /sys", ["--log_dir=/sys/cql-runs"], "field 'log_dir': cannot create the run directory /sys/cql-r"),
]


@pytest.mark.parametrize("what, argv, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(what, argv, message, hopper_hdf5, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cql.main([f"--env={hopper_hdf5}", "--wandb_mode=disabled", f"--log_dir={tmp_path}", "--max_timesteps=1",
                  *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]


@pytest.mark.parametrize("kind", ["absent", "missing", "nan", "short", "truncated", "noenv"])
def test_bad_dataset_file_exits_2_with_one_line(kind, hopper_hdf5, tmp_path, capsys):
    path, message = {p.stem: (p, m) for p, m in _bad_files(tmp_path, hopper_hdf5)}[kind]
    with pytest.raises(SystemExit) as exit_info:
        cql.main([f"--env={path}" if path.exists() else "--env=hopper-random-v2", f"--dataset_path={path}",
                  "--wandb_mode=disabled", f"--log_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert re.search(message, err[0]), err[0]


def test_checkpoint_of_another_config_exits_2(hopper_hdf5, tmp_path, capsys):
    trainer = cql.CQL(cql.TrainConfig(q_n_hidden_layers=2), 11, 3, 1.0, torch.device("cpu"))
    cql.save_checkpoint(tmp_path / "ck.pt", trainer, np.zeros(11), np.ones(11))
    with pytest.raises(SystemExit) as exit_info:
        cql.main([f"--env={hopper_hdf5}", "--wandb_mode=disabled", f"--log_dir={tmp_path}",
                  f"--load_model={tmp_path / 'ck.pt'}", "--q_n_hidden_layers=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "does not fit this config" in err[0]


def test_background_evaluation_failure_is_reported_not_hung():
    actor = _decisive_actor()
    evaluator = cql.Evaluator(_hopper(), _hopper, 2, cql.evaluate, (0, np.zeros(11), np.ones(11)), actor,
                              background=True)
    weights = cql.actor_weights(actor)
    weights["net.0.weight"] = weights["net.0.weight"][:, :5]  # weights of another network
    evaluator.submit(10, weights)
    with pytest.raises(RuntimeError, match="evaluation failed in the worker: RuntimeError: .*size mismatch"):
        evaluator.collect(wait=True)
    evaluator.worker.join(timeout=30)
    assert not evaluator.worker.is_alive()


def test_wandb_mode_env_disabled_needs_no_wandb_package(tmp_path, monkeypatch):
    # wandb's own WANDB_MODE=disabled is obeyed when the config leaves wandb_mode open, so a machine
    # without the wandb package can train; without it, the logger does try to import wandb. Both scripts
    # log through algorithms.common.runs' RunLogger: tested once.
    assert cql.RunLogger is importlib.import_module("algorithms.common.online").RunLogger is runs.RunLogger
    monkeypatch.setitem(sys.modules, "wandb", None)  # "import wandb" now raises ImportError
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = cql.TrainConfig(env="unused")
    logger = runs.RunLogger(config, tmp_path, "run-0")
    assert logger.wandb is None
    logger.log({"x": 1.0}, 1)
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "x": 1.0}
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ImportError):
        runs.RunLogger(config, tmp_path, "run-0")


@pytest.mark.parametrize("script", ["offline", "finetune"])
@pytest.mark.parametrize("field", ["log_dir", "checkpoints_path"])
def test_run_directory_that_takes_no_file_is_a_one_line_error(script, field, hopper_hdf5, tmp_path, monkeypatch,
                                                              capsys):
    """The run directory is made, but config.yaml cannot be written in it (a read-only file system, a full
    disk; root's chmod cannot show it, so the write is refused as such a file system refuses it)."""
    module = importlib.import_module(f"algorithms.{script}.cql")
    refuse_temporary_files(monkeypatch, ".config.yaml.", errno.EROFS)
    short = ["--max_timesteps=1"] if script == "offline" else ["--offline_iterations=1", "--online_iterations=0"]
    with pytest.raises(SystemExit) as exit_info:
        module.main([f"--env={hopper_hdf5}", "--wandb_mode=disabled", f"--{field}={tmp_path / 'runs'}", *short])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert re.fullmatch(f"error: field '{field}': cannot write {re.escape(str(tmp_path / 'runs'))}/CQL-[^/]+/"
                        r"config.yaml \(Read-only file system\)", err[0]), err[0]
