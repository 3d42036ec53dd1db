"""Handlers are imported only when asked for, from where asked, and a failing import is a
one-line handler error (hardening #12)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from amohook.errors import ExitCode
from tests.conftest import ROOT, cli_env

RULES = (ROOT / "examples" / "rules.toml").read_text(encoding="utf-8")
SCRIPT = Path(sys.executable).parent / "amohook"
# `python -m amohook` and the installed console script put different things on sys.path.
LAUNCHERS = [pytest.param([sys.executable, "-m", "amohook"], id="python-m")]
if SCRIPT.exists():
    LAUNCHERS.append(pytest.param([str(SCRIPT)], id="script"))


def run_in(cwd: Path, launcher: list[str], args: list[str], db_url: str):
    return subprocess.run(
        [*launcher, *args], env=cli_env(db_url), cwd=str(cwd), capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_stdlib_named_file_in_the_working_directory_is_never_imported(tmp_path, sqlite_url, launcher):
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "marker"
    for name in ("tomllib", "json", "typing_extensions"):
        (work / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    (work / "rules.toml").write_text(RULES)
    result = run_in(work, launcher, ["worker", "--rules", "rules.toml", "--once", "--log-level", "warning"], sqlite_url)
    assert not marker.exists(), f"imported from the working directory: {marker.read_text()}"
    # The rules name an account the store does not have; what matters is that nothing ran.
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_handler_beside_the_config_is_still_found(tmp_path, sqlite_url, launcher):
    (tmp_path / "myhooks.py").write_text("def handle(event, ctx):\n    pass\n")
    result = run_in(tmp_path, launcher, ["worker", "--handler", "myhooks:handle", "--once"], sqlite_url)
    assert result.returncode == 0, result.stderr
    assert "processed 0 event(s)" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, shown",
    [
        ("import sys\nsys.exit(3)\n", "SystemExit: 3"),
        ("raise SystemExit\n", "SystemExit"),
        ("raise GeneratorExit('odd')\n", "GeneratorExit: odd"),
        ("raise ValueError('bad config\\nsecond line')\n", "ValueError: bad config"),
    ],
)
def test_a_handler_module_failing_at_import_is_a_one_line_handler_error(tmp_path, sqlite_url, body, shown):
    (tmp_path / "badhooks.py").write_text(body)
    result = run_in(
        tmp_path, [sys.executable, "-m", "amohook"], ["worker", "--handler", "badhooks:handle", "--once"], sqlite_url
    )
    assert result.returncode == ExitCode.USAGE, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: handler 'badhooks:handle'") and shown in lines[0], lines[0]


def test_the_working_directory_is_not_left_on_the_import_path(tmp_path, monkeypatch):
    from amohook.worker import load_handler

    (tmp_path / "lefthooks.py").write_text("def handle(event, ctx):\n    pass\n")
    before = list(sys.path)
    assert callable(load_handler("lefthooks:handle", search_dir=str(tmp_path)))
    assert sys.path == before
    sys.modules.pop("lefthooks", None)
