"""Re-execute notebooks and store their outputs, each with a hash of the cell source that made it.

    nice -n 15 python .ci/refresh_outputs.py nbs/01_loss.ipynb [nbs/11_train.ipynb ...] [--flags slow]

Runs each notebook top to bottom in one process, the way `nbdev_test` does (same working directory, the
same cells: those flagged `notest` or `slow` are skipped unless named in `--flags`; `cuda` and `mps` cells run,
since they check for their device). Every cell that ran gets its new outputs, and, where it has any, the hash
of its source in its metadata (`src_hash`, which `.ci/check_notebooks.py` compares with the source to find
stale outputs). A skipped cell keeps its outputs only while its hash still matches. The notebook is then
cleaned as `nbdev_clean` would, and written only if every cell ran without an error.
"""
import argparse, os, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_notebooks import HASH_KEY, src_hash

ROOT = Path(__file__).resolve().parent.parent
BIG = 20_000  # characters of text, or bytes of an image, above which a cell's output is worth a second look


def _skipped(cell, skip: set) -> bool:
    "Whether nbdev_test would skip this code cell: a flag in `skip`, `#| eval: false`, or an `nbdev_export()` call."
    from fastcore.basics import AttrDict
    from nbdev.process import extract_directives
    direc = extract_directives(AttrDict(source=cell.source), remove=False)
    return bool(set(direc) & skip) or direc.get("eval:", [""])[0].lower() == "false" or "nbdev_export" + "(" in cell.source


def _size(outputs) -> int:
    return sum(len("".join(v) if isinstance(v, list) else str(v))
               for o in outputs for v in [*o.get("data", {}).values(), o.get("text", "")])


def refresh(path: Path, skip: set) -> bool:
    "Execute `path`, store outputs and their source hashes; False (and nothing written) when a cell raised."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.clean import clean_nb
    from nbdev.config import get_config

    nb = read_nb(path)
    ran = set()

    def no_eval(cell):  # True skips the cell, as in nbdev's test_nb
        if cell.cell_type != "code" or _skipped(cell, skip): return True
        ran.add(cell.idx_)
        cell.outputs = []  # execnb stores only outputs that exist: a cell that now prints nothing must lose its old ones
        return False

    start = time.time()
    shell = CaptureShell(path, mpl_format="png")  # plain PNGs: retina doubles every image's size
    try:
        with working_directory(path.parent): shell.run_all(nb, exc_stop=True, preproc=no_eval)
    except BaseException:
        if shell.exc is None: raise  # the tool failed, not a cell
        sys.stderr.write(shell.prettytb(fname=path) + "\n")
        return False
    for c in nb.cells:
        if c.cell_type != "code": continue
        h = src_hash(c.source)
        if c.idx_ not in ran and c.metadata.get(HASH_KEY) != h: c.outputs = []  # skipped, and changed since
        if c.outputs: c.metadata[HASH_KEY] = h
        else: c.metadata.pop(HASH_KEY, None)
        if _size(c.outputs) > BIG: print(f"  note: {path.name} cell {c.idx_} keeps {_size(c.outputs):,} characters of output")
    cfg = get_config(path=ROOT)  # the repository's settings, wherever the notebook lies
    clean_nb(nb, False, cfg.get("allowed_metadata_keys").split(), cfg.get("allowed_cell_metadata_keys").split(), cfg.clean_ids)
    write_nb(nb, path)
    kept = sum(1 for c in nb.cells if c.cell_type == "code" and c.outputs)
    print(f"{path}: {len(ran)} cells ran in {time.time() - start:.0f} s, {kept} keep an output, {path.stat().st_size / 1024:.0f} KB")
    return True


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--flags", default="", help="space-separated flags to run that are normally skipped (e.g. slow)")
    a = ap.parse_args()
    from nbdev.config import get_config
    skip = set(get_config(path=ROOT).tst_flags.split()) - {"cuda", "mps"} - set(a.flags.split())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # one process per notebook: torch and sys.modules state must not leak from one notebook into the next
    bad = []
    for p in a.notebooks:
        if len(a.notebooks) == 1: ok = refresh(p.resolve(), skip)
        else:
            import subprocess
            ok = subprocess.run([sys.executable, __file__, str(p), "--flags", a.flags]).returncode == 0
        if not ok: bad.append(str(p))
    if bad: sys.exit(f"not refreshed (a cell raised; nothing written): {', '.join(bad)}")
