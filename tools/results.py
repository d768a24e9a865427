"""CORL-style result tables and learning curves from local run directories (no wandb account needed).

    python tools/results.py runs/ --csv runs/results.csv --plots runs/plots

A run directory is any folder holding both `config.yaml` (the run's TrainConfig) and `metrics.jsonl`
(one JSON object per line with "step"; a non-finite value is the string "NaN", "Infinity" or "-Infinity",
read back as the float; older files' bare NaN tokens read too), as written by algorithms/offline/cql.py and
algorithms/finetune/cql.py. Runs are grouped into experiments: by script kind ("finetune" when the config
has online_iterations or a row has offline_iter/online_iter, else "offline"), by dataset (config `env`)
and by every config field that changes what a run computes, its length (max_timesteps, offline_iterations,
online_iterations) included: all but seed and the bookkeeping fields (BOOKKEEPING_FIELDS: paths, names,
logging, evaluation and checkpoint cadence, device, compile, wandb, resume, load_model). A field missing
from an older run's config.yaml counts as the script's default. A dataset run as several experiments gets
a row each, named by the fields that tell them apart (hopper-medium-v2 (max_timesteps=3000)); its domain
average takes the experiment with the most seeds (then the longest). The dataset's short name: a file's
stem (data/hopper-v4-medium-replay.hdf5 -> hopper-v4-medium-replay), else the name as given
(hopper-medium-v2, mujoco/hopper/medium-v0); two datasets of one short name keep their full `env`. The
CSV's env column has the full `env`, its variant column the fields that tell experiments apart.

Numbers, per experiment, over its runs (one run per distinct seed):
  last  = the normalized score at each run's final evaluation, then mean ± std over runs;
  best  = each run's highest normalized score, then mean ± std over runs;
  std   = population std (np.std, ddof=0), as CORL reports it;
  domain average = the mean of the dataset means of that domain (locomotion, antmaze, maze2d, adroit, other).
The score is "eval/d4rl_normalized_score" in a run that logs it (finetune), else "d4rl_normalized_score".
A run's seed is its config's `seed` (each run of a --seeds stack has a config.yaml of its own); in run
directories written before that, whose config.yaml is the whole stack's, the seed in the directory's name
(<name>-<env>-<seed>-<id>). Of several runs of one experiment with one seed the newest (the latest
config.yaml) counts and the others are left out; a note on stderr names them, and the runs pooled into a
row that differ in bookkeeping fields.

Curves, a marker at each evaluation: runs of unequal length or with different evaluation steps are aligned
on the steps that every run of the experiment evaluated (the intersection; nothing is interpolated) with
`--align common`, the default (where they share no step, as `--align interp`, with a note); `--align interp`
instead interpolates each run linearly onto the union of steps up to the shortest run's last step.
"""
import argparse
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

if __package__ in (None, ""):  # run as a script: make `algorithms` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from algorithms.common.help import config_fields  # noqa: E402  (torch-free: the scripts' config defaults)

REPO = Path(__file__).resolve().parents[1]

SCORE_KEYS = ("eval/d4rl_normalized_score", "d4rl_normalized_score")  # first one present in a run wins
DOMAIN_ORDER = ("locomotion", "antmaze", "maze2d", "adroit", "other")
TASK_DOMAINS = {
    **{task: "locomotion" for task in ("halfcheetah", "hopper", "walker2d", "ant")},
    "antmaze": "antmaze", "maze2d": "maze2d", "pointmaze": "maze2d",
    **{task: "adroit" for task in ("pen", "door", "hammer", "relocate")},
}
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}  # metrics.jsonl's strict JSON
CSV_FIELDS = ["kind", "row", "domain", "dataset", "variant", "seeds", "datasets", "steps",
              "last_mean", "last_std", "best_mean", "best_std", "env"]
# Config fields that change only a run's bookkeeping, not what it computes: runs that differ in these (and in
# seed) alone are one experiment. Every other field splits experiments.
BOOKKEEPING_FIELDS = frozenset({
    "seed", "seeds", "eval_seed",  # which run of the experiment
    "checkpoints_path", "log_dir", "dataset_path", "name", "project", "group", "wandb_mode",  # paths, names, wandb
    "eval_freq", "log_freq", "checkpoint_freq", "keep_checkpoints", "background_eval",  # cadence, where evals run
    "device", "compile", "cudagraphs", "tf32",  # where and how fast the same math runs
    "resume", "load_model", "minari_download", "env_errors_in_a_row",  # continuing, downloading, giving up
})


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
    config: Dict[str, Any] = field(default_factory=dict)  # config.yaml as read
    started: float = 0.0  # config.yaml's modification time: of two runs of one seed the later counts


@dataclass
class DatasetResult:
    kind: str
    domain: str
    env: str  # as the runs' configs give it
    name: str  # short_name(env), or env where two datasets would share a short name
    runs: List[Run]  # one per distinct seed (runs of an unknown seed each count)
    last: np.ndarray  # per run
    best: np.ndarray  # per run
    variant: str = ""  # the fields that tell this experiment from the dataset's others: "max_timesteps=3000"
    in_average: bool = True  # the dataset's experiment that its domain average takes

    @property
    def label(self) -> str:
        return f"{self.name} ({self.variant})" if self.variant else self.name


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


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
               score_key, steps, scores, config, (folder / "config.yaml").stat().st_mtime)


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
# Experiments and tables
# ======================================================================================
@lru_cache(maxsize=None)
def script_defaults(kind: str) -> Dict[str, Any]:
    """The TrainConfig defaults of algorithms/<kind>/cql.py, read from its source (no torch); {} if absent."""
    path = REPO / "algorithms" / kind / "cql.py"
    if not path.is_file():
        return {}
    return {name: default for name, _, default, _ in config_fields(path.read_text(), "TrainConfig")[1]}


def experiment_fields(run: Run) -> Dict[str, Any]:
    """The config fields that make a run's experiment: all but BOOKKEEPING_FIELDS, a field missing from its
    config.yaml at the script's default; fields the script no longer has are ignored."""
    defaults = script_defaults(run.kind) or {k: None for k in run.config}
    return {k: run.config.get(k, default) for k, default in defaults.items()
            if k not in BOOKKEEPING_FIELDS and k != "env"}


def newest_run_per_seed(kind: str, label: str, members: List[Run]) -> List[Run]:
    """One run per seed, the newest; a note names the runs left out. Runs of an unknown seed each count."""
    by_seed: Dict[int, List[Run]] = {}
    for run in members:
        if run.seed is not None:
            by_seed.setdefault(run.seed, []).append(run)
    repeated = {seed: sorted(runs, key=lambda r: (r.started, str(r.path))) for seed, runs in by_seed.items()
                if len(runs) > 1}
    if repeated:
        older = [r for runs in repeated.values() for r in runs[:-1]]
        counts = ", ".join(f"seed {seed}: {len(runs)} runs" for seed, runs in sorted(repeated.items()))
        print(f"note: {kind} {label}: {counts}; the newest run of each seed counts, {plural(len(older), 'older run')} "
              f"left out: {', '.join(str(r.path) for r in older)}", file=sys.stderr)
    left_out = {id(r) for runs in repeated.values() for r in runs[:-1]}
    return [r for r in members if id(r) not in left_out]


def note_pooled(kind: str, label: str, members: List[Run]) -> None:
    """A note when a row pools runs whose configs differ in bookkeeping fields (beyond which seed they are)."""
    differ = sorted(k for k in BOOKKEEPING_FIELDS - {"seed", "seeds", "eval_seed", "resume"}
                    if len({repr(r.config.get(k)) for r in members}) > 1)
    if differ:
        print(f"note: {kind} {label}: pooled {plural(len(members), 'run')} that differ only in bookkeeping "
              f"({', '.join(differ)})", file=sys.stderr)


def variant_labels(keys: List[Tuple[Tuple[str, Any], ...]]) -> List[str]:
    """For the experiments of one dataset (their field tuples), the fields that tell them apart: "a=1, b=2"."""
    if len(keys) == 1:
        return [""]
    fields_of = [dict(key) for key in keys]
    names = sorted({k for f in fields_of for k in f if len({repr(g.get(k)) for g in fields_of}) > 1})
    return [", ".join(f"{k}={f.get(k)}" for k in names) for f in fields_of]


def summarize(runs: List[Run]) -> List[DatasetResult]:
    """Runs grouped into experiments (kind, env, experiment fields), one run per seed, in kind, domain,
    dataset order; notes on stderr for runs left out or pooled and for datasets run as several experiments."""
    datasets: Dict[Tuple[str, str], Dict[Tuple[Tuple[str, Any], ...], List[Run]]] = {}
    for run in runs:
        key = tuple(sorted(experiment_fields(run).items()))
        datasets.setdefault((run.kind, run.env), {}).setdefault(key, []).append(run)
    envs_of_name: Dict[Tuple[str, str], set] = {}
    for kind, env in datasets:
        envs_of_name.setdefault((kind, short_name(env)), set()).add(env)
    results = []
    for (kind, env), experiments in datasets.items():
        name = short_name(env) if len(envs_of_name[kind, short_name(env)]) == 1 else env
        rows = []
        for variant, members in zip(variant_labels(list(experiments)), experiments.values()):
            label = f"{name} ({variant})" if variant else name
            kept = newest_run_per_seed(kind, label, members)
            note_pooled(kind, label, kept)
            rows.append(DatasetResult(kind, domain_of(env), env, name, kept, variant=variant,
                                      last=np.array([r.scores[-1] for r in kept]),
                                      best=np.array([r.scores.max() for r in kept])))
        averaged = max(rows, key=lambda d: (len(d.runs), max(r.steps[-1] for r in d.runs),
                                            max(r.started for r in d.runs)))
        for d in rows:
            d.in_average = d is averaged
        if len(rows) > 1:
            print(f"note: {kind} {name}: {len(rows)} experiments, a row each; the {domain_of(env)} average takes "
                  f"{averaged.variant} (the most seeds, then the longest)", file=sys.stderr)
        results += rows
    return sorted(results, key=lambda d: (d.kind != "offline", DOMAIN_ORDER.index(d.domain), d.name, d.variant))


def table_rows(results: List[DatasetResult]) -> List[dict]:
    """CSV_FIELDS rows: each dataset, then after each (kind, domain) its average row."""
    rows = []
    for i, d in enumerate(results):
        ends = sorted({int(r.steps[-1]) for r in d.runs})
        rows.append(dict(kind=d.kind, row="dataset", domain=d.domain, dataset=d.name, variant=d.variant,
                         seeds=len(d.runs), datasets=1,
                         steps=str(ends[0]) if len(ends) == 1 else f"{ends[0]}-{ends[-1]}",
                         last_mean=float(d.last.mean()), last_std=float(d.last.std()),
                         best_mean=float(d.best.mean()), best_std=float(d.best.std()), env=d.env))
        following = results[i + 1] if i + 1 < len(results) else None
        if following is None or (following.kind, following.domain) != (d.kind, d.domain):
            same = [e for e in results if (e.kind, e.domain) == (d.kind, d.domain) and e.in_average]
            rows.append(dict(kind=d.kind, row="domain_average", domain=d.domain, dataset=f"{d.domain} average",
                             variant="", seeds="", datasets=len(same), steps="",
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
                label = f"{r['dataset']} ({r['variant']})" if r["variant"] else r["dataset"]
                out.append(f"| {label} | {r['domain']} | {r['last_mean']:.1f} ± {r['last_std']:.1f} | "
                           f"{r['best_mean']:.1f} ± {r['best_std']:.1f} | {r['seeds']} | {r['steps']} |")
            else:
                out.append(f"| **{r['dataset']}** | | **{r['last_mean']:.1f}** | **{r['best_mean']:.1f}** | "
                           f"{plural(r['datasets'], 'dataset')} | |")
        out.append("")
    out.append("Last: score at each run's final evaluation; best: each run's highest score; mean ± population "
               "std (np.std, ddof=0) over distinct seeds. Averages: mean of the dataset means (of a dataset run as "
               "several experiments, the one with the most seeds).")
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
    if how == "common" and not len(steps):
        print(f"note: {d.kind} {d.label}: its runs share no evaluation step; the curve interpolates them "
              f"(--align interp)", file=sys.stderr)
        steps, scores = align(d.runs, "interp")
    mean = scores.mean(0)
    low, high = (scores.min(0), scores.max(0)) if spread == "minmax" else (mean - scores.std(0), mean + scores.std(0))
    ax.plot(steps, mean, lw=1.5, marker="o", ms=3,  # a marker: a run of one evaluation shows too
            label="1 seed" if len(d.runs) == 1 else f"mean of {len(d.runs)} seeds")
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
    variant = f"\n{textwrap.fill(d.variant, GRID_TITLE_CHARS)}" if d.variant else ""
    return f"{name}{variant}\n{d.kind}, {plural(len(d.runs), 'seed')}"


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
        draw_curve(ax, d, how, spread, f"CQL {d.kind}: {d.label}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        variant = re.sub(r"[^\w.=,+-]", "_", d.variant.replace(", ", ","))
        path = folder / f"{d.kind}-{d.name.replace('/', '_')}{'-' + variant if variant else ''}.png"
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
