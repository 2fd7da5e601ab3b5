"""Command-line mistakes through the real entry point: a usage line and one error line on stderr,
exit status 2, no traceback (typer hands us its vendored click's exceptions with standalone_mode=False)."""

from __future__ import annotations

import pytest
from conftest import run_cli


@pytest.mark.parametrize("argv, error", [
    (["trian"], "No such command 'trian'"),
    (["run", "--resum"], "No such option: --resum"),
    (["export", "--model"], "Option '--model' requires an argument"),
])
def test_usage_mistakes_exit_2_with_the_usage_line(argv, error):
    proc = run_cli(*argv, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Usage:" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and error in errors[0], proc.stderr


def test_the_usage_line_names_the_subcommand():
    proc = run_cli("export", "--model", timeout=120)
    assert "export [OPTIONS]" in proc.stderr, proc.stderr


def test_help_exits_0():
    proc = run_cli("train", "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--resume" in proc.stdout


@pytest.mark.parametrize("raised, code, err", [(lambda: __import__("typer").Abort(), 1, "Aborted!"),
                                               (lambda: __import__("typer").Exit(3), 3, "")])
def test_abort_and_exit(raised, code, err, monkeypatch, capsys):
    import sys

    from distil import cli

    def app(**_):
        raise raised()

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(sys, "argv", ["distil"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == code
    assert capsys.readouterr().err.strip() == err


def test_a_malformed_gate_exits_2_before_any_work(tmp_path):
    proc = run_cli("eval", f"out={tmp_path / 'out'}", "--gate", "top1_agreement.mean >= 1", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: field \"--gate\": bad gate 'top1_agreement.mean >= 1': unknown field 'mean' "
        "(one of teacher, student, baseline, retention, student_minus_baseline)"]
    assert not (tmp_path / "out").exists()
