"""Check that the notebooks read as chapters and that every exported module has its docstring.

Fails (exit 1, naming each problem) when
- a markdown cell is written as comment lines (every line starts with `# `), which Jupyter renders as a
  wall of top-level headings;
- a notebook does not open with a `# Title` cell followed by a `> one-line description`;
- a notebook stores an error output (a stale traceback);
- a module under `wmtp/` (other than nbdev's index) has no docstring.
"""
import ast, json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
TITLE = re.compile(r"# [^#\n][^\n]*\n\n> \S[^\n]*")


def comment_style(src: str) -> bool:
    "True when a markdown cell is written as `# ` comment lines rather than prose."
    lines = [l for l in src.splitlines() if l.strip()]
    if src.lstrip().startswith("# #"): return True
    return len(lines) > 1 and all(l.startswith("# ") or l.strip() == "#" for l in lines)


def notebook_problems(path: Path) -> list[str]:
    "Every problem found in one notebook, each naming the cell."
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    out = []
    first = "".join(cells[0]["source"]) if cells else ""
    if not cells or cells[0]["cell_type"] != "markdown" or not TITLE.match(first):
        out.append(f"{path.name}: the first cell is not '# Title' + blank line + '> description'")
    for i, c in enumerate(cells):
        src = "".join(c["source"])
        if c["cell_type"] == "markdown" and comment_style(src):
            out.append(f"{path.name} cell {i}: markdown written as '# ' comment lines (renders as headings)")
        if c["cell_type"] == "code" and any(o.get("output_type") == "error" for o in c.get("outputs", [])):
            out.append(f"{path.name} cell {i}: a stored error output (stale traceback)")
    return out


def module_problems(pkg: Path) -> list[str]:
    "Modules without a docstring."
    out = []
    for f in sorted(pkg.glob("*.py")):
        if f.name in ("__init__.py", "_modidx.py"): continue
        if not ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))):
            out.append(f"wmtp/{f.name}: no module docstring (its notebook needs a '# Title' + '> description' cell)")
    return out


if __name__ == "__main__":
    problems = [p for nb in sorted((root / "nbs").glob("*.ipynb")) for p in notebook_problems(nb)]
    problems += module_problems(root / "wmtp")
    for p in problems: print("FAIL:", p)
    if problems: sys.exit(1)
    print(f"notebooks read as prose: {len(list((root / 'nbs').glob('*.ipynb')))} notebooks, every module has a docstring")
