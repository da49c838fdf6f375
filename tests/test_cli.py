"""The `wmtp` command line, end to end, as a user starts it (installed console script and `python -m`)."""
import shutil, subprocess, sys

import wmtp


def _wmtp(*args, **kw):
    exe = shutil.which("wmtp")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "wmtp.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_every_command():
    out = _wmtp("--help")
    assert out.returncode == 0, out.stderr
    for name in ("train", "eval", "bench"):
        assert f"  {name} " in out.stdout


def test_version_matches_package():
    out = _wmtp("--version")
    assert out.returncode == 0 and out.stdout.strip() == wmtp.__version__


def test_unknown_command_is_an_error_with_a_suggestion():
    out = _wmtp("trian")
    assert out.returncode == 2
    assert "unknown command 'trian'" in out.stderr and "did you mean 'train'" in out.stderr
