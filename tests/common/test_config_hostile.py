"""Config input that would hang the parser, blow up its memory or end in a traceback (Reliability III, section 6):
files that block when opened or never end, YAML aliases that expand exponentially ("billion laughs"), integers past
Python's int digits and values nested thousands deep; on the command line, in --config_path and in the files
--resume reads. Each is one line `error: ...` naming the file or field, exit code 2, at once."""
import os
import re
import resource
import signal
import subprocess
import sys

import pytest
from conftest import CHILD_ENV, OFFLINE_SCRIPT

import algorithms.offline.cql as offline_cql
from algorithms.common.config import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, ConfigError

parse_config = offline_cql.parse_config
HUGE_INT = "1" + "0" * 5000  # past Python's 4300 digits of int(str)
DEEP = 10_000  # nesting levels, past Python's recursion limit


def billion_laughs(key: str, levels: int = 10) -> str:
    """A YAML document of one key whose value would expand to 9^levels x's (3.5 billion for 10) through anchors.
    The in-process tests take 6 levels, which the parser before this change expanded (into its error message)
    in a second, so that they fail there rather than fill the memory; the script's test takes 10 under a cap."""
    anchors = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]"
                                                     for i in range(1, levels)]
    return f"{key}: [{', '.join(anchors)}]\n"


@pytest.fixture
def deadline():
    """Fails the test if it runs past 20 s (the old parser waited on a FIFO for ever) rather than hanging."""
    def too_long(*_):
        raise AssertionError("parse_config took over 20 s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def refused(argv: list, message: str) -> str:
    """parse_config(argv)'s ConfigError, checked to be one short line matching message."""
    with pytest.raises(ConfigError) as info:
        parse_config(argv)
    error = str(info.value)
    assert "\n" not in error and len(error) < 400 and re.search(message, error), error
    return error


# --------------------------------------------------------------------------------------
# 1. a file that is not a regular file is not opened; one past MAX_CONFIG_BYTES is not read
# --------------------------------------------------------------------------------------
def test_config_path_that_is_not_a_regular_file_is_refused(tmp_path, deadline):
    os.mkfifo(tmp_path / "fifo.yaml")  # no writer: open() waits forever
    for path, kind in [(tmp_path / "fifo.yaml", "a FIFO"), ("/dev/zero", "a character device"),
                       (tmp_path, "a directory")]:
        refused(["--config_path", str(path)], f"^config file {re.escape(str(path))}: expected a regular file, "
                                              f"got {kind}$")


def test_config_file_past_the_size_limit_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("seed: 1\n" + "#" * MAX_CONFIG_BYTES + "\n")
    refused(["--config_path", str(path)], f"^config file {re.escape(str(path))}: larger than {MAX_CONFIG_BYTES} bytes")


@pytest.mark.parametrize("name", ["config.yaml", "stack.yaml"])
@pytest.mark.parametrize("kind", ["a FIFO", "a directory"])
def test_resume_files_that_are_not_regular_files_are_refused(name, kind, tmp_path, deadline):
    """A FIFO stack.yaml was skipped (is_file), so a stack resumed as one run; a FIFO config.yaml was 'no run'."""
    if name == "stack.yaml":
        (tmp_path / "config.yaml").write_text("seed: 0\n")
    if kind == "a FIFO":
        os.mkfifo(tmp_path / name)
    else:
        (tmp_path / name).mkdir()
    what = "config file" if name == "config.yaml" else "stack record"
    refused(["--resume", str(tmp_path)], f"^{what} {re.escape(str(tmp_path / name))}: expected a regular file, "
                                         f"got {kind}$")


# --------------------------------------------------------------------------------------
# 2. anchors and aliases are refused where they appear, before anything is built
# --------------------------------------------------------------------------------------
ANCHORS = [  # (what, YAML text, line of the first anchor or alias)
    ("billion laughs in a string field", billion_laughs("name", 6), 1),
    ("billion laughs in seeds", billion_laughs("seeds", 6), 1),
    ("anchored scalar and its alias", "batch_size: 8\nseed: &s 3\nbc_steps: *s\n", 2),
    ("merge of an anchored mapping", "base: &b {batch_size: 8}\n<<: *b\n", 1),
    ("anchor on the document", "&top {seed: 1}\n", 1),
    ("anchored key", "&k seed: 1\n", 1),
]


@pytest.mark.parametrize("what,text,line", ANCHORS, ids=[a[0] for a in ANCHORS])
def test_yaml_anchors_and_aliases_are_refused(what, text, line, tmp_path, deadline):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    refused(["--config_path", str(path)],
            f"^config file {re.escape(str(path))}: line {line}: YAML anchors and aliases .* are not accepted")


def test_billion_laughs_in_a_resumed_stack_record_is_refused(tmp_path, deadline):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "stack.yaml").write_text(billion_laughs("runs", 6))
    refused(["--resume", str(tmp_path)], f"^stack record {re.escape(str(tmp_path / 'stack.yaml'))}: line 1: "
                                         "YAML anchors and aliases")


# --------------------------------------------------------------------------------------
# 3. integers past Python's digits, dates that do not exist, values nested thousands deep
# --------------------------------------------------------------------------------------
UNREADABLE = [  # (what, YAML text, expected message after "<file>: ")
    ("5001-digit seed", f"seed: {HUGE_INT}\n", r"line 1: cannot read '10000.*\(5003 characters\) "
                                               r"\(Exceeds the limit \(4300 digits\)"),
    ("5001-digit entry of seeds", f"seeds: [0, {HUGE_INT}]\n", r"line 1: cannot read '10000"),
    ("5001-digit key", f"? {HUGE_INT}\n: 1\n", r"line 1: cannot read '10000"),
    ("date that does not exist", "batch_size: 8\nseed: 2020-13-45\n", r"line 2: cannot read '2020-13-45' "
                                                                     r"\(month must be in 1..12\)"),
    ("list 10000 deep", f"seeds: {'[' * DEEP}{']' * DEEP}\n", f"line 1: values nested more than {MAX_YAML_DEPTH} deep"),
    ("mapping 10000 deep", f"name: {'{a: ' * DEEP}1{'}' * DEEP}\n", "line 1: values nested more than"),
    ("block mapping 40 deep", "".join("  " * i + "a:\n" for i in range(40)), f"line {MAX_YAML_DEPTH}: values nested"),
]


@pytest.mark.parametrize("what,text,message", UNREADABLE, ids=[u[0] for u in UNREADABLE])
def test_unreadable_or_deep_values_in_a_config_file_are_one_line(what, text, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    refused(["--config_path", str(path)], f"^config file {re.escape(str(path))}: {message}")


@pytest.mark.parametrize("what,text,message", UNREADABLE[:1] + UNREADABLE[4:5], ids=["5001-digit seed", "deep list"])
def test_unreadable_or_deep_values_in_a_resumed_config_are_one_line(what, text, message, tmp_path):
    (tmp_path / "config.yaml").write_text(text)
    refused(["--resume", str(tmp_path)], f"^config file {re.escape(str(tmp_path / 'config.yaml'))}: {message}")


COMMAND_LINE = [  # (option, expected message after "command line: "), short whatever the value's length
    (f"--seed={HUGE_INT}", r"^command line: field 'seed' expects an integer, got '10000.*\(5003 characters\)$"),
    ("--seed=2020-13-45", r"^command line: field 'seed' expects an integer, got '2020-13-45'$"),
    (f"--batch_size={'[' * DEEP}{']' * DEEP}", r"^command line: field 'batch_size' expects an integer, got '\[\[\["),
    (f"--batch_size={'{a: ' * DEEP}1{'}' * DEEP}", r"^command line: field 'batch_size' expects an integer"),
    (f"--seeds={'[' * DEEP}", r"^field 'seeds' expects a count like 4 .*, got '\[\[\[.*characters\)$"),
    ("--batch_size=&a 3", r"^command line: field 'batch_size' expects an integer, got '&a 3'$"),  # as in a file
]


@pytest.mark.parametrize("option,message", COMMAND_LINE, ids=[c[0][:20] for c in COMMAND_LINE])
def test_unreadable_or_deep_command_line_values_are_one_short_line(option, message):
    refused([option], message)


# --------------------------------------------------------------------------------------
# 4. the real entry point: one case of each class, one line `error: ...`, exit code 2, in seconds
# --------------------------------------------------------------------------------------
def _fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    return ["--config_path", str(tmp_path / "fifo.yaml")], f"config file {tmp_path / 'fifo.yaml'}: expected a regular"


def _resumed_fifo_stack(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    os.mkfifo(tmp_path / "stack.yaml")
    return ["--resume", str(tmp_path)], f"stack record {tmp_path / 'stack.yaml'}: expected a regular file, got a FIFO"


def _laughs(tmp_path):
    (tmp_path / "c.yaml").write_text(billion_laughs("seeds"))
    return ["--config_path", str(tmp_path / "c.yaml")], f"config file {tmp_path / 'c.yaml'}: line 1: YAML anchors"


def _huge_int_file(tmp_path):
    (tmp_path / "c.yaml").write_text(f"seed: {HUGE_INT}\n")
    return ["--config_path", str(tmp_path / "c.yaml")], f"config file {tmp_path / 'c.yaml'}: line 1: cannot read"


def _deep_resumed_config(tmp_path):
    (tmp_path / "config.yaml").write_text(f"name: {'{a: ' * DEEP}1{'}' * DEEP}\n")
    return ["--resume", str(tmp_path)], f"config file {tmp_path / 'config.yaml'}: line 1: values nested more than"


def _huge_int_option(tmp_path):
    return [f"--seed={HUGE_INT}"], "command line: field 'seed' expects an integer, got '1000"


def _deep_option(tmp_path):
    return [f"--batch_size={'[' * DEEP}{']' * DEEP}"], "command line: field 'batch_size' expects an integer, got '[[["


SCRIPT_CASES = [_fifo, _resumed_fifo_stack, _laughs, _huge_int_file, _deep_resumed_config, _huge_int_option,
                _deep_option]


@pytest.mark.parametrize("case", SCRIPT_CASES, ids=[c.__name__[1:] for c in SCRIPT_CASES])
def test_script_refuses_hostile_config_in_one_line_exit_2(case, tmp_path):
    argv, start = case(tmp_path)
    def cap_memory():  # 2 GiB of heap, 8 times what parsing needs: the old parser's expansion ends in MemoryError
        resource.setrlimit(resource.RLIMIT_DATA, (2**31, 2**31))

    try:
        result = subprocess.run([sys.executable, OFFLINE_SCRIPT, *argv], capture_output=True, text=True,
                                timeout=60, env=CHILD_ENV, cwd=tmp_path, preexec_fn=cap_memory)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case.__name__[1:]}: the script hung")
    error = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in error and len(error) < 400, (result.returncode, error[-500:])
    assert error.startswith(f"error: {start}"), error
