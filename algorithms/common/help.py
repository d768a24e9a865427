"""The `--help` page of a config dataclass, read from its source file with ast: every field with its type,
default and one-line comment. Torch-free (standard library only), so a script answers --help before its
imports run: importing torch alone takes seconds on a small CPU.

The page has pyrallis's layout (usage, options, then the class's docstring and its fields).
"""
import argparse
import ast
import math
import os
import sys
from typing import Any, List, Optional, Tuple

HELP_FLAGS = ("-h", "--help")


def _default(node: Optional[ast.expr]) -> Any:
    """A field's default as a value (1_000 -> 1000, -math.inf -> -inf); other expressions as their source text."""
    if node is None:
        return None
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    operand = node.operand if negative else node
    if isinstance(operand, ast.Attribute) and isinstance(operand.value, ast.Name) and operand.value.id == "math":
        value = getattr(math, operand.attr, None)
        if isinstance(value, float):
            return -value if negative else value
    return ast.unparse(node)


def _type_name(annotation: ast.expr) -> str:
    """pyrallis's metavar: `int`, and `[int]` for Optional[int]."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Optional", "typing.Optional"):
        return f"[{ast.unparse(annotation.slice)}]"
    return ast.unparse(annotation)


def _comment(lines: List[str], field: ast.AnnAssign) -> str:
    """The comment after the field on its last line; else the comment lines right above it."""
    last = lines[field.end_lineno - 1]
    code, hash_sign, comment = last[field.end_col_offset:].partition("#")
    if hash_sign and not code.strip():
        return comment.strip()
    above, row = [], field.lineno - 2
    while row >= 0 and lines[row].strip().startswith("#"):
        above.insert(0, lines[row].strip().lstrip("#").strip())
        row -= 1
    return " ".join(above)


def config_fields(source: str, class_name: str) -> Tuple[str, List[Tuple[str, str, Any, str]]]:
    """The docstring of class class_name in source, and its fields: (name, type, default, comment)."""
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            fields = [(item.target.id, _type_name(item.annotation), _default(item.value), _comment(lines, item))
                      for item in node.body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)]
            return ast.get_docstring(node) or "", fields
    raise LookupError(f"no class {class_name} in the source")


def help_page(source_path: str, class_name: str = "TrainConfig", prog: Optional[str] = None) -> str:
    """The --help page of the config dataclass class_name defined in the file source_path."""
    with open(source_path, encoding="utf-8") as f:
        docstring, fields = config_fields(f.read(), class_name)
    parser = argparse.ArgumentParser(prog=prog or os.path.basename(sys.argv[0]), formatter_class=_Formatter)
    parser.add_argument("--config_path", metavar="str", default=None,
                        help="YAML file of field: value; options on the command line override it")
    group = parser.add_argument_group(class_name, docstring)
    for name, type_name, default, comment in fields:
        group.add_argument(f"--{name}", metavar=type_name, default=default, help=comment or " ")
    return parser.format_help()


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """'(default: x)' after each option's comment; the class docstring kept as written."""


def exit_with_help_if_asked(name: str, source_path: str, class_name: str = "TrainConfig") -> None:
    """A script's first lines call this: run as the program (name == "__main__") with -h or --help on the
    command line, it prints the help page of the script's config class and exits 0; else nothing happens."""
    if name == "__main__" and any(arg in HELP_FLAGS for arg in sys.argv[1:]):
        sys.stdout.write(help_page(source_path, class_name))
        raise SystemExit(0)
