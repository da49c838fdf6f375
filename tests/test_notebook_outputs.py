"""The notebook checks of `.ci/check_notebooks.py` and the output refresh of `.ci/refresh_outputs.py`, on tiny notebooks."""
import importlib.util, json, subprocess, sys

from conftest import ROOT, subprocess_env

spec = importlib.util.spec_from_file_location("check_notebooks", ROOT / ".ci" / "check_notebooks.py")
check = importlib.util.module_from_spec(spec); spec.loader.exec_module(check)


def _nb(*cells) -> dict:
    "A notebook of (cell_type, source) pairs, after a title cell."
    mk = lambda t, s: dict(cell_type=t, source=s, metadata={}, **({"outputs": [], "execution_count": None} if t == "code" else {}))
    cells = [mk("markdown", "# A tiny chapter\n\n> What it shows")] + [mk(t, s) for t, s in cells]
    return dict(cells=cells, metadata={}, nbformat=4, nbformat_minor=5)


def _write(path, nb): path.write_text(json.dumps(nb, indent=1)); return path


def _run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / ".ci" / script), *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=ROOT, timeout=300)


def test_stale_output_fails_until_refreshed(tmp_path):
    nb = _write(tmp_path / "tiny.ipynb", _nb(("code", "x = 2"), ("code", "print(x * 21)"), ("code", "#| slow\nprint('slow')")))
    res = _run("refresh_outputs.py", nb)
    assert res.returncode == 0, res.stderr
    cells = json.loads(nb.read_text())["cells"]
    assert "".join(cells[2]["outputs"][0]["text"]) == "42\n" and check.HASH_KEY in cells[2]["metadata"]
    assert cells[1]["outputs"] == [] and check.HASH_KEY not in cells[1]["metadata"]  # no output, no hash
    assert cells[3]["outputs"] == []  # slow cells do not run unless asked (--flags slow)
    assert _run("check_notebooks.py", nb).returncode == 0

    # a developer edits the cell and commits without refreshing: the stored 42 is no longer this code's output
    data = json.loads(nb.read_text()); data["cells"][2]["source"] = "print(x * 20)"; _write(nb, data)
    res = _run("check_notebooks.py", nb)
    assert res.returncode == 1 and "cell 2: a stale output" in res.stdout, res.stdout

    assert _run("refresh_outputs.py", nb).returncode == 0
    assert "".join(json.loads(nb.read_text())["cells"][2]["outputs"][0]["text"]) == "40\n"
    assert _run("check_notebooks.py", nb).returncode == 0

    # a cell that no longer prints anything loses its old output and its hash
    data = json.loads(nb.read_text()); data["cells"][2]["source"] = "y = x * 20"; _write(nb, data)
    assert _run("refresh_outputs.py", nb).returncode == 0
    cell = json.loads(nb.read_text())["cells"][2]
    assert cell["outputs"] == [] and check.HASH_KEY not in cell["metadata"]


def test_refresh_writes_nothing_when_a_cell_raises(tmp_path):
    nb = _write(tmp_path / "bad.ipynb", _nb(("code", "print('before')"), ("code", "1 / 0")))
    before = nb.read_text()
    res = _run("refresh_outputs.py", nb)
    assert res.returncode == 1 and "ZeroDivisionError" in res.stderr and "not refreshed" in res.stderr
    assert nb.read_text() == before


def test_outputs_without_hash():
    out = {"output_type": "stream", "name": "stdout", "text": ["1\n"]}
    cells = _nb(("code", "print(1)"), ("code", "print(2)"))["cells"]
    cells[1]["outputs"] = [out]
    # never refreshed: outputs made by hand are tolerated, except under --strict
    assert check.output_problems("nb", cells) == []
    assert "not stored by .ci/refresh_outputs.py" in check.output_problems("nb", cells, strict=True)[0]
    # once the tool refreshed the notebook, an output without a hash was made by something else
    cells[2]["outputs"] = [out]; cells[2]["metadata"][check.HASH_KEY] = check.src_hash("print(2)")
    assert [p[:10] for p in check.output_problems("nb", cells)] == ["nb cell 1:"]


def test_silent_chapter():
    cells = _nb(("code", "#| export\ndef f(): return 1"), ("code", "f()"))["cells"]
    assert "keeps no output" in check.output_problems("nb", cells)[0]
    only_exports = _nb(("code", "#| export\ndef f(): return 1"))["cells"]
    assert check.output_problems("nb", only_exports, strict=True) == []


def test_pending_notebooks_report_but_pass_until_strict(tmp_path, capsys, monkeypatch):
    nb = _nb(("markdown", "# A one-line heading"), ("code", "#| cuda\nx = 1"), ("code", "x"))
    monkeypatch.setattr(check, "PENDING", {"13_bench.ipynb"})  # a notebook someone is changing now (empty on main)
    name = "13_bench.ipynb"
    p = _write(tmp_path / name, nb)
    assert check.notebook_problems(p) == []
    assert capsys.readouterr().out.count("pending:") == 3
    assert len(check.notebook_problems(p, strict=True)) == 3
    other = _write(tmp_path / "99_mine.ipynb", nb)
    assert len(check.notebook_problems(other)) == 3


def test_device_cells_must_check_their_device():
    cells = _nb(("code", "#| cuda\nx = torch.ones(1, device='cuda')"),
                ("code", '#| mps\nif has_device("mps"):\n    x = torch.ones(1, device="mps")'),
                ("code", '#| mps\nif has_device("cuda"):\n    pass'))["cells"]
    probs = check.device_problems("nb", cells)
    assert [p.split(":")[0] for p in probs] == ["nb cell 1", "nb cell 3"], probs


def test_one_line_heading_cells():
    assert check.comment_style("# Title", first=True) is False
    assert check.comment_style("# Loading the data")
    assert check.comment_style("## A section") is False
    assert check.comment_style("# one\n# two")
    assert check.comment_style("Prose that mentions # a hash.") is False


def test_book_floor(tmp_path):
    "The book-wide floor fails on a book that shows too little, and passes on this repository's notebooks."
    code = lambda src, outs=(): {"cell_type": "code", "source": [src], "outputs": list(outs), "metadata": {}}
    png = {"output_type": "display_data", "data": {"image/png": "iVBOR"}, "metadata": {}}
    nb = tmp_path / "a.ipynb"
    nb.write_text(json.dumps({"cells": [code("#| export\nx = 1"), code("w"), code("x"), code("y"), code("z", [png])]}))
    probs = check.book_problems([nb])
    assert any("1 of 4 non-export code cells" in p for p in probs) and any("1 plots, fewer than 10" in p for p in probs), probs
    assert check.book_problems(sorted((ROOT / "nbs").glob("*.ipynb"))) == []
