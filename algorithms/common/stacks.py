"""Stacks of (config, seed) members: the runs one process trains together.

A stack's members share the networks' and the update's shapes and every hyperparameter; they may differ in
MEMBER_FIELDS: the data side (dataset, its normalisation and reward transform, eval env, reference returns,
episode length), the seed and the names that label their run. `--seeds=0,1,2,3` makes one member per seed of
one config; `--stack_configs=a.yaml,b.yaml` one per config file (times each seed). Every member has its own
run directory whose config.yaml trains it alone; --resume of any of them resumes the whole stack.
"""
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from algorithms.common.config import (
    MAX_RUNS,
    STACK_RECORD,
    ConfigError,
    listed_files,
    read_yaml_file,
    run_config,
    run_seeds,
    shown,
)
from algorithms.common.data import dataset_label

# What members of one stack may set each their own way; every other field is the stack's.
MEMBER_FIELDS = ("env", "dataset_path", "eval_env", "max_episode_steps", "ref_min_score", "ref_max_score",
                 "minari_download", "goal_in_state", "normalize", "normalize_reward", "reward_scale", "reward_bias",
                 "seed", "name", "project", "group")
STACK_ONLY = ("seeds", "stack_configs", "resume")  # how the process was started: no member records them
RUN_LABELS = ("seed", "name", "project", "group")  # the member fields that leave its data as it is


def data_key(config: Any) -> Tuple[Any, ...]:
    """What makes a member's training data and evaluation: members with the same key share one copy."""
    return tuple(getattr(config, name) for name in MEMBER_FIELDS if name not in RUN_LABELS)


def prepare_members(members: List[Any], prepare: Callable[[Any], Any], shape: Callable[[Any], Tuple[int, int, float]],
                    what: Callable[[Any], str]) -> Dict[Tuple[Any, ...], Any]:
    """prepare(member) of each distinct data side once (a --seeds stack has one), by data_key; a ConfigError naming
    stack_configs when two cannot share the networks: shape(prepared) = (state size, action size, action bound)
    differs, what(prepared) naming each in the message."""
    prepared: Dict[Tuple[Any, ...], Any] = {}
    for member in members:
        if data_key(member) not in prepared:
            prepared[data_key(member)] = prepare(member)
    first, *others = prepared.values()
    for other in others:
        if shape(other) != shape(first):
            (state, action, bound), (state_0, action_0, bound_0) = shape(other), shape(first)
            raise ConfigError(f"field 'stack_configs': {what(other)} has state {state}, action {action} (bound "
                              f"{bound}), {what(first)} state {state_0}, action {action_0} (bound {bound_0}): a "
                              f"stack's members share the networks")
    return prepared


def stack_config_files(config: Any) -> List[str]:
    """The stack_configs field as a list of files ("a.yaml,b.yaml" -> [a.yaml, b.yaml]), each checked to exist."""
    files = listed_files(config.stack_configs)
    if not files:
        raise ConfigError(f"field 'stack_configs' expects config files like a.yaml,b.yaml, got "
                          f"{shown(config.stack_configs)}")
    for file in files:
        if not Path(file).is_file():
            raise ConfigError(f"field 'stack_configs': {file} is not a file")
    if len(set(files)) != len(files):
        raise ConfigError(f"field 'stack_configs' lists a file twice: {shown(config.stack_configs)}")
    return files


def stack_members(config: Any, read_config: Callable[[str], Any]) -> Optional[List[Any]]:
    """Each member's own config (run_config: what its config.yaml records), configs-major then seeds; None for
    a lone run. read_config(path) parses one config file as the script does (no overrides).

    The command line's overrides apply to every member: config is the first file (or the resumed run's own
    config.yaml) with them applied, so the fields where config differs from that file are the overrides.
    A resumed stack takes its members from its run directories' config.yaml files, in the stack's order."""
    if config.resume and (Path(config.resume) / STACK_RECORD).is_file():
        record = read_yaml_file(str(Path(config.resume) / STACK_RECORD), f"stack record of {config.resume}")
        names = record.get("runs") if isinstance(record, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) and "/" not in n for n in names):
            raise ConfigError(f"stack record {Path(config.resume) / STACK_RECORD}: 'runs' must list the stack's "
                              f"run directory names")
        files = [str(Path(config.resume).parent / name / "config.yaml") for name in names]
        base, seeds = str(Path(config.resume) / "config.yaml"), None
    elif config.stack_configs is not None:
        files = stack_config_files(config)
        base, seeds = files[0], run_seeds(config) or [config.seed]
    elif config.seeds is not None:
        return [run_config(config, seed) for seed in run_seeds(config)]
    else:
        return None
    if len(files) * len(seeds or [0]) > MAX_RUNS:
        raise ConfigError(f"fields 'stack_configs' and 'seeds': at most {MAX_RUNS} runs in one process, "
                          f"got {len(files)} x {len(seeds or [0])}")
    parsed = {file: read_config(file) for file in dict.fromkeys([base, *files])}  # each file once
    first = parsed[base]
    overrides = {f.name: getattr(config, f.name) for f in fields(config)
                 if f.name not in STACK_ONLY and getattr(config, f.name) != getattr(first, f.name)}
    overrides.pop("seed", None)  # seeds (or, resumed, each member's own config) set each member's seed
    members = []
    for file in files:
        own = replace(parsed[file], **overrides)
        members += [run_config(own, seed) for seed in (seeds or [own.seed])]
    check_members(members, [f for f in files for _ in (seeds or [0])])
    return members


def check_members(members: List[Any], sources: List[str]) -> None:
    """Members that cannot share a stack: a ConfigError naming the first field outside MEMBER_FIELDS that two of
    them set differently, with both values and where each comes from."""
    shared = [name for name in asdict(members[0]) if name not in MEMBER_FIELDS and name not in STACK_ONLY]
    for member, source in zip(members[1:], sources[1:]):
        for name in shared:
            if getattr(member, name) != getattr(members[0], name):
                raise ConfigError(
                    f"field '{name}': {sources[0]} sets {getattr(members[0], name)!r}, {source} sets "
                    f"{getattr(member, name)!r}; the members of one stack share every field but "
                    f"{', '.join(MEMBER_FIELDS)} (run them in separate processes)")


def summarize(runs: List[Any], updates: int, elapsed: float, load_seconds: float, eval_seconds: float,
              stacked: bool, first: int = 0) -> Dict[str, Any]:
    """An offline train()'s summary, printed in one line with the runs' normalized scores (a stack of several
    datasets: each dataset's mean over its seeds); first: the update a resumed process started from (its time
    counts the updates after it). runs: each with config, dir, logger, scores (by update) and last_return."""
    summaries = [{"run_dir": str(run.dir), "seed": run.config.seed, "env": run.config.env,
                  "last_return": run.last_return, "last_score": run.scores[max(run.scores)] if run.scores else None,
                  "best_score": max(run.scores.values()) if run.scores else None} for run in runs]
    summary = {"updates": updates, "seconds": elapsed, "load_seconds": load_seconds, "eval_seconds": eval_seconds}
    if stacked:
        summary["runs"] = summaries
    else:
        summary = {"run_dir": summaries[0]["run_dir"], **summary,
                   **{k: v for k, v in summaries[0].items() if k not in ("run_dir", "seed", "env")}}
    by_env: Dict[str, List[float]] = {}
    for s in summaries:
        by_env.setdefault(s["env"], []).append(s["last_score"])
    if any(None in scores for scores in by_env.values()):
        score_text = "no normalized score (no reference returns)"
    elif not stacked:
        score_text = f"normalized score last {summaries[0]['last_score']:.1f}, best {summaries[0]['best_score']:.1f}"
    elif len(by_env) == 1:
        last = by_env.popitem()[1]
        score_text = (f"normalized score last {np.mean(last):.1f} +- {np.std(last):.1f} over {len(runs)} seeds "
                      f"({', '.join(f'{v:.1f}' for v in last)})")
    else:
        score_text = "normalized score last (mean over seeds) " + ", ".join(
            f"{dataset_label(env)} {np.mean(v):.1f}" for env, v in by_env.items())
    metrics_paths = runs[0].logger.path if not stacked else f"metrics.jsonl of each run dir in {runs[0].dir.parent}"
    eval_share = 100 * eval_seconds / max(elapsed + load_seconds, 1e-9)
    resumed = f" ({updates - first} in this process, resumed at update {first})" if first else ""
    print(f"done: {updates} updates{resumed} in {elapsed:.0f} s (evaluation held training up "
          f"{eval_seconds:.1f} s, {eval_share:.1f}% of the run; set-up {load_seconds:.0f} s), {score_text}; "
          f"metrics in {metrics_paths}")
    return summary
