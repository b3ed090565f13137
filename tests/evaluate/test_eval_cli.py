"""`dsran eval` from the command line: errors, params.yaml defaults and a real run end to end."""

import subprocess
import sys
from pathlib import Path

DSRAN = [sys.executable, "-m", "dsran"]


def run_dsran(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*DSRAN, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_eval_without_model_rejected(tmp_path):
    result = run_dsran("--no-params", "eval", "--split", "test", cwd=tmp_path)
    assert result.returncode == 2
    assert "no model given: pass --model RUN" in result.stderr


def test_eval_missing_run_folder(tmp_path):
    result = run_dsran("eval", "--split", "5k", "--model", "runs/none", cwd=tmp_path)
    assert result.returncode == 1
    assert "run folder not found: runs/none" in result.stderr


def test_eval_defaults_from_params(tmp_path):
    (tmp_path / "params.yaml").write_text("eval:\n  split: 1k-5fold\n  model: runs/a\n")
    result = run_dsran("eval", cwd=tmp_path)
    assert "run folder not found: runs/a" in result.stderr

    (tmp_path / "params.yaml").write_text("eval:\n  model: [runs/b, runs/c]\n")
    result = run_dsran("eval", "--split", "test", cwd=tmp_path)
    assert "run folder not found: runs/b" in result.stderr

    (tmp_path / "params.yaml").write_text("eval:\n  split: 10k\n  model: runs/a\n")
    result = run_dsran("eval", cwd=tmp_path)
    assert result.returncode == 2
    assert "'10k' is not one of 'test', '5k', '1k-5fold'" in result.stderr
