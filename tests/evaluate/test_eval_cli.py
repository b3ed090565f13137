"""`dsran eval` option errors and params.yaml defaults, through Click's test runner."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from dsran.pipelines.cli import cli


def invoke(*args, cwd: Path):
    """Run ``dsran ARGS`` in this process with ``cwd`` as the working folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_eval_without_model_rejected(tmp_path):
    result = invoke("--no-params", "eval", "--split", "test", cwd=tmp_path)
    assert result.exit_code == 2
    assert "no model given: pass --model RUN" in result.output


def test_eval_missing_run_folder(tmp_path):
    result = invoke("eval", "--split", "5k", "--model", "runs/none", cwd=tmp_path)
    assert result.exit_code == 1
    assert "run folder not found: runs/none" in result.output


def test_eval_defaults_from_params(tmp_path):
    (tmp_path / "params.yaml").write_text("eval:\n  split: 1k-5fold\n  model: runs/a\n")
    result = invoke("eval", cwd=tmp_path)
    assert "run folder not found: runs/a" in result.output

    (tmp_path / "params.yaml").write_text("eval:\n  model: [runs/b, runs/c]\n")
    result = invoke("eval", "--split", "test", cwd=tmp_path)
    assert "run folder not found: runs/b" in result.output

    (tmp_path / "params.yaml").write_text("eval:\n  split: 10k\n  model: runs/a\n")
    result = invoke("eval", cwd=tmp_path)
    assert result.exit_code == 2
    assert "'10k' is not one of 'test', '5k', '1k-5fold'" in result.output
