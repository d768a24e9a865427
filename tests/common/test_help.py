"""The --help page (algorithms/common/help.py): every config field with its type, default and comment, read
from the source with ast; a script run with --help prints it before importing torch (seconds on a small CPU)."""
import dataclasses
import inspect
import re
import subprocess
import sys
import typing

import pytest
from conftest import CHILD_ENV, FINETUNE_SCRIPT, OFFLINE_SCRIPT, ROOT

import algorithms.finetune.cql as finetune_cql
import algorithms.offline.cql as offline_cql
import tools.make_dataset as make_dataset
from algorithms.common.help import config_fields, help_page

CONFIGS = {"offline": (offline_cql.TrainConfig, OFFLINE_SCRIPT),
           "finetune": (finetune_cql.TrainConfig, FINETUNE_SCRIPT),
           "make_dataset": (make_dataset.MakeConfig, str(ROOT / "tools/make_dataset.py"))}
OPTION = re.compile(r"^--(\w+) (\S+) (.*) \(default: (.*)\)$")


def help_options(page: str) -> list:
    """(name, metavar, comment, default) of each option of a help page; an option's help may go on in the
    lines below it (on the next line altogether when the name is long)."""
    entries = []
    for line in page.splitlines():
        if line.startswith("  --"):
            entries.append(line.strip())
        elif entries and line.startswith("      ") and entries[-1] is not None:
            entries[-1] += " " + line.strip()
        else:
            entries.append(None)  # a heading or description ends the option above
    return [OPTION.match(" ".join(e.split())).groups() for e in entries if e is not None]


def source_comments(config_class: type) -> dict:
    """field -> the comment after it on its line of the class source (read line by line, not with ast)."""
    comments = {}
    for line in inspect.getsource(config_class).splitlines():
        match = re.match(r"^    (\w+): .*?  # (.*)$", line)
        if match:
            comments[match[1]] = match[2].strip()
    return comments


def metavar(annotation) -> str:
    """pyrallis's metavar of a field type: int, and [int] for Optional[int]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return f"[{args[0].__name__}]" if args else annotation.__name__


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_help_lists_every_field_with_its_type_default_and_comment(name, monkeypatch):
    config_class, path = CONFIGS[name]
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: argparse wraps to the terminal's width
    page = help_page(path, config_class.__name__, prog="cql.py")
    listed = [option for option in help_options(page) if option[0] != "config_path"]
    comments = source_comments(config_class)
    expected = [(f.name, metavar(f.type), comments[f.name], str(f.default))
                for f in dataclasses.fields(config_class)]
    assert listed == expected
    assert inspect.getdoc(config_class) in page  # the class docstring heads its options


def test_help_takes_the_comment_above_a_field_without_one_after_it():
    source = ("import math\n@dataclass\nclass C:\n    '''Doc.'''\n\n    # the first\n    # of two lines\n"
              "    a: int = 1_000\n    b: float = -math.inf  # after\n    c: str = ''\n")
    assert config_fields(source, "C") == ("Doc.", [("a", "int", 1000, "the first of two lines"),
                                                   ("b", "float", float("-inf"), "after"), ("c", "str", "", "")])


@pytest.mark.parametrize("script", [OFFLINE_SCRIPT, FINETUNE_SCRIPT], ids=["offline", "finetune"])
def test_script_help_imports_no_torch_and_matches_parse_config_help(script, capsys, monkeypatch):
    child = subprocess.run([sys.executable, "-X", "importtime", script, "--help"], env=CHILD_ENV, cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in child.stderr.splitlines() if line.startswith("import time")}
    assert "algorithms.common.help" in imported
    assert not imported & {"torch", "numpy", "gymnasium", "yaml", "algorithms.common.config"}, sorted(imported)
    # The same page as main(["--help"]) of the imported script, which goes through parse_config.
    module = offline_cql if script == OFFLINE_SCRIPT else finetune_cql
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(SystemExit) as stop:
        module.main(["--seed=3", "-h"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == child.stdout
    assert "--cql_alpha float" in child.stdout and "weight of the CQL penalty" in child.stdout
