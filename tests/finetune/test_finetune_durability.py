"""algorithms/finetune/cql.py runs survive kills and lose nothing: exact resume across the offline ->
online switch (the training env mid-episode included), checkpoints kept consistent with their
replay files, non-finite values stop the run, bad input exits 2 with one line."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import (
    CHILD_ENV,
    FINETUNE_SCRIPT,
    assert_same_finetune_run,
    finetune_run_args,
    kill_when_written,
    poison_critic_at_update,
)

import algorithms.finetune.cql as cql
from algorithms.common import envs, runs
from algorithms.common.runs import checkpoint_files, load_state_file, write_state_file

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def run_until(args: list, run_root: Path, checkpoint: str) -> Path:
    """Starts the script, SIGKILLs it once `checkpoint` exists (somewhere in the next interval)."""
    process = subprocess.Popen([sys.executable, FINETUNE_SCRIPT, *args], env=CHILD_ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    kill_when_written(process, run_root, checkpoint)
    (run_dir,) = run_root.iterdir()
    return run_dir


def test_sigkilled_run_resumes_twice_across_the_switch_to_the_same_weights_and_metrics(hopper_hdf5, tmp_path):
    subprocess.run([sys.executable, FINETUNE_SCRIPT, *finetune_run_args(hopper_hdf5, tmp_path / "a")], env=CHILD_ENV,
                   check=True, capture_output=True, timeout=600)
    (reference,) = (tmp_path / "a").iterdir()

    # Killed offline (the switch at iteration 60 lies ahead), resumed, killed again online, resumed.
    killed = run_until(finetune_run_args(hopper_hdf5, tmp_path / "b"), tmp_path / "b", "checkpoint_20.pt")
    assert not (killed / "checkpoint_60.pt").exists(), "killed too late to cross the switch after resuming"
    resume = subprocess.Popen([sys.executable, FINETUNE_SCRIPT, f"--resume={killed}"], env=CHILD_ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_written(resume, killed.parent, "checkpoint_100.pt")
    assert not (killed / "checkpoint_200.pt").exists(), "killed too late to test anything"
    newest = checkpoint_files(killed)[-1]
    run_state = load_state_file(newest)["run"]
    assert run_state["env"] is not None and run_state["episode"][2] > 0, "resume should start mid-episode"

    result = subprocess.run([sys.executable, FINETUNE_SCRIPT, f"--resume={killed}"], env=CHILD_ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed at iteration {newest.stem.split('_')[1]}" in result.stdout
    assert_same_finetune_run(reference, killed, 200)
    assert not list(killed.glob(".*.tmp")) and [p.name for p in killed.glob("replay_*.pt")] == ["replay_200.pt"]


def test_training_env_state_round_trips_mid_episode():
    """algorithms/common/envs.py's env_state and set_env_state (the training env in a checkpoint): Hopper
    (MuJoCo integration state) and Pendulum (its plain attributes) go on bit for bit."""
    for env_id in ("Hopper-v4", "Pendulum-v1"):
        env = gym.make(env_id, max_episode_steps=30)
        env.reset(seed=3)
        env.action_space.seed(3)
        for _ in range(7):
            env.step(env.action_space.sample())
        state = envs.env_state(env)
        clone = gym.make(env_id, max_episode_steps=30)
        envs.set_env_state(clone, state)
        for _ in range(60):  # through time-limit ends and resets drawn from the env's own generator
            results = [e.step(e.action_space.sample()) for e in (env, clone)]
            for a, b in zip(*results[:2]):
                if not isinstance(a, dict):
                    assert np.array_equal(a, b), env_id
            if results[0][2] or results[0][3]:
                assert np.array_equal(env.reset()[0], clone.reset()[0]), env_id


def test_kill_between_replay_and_checkpoint_write_resumes_from_the_previous_pair(hopper_hdf5, tmp_path,
                                                                                monkeypatch):
    args = finetune_run_args(hopper_hdf5, tmp_path / "a", offline=20, online=60)
    reference = Path(cql.train(cql.parse_config(args))["run_dir"])

    class Killed(BaseException):
        pass

    write_atomic = runs.write_atomic

    def dies_before_checkpoint_60(path, write, mode="wb"):
        if path.name == "checkpoint_60.pt":  # replay_60.pt is already complete on disk
            (path.parent / ".checkpoint_60.pt.abc.tmp").write_bytes(b"half a checkp")
            raise Killed()
        write_atomic(path, write, mode)

    monkeypatch.setattr(runs, "write_atomic", dies_before_checkpoint_60)
    with pytest.raises(Killed):
        cql.train(cql.parse_config(args[:-1] + [f"--checkpoints_path={tmp_path / 'b'}"]))
    monkeypatch.setattr(runs, "write_atomic", write_atomic)
    (killed,) = (tmp_path / "b").iterdir()
    assert sorted(p.name for p in killed.glob("replay_*.pt")) == ["replay_40.pt", "replay_60.pt"]
    assert checkpoint_files(killed)[-1].name == "checkpoint_40.pt"

    cql.train(cql.parse_config([f"--resume={killed}"]))
    assert_same_finetune_run(reference, killed, 80)
    assert not list(killed.glob(".*.tmp"))


def test_keep_checkpoints_keeps_the_newest_and_one_replay_file(hopper_hdf5, tmp_path):
    config = cql.parse_config(finetune_run_args(hopper_hdf5, tmp_path, offline=20, online=30)
                              + ["--checkpoint_freq=10", "--keep_checkpoints=2"])
    run_dir = Path(cql.train(config)["run_dir"])
    assert [p.name for p in checkpoint_files(run_dir)] == ["checkpoint_40.pt", "checkpoint_50.pt"]
    assert [p.name for p in run_dir.glob("replay_*.pt")] == ["replay_50.pt"]


@pytest.mark.parametrize("offline, log_freq, message", [
    (40, 20, r"non-finite \w+ \(nan\) in iterations 21\.\.40; last good checkpoint: .*checkpoint_20\.pt"),
    (40, 50, r"non-finite network weights after iteration 40; last good checkpoint: .*checkpoint_20\.pt"),
    (20, 50, r"non-finite action \(\[nan nan nan\]\) from the actor in iteration 26; last good checkpoint: "
             r".*checkpoint_20\.pt"),
], ids=["metrics", "weights", "online action"])
def test_non_finite_stops_with_exit_3_naming_the_last_good_checkpoint(offline, log_freq, message, hopper_hdf5,
                                                                      tmp_path, monkeypatch, capsys):
    poison_critic_at_update(cql, monkeypatch, 25)
    with pytest.raises(SystemExit) as exit_info:
        cql.main(finetune_run_args(hopper_hdf5, tmp_path, offline=offline, online=60 - offline)
                 + [f"--log_freq={log_freq}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not tqdm's
    assert exit_info.value.code == 3 and len(err) == 1 and re.search(message, err[0]), err
    (run_dir,) = tmp_path.iterdir()
    assert [p.name for p in checkpoint_files(run_dir)] == ["checkpoint_20.pt"]
    assert [p.name for p in run_dir.glob("replay_*.pt")] == ["replay_20.pt"]


@pytest.mark.parametrize("offline, log_freq, message", [
    (40, 20, r"non-finite \w+ \(nan\) of seed 3 in iterations 21\.\.40; last good checkpoint: "
             r".*-3-\w+/checkpoint_20\.pt"),
    (40, 50, r"non-finite network weights after iteration 40; last good checkpoint: .*-3-\w+/checkpoint_20\.pt"),
    (20, 50, r"non-finite action \(\[nan nan nan\]\) from the actor of seed 3 in iteration 26; last good "
             r"checkpoint: .*-3-\w+/checkpoint_20\.pt"),
], ids=["metrics", "weights", "online action"])
def test_a_stack_stops_on_non_finite_values_naming_the_seed_and_the_last_good_checkpoint(
        offline, log_freq, message, hopper_hdf5, tmp_path, monkeypatch, capsys):
    poison_critic_at_update(cql, monkeypatch, 25)  # every run's critic
    with pytest.raises(SystemExit) as exit_info:
        cql.main(finetune_run_args(hopper_hdf5, tmp_path, offline=offline, online=60 - offline)
                 + [f"--log_freq={log_freq}", "--seeds=3,4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not tqdm's
    assert exit_info.value.code == 3 and len(err) == 1 and re.search(message, err[0]), err
    for run_dir in tmp_path.iterdir():
        assert [p.name for p in checkpoint_files(run_dir)] == ["checkpoint_20.pt"]


# ------------------------------------------------------------------ bad input: exit 2, one line
@pytest.fixture(scope="module")
def finished_run(hopper_hdf5, tmp_path_factory) -> Path:
    """A short finished run with checkpoints at 10 (offline) and 20 (online), to damage copies of."""
    root = tmp_path_factory.mktemp("finished")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = cql.parse_config(finetune_run_args(hopper_hdf5, root, offline=10, online=10) + ["--checkpoint_freq=10"])
    run_dir = Path(cql.train(config)["run_dir"])
    torch.set_num_threads(threads)
    return run_dir


def _damaged(finished_run: Path, tmp_path: Path, kind: str) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    if kind in ("no replay", "no run state", "torn checkpoint"):  # else --resume passes over to checkpoint_10.pt
        (run_dir / "checkpoint_10.pt").unlink()
    if kind == "no checkpoint":
        for path in run_dir.glob("*.pt"):
            path.unlink()
    elif kind == "no replay":
        (run_dir / "replay_20.pt").unlink()
    elif kind == "no run state":
        state = load_state_file(run_dir / "checkpoint_20.pt")
        write_state_file(run_dir / "checkpoint_20.pt", {**state, "run": None})
    elif kind == "torn checkpoint":
        path = run_dir / "checkpoint_20.pt"
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "torn replay":
        path = run_dir / "replay_20.pt"
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "bad config":
        (run_dir / "config.yaml").write_text("batch_size: many\n")
    return run_dir


BAD_INPUTS = [  # (what, argv after the dataset argument, expected message); {run}: a damaged copy of a run
    ("unknown option", ["--bogus=1"], "unknown option '--bogus'"),
    ("not a number", ["--cql_alpha_online=ten"], "field 'cql_alpha_online' expects a number, got 'ten'"),
    ("not an integer", ["--online_iterations=1.5"], "field 'online_iterations' expects an integer"),
    ("negative online_iterations", ["--online_iterations=-1"], "field 'online_iterations' must be >= 0"),
    ("negative warmup_steps", ["--warmup_steps=-1"], "field 'warmup_steps' must be >= 0"),
    ("checkpoint_freq 0", ["--checkpoint_freq=0"], "field 'checkpoint_freq' must be > 0"),
    ("negative keep_checkpoints", ["--keep_checkpoints=-1"], "field 'keep_checkpoints' must be >= 0"),
    ("max_episode_steps 0", ["--max_episode_steps=0"], "field 'max_episode_steps' must be > 0"),
    ("negative eval_seed", ["--eval_seed=-5"], "field 'eval_seed' must be in \\[0, 4294967295\\], got -5"),
    ("negative seed", ["--seed=-1"], "field 'seed' must be in \\[0, 4294967295\\]"),
    ("log_dir a file", ["--log_dir=/dev/null"], "field 'log_dir': cannot create the run directory /dev/null/"),
    ("ref_min_score >= ref_max_score", ["--ref_min_score=5", "--ref_max_score=-5"],
     "fields 'ref_min_score' \\(5.0\\) >= 'ref_max_score' \\(-5.0\\): the return that scores 0 must be below"),
    ("ref_min_score above the file's ref_max_score", ["--ref_min_score=4000"],
     "hopper-random-tiny.hdf5: fields 'ref_min_score' \\(4000.0\\) >= 'ref_max_score' \\(3234.3\\) "
     "\\(ref_min_score from the config\\)"),
    ("on_nonfinite not stop or skip", ["--on_nonfinite=maybe"],
     "field 'on_nonfinite' must be stop or skip, got 'maybe'"),
    ("dataset larger than buffer_size", ["--buffer_size=10"], "field 'buffer_size' \\(10\\) is smaller than"),
    ("dimension mismatch with the env", ["--eval_env=HalfCheetah-v4"], "observations have 11 dims, the eval env"),
    ("pure online without online iterations", ["--env=Pendulum-v1", "--offline_iterations=0",
                                               "--online_iterations=0"], "pure online mode .* needs online_iter"),
    ("gym id with offline iterations", ["--env=Pendulum-v1"], "set offline_iterations=0 to train online"),
    ("unknown env, pure online", ["--env=NoSuchEnv-v0", "--offline_iterations=0"], "'NoSuchEnv-v0': not a known"),
    ("discrete actions, pure online", ["--env=CartPole-v1", "--offline_iterations=0"],
     "training env: needs a 1-D Box action space"),
    ("eval env with another action bound", ["--env=Pendulum-v1", "--offline_iterations=0",
                                            "--eval_env=MountainCarContinuous-v0"],
     "eval env: action bound 1.0 differs from the training env's 2.0"),
    ("checkpoint missing", ["--load_model=/nonexistent/ck.pt"], "field 'load_model': checkpoint file .* not found"),
    ("checkpoint of another config", ["--load_model={run}/checkpoint_20.pt", "--q_n_hidden_layers=3"],
     "field 'load_model': .*checkpoint_20.pt does not fit this config"),
    ("checkpoint's replay file gone", ["--load_model={run}/checkpoint_20.pt", "#no replay"],
     "field 'load_model': .* needs its replay file .*replay_20.pt, which is gone"),
    ("resume: not a run directory", ["--resume=/nonexistent/run"], "field 'resume': /nonexistent/run is not a run"),
    ("resume: no checkpoint", ["--resume={run}", "#no checkpoint"], "field 'resume': .* has no checkpoint"),
    ("resume: replay file gone", ["--resume={run}", "#no replay"],
     "field 'resume': no good checkpoint .* its replay file replay_20.pt is gone"),
    ("resume: no run state", ["--resume={run}", "#no run state"],
     "field 'resume': no good checkpoint .* holds no run state"),
    ("resume: torn checkpoint", ["--resume={run}", "#torn checkpoint"], "field 'resume': no good checkpoint"),
    ("resume: torn replay file", ["--resume={run}", "#torn replay"], "field 'resume': replay file .* unreadable"),
    ("resume: bad saved config", ["--resume={run}", "#bad config"], "config.yaml: field 'batch_size' expects an"),
    # numbers that parse but overflow int64 or make no sense downstream: upper limits (LIMITS)
    ("batch_size 1e100", ["--batch_size=1e100"], "field 'batch_size' must be at most 1048576, got 1000000000000"),
    ("offline_iterations past int64", [f"--offline_iterations={2**63}"],
     "field 'offline_iterations' must be at most 1000000000000, got 9223372036854775808"),
    ("online_iterations 1e100", ["--online_iterations=1e100"], "field 'online_iterations' must be at most"),
    ("warmup_steps past int64", ["--warmup_steps=1e19"], "field 'warmup_steps' must be at most 1000000000000"),
    ("buffer_size 1e12", ["--buffer_size=1e12"], "field 'buffer_size' must be at most 1000000000, got 1000000000000"),
    ("cql_n_actions past memory", ["--cql_n_actions=1e9"], "field 'cql_n_actions' must be at most 10000"),
    ("n_episodes past int64", ["--n_episodes=1e19"], "field 'n_episodes' must be at most 10000"),
    ("q_n_hidden_layers a million", ["--q_n_hidden_layers=1e6"], "field 'q_n_hidden_layers' must be at most 100"),
    ("eval_freq past int64", [f"--eval_freq={2**64}"], "field 'eval_freq' must be at most 1000000000000"),
    ("max_episode_steps 1e100", ["--max_episode_steps=1e100"], "field 'max_episode_steps' must be at most"),
    ("learning rate above 1", ["--qf_lr=3"], "field 'qf_lr' must be at most 1, got 3.0"),
    ("replay ring too large for memory", ["--env=Ant-v4", "--offline_iterations=0", "--buffer_size=1e9",
                                          "--online_iterations=1e9", "--seeds=8"],  # 8 rings: 1.9 TiB, on any host
     "fields 'seeds' and 'buffer_size': 8 runs need at least 1.9 TiB of cpu memory .* replay rings 8 x 238.4 GiB"),
    # floats that are infinite or past float32 where that means nothing
    ("infinite cql_alpha_online", ["--cql_alpha_online=inf"], "field 'cql_alpha_online' expects a finite number"),
    ("cql_alpha past float32", ["--cql_alpha=1e308"], "field 'cql_alpha' expects a finite number within float32"),
    ("infinite policy_lr", ["--policy_lr=inf"], "field 'policy_lr' expects a finite number"),
    ("infinite reward_bias", ["--reward_bias=-inf"], "field 'reward_bias' expects a finite number"),
    ("infinite ref_max_score", ["--ref_max_score=inf"], "field 'ref_max_score' expects a finite number"),
    ("rewards that overflow float32 once scaled", ["--normalize_reward=true", "--reward_scale=1e38"],
     "fields 'reward_scale' \\(1e\\+38\\) and 'reward_bias' \\(0\\): dataset file .*hopper-random-tiny.hdf5's "
     "rewards overflow float32"),
    # strings with characters that cannot work downstream
    ("name with '/'", ["--name=a/b"], "field 'name' starts the run directory's name .*: no '/', got 'a/b'"),
    ("wandb project with ':'", ["--project=cql:v2"], "field 'project': a wandb project name cannot hold :"),
    ("device meta", ["--device=meta"], "field 'device' must be auto, cpu, cuda or cuda:N, got 'meta'"),
    # output paths that cannot be created
    ("checkpoints_path under /proc", ["--checkpoints_path=/proc/cql-runs"],
     "field 'checkpoints_path': cannot create the run directory /proc/cql-runs/CQL-"),
    ("log_dir under /sys", ["--log_dir=/sys/cql-runs"], "field 'log_dir': cannot create the run directory /sys/cql-r"),
]


@pytest.mark.parametrize("what, argv, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(what, argv, message, hopper_hdf5, finished_run, tmp_path, capsys):
    damage = [a[1:] for a in argv if a.startswith("#")]
    argv = [a for a in argv if not a.startswith("#")]
    if any("{run}" in a for a in argv):
        run_dir = _damaged(finished_run, tmp_path, damage[0] if damage else "")
        argv = [a.replace("{run}", str(run_dir)) for a in argv]
    base = [] if any(a.startswith("--resume") for a in argv) else [
        f"--env={hopper_hdf5}", "--wandb_mode=disabled", f"--log_dir={tmp_path}", "--offline_iterations=1",
        "--online_iterations=1", "--n_episodes=1", "--max_episode_steps=5", "--batch_size=8"]
    with pytest.raises(SystemExit) as exit_info:
        cql.main([*base, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(message, err[0]), err[0]


def test_script_exits_2_with_one_line_on_a_bad_resume(tmp_path):
    result = subprocess.run([sys.executable, FINETUNE_SCRIPT, f"--resume={tmp_path}"], env=CHILD_ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: field 'resume': {tmp_path} is not a run directory (no config.yaml)"


def test_a_removed_field_in_an_older_run_directory_is_accepted_at_its_old_value(tmp_path, capsys):
    """Run directories written before env_workers went hold `env_workers: false` in config.yaml: it parses (and
    is dropped); the field set otherwise, in a file or on the command line, is one line naming it (exit 2)."""
    old = tmp_path / "config.yaml"
    old.write_text("env: Pendulum-v1\noffline_iterations: 0\nonline_iterations: 10\nenv_workers: false\n")
    config = cql.parse_config(["--config_path", str(old)])
    assert config.online_iterations == 10 and not hasattr(config, "env_workers")
    assert cql.parse_config(["--config_path", str(old), "--env_workers=false"]) == config
    on = tmp_path / "on.yaml"
    on.write_text(old.read_text().replace("env_workers: false", "env_workers: true"))
    for argv in (["--config_path", str(on)], ["--config_path", str(old), "--env_workers=true"]):
        with pytest.raises(SystemExit) as stop:
            cql.main(argv)
        assert stop.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert "field 'env_workers' was removed" in line and "only false is accepted" in line, line
