"""CORL-style result tables and learning curves from local run directories (no wandb account needed).

    python tools/results.py runs/ --csv runs/results.csv --plots runs/plots

A run directory is any folder holding both `config.yaml` (the run's TrainConfig) and `metrics.jsonl`
(one JSON object per line with "step"; a non-finite value is the string "NaN", "Infinity" or "-Infinity",
read back as the float; older files' bare NaN tokens read too), as written by algorithms/offline/cql.py and
algorithms/finetune/cql.py. Runs are grouped by script kind ("finetune" when the config has
online_iterations or a row has offline_iter/online_iter, else "offline") and by dataset (config `env`),
shown under a short name: a dataset file's stem (data/hopper-v4-medium-replay.hdf5 -> hopper-v4-medium-replay),
else the name as given (hopper-medium-v2, mujoco/hopper/medium-v0); two datasets of one short name keep
their full `env`. The CSV's env column has the full `env`.

Numbers, per dataset, over its runs (one run per seed):
  last  = the normalized score at each run's final evaluation, then mean ± std over runs;
  best  = each run's highest normalized score, then mean ± std over runs;
  std   = population std (np.std, ddof=0), as CORL reports it;
  domain average = the mean of the dataset means of that domain (locomotion, antmaze, maze2d, adroit, other).
The score is "eval/d4rl_normalized_score" in a run that logs it (finetune), else "d4rl_normalized_score".
A run's seed is its config's `seed` (each run of a --seeds stack has a config.yaml of its own); in run
directories written before that, whose config.yaml is the whole stack's, the seed in the directory's name
(<name>-<env>-<seed>-<id>). Two runs of one dataset with one seed get a warning (each counts).

Curves: runs of unequal length or with different evaluation steps are aligned on the steps that every
run of the dataset evaluated (the intersection; nothing is interpolated) with `--align common`, the
default; `--align interp` instead interpolates each run linearly onto the union of steps up to the
shortest run's last step.
"""
import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

SCORE_KEYS = ("eval/d4rl_normalized_score", "d4rl_normalized_score")  # first one present in a run wins
DOMAIN_ORDER = ("locomotion", "antmaze", "maze2d", "adroit", "other")
TASK_DOMAINS = {
    **{task: "locomotion" for task in ("halfcheetah", "hopper", "walker2d", "ant")},
    "antmaze": "antmaze", "maze2d": "maze2d", "pointmaze": "maze2d",
    **{task: "adroit" for task in ("pen", "door", "hammer", "relocate")},
}
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}  # metrics.jsonl's strict JSON
CSV_FIELDS = ["kind", "row", "domain", "dataset", "seeds", "datasets", "steps",
              "last_mean", "last_std", "best_mean", "best_std", "env"]


class ResultsError(ValueError):
    """Input that cannot be read; the message is one line naming the file."""


@dataclass
class Run:
    path: Path
    env: str
    seed: Optional[int]
    kind: str  # "offline" or "finetune"
    score_key: str
    steps: np.ndarray  # evaluation steps, increasing
    scores: np.ndarray  # normalized score at each of those steps


@dataclass
class DatasetResult:
    kind: str
    domain: str
    env: str  # as the runs' configs give it
    name: str  # short_name(env), or env where two datasets would share a short name
    runs: List[Run]
    last: np.ndarray  # per run
    best: np.ndarray  # per run


# ======================================================================================
# Reading run directories
# ======================================================================================
def find_run_dirs(roots: Sequence[str]) -> List[Path]:
    """Every folder under roots (roots included) that holds both metrics.jsonl and config.yaml."""
    found = []
    for root in roots:
        if not Path(root).is_dir():
            raise ResultsError(f"{root}: no such directory")
        for folder, _, files in os.walk(root):
            if "metrics.jsonl" in files and "config.yaml" in files:
                found.append(Path(folder))
    if not found:
        raise ResultsError(f"no run directories (a folder with metrics.jsonl and config.yaml) under {', '.join(roots)}")
    return sorted(found)


def read_config(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ResultsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ResultsError(f"{path}: expected a mapping of field: value, got {type(config).__name__}")
    if not isinstance(config.get("env"), str) or not config["env"]:
        raise ResultsError(f"{path}: no 'env' key (the dataset name), got {config.get('env')!r}")
    return config


def read_metrics(path: Path) -> List[dict]:
    """The rows of a metrics.jsonl; an unfinished last line (no newline: run still writing) is skipped."""
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # the last piece has no newline after it: being written right now
                print(f"warning: {path}:{number}: skipped an unfinished last line", file=sys.stderr)
                continue
            raise ResultsError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ResultsError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        row = {k: NON_FINITE.get(v, v) if isinstance(v, str) and k != "step" else v for k, v in row.items()}
        step = row.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            raise ResultsError(f"{path}:{number}: expected a numeric 'step', got {step!r}")
        for key in SCORE_KEYS:
            if key in row and (not isinstance(row[key], (int, float)) or isinstance(row[key], bool)):
                raise ResultsError(f"{path}:{number}: expected a number for '{key}', got {row[key]!r}")
        rows.append(row)
    return rows


def read_run(folder: Path) -> Optional[Run]:
    """One run, or None (with a warning) when it has no normalized score yet."""
    config = read_config(folder / "config.yaml")
    rows = read_metrics(folder / "metrics.jsonl")
    finetune = "online_iterations" in config or any("online_iter" in r or "offline_iter" in r for r in rows)
    score_key = next((k for k in SCORE_KEYS if any(k in r for r in rows)), None)
    if score_key is None:
        print(f"warning: {folder}: skipped, no {' or '.join(SCORE_KEYS)} rows yet", file=sys.stderr)
        return None
    points = sorted({int(r["step"]): float(r[score_key]) for r in rows if score_key in r}.items())
    steps, scores = (np.array(column) for column in zip(*points))
    return Run(folder, config["env"], run_seed(folder, config), "finetune" if finetune else "offline",
               score_key, steps, scores)


def run_seed(folder: Path, config: dict) -> Optional[int]:
    """The run's own seed: its config's `seed`, unless the config is a whole --seeds stack's (run directories
    written before each run of a stack had its own config.yaml): then the seed in the directory's name
    <name>-<env>-<seed>-<id>, or None (with a warning) where the name has none."""
    if config.get("seeds") is None:
        return config.get("seed")
    parts = folder.name.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return int(parts[1])
    print(f"warning: {folder}: a run of a --seeds stack ({config['seeds']}) whose directory name gives no seed; "
          f"not counted in the check for repeated seeds", file=sys.stderr)
    return None


def short_name(env: str) -> str:
    """A dataset's name in tables and plots: a file's stem (a path says little), else env as given."""
    return Path(env).stem if env.endswith((".hdf5", ".h5")) else env


def domain_of(env: str) -> str:
    """Task family: hopper-medium-v2 -> locomotion, D4RL/antmaze/umaze-v1 -> antmaze, x.hdf5 by its stem."""
    if env.endswith((".hdf5", ".h5")):
        name = Path(env).stem
    elif "/" in env:
        name = env.split("/")[-2]  # Minari: namespace/dataset/version
    else:
        name = env
    return TASK_DOMAINS.get(name.split("-")[0].lower(), "other")


# ======================================================================================
# Tables
# ======================================================================================
def summarize(runs: List[Run]) -> List[DatasetResult]:
    """Runs grouped by (kind, env), in kind, domain, dataset order."""
    groups: Dict[Tuple[str, str], List[Run]] = {}
    for run in runs:
        groups.setdefault((run.kind, run.env), []).append(run)
    envs_of_name: Dict[Tuple[str, str], set] = {}
    for kind, env in groups:
        envs_of_name.setdefault((kind, short_name(env)), set()).add(env)
    results = []
    for (kind, env), members in groups.items():
        seeds = [r.seed for r in members]
        repeated = sorted({s for s in seeds if s is not None and seeds.count(s) > 1})
        if repeated:
            print(f"warning: {kind} {env}: seed(s) {repeated} appear in more than one run; each run counts",
                  file=sys.stderr)
        name = short_name(env) if len(envs_of_name[kind, short_name(env)]) == 1 else env
        results.append(DatasetResult(kind, domain_of(env), env, name, members,
                                     last=np.array([r.scores[-1] for r in members]),
                                     best=np.array([r.scores.max() for r in members])))
    return sorted(results, key=lambda d: (d.kind != "offline", DOMAIN_ORDER.index(d.domain), d.name))


def table_rows(results: List[DatasetResult]) -> List[dict]:
    """CSV_FIELDS rows: each dataset, then after each (kind, domain) its average row."""
    rows = []
    for i, d in enumerate(results):
        ends = sorted({int(r.steps[-1]) for r in d.runs})
        rows.append(dict(kind=d.kind, row="dataset", domain=d.domain, dataset=d.name, seeds=len(d.runs), datasets=1,
                         steps=str(ends[0]) if len(ends) == 1 else f"{ends[0]}-{ends[-1]}",
                         last_mean=float(d.last.mean()), last_std=float(d.last.std()),
                         best_mean=float(d.best.mean()), best_std=float(d.best.std()), env=d.env))
        following = results[i + 1] if i + 1 < len(results) else None
        if following is None or (following.kind, following.domain) != (d.kind, d.domain):
            same = [e for e in results if (e.kind, e.domain) == (d.kind, d.domain)]
            rows.append(dict(kind=d.kind, row="domain_average", domain=d.domain, dataset=f"{d.domain} average",
                             seeds="", datasets=len(same), steps="",
                             last_mean=float(np.mean([e.last.mean() for e in same])), last_std="",
                             best_mean=float(np.mean([e.best.mean() for e in same])), best_std="", env=""))
    return rows


def to_markdown(rows: List[dict]) -> str:
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        out += [f"## CQL {kind}", "",
                "| Dataset | Domain | Last | Best | Seeds | Steps |", "|---|---|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["kind"] == kind):
            if r["row"] == "dataset":
                out.append(f"| {r['dataset']} | {r['domain']} | {r['last_mean']:.1f} ± {r['last_std']:.1f} | "
                           f"{r['best_mean']:.1f} ± {r['best_std']:.1f} | {r['seeds']} | {r['steps']} |")
            else:
                out.append(f"| **{r['dataset']}** | | **{r['last_mean']:.1f}** | **{r['best_mean']:.1f}** | "
                           f"{r['datasets']} dataset{'s' if r['datasets'] != 1 else ''} | |")
        out.append("")
    out.append("Last: score at each run's final evaluation; best: each run's highest score; mean ± population "
               "std (np.std, ddof=0) over seeds. Averages: mean of the dataset means.")
    return "\n".join(out) + "\n"


def write_atomic(path: Path, write: Callable[[io.IOBase], None], mode: str = "w") -> None:
    """Writes through a temporary file in the same folder, then renames: a reader sees old or new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_csv(rows: List[dict], path: Path) -> None:
    def write(f: io.IOBase) -> None:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)

    write_atomic(path, write)


# ======================================================================================
# Curves
# ======================================================================================
def align(runs: List[Run], how: str) -> Tuple[np.ndarray, np.ndarray]:
    """(steps, scores[run, step]) on steps shared by all runs ("common") or interpolated ("interp")."""
    if how == "common":
        steps = np.array(sorted(set.intersection(*(set(r.steps.tolist()) for r in runs))), dtype=int)
        return steps, np.stack([r.scores[np.searchsorted(r.steps, steps)] for r in runs])
    end = min(r.steps[-1] for r in runs)
    steps = np.unique(np.concatenate([r.steps[r.steps <= end] for r in runs])).astype(float)
    return steps, np.stack([np.interp(steps, r.steps, r.scores) for r in runs])


def draw_curve(ax, d: DatasetResult, how: str, spread: str, title: str, fontsize: float = 9) -> None:
    steps, scores = align(d.runs, how)
    mean = scores.mean(0)
    low, high = (scores.min(0), scores.max(0)) if spread == "minmax" else (mean - scores.std(0), mean + scores.std(0))
    ax.plot(steps, mean, lw=1.5, label=f"mean of {len(d.runs)} seeds")
    ax.fill_between(steps, low, high, alpha=0.25, label="min..max" if spread == "minmax" else "± std")
    ax.set_title(title, fontsize=fontsize)
    ax.set_xlabel("update step")
    ax.set_ylabel("normalized score")
    ax.grid(alpha=0.3)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)


GRID_TITLE_CHARS = 34  # a grid panel's title lines wrap at this many characters (8 pt on a 4-inch panel)


def grid_title(d: DatasetResult) -> str:
    """The dataset's name, wrapped (at '/' or '-' where it can), over a line with kind and seed count."""
    name = textwrap.fill(d.name.replace("/", "/ ").replace("-", "- "), GRID_TITLE_CHARS,
                         break_long_words=True).replace("/ ", "/").replace("- ", "-")
    return f"{name}\n{d.kind}, {len(d.runs)} seed{'s' if len(d.runs) != 1 else ''}"


def grid_figure(results: List[DatasetResult], how: str, spread: str):
    """All learning curves in panels of 4 columns, each titled by grid_title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, d in zip(axes.flat, results):
        draw_curve(ax, d, how, spread, grid_title(d), fontsize=8)
    for ax in axes.flat[len(results):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def write_plots(results: List[DatasetResult], folder: Path, how: str, spread: str) -> List[Path]:
    """One PNG per dataset (<kind>-<dataset>.png) and grid.png with all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for d in results:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw_curve(ax, d, how, spread, f"CQL {d.kind}: {d.name}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"{d.kind}-{d.name.replace('/', '_')}.png"
        save_figure(fig, path)
        written.append(path)
    save_figure(grid_figure(results, how, spread), folder / "grid.png")
    return written + [folder / "grid.png"]


# ======================================================================================
# Command line
# ======================================================================================
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/results.py", description=__doc__.split("\n\n")[0],
        epilog="Std is the population std (np.std), as in CORL. Exit code 2 on unreadable input.")
    parser.add_argument("roots", nargs="*", default=["runs"], help="folders searched recursively for run dirs "
                        "(default: runs)")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV to this file")
    parser.add_argument("--plots", type=Path, help="write learning curves (one PNG per dataset + grid.png) here")
    parser.add_argument("--align", choices=["common", "interp"], default="common",
                        help="curves on the steps every run evaluated (common) or interpolated (interp)")
    parser.add_argument("--spread", choices=["std", "minmax"], default="std",
                        help="shaded band around the mean: ± population std or min..max over seeds")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        runs = [run for folder in find_run_dirs(args.roots) if (run := read_run(folder)) is not None]
        if not runs:
            raise ResultsError(f"no run under {', '.join(args.roots)} has a normalized score yet")
        results = summarize(runs)
        rows = table_rows(results)
        print(to_markdown(rows), end="")
        if args.csv:
            write_csv(rows, args.csv)
            print(f"wrote {args.csv}", file=sys.stderr)
        if args.plots:
            paths = write_plots(results, args.plots, args.align, args.spread)
            print(f"wrote {len(paths)} plots to {args.plots}", file=sys.stderr)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
