"""tools/make_dataset.py (GitHub issue 5): every dataset kind on a tiny budget, the offline script
training on its output, resume, Minari output, and the shipped quickstart file and config."""
import errno
import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import refuse_temporary_files

import algorithms.offline.cql as offline_cql
import tools.make_dataset as md
from algorithms.common.runs import load_state_file

ROOT = Path(__file__).resolve().parents[2]
# A tiny budget on InvertedPendulum-v4 with a 20-step limit: episodes end both by termination and by timeout.
TINY = ["--env", "InvertedPendulum-v4", "--max_episode_steps", "20", "--seed", "3", "--warmup_steps", "100",
        "--snapshot_freq", "100", "--eval_episodes", "1", "--n_transitions", "120", "--batch_size", "32"]
QUICKSTART_FILE = ROOT / "data" / "hopper-v4-medium-replay.hdf5"
QUICKSTART_SHA256 = "47e3a0459385889263f52b07cbca1b42f3e67b992f9d3f05e495a66d35278ada"
QUICKSTART_CONFIG = ROOT / "configs" / "offline" / "cql" / "quickstart.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def _read(path: Path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in md.COLUMNS}, dict(f.attrs)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """All six kinds from one 300-step learner."""
    tmp = tmp_path_factory.mktemp("made")
    config = md.parse_args([*TINY, "--train_steps", "300", "--work_dir", str(tmp / "work"), "--out_dir",
                            str(tmp / "out"), "--compression", "4"])
    rows = md.make_datasets(config)
    return config, {r["kind"]: r for r in rows}, tmp


def test_every_kind_has_d4rl_layout_flags_and_metadata(made):
    config, rows, tmp = made
    assert list(rows) == list(md.KINDS)
    snapshots = json.loads((tmp / "work" / "snapshots.json").read_text())
    assert [s["step"] for s in snapshots] == [0, 100, 200, 300]
    files = {kind: _read(Path(r["path"])) for kind, r in rows.items()}
    medium_step = files["medium"][1]["policy_step"]
    assert medium_step in (100, 200)  # a trained snapshot, not the initial or the final one
    expected_rows = {"random": 120, "medium": 120, "expert": 120, "medium-expert": 240,
                     "medium-replay": medium_step, "full-replay": 300}
    for kind, (data, attrs) in files.items():
        n = expected_rows[kind]
        assert data["observations"].shape == data["next_observations"].shape == (n, 4), kind
        assert data["actions"].shape == (n, 1) and data["rewards"].shape == data["terminals"].shape == (n,)
        for key in ("observations", "actions", "rewards", "next_observations"):
            assert data[key].dtype == np.float32
        assert data["terminals"].dtype == data["timeouts"].dtype == bool
        assert np.abs(data["actions"]).max() <= 3.0  # InvertedPendulum's action bound
        ends = data["terminals"] | data["timeouts"]
        assert ends[-1] and not (data["terminals"] & data["timeouts"]).any()
        # inside an episode, s' is the next row's s; an episode is at most 20 steps long
        inside = np.flatnonzero(~ends[:-1])
        np.testing.assert_array_equal(data["next_observations"][inside], data["observations"][inside + 1])
        assert np.diff(np.flatnonzero(np.concatenate([[True], ends]))).max() <= 20
        assert data["terminals"].any()  # the pole falls at some point in every kind
        assert attrs["env_id"] == "InvertedPendulum-v4" and attrs["time_limit"] == attrs["max_episode_steps"] == 20
        assert attrs["kind"] == kind and attrs["seed"] == 3 and attrs["train_steps"] == 300
        returns = md.episode_returns(data)
        assert attrs["n_episodes"] == len(returns)
        assert attrs["behaviour_return"] == pytest.approx(np.mean(returns))
        assert attrs["ref_min_score"] == pytest.approx(files["random"][1]["behaviour_return"])
        assert attrs["ref_max_score"] == pytest.approx(files["expert"][1]["behaviour_return"])
    assert files["random"][1]["policy_step"] == 0 and files["expert"][1]["policy_step"] == 300
    assert list(files["medium-expert"][1]["policy_step"]) == [medium_step, 300]
    # random rollouts: InvertedPendulum rewards are 1 per step, so a return is an episode length
    assert set(files["random"][0]["rewards"].tolist()) == {1.0}
    for key in md.COLUMNS:  # medium-expert is medium then expert
        np.testing.assert_array_equal(files["medium-expert"][0][key],
                                      np.concatenate([files["medium"][0][key], files["expert"][0][key]]))


def test_replay_kinds_are_the_learners_stream_in_order(made):
    config, rows, tmp = made
    stream = md.load_stream(tmp / "work", 300)
    full, _ = _read(Path(rows["full-replay"]["path"]))
    replay, attrs = _read(Path(rows["medium-replay"]["path"]))
    n = attrs["policy_step"]
    for key in md.COLUMNS:
        np.testing.assert_array_equal(full[key][:-1], stream[key][:-1])
        np.testing.assert_array_equal(replay[key][:-1], full[key][: n - 1])  # a prefix ...
    for key in ("observations", "actions", "rewards", "next_observations", "terminals"):
        np.testing.assert_array_equal(replay[key], full[key][:n])
    # ... whose last row ends an episode: a timeout where the cut fell inside one
    assert replay["timeouts"][-1] == (full["timeouts"][n - 1] or not full["terminals"][n - 1])
    # the first warmup_steps actions are uniform random (spread over the box), later ones the policy's
    assert np.abs(full["actions"][:100]).max() > 2.0


def test_offline_script_trains_on_every_kind(made, tmp_path):
    config, rows, tmp = made
    for kind in ("medium-replay", "medium-expert"):
        run = offline_cql.parse_config(["--env", rows[kind]["path"], "--max_timesteps=4", "--batch_size=16",
                                        "--cql_n_actions=2", "--n_episodes=1", "--eval_freq=4", "--log_freq=2",
                                        "--wandb_mode=disabled", f"--log_dir={tmp_path}", "--device=cpu",
                                        "--max_episode_steps=20"])  # see test_offline_script_reads_the_time_limit
        summary = offline_cql.train(run)
        assert summary["updates"] == 4 and np.isfinite(summary["last_score"])
        data = offline_cql.load_dataset(run)
        assert data.ref_max_score == pytest.approx(_read(Path(rows["expert"]["path"]))[1]["behaviour_return"])


def test_offline_script_reads_the_time_limit(made):
    config, rows, tmp = made
    run = offline_cql.parse_config(["--env", rows["medium"]["path"], "--wandb_mode=disabled"])
    env = offline_cql.load_dataset(run).make_env()
    assert env.spec.max_episode_steps == 20


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(made, tmp_path, capsys):
    config, rows, tmp = made
    work = tmp_path / "work"
    first = md.parse_args([*TINY, "--train_steps", "150", "--work_dir", str(work), "--out_dir", str(tmp_path / "a"),
                           "--kinds", "full-replay"])
    md.make_datasets(first)
    checkpoint = md.learner_checkpoint(work)  # the finetune script's checkpoint of the learner's run
    assert checkpoint.name == "checkpoint_150.pt"
    assert load_state_file(checkpoint)["progress"]["iteration"] == 150
    stream_150 = md.load_stream(work, 150)
    capsys.readouterr()
    second = md.parse_args([*TINY, "--train_steps", "300", "--work_dir", str(work), "--out_dir", str(tmp_path / "b"),
                            "--kinds", "full-replay"])
    md.make_datasets(second)
    assert "from step 150" in capsys.readouterr().out
    assert sorted(p.name for p in (work / "stream").glob("*.npz")) == ["0_100.npz", "100_150.npz", "150_200.npz",
                                                                        "200_300.npz"]
    resumed, straight = md.load_stream(work, 300), md.load_stream(tmp / "work", 300)
    for key in md.COLUMNS:  # the same transitions as the run that was never stopped, and the saved ones kept
        np.testing.assert_array_equal(resumed[key], straight[key])
        np.testing.assert_array_equal(resumed[key][:150], stream_150[key])
    for name, value in torch.load(work / "snapshots" / "actor_300.pt").items():
        torch.testing.assert_close(value, torch.load(tmp / "work" / "snapshots" / "actor_300.pt")[name],
                                   rtol=0, atol=0)
    # a finished work dir does not train again; one made with other learner options is refused
    md.make_datasets(second)
    assert "continuing" not in capsys.readouterr().out
    with pytest.raises(md.MakeError, match="policy_lr"):
        md.make_datasets(md.parse_args([*TINY, "--train_steps", "300", "--work_dir", str(work), "--policy_lr", "1e-3"]))
    with pytest.raises(md.MakeError, match="already trained 300 steps"):
        md.make_datasets(md.parse_args([*TINY, "--train_steps", "200", "--work_dir", str(work)]))


def test_a_learner_stopped_between_a_snapshot_and_its_checkpoint_continues_to_the_same_stream(made, tmp_path,
                                                                                               monkeypatch):
    """The stream chunk and snapshot of step 200 are written, the learner's checkpoint of 200 is not (a kill
    there): the next run continues from the checkpoint of 100 and makes them again, the same."""
    config, rows, tmp = made
    work = tmp_path / "work"
    argv = [*TINY, "--train_steps", "300", "--work_dir", str(work), "--out_dir", str(tmp_path),
            "--kinds", "full-replay"]
    save = md.finetune.save_checkpoints

    def killed_at_200(runs, step, *args, **kwargs):
        if step == 200:
            raise KeyboardInterrupt
        return save(runs, step, *args, **kwargs)

    monkeypatch.setattr(md.finetune, "save_checkpoints", killed_at_200)
    with pytest.raises(KeyboardInterrupt):
        md.make_datasets(md.parse_args(argv))
    assert (work / "stream" / "100_200.npz").is_file() and md.learner_checkpoint(work).name == "checkpoint_100.pt"
    assert [s["step"] for s in md.read_snapshots(work)] == [0, 100, 200]
    monkeypatch.setattr(md.finetune, "save_checkpoints", save)
    md.make_datasets(md.parse_args(argv))
    assert [s["step"] for s in md.read_snapshots(work)] == [0, 100, 200, 300]
    resumed, straight = md.load_stream(work, 300), md.load_stream(tmp / "work", 300)
    for key in md.COLUMNS:
        np.testing.assert_array_equal(resumed[key], straight[key])


def test_minari_dataset_from_arrays(made, tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    config, rows, tmp = made
    data, attrs = _read(Path(rows["medium-expert"]["path"]))
    md.write_minari("test/invertedpendulum/medium-expert-v0", data, config, attrs["ref_min_score"],
                    attrs["ref_max_score"], "test")
    dataset = minari.load_dataset("test/invertedpendulum/medium-expert-v0")
    episodes = list(dataset.iterate_episodes())
    assert len(episodes) == attrs["n_episodes"] + int(not (data["terminals"] | data["timeouts"])[-1])
    np.testing.assert_array_equal(np.concatenate([e.actions for e in episodes]), data["actions"])
    np.testing.assert_array_equal(np.concatenate([e.terminations for e in episodes]), data["terminals"])
    np.testing.assert_array_equal(np.concatenate([e.observations[:-1] for e in episodes]), data["observations"])
    assert dataset.storage.metadata["ref_max_score"] == pytest.approx(attrs["ref_max_score"])


def test_a_failed_write_stops_with_exit_3_in_one_line(tmp_path, monkeypatch, capsys):
    """A full disk while the tool writes its learner's actor snapshots: one line naming the file, exit 3."""
    refuse_temporary_files(monkeypatch, ".actor_", errno.ENOSPC)
    with pytest.raises(SystemExit) as exit_info:
        md.main([*TINY, "--train_steps", "50", "--work_dir", str(tmp_path / "work"), "--out_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 3 and len(err) == 1, err
    # (the learner's progress bar, which has no newline of its own, stands before it on that line)
    assert re.search(r"error: disk full writing \S+/snapshots/actor_\d+\.pt \(No space left on device\); no checkpoint",
                     err[0]), err[0]


def test_medium_is_the_first_trained_snapshot_reaching_a_third_of_the_way():
    snapshots = [{"step": 100 * i, "eval_return_mean": r} for i, r in enumerate([10, 35, 60, 20, 80, 100])]
    assert md.pick_medium(snapshots, None) == (snapshots[2], 40.0)  # 10 + (100 - 10) / 3
    assert md.pick_medium(snapshots, 30.0)[0] is snapshots[1]
    assert md.pick_medium(snapshots, 500.0)[0] is snapshots[4]  # none reaches it: the nearest, not the final
    assert md.pick_medium(snapshots[:2], None)[0] is snapshots[1]  # only the final one is trained


def test_bad_options_name_the_option():
    with pytest.raises(md.MakeError, match="option 'kinds'"):
        md.parse_args(["--kinds", "medium,nearly-expert"])
    with pytest.raises(md.MakeError, match="option 'env'"):
        md.parse_args(["--env", "NoSuchEnv-v9"])
    with pytest.raises(md.MakeError, match="unknown option '--steps'"):
        md.parse_args(["--steps", "5"])
    with pytest.raises(md.MakeError, match="'train_steps'"):
        md.parse_args(["--train_steps", "0"])


BAD_OPTIONS = [  # (argv, message): numbers past their limits or int64, infinite floats, a key twice in a file
    (["--train_steps=1e100"], "option 'train_steps' must be at most 1000000000000, got 1000000000000"),
    ([f"--n_transitions={2**63}"], "option 'n_transitions' must be at most 1000000000, got 9223372036854775808"),
    (["--eval_episodes=1e9"], "option 'eval_episodes' must be at most 10000"),
    (["--threads=1e6"], "option 'threads' must be at most 4096"),
    (["--seed=-1"], "option 'seed' must be >= 0, got -1"),
    (["--seed=1e19"], "option 'seed' must be at most 4294967295"),
    (["--max_episode_steps=-5"], "option 'max_episode_steps' must be >= 1, got -5"),
    (["--discount=5"], "option 'discount' must be in \\[0, 1\\], got 5.0"),
    (["--qf_lr=2"], "option 'qf_lr' must be in \\(0, 1\\], got 2.0"),
    (["--policy_lr=inf"], "field 'policy_lr' expects a finite number within float32's range"),
    (["--target_return=-1e300"], "field 'target_return' expects a finite number within float32's range"),
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[a[0] for a, _ in BAD_OPTIONS])
def test_hostile_options_name_the_option_in_one_line(argv, message):
    with pytest.raises(md.MakeError, match=message) as error:
        md.parse_args(argv)
    assert "\n" not in str(error.value)


def test_config_file_with_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "make.yaml"
    path.write_text("env: Pendulum-v1\ntrain_steps: 300\ntrain_steps: 400\n")
    with pytest.raises(md.MakeError, match=f"config file {path}: key 'train_steps' given twice \\(lines 2 and 3\\)"):
        md.parse_args(["--config_path", str(path)])


def test_config_file_options_and_command_line_overrides(tmp_path):
    path = tmp_path / "make.yaml"
    path.write_text("env: Pendulum-v1\ntrain_steps: 300\nkinds: random,expert\n")
    config = md.parse_args(["--config_path", str(path), "--train_steps=400"])
    assert (config.env, config.train_steps, config.kinds) == ("Pendulum-v1", 400, "random,expert")
    path.write_text("steps: 5\n")
    with pytest.raises(md.MakeError, match=f"config file {path}: unknown key 'steps'"):
        md.parse_args(["--config_path", str(path)])
    path.write_text("train_steps: many\n")
    with pytest.raises(md.MakeError, match="field 'train_steps' expects an integer"):
        md.parse_args(["--config_path", str(path)])


# ------------------------------------------------------------------ the shipped quickstart
def test_shipped_quickstart_file_is_the_recorded_one():
    digest = hashlib.sha256(QUICKSTART_FILE.read_bytes()).hexdigest()
    assert digest == QUICKSTART_SHA256, f"{QUICKSTART_FILE} changed: sha256 {digest}"
    data, attrs = _read(QUICKSTART_FILE)
    n = len(data["rewards"])
    assert data["observations"].shape == data["next_observations"].shape == (n, 11)
    assert data["actions"].shape == (n, 3) and n == attrs["policy_step"]
    assert attrs["env_id"] == "Hopper-v4" and attrs["kind"] == "medium-replay"
    assert attrs["ref_max_score"] > attrs["behaviour_return"] > attrs["ref_min_score"]


def test_quickstart_config_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names the file relative to the repository root
    config = offline_cql.parse_config(["--config_path", str(QUICKSTART_CONFIG), "--max_timesteps=50",
                                       "--eval_freq=50", "--n_episodes=1", "--wandb_mode=disabled",
                                       f"--log_dir={tmp_path}"])
    assert Path(config.env).resolve() == QUICKSTART_FILE.resolve()
    summary = offline_cql.train(config)
    assert summary["updates"] == 50 and np.isfinite(summary["last_score"])
