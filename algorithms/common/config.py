"""Strict config parsing for the scripts and tools: a YAML file plus `--key=value` overrides into a config
dataclass, every value typed and checked, one-line errors naming the field; the seeds of a stack of runs.

Nothing here knows an algorithm: a script passes its config class, its bounds and limits tables and its
own checks. Exit codes: ConfigError and DatasetError are bad input (2), RunFault a fault (3).
"""
import math
import os
import stat
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union, get_args, get_origin

import numpy as np
import torch
import yaml


class ConfigError(ValueError):
    """A config value or key is not acceptable; the message is one line naming the field."""


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message is one line naming the file."""


class RunFault(RuntimeError):
    """A fault that stops a run (beside non-finite values, FloatingPointError): the message is one line
    naming what happened and the last good checkpoint (exit code 3)."""


FLOAT32_MAX = float(np.finfo(np.float32).max)
_NONE_WORDS = {"none", "null", "~"}  # None on the command line and in a YAML file alike
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


MAX_CONFIG_BYTES = 2**20  # a config file or run record holds a few hundred bytes: a larger file is not one
MAX_YAML_DEPTH = 32  # a config nests two deep (seeds: [0, 1]); PyYAML recurses per level, to a RecursionError
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def shown(value: Any, limit: int = 100) -> str:
    """repr(value) for a one-line message, cut after limit characters (a 5000-digit seed stays readable)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses, with a one-line ConfigError naming `where` (the file) and the line:
    a key given twice in one mapping, at any depth (SafeLoader keeps the last; a key that a merge (<<)
    brings in and the mapping sets again counts as twice too); anchors and aliases (CORL's configs use
    none, and aliases of aliases expand exponentially: "billion laughs"); values nested past MAX_YAML_DEPTH;
    a scalar Python cannot convert (an integer past its 4300 digits, a date such as 2020-13-45)."""

    def __init__(self, stream: Any, where: Optional[str] = None) -> None:
        super().__init__(stream)
        self.where = where or f"config file {self.name}"
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:  # before it is built
            raise ConfigError(f"{self.where}: line {line}: YAML anchors and aliases (&{event.anchor}, "
                              f"*{event.anchor}) are not accepted; write the value out")
        if self.depth >= MAX_YAML_DEPTH:
            raise ConfigError(f"{self.where}: line {line}: values nested more than {MAX_YAML_DEPTH} deep")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ConfigError:
            raise
        except ValueError as e:  # int() past sys.get_int_max_str_digits(), datetime.date(2020, 13, 45)
            reason = str(e).split(";")[0]  # without int()'s advice to raise the limit
            raise ConfigError(f"{self.where}: line {node.start_mark.line + 1}: cannot read {shown(node.value)} "
                              f"({reason})") from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        self.flatten_mapping(node)  # merged keys first, as SafeLoader takes them
        lines: Dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                twice = key in lines
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if twice:
                raise ConfigError(f"{self.where}: key '{key}' given twice (lines {lines[key]} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep)


def read_yaml_file(path: str, where: str) -> Any:
    """The YAML document of a config file or run record (read by StrictLoader), or a one-line ConfigError
    naming the file: not a regular file (a FIFO, a device or a directory would block or never end, so it
    is not opened), larger than MAX_CONFIG_BYTES, not UTF-8, not valid YAML."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # nor blocks on a FIFO swapped in since the stat
            with os.fdopen(fd, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                data = f.read(MAX_CONFIG_BYTES + 1) if stat.S_ISREG(mode) else b""
    except OSError as e:
        raise ConfigError(f"{where}: cannot read ({e.strerror})") from None
    except ValueError:  # a path holding NUL
        raise ConfigError(f"{where}: cannot read (a path cannot hold NUL characters)") from None
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "another kind of file")
        raise ConfigError(f"{where}: expected a regular file, got {kind}")
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes, the most a config file may hold")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start})") from None
    loader = StrictLoader(text, where)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    finally:
        loader.dispose()


def _read_scalar(text: str) -> Any:
    """A command-line value read as YAML reads a scalar (true, 3, 1_000, 0.5, .inf, null); text that YAML
    leaves as text stays so (PyYAML reads 1e6 and 3e-4 as text: parse_value takes those as numbers), and so
    does text that StrictLoader refuses (anchors, deep nesting, an integer past Python's digits)."""
    loader = StrictLoader(text, "command line")
    try:
        return loader.get_single_data()
    except (yaml.YAMLError, ConfigError):
        return text
    finally:
        loader.dispose()


def parse_value(name: str, annotation: Any, value: Any, where: str, infinite_ok: bool = False) -> Any:
    """One config value, a YAML scalar or a command-line string, as the field's type, or a ConfigError.

    Command-line values are typed as YAML types them (a string field keeps its text), so both sources
    follow one rule: bools are YAML's (true/false, yes/no, on/off), integers may be written 1e6 or
    1_000_000, numbers may not be NaN, and none/null/~ is None for Optional fields only. A float must lie
    within float32's range, which the networks compute in, unless infinite_ok (a field whose default is
    infinite, such as an open clip bound: no learning rate, weight or score means anything at inf); a
    string holds no NUL (no name or path can).
    """
    optional = get_origin(annotation) is Union and type(None) in get_args(annotation)
    base = next(a for a in get_args(annotation) if a is not type(None)) if optional else annotation
    if base not in _EXPECTED:
        raise ConfigError(f"{where}: field '{name}' has an unsupported type {annotation}")

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: field '{name}' expects {expected}, got {shown(value)}")

    parsed = value
    if isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
        parsed = None
    elif isinstance(value, str) and base is not str:
        parsed = _read_scalar(value.strip())
    if parsed is None:
        if optional:
            return None
        raise fail(f"a {base.__name__}" + (" (use '' for none)" if base is str else ""))
    if base in (int, float) and isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            raise fail(_EXPECTED[base]) from None
    number = isinstance(parsed, (int, float)) and not isinstance(parsed, bool)
    if base is float and number and math.isnan(parsed):
        raise fail("a number, not NaN")
    if base is float and number and not abs(parsed) <= FLOAT32_MAX and not infinite_ok:
        raise fail(f"a finite number within float32's range (|value| <= {FLOAT32_MAX:.4g})")
    if base is str and isinstance(parsed, str) and "\0" in parsed:
        raise fail("a string without NUL characters")
    if base is int and number and not (math.isfinite(parsed) and parsed == int(parsed)):
        raise fail("an integer")
    if not (isinstance(parsed, bool) if base is bool else number if base in (int, float) else isinstance(parsed, str)):
        raise fail(_EXPECTED[base])
    return base(parsed)


def check_bounds(config: Any, bounds: Dict[str, Tuple[float, Optional[float], bool]],
                 choices: Dict[str, Tuple[Optional[str], ...]]) -> None:
    """A ConfigError for the first field outside its bounds (low, high or None, whether low is allowed;
    high is allowed) or its choices; a None value of an Optional field is not checked."""
    for name, (low, high, low_allowed) in bounds.items():
        value = getattr(config, name)
        if value is None or ((value >= low if low_allowed else value > low) and (high is None or value <= high)):
            continue
        if high is None:
            raise ConfigError(f"field '{name}' must be {'>=' if low_allowed else '>'} {low}, got {value!r}")
        raise ConfigError(f"field '{name}' must be in {'[' if low_allowed else '('}{low}, {high}], got {value!r}")
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            named = [a for a in allowed if a is not None]
            raise ConfigError(f"field '{name}' must be {', '.join(named[:-1])} or {named[-1]}, "
                              f"got {getattr(config, name)!r}")


MAX_SEED = 2**32 - 1  # numpy's global seed; Gymnasium refuses negative seeds
MAX_RUNS = 1024  # runs in one --seeds stack: more is a typo, not an experiment one GPU holds
# Upper limits of counts: generous, but each well past any run one GPU makes (a larger value is a typo, and
# past 2^63 it does not even fit the int64 that torch and numpy take).
MAX_STEPS = 10**12  # updates, iterations, episode steps, frequencies: 30 years at 1000 updates/s
MAX_ROWS = 10**9  # transitions in a replay buffer: 100+ GB even for a 10-dim task, more than one GPU holds
MAX_BATCH = 2**20  # transitions per update; times cql_n_actions critic rows, so a million already fills a GPU
MAX_SAMPLED_ACTIONS = 10_000  # cql_n_actions: CORL uses 10
MAX_EPISODES = 10_000  # evaluation episodes, run side by side: each its own simulator
MAX_HIDDEN_LAYERS = 100  # of 256 units per critic: CORL uses 2 to 5
# Numeric fields' allowed values: (low, high or None, whether low itself is allowed).
POSITIVE, NON_NEGATIVE = (0, None, False), (0, None, True)
# The fields of a training run that every script of this project has, and their ranges; a script adds its own.
RUN_BOUNDS: Dict[str, Tuple[float, Optional[float], bool]] = {
    "seed": (0, MAX_SEED, True), "eval_freq": POSITIVE, "n_episodes": POSITIVE, "buffer_size": POSITIVE,
    "batch_size": POSITIVE, "log_freq": POSITIVE, "checkpoint_freq": POSITIVE, "keep_checkpoints": NON_NEGATIVE,
    "max_episode_steps": POSITIVE,
}
RUN_LIMITS: Dict[str, float] = {
    "eval_freq": MAX_STEPS, "n_episodes": MAX_EPISODES, "buffer_size": MAX_ROWS, "batch_size": MAX_BATCH,
    "log_freq": MAX_STEPS, "checkpoint_freq": MAX_STEPS, "keep_checkpoints": MAX_STEPS, "max_episode_steps": MAX_STEPS,
}
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # wandb.init refuses a project name with any of these
CHOICES: Dict[str, Tuple[Optional[str], ...]] = {"wandb_mode": (None, "online", "offline", "disabled"),
                                              "on_nonfinite": ("stop", "skip")}


def check_limits(config: Any, limits: Dict[str, float]) -> None:
    """A ConfigError for the first field above its upper limit; a None value of an Optional field is not checked."""
    for name, limit in limits.items():
        value = getattr(config, name)
        if value is not None and value > limit:
            raise ConfigError(f"field '{name}' must be at most {limit}, got {value!r}")


def check_run_config(config: Any, bounds: Dict[str, Tuple[float, Optional[float], bool]],
                     limits: Dict[str, float]) -> None:
    """A one-line ConfigError for the first impossible value among a training run's fields: those of bounds,
    limits and CHOICES (a script's tables: RUN_BOUNDS and RUN_LIMITS with its own fields), the reference
    returns, seeds, device, run name and wandb project."""
    check_bounds(config, bounds, CHOICES)
    check_limits(config, limits)
    if config.ref_min_score is not None and config.ref_max_score is not None \
            and not config.ref_min_score < config.ref_max_score:
        raise ConfigError(f"fields 'ref_min_score' ({config.ref_min_score}) >= 'ref_max_score' "
                          f"({config.ref_max_score}): the return that scores 0 must be below the one that scores 100")
    run_seeds(config)  # a bad seeds value fails here, not after the data is loaded
    if config.device != "auto":
        try:
            device_type = torch.device(config.device).type
        except RuntimeError:
            device_type = None
        if device_type not in ("cpu", "cuda"):  # torch knows meta, mps, xpu, ...: the scripts run on these two
            raise ConfigError(f"field 'device' must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    if "/" in config.name:  # else the run directory would land in a folder of that name
        raise ConfigError(f"field 'name' starts the run directory's name <name>-<env>-<seed>-<id>: no '/', "
                          f"got {config.name!r}")
    forbidden = [c for c in WANDB_PROJECT_FORBIDDEN if c in config.project]
    if forbidden:
        raise ConfigError(f"field 'project': a wandb project name cannot hold {' '.join(forbidden)}, "
                          f"got {config.project!r}")


def run_seeds(config: Any) -> Optional[List[int]]:
    """The seeds of a multi-seed run ("0,1,2,3" -> [0, 1, 2, 3], "4" -> seed..seed+3); None: one run."""
    if config.seeds is None:
        return None
    text = config.seeds.strip()
    expected = f"field 'seeds' expects a count like 4 or a list like 0,1,2,3, got {shown(config.seeds)}"
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()] if "," in text else int(text)
    except ValueError:
        raise ConfigError(expected) from None
    count = seeds if isinstance(seeds, int) else len(seeds)
    if count > MAX_RUNS:  # before a count becomes a list
        raise ConfigError(f"field 'seeds': at most {MAX_RUNS} runs in one process, got {count}")
    if isinstance(seeds, int):  # a count: seed, seed + 1, ...
        seeds = list(range(config.seed, config.seed + seeds))
    if not seeds:
        raise ConfigError(expected)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"field 'seeds' lists a seed twice: {shown(config.seeds)}")
    outside = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if outside:
        raise ConfigError(f"field 'seeds' lists a seed outside [0, {MAX_SEED}]: {outside[0]}")
    return seeds


STACK_RECORD = "stack.yaml"  # in each run directory of a --seeds stack, beside the run's own config.yaml


@dataclass
class StackRecord:
    """<run dir>/stack.yaml of each run of a --seeds stack: the stack the run came from. Its config.yaml
    is the run's own (run_config); --resume of any of the stack's run directories takes seed and seeds
    from here, so the whole stack resumes."""

    seeds: str  # the stack's seeds field, as given: "0,1,2,3", or a count "4" (seed..seed+3)
    seed: int  # the stack's seed: where a count starts, and the one stream of its batches and noise
    runs: List[str]  # the stack's run directory names, in the order of its seeds
    stack_configs: Optional[str] = None  # the config files of a stack of several configs, as given


def listed_files(text: Optional[str]) -> List[str]:
    """A comma-separated list of files as given (stack_configs: "a.yaml, b.yaml" -> [a.yaml, b.yaml])."""
    return [file.strip() for file in (text or "").split(",") if file.strip()]


def run_config(config: Any, seed: int) -> Any:
    """The config of the run with this seed alone, as its config.yaml and checkpoints record it:
    --config_path of it trains that seed from the start (no seeds, no resume)."""
    return replace(config, seed=seed, seeds=None, resume=None,
                   **({"stack_configs": None} if hasattr(config, "stack_configs") else {}))


def check_removed(name: str, removed: Tuple[Any, str], value: Any, where: str) -> None:
    """A removed field (parse_config's removed) at its one accepted value passes; any other value is a ConfigError."""
    accepted, why = removed
    if parse_value(name, type(accepted), value, where) != accepted:
        raise ConfigError(f"{where}: field '{name}' was removed ({why}); only {str(accepted).lower()} is accepted, "
                          f"as run directories written before hold it")


def parse_config(argv: List[str], config_class: type, check: Callable[[Any], None],
                 removed: Optional[Dict[str, Tuple[Any, str]]] = None) -> Any:
    """Strict parsing of `--config_path file.yaml` plus `--key=value` / `--key value` overrides into
    config_class, then check(config); the scripts and tools/make_dataset.py parse their options so.
    removed: fields that older run directories' config.yaml may still hold, by name: (their only value
    then, why they went); that value is accepted and dropped, any other is a ConfigError.

    -h or --help prints the help page of config_class's fields and their comments and exits 0 (a script
    run with --help prints it before its imports: algorithms/common/help.py).
    """
    if "-h" in argv or "--help" in argv:
        import sys

        from algorithms.common.help import help_page

        sys.stdout.write(help_page(sys.modules[config_class.__module__].__file__, config_class.__name__))
        raise SystemExit(0)
    removed = removed or {}
    types = {f.name: f.type for f in fields(config_class)}
    infinite = {f.name for f in fields(config_class) if isinstance(f.default, float) and math.isinf(f.default)}
    overrides: Dict[str, str] = {}
    tokens = iter(argv)
    for token in tokens:
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"command line: expected --key=value, got {token!r}")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            value = next(tokens, "--")
            if value.startswith("--"):
                raise ConfigError(f"command line: option '--{key}' needs a value")
        key = key.replace("-", "_")
        if key not in types and key not in removed and key != "config_path":
            raise ConfigError(f"command line: unknown option '--{key}'")
        overrides[key] = value
    config_path = overrides.pop("config_path", None)
    values: Dict[str, Any] = {}
    sources: List[Tuple[str, str, Set[str], Set[str]]] = []  # YAML files in order: what, path, keys allowed, needed
    stack_files = listed_files(overrides.get("stack_configs"))
    if config_path is None and stack_files:  # a stack of configs: the first is the base of the fields they share
        config_path = stack_files[0]
    elif config_path is not None and "stack_configs" in overrides:
        raise ConfigError("command line: give the configs of a stack in --stack_configs alone, not --config_path too")
    if config_path is None and "resume" in overrides:  # a resumed run keeps its own config ...
        config_path = str(Path(overrides["resume"]) / "config.yaml")
        if not Path(config_path).exists():  # one that exists but is no regular file: read_yaml_file says so
            raise ConfigError(f"field 'resume': {overrides['resume']} is not a run directory (no config.yaml)")
        stack_path = Path(overrides["resume"]) / STACK_RECORD
        if stack_path.exists():  # ... and a run of a stack its stack's seed and seeds: the whole stack resumes
            record_keys = {f.name for f in fields(StackRecord)}
            sources.append(("stack record", str(stack_path), record_keys, {"seeds", "seed", "runs"}))
    if config_path is not None:
        sources.insert(0, ("config file", config_path, set(types), set()))
    for what, path, keys, needed in sources:
        where = f"{what} {path}"
        loaded = read_yaml_file(path, where)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: expected a mapping of field: value")
        missing = sorted(needed - set(loaded))
        if missing:
            raise ConfigError(f"{where}: missing key(s) {', '.join(missing)}")
        for key, value in loaded.items():
            if key not in keys and key not in removed:
                raise ConfigError(f"{where}: unknown key '{key}'")
            if key in removed:
                check_removed(key, removed[key], value, where)
                continue
            if key not in types:  # a stack record's run directory names: the checkpoints name them too
                continue
            if key == "seeds" and isinstance(value, list):  # YAML `seeds: [0, 1]` (a list of one keeps its comma)
                value = ",".join(map(str, value)) + ("," if len(value) == 1 else "")
            elif key == "seeds" and isinstance(value, int) and not isinstance(value, bool):  # YAML `seeds: 4`
                value = str(value)
            values[key] = parse_value(key, types[key], value, where, key in infinite)
    for key, value in overrides.items():
        if key in removed:
            check_removed(key, removed[key], value, "command line")
            continue
        values[key] = parse_value(key, types[key], value, "command line", key in infinite)
    config = config_class(**values)
    check(config)
    return config
