"""The `wmtp` command line, end to end, as a user starts it (installed console script and `python -m`)."""
import wmtp
from conftest import wmtp_cli


def _wmtp(*args, **kw): return wmtp_cli(*args, timeout=120, script=True, **kw)


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
