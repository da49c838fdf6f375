"""Render README.md from nbs/index.ipynb (markdown cells as they are, code cells fenced, text outputs kept).

nbdev's own `nbdev_readme` needs Quarto, which cannot be installed here; this keeps the same rule
(the README is the index notebook) with no extra tool. `--check` fails when README.md is stale.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def render(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    parts = []
    for cell in nb["cells"]:
        src = "".join(cell["source"]).rstrip()
        if not src: continue
        first = src.splitlines()[0].strip()
        if cell["cell_type"] == "markdown":
            parts.append(src.replace("](images/", "](nbs/images/")); continue  # images live beside the notebook
        if first.startswith("#|") and ("hide" in first or "export" in first): continue
        lines = [l for l in src.splitlines() if not l.strip().startswith("#|")]
        parts.append("```python\n" + "\n".join(lines).strip() + "\n```")
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "text/markdown" in data: parts.append("".join(data["text/markdown"]).rstrip())
            elif out.get("output_type") == "stream": parts.append("```\n" + "".join(out["text"]).rstrip() + "\n```")
            elif "text/plain" in data and "image/png" not in data: parts.append("```\n" + "".join(data["text/plain"]).rstrip() + "\n```")
    return "<!-- Rendered from nbs/index.ipynb by .ci/render_readme.py: edit the notebook, not this file. -->\n\n" + "\n\n".join(parts) + "\n"

if __name__ == "__main__":
    text = render(root / "nbs" / "index.ipynb")
    readme = root / "README.md"
    if "--check" in sys.argv:
        if readme.read_text(encoding="utf-8") != text:
            sys.exit("README.md is not what nbs/index.ipynb renders to: run `python .ci/render_readme.py`")
        print("README.md is in sync with nbs/index.ipynb")
    else:
        readme.write_text(text, encoding="utf-8"); print(f"wrote {readme}")
