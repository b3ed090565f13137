"""`dsran eval` option errors and params.yaml defaults, through Click's test runner."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from dsran.pipelines.cli import cli


def invoke(*args, cwd: Path, dvc_stage: str | None = None):
    """Run ``dsran ARGS`` in this process with ``cwd`` as the working folder.

    ``dvc_stage`` sets DVC_STAGE as `dvc repro` does, which makes dsran read params.yaml.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        if dvc_stage is None:
            patch.delenv("DVC_STAGE", raising=False)
        else:
            patch.setenv("DVC_STAGE", dvc_stage)
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
    result = invoke("eval", cwd=tmp_path, dvc_stage="dvc.yaml:eval")
    assert "run folder not found: runs/a" in result.output

    (tmp_path / "params.yaml").write_text("eval:\n  model: [runs/b, runs/c]\n")
    result = invoke("eval", "--split", "test", cwd=tmp_path, dvc_stage="dvc.yaml:eval")
    assert "run folder not found: runs/b" in result.output

    (tmp_path / "params.yaml").write_text("eval:\n  split: 10k\n  model: runs/a\n")
    result = invoke("eval", cwd=tmp_path, dvc_stage="dvc.yaml:eval")
    assert result.exit_code == 2
    assert "'10k' is not one of 'test', '5k', '1k-5fold'" in result.output


def test_params_ignored_outside_dvc(tmp_path):
    (tmp_path / "params.yaml").write_text("eval:\n  split: 1k-5fold\n  model: runs/a\n")
    result = invoke("eval", cwd=tmp_path)
    assert result.exit_code == 2
    assert "Missing option '--split'" in result.output


def test_params_file_named_explicitly(tmp_path):
    (tmp_path / "mine.yaml").write_text("eval:\n  split: 5k\n  model: runs/x\n")
    result = invoke("--params", "mine.yaml", "eval", cwd=tmp_path)
    assert "run folder not found: runs/x" in result.output


def test_params_unknown_key_rejected(tmp_path):
    (tmp_path / "params.yaml").write_text("eval:\n  splitt: 5k\n")
    result = invoke("eval", "--split", "test", cwd=tmp_path, dvc_stage="dvc.yaml:eval")
    assert result.exit_code == 1
    assert "section 'eval' has unknown keys ['splitt']" in result.output


def test_params_file_missing(tmp_path):
    result = invoke("--params", "absent.yaml", "eval", "--split", "test", cwd=tmp_path)
    assert result.exit_code == 1
    assert "parameters file not found: absent.yaml" in result.output
