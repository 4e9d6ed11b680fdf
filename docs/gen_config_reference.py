"""Generate the config reference of docs/training.md from the config dataclasses.

Reads ``fastxmc/data/config.py`` and ``fastxmc/train/config.py`` as source (``ast`` + the comment
lines, nothing is imported, so neither torch nor the package is needed) and writes one table per
section: field, type, default, and the comment written beside (or just above) the field.

Used two ways:

- as a mkdocs hook (``hooks:`` in mkdocs.yml): ``on_page_markdown`` replaces the marker
  ``<!-- config-reference -->`` of any page with the tables, so the page follows the code;
- as a script: ``python docs/gen_config_reference.py`` prints the tables.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- config-reference -->"
# (section on the command line, source file, dataclass)
SECTIONS = [
    ("data", "fastxmc/data/config.py", "DataConfig"),
    ("model", "fastxmc/train/config.py", "ModelConfig"),
    ("optim", "fastxmc/train/config.py", "OptimConfig"),
    ("loss", "fastxmc/train/config.py", "LossConfig"),
    ("run", "fastxmc/train/config.py", "RunConfig"),
]


def _comment(line: str) -> str | None:
    """The text of a ``#`` comment on ``line`` outside string literals, or None."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return line[i + 1:].strip()
    return None


def _field_doc(lines: list[str], node: ast.AnnAssign) -> str:
    """Comment lines just above the field, the comment at its end, and deeper-indented comment lines
    right below it that continue that end-of-line comment."""
    indent = node.col_offset
    above = []
    i = node.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#") and \
            len(lines[i]) - len(lines[i].lstrip()) == indent:
        above.insert(0, lines[i].strip()[1:].strip())
        i -= 1
    trailing = []
    end = _comment(lines[node.end_lineno - 1][node.end_col_offset:])
    if end is not None:
        trailing.append(end)
        j = node.end_lineno
        while j < len(lines) and lines[j].strip().startswith("#") and \
                len(lines[j]) - len(lines[j].lstrip()) > indent:
            trailing.append(lines[j].strip()[1:].strip())
            j += 1
    return " ".join(above + trailing)


def _default(node: ast.expr | None) -> str:
    if node is None:
        return "(required)"
    if isinstance(node, ast.Call) and ast.unparse(node.func) == "field":
        for kw in node.keywords:
            if kw.arg == "default_factory":
                return ast.unparse(kw.value) + "()"
            if kw.arg == "default":
                return ast.unparse(kw.value)
    return ast.unparse(node)


def fields(path: Path, cls_name: str) -> tuple[str, list[tuple[str, str, str, str]]]:
    """(class docstring, [(name, type, default, doc)]) of dataclass ``cls_name`` in ``path``."""
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == cls_name:
            rows = [(stmt.target.id, ast.unparse(stmt.annotation), _default(stmt.value),
                     _field_doc(lines, stmt))
                    for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)]
            return ast.get_docstring(node) or "", rows
    raise LookupError(f"no class {cls_name} in {path}")


def _rst(text: str) -> str:
    """Sphinx roles and double backquotes of a docstring as plain Markdown code."""
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")


def _cell(text: str) -> str:
    return _rst(text).replace("|", "\\|").replace("\n", " ")


def render(root: Path = ROOT) -> str:
    out = []
    for section, rel, cls_name in SECTIONS:
        doc, rows = fields(root / rel, cls_name)
        out.append(f"### `{section}`: `{cls_name}`\n")
        if doc:
            out.append(_rst(" ".join(doc.split())) + f" (source: `{rel}`)\n")
        out.append("| field | type | default | what it does |")
        out.append("|---|---|---|---|")
        for name, typ, default, text in rows:
            out.append(f"| `--{section}.{name}` | `{_cell(typ)}` | `{_cell(default)}` | {_cell(text)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render(Path(config["config_file_path"]).resolve().parent))


if __name__ == "__main__":
    print(render())
