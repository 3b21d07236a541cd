"""The written rules of docs/contributing.md that a machine can check: short functions, modules that never
reach into their datamodule, and config comments whose pointers to docs/ lead somewhere."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60

def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES, base: Path = ROOT) -> dict[str, int]:
    """``{"path::name": lines}`` of every function under ``root`` longer than ``limit`` lines (decorators
    not counted, docstring and comments counted: they are part of what a reader has to hold)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out[f"{path.relative_to(base)}::{node.name}"] = lines
    return out


def test_no_function_in_src_is_over_60_lines():
    new = long_functions(ROOT / "src")
    assert not new, f"split these into named functions (docs/contributing.md, 'Short functions'): {new}"


def test_long_functions_counts_lines(tmp_path):
    body = [f"    x{i} = {i}" for i in range(60)]
    (tmp_path / "m.py").write_text("\n".join(["def ok():", *body[:59], "", "def long():", *body]) + "\n")
    assert long_functions(tmp_path, base=tmp_path) == {"m.py::long": 61}


DATAMODULE_NAMES = {"dm", "datamodule"}


def datamodule_reaches(path: Path) -> list[str]:
    """``"line: what"`` for each place the module file ``path`` reaches into a datamodule: an attribute named
    ``datamodule`` (``self.trainer.datamodule``), a variable ``dm`` / ``datamodule`` used at all, or a
    ``.setup(`` call on anything but ``super()`` (Lightning sets a datamodule up; a module sets up only itself).
    Static, so a string or comment naming them is fine."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "datamodule":
            out.append((node.lineno, ".datamodule"))
        elif isinstance(node, ast.Name) and node.id in DATAMODULE_NAMES:
            out.append((node.lineno, node.id))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setup"
              and not (isinstance(node.func.value, ast.Call) and getattr(node.func.value.func, "id", "") == "super")):
            out.append((node.lineno, ".setup("))
    return [f"{line}: {what}" for line, what in sorted(out)]


def test_no_module_reaches_into_its_datamodule():
    """docs/contributing.md, 'Modules see data through batches and a handover': a stage's LightningModule gets
    what its datamodule prepared through ``handover()`` / ``receive()`` (``megedit.handover``), never by reading
    the datamodule or setting it up."""
    modules = sorted((ROOT / "src" / "megedit").rglob("*_module.py"))
    assert len(modules) >= 7
    found = {str(p.relative_to(ROOT)): r for p in modules if (r := datamodule_reaches(p))}
    assert not found, f"hand these over instead (megedit.handover): {found}"


def test_datamodule_reaches_finds_each_kind(tmp_path):
    (tmp_path / "x_module.py").write_text(
        "class M:\n"
        "    def setup(self, stage):\n"
        "        super().setup(stage)  # fine: its own\n"
        "        n = len(self.trainer.datamodule.items)\n"
        "        dm = self.trainer\n"
        "        self.data.setup('fit')\n"
        "        return 'dm.items in a string is fine'\n")
    assert datamodule_reaches(tmp_path / "x_module.py") == ["4: .datamodule", "5: dm", "6: .setup("]


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces to
    hyphens (a repeated heading's ``-1`` suffix is not modelled)."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in markdown.splitlines() if re.match(r"#{1,6} ", line)}


def test_heading_anchors():
    text = "# Stage 5: diffusion\n## Options (`configs/stages/diffusion.yaml`)\n### The SmolLM2 section\n#no"
    assert heading_anchors(text) == {"stage-5-diffusion", "options-configsstagesdiffusionyaml",
                                     "the-smollm2-section"}


def test_config_comments_point_to_existing_docs():
    """Why a value was chosen is in docs/, and a config comment points there: every pointer must lead to an
    existing page and, where it names one, an existing heading."""
    pointers = [(path, m) for path in sorted((ROOT / "configs").rglob("*.yaml"))
                for m in re.finditer(r"docs/([\w.-]+\.md)(?:#([\w-]+))?", path.read_text())]
    assert pointers
    broken = []
    for path, m in pointers:
        doc = ROOT / "docs" / m[1]
        if not doc.is_file() or (m[2] and m[2] not in heading_anchors(doc.read_text())):
            broken.append(f"{path.relative_to(ROOT)}: {m[0]}")
    assert not broken, "config comments point to missing docs: " + ", ".join(broken)
