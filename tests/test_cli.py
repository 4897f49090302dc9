import subprocess
import sys

from fastdiff import cli


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("fastdiff", "torch", "backends:", "cpu", "reference", "triton", "cuda"):
        assert word in out
    assert "cpu        yes" in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "fastdiff.cli", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout
