"""Converts checkpoint and replay files written before 2026-12-07 (format 1) to the format the scripts load
without running code (format 2: what torch.load(weights_only=True) reads, with a digest of the contents).

Format 1 held pickled numpy objects, which only unpickling reads, and unpickling a file can run any code in
it: convert only files you trust (your own runs, or from someone you trust). The original is kept beside the
new file as <name>.format1.

    python tools/convert_checkpoint.py --trust runs/<run dir>/checkpoint_*.pt runs/<run dir>/replay_*.pt
"""
import argparse
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # run as a file: the repository root on the path, as for the scripts
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from algorithms.common.envs import is_plain  # noqa: E402
from algorithms.common.runs import write_state_file  # noqa: E402
from algorithms.common.state_files import FORMAT_KEY, load_state_file  # noqa: E402


def plain_env_state(env: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A format-1 training-env state (its attributes pickled) as format 2 keeps it (plain attributes), or None
    when the env kept objects a checkpoint cannot hold: the episode in progress is then dropped on resume."""
    if env is None or not isinstance(env.get("attributes"), bytes):
        return env
    attributes = pickle.loads(env["attributes"])  # trusted: the user said so with --trust
    plain = {k: v for k, v in attributes.items() if is_plain(v)}
    if "mujoco" not in env and len(plain) < len(attributes):
        return None
    return {**env, "attributes": plain}


def convert(path: Path) -> str:
    """Rewrites one trusted file in format 2 (the original kept as <name>.format1); returns what was done."""
    try:
        load_state_file(path)
        return f"{path}: already loads safely, left as it is"
    except ValueError:
        pass
    state = torch.load(path, map_location="cpu", weights_only=False)  # trusted: the user said so with --trust
    if not isinstance(state, dict) or FORMAT_KEY in state:
        raise ValueError(f"{path}: not a checkpoint or replay file of this project")
    if isinstance(state.get("run"), dict) and "env" in state["run"]:
        state["run"]["env"] = plain_env_state(state["run"]["env"])
    backup = path.with_name(path.name + ".format1")
    shutil.copy2(path, backup)
    write_state_file(path, state)
    load_state_file(path)  # reads back, digest checked
    return f"{path}: converted (the original is {backup.name})"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="checkpoint_*.pt and replay_*.pt files")
    parser.add_argument("--trust", action="store_true",
                        help="required: converting unpickles the files, which runs any code they hold")
    args = parser.parse_args(argv)
    if not args.trust:
        parser.error("converting a file unpickles it, which can run code in it: pass --trust for files you trust")
    for path in args.files:
        if not path.is_file() or os.path.islink(path):
            parser.error(f"{path}: not a regular file")
        try:
            print(convert(path))
        except (ValueError, RuntimeError, pickle.UnpicklingError, TypeError) as e:
            print(f"error: {path}: cannot convert ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                  file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
