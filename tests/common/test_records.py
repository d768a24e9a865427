"""Records that say what happened: each run directory of a --seeds stack holds the run's own config.yaml
(--config_path of it trains that seed alone) and stack.yaml, the stack it came from, which --resume reads.

* a stack's run directories: config.yaml is the run's config (its seed, no seeds), stack.yaml the stack's
  seeds, seed and run directory names; a checkpoint's config is the run's too;
* --config_path <run dir>/config.yaml trains that seed alone, from the weights that run started from;
* run directories written the old way (config.yaml with the stack's seeds, no stack.yaml) still resume,
  exactly as the new ones do, and are rewritten the new way;
* a damaged stack.yaml is a one-line error.

Records are written and read by algorithms/common (runs.write_run_records, config.parse_config): the old layout's
resume and the damaged records are checked once, through the offline script; each script's stack records its
runs' configs and checkpoints end to end.
"""
import copy
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from conftest import metrics_rows

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as offline_cql
from algorithms.common.runs import load_state_file

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread
MODULES = {"offline": offline_cql, "finetune": finetune_cql}
SEEDS = (4, 9)


def stack_args(script: str, data: Path, checkpoints: Path) -> list:
    """A 2-seed stack of the script (seed 0: the stack's stream) with checkpoints at 20 and 40."""
    common = [f"--env={data}", "--seeds=4,9", "--batch_size=16", "--cql_n_actions=2", "--n_episodes=1",
              "--max_episode_steps=10", "--wandb_mode=disabled", "--device=cpu", "--q_n_hidden_layers=1",
              "--log_freq=10", "--eval_freq=20", f"--checkpoints_path={checkpoints}"]
    if script == "offline":
        return [*common, "--max_timesteps=40"]
    return [*common, "--offline_iterations=20", "--online_iterations=20"]


def longer(script: str) -> list:
    """Overrides that continue a stopped stack_args run for 20 more iterations."""
    return ["--max_timesteps=60"] if script == "offline" else ["--online_iterations=40"]


def by_seed(root: Path) -> dict:
    return {int(d.name.split("-")[-2]): d for d in root.iterdir() if d.is_dir()}


def record_initial_weights(module, monkeypatch) -> list:
    """Each trainer built, as its runs' weights right after it was built (one per run); the last one is the
    trainer of train() (a stack builds one-run trainers inside)."""
    built = []
    init = module.CQL.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        runs = [None] if self.seeds is None else range(len(self.seeds))
        built.append([copy.deepcopy(self.state_dict() if run is None else self.run_state_dict(run)) for run in runs])

    monkeypatch.setattr(module.CQL, "__init__", recording)
    return built


def assert_same_networks(got: dict, want: dict) -> None:
    for part in ("actor", "critic", "target_critic"):
        assert list(got[part]) == list(want[part]), part
        for name in want[part]:
            assert torch.equal(got[part][name], want[part][name]), (part, name)


@pytest.mark.parametrize("script", ["offline", "finetune"])
def test_each_run_of_a_stack_records_its_own_config_and_trains_alone_from_it(script, hopper_hdf5, tmp_path,
                                                                             monkeypatch):
    module = MODULES[script]
    built = record_initial_weights(module, monkeypatch)
    stack_config = module.parse_config(stack_args(script, hopper_hdf5, tmp_path / "stack"))
    module.train(stack_config)
    stack_start = built[-1]
    dirs = by_seed(tmp_path / "stack")
    assert sorted(dirs) == list(SEEDS)
    names = [dirs[seed].name for seed in SEEDS]
    for seed in SEEDS:
        own = module.parse_config(["--config_path", str(dirs[seed] / "config.yaml")])
        assert (own.seed, own.seeds, own.resume) == (seed, None, None)
        assert asdict(own) == {**asdict(stack_config), "seed": seed, "seeds": None}  # all else the stack's
        record = yaml.safe_load((dirs[seed] / "stack.yaml").read_text())
        assert record == {"seeds": "4,9", "seed": 0, "runs": names}
        checkpoint = load_state_file(dirs[seed] / "checkpoint_40.pt")
        assert checkpoint["config"] == asdict(own)  # a one-run checkpoint says which run it is
        assert checkpoint["run"]["stack"] == names

    # --config_path of seed 9's config.yaml: one run of seed 9, from the weights seed 9 started from in the stack.
    summary = module.train(module.parse_config(["--config_path", str(dirs[9] / "config.yaml"),
                                                f"--checkpoints_path={tmp_path / 'alone'}"]))
    assert Path(summary["run_dir"]).name.split("-")[-2] == "9" and "runs" not in summary
    assert len(stack_start) == 2 and len(built[-1]) == 1
    assert_same_networks(built[-1][0], stack_start[1])
    with pytest.raises(AssertionError):  # not seed 4's
        assert_same_networks(built[-1][0], stack_start[0])
    alone = Path(summary["run_dir"])
    assert not (alone / "stack.yaml").exists()
    assert yaml.safe_load((alone / "config.yaml").read_text())["seed"] == 9


def test_old_run_directories_of_a_stack_still_resume_exactly(hopper_hdf5, tmp_path, capsys):
    """Run directories written before stack.yaml (each config.yaml the stack's) resume the whole stack as
    the new layout does, bit for bit, and are rewritten in the new layout."""
    script = "offline"
    module = MODULES[script]
    stack_config = module.parse_config(stack_args(script, hopper_hdf5, tmp_path / "new"))
    module.train(stack_config)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    for run_dir in by_seed(tmp_path / "old").values():  # the layout of before: the stack's config, no record
        (run_dir / "stack.yaml").unlink()
        (run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(stack_config), sort_keys=False))
    for layout in ("new", "old"):
        dirs = by_seed(tmp_path / layout)
        module.main([f"--resume={dirs[9]}", *longer(script)])  # any run dir of the stack resumes them all
        assert "resumed at" in capsys.readouterr().out
    new, old = by_seed(tmp_path / "new"), by_seed(tmp_path / "old")
    for seed in SEEDS:
        want = load_state_file(new[seed] / "checkpoint_60.pt")
        got = load_state_file(old[seed] / "checkpoint_60.pt")
        assert_same_networks(got, want)
        assert torch.equal(got["log_alpha"], want["log_alpha"])
        assert metrics_rows(old[seed]) == metrics_rows(new[seed])
        assert [r["step"] for r in metrics_rows(new[seed])][-1] == 60
        assert got["config"]["seed"] == seed and got["config"]["seeds"] is None
        assert yaml.safe_load((old[seed] / "stack.yaml").read_text()) == {
            "seeds": "4,9", "seed": 0, "runs": [old[s].name for s in SEEDS]}
        assert yaml.safe_load((old[seed] / "config.yaml").read_text())["seeds"] is None


@pytest.mark.parametrize("record, message", [
    ("seeds: '4,9'\nruns: [a, b]\n", "missing key(s) seed"),
    ("seeds: '4,9'\nseed: 0\nruns: [a, b]\nmore: 1\n", "unknown key 'more'"),
    ("- 4\n- 9\n", "expected a mapping of field: value"),
    ("seeds: '4,9'\nseed: zero\nruns: [a, b]\n", "field 'seed' expects an integer, got 'zero'"),
], ids=["missing key", "unknown key", "not a mapping", "bad value"])
def test_a_damaged_stack_record_is_a_one_line_error(record, message, tmp_path, capsys):
    module = offline_cql
    run_dir = tmp_path / "CQL-x-4-00000000"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"seed": 4}))
    (run_dir / "stack.yaml").write_text(record)
    with pytest.raises(SystemExit) as stop:
        module.main([f"--resume={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in err, err
    assert err.startswith(f"error: stack record {run_dir / 'stack.yaml'}: ") and message in err, err
