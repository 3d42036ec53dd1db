"""An SQLite URL is outside input: amohook sets modes only on what it creates (hardening #1, #13)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from amohook.errors import ExitCode
from tests.conftest import run_cli


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _status(url: str):
    return run_cli(["status"], url)


def test_an_existing_directory_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "srv"
    target.mkdir(mode=0o755)
    os.chmod(target, 0o755)
    result = _status(f"sqlite:///{target}")
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "is a directory" in result.stderr and "nothing was changed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _mode(target) == 0o755
    assert list(target.iterdir()) == []


def test_root_and_a_shared_temp_directory_are_not_touched(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    for url in (f"sqlite:///{shared}", "sqlite:////", "sqlite:////tmp"):
        before = {p: _mode(p) for p in (shared, "/", "/tmp")}
        result = _status(url)
        assert result.returncode == ExitCode.USAGE, (url, result.stderr)
        assert {p: _mode(p) for p in before} == before


def test_a_text_file_is_refused_and_keeps_its_mode_and_content(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("my notes\n")
    os.chmod(target, 0o644)
    result = _status(f"sqlite:///{target}")
    assert result.returncode == ExitCode.USAGE
    assert "not an SQLite database" in result.stderr
    assert _mode(target) == 0o644
    assert target.read_text() == "my notes\n"
    assert not (tmp_path / "notes.txt-wal").exists()


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_symlink_is_refused_and_its_target_keeps_its_mode(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("x")
    else:
        target.mkdir()
    os.chmod(target, 0o755)
    link = tmp_path / "link.db"
    link.symlink_to(target)
    result = _status(f"sqlite:///{link}")
    assert result.returncode == ExitCode.USAGE
    assert "symbolic link" in result.stderr
    assert _mode(target) == 0o755


def test_a_dangling_symlink_is_not_followed_to_create_a_file(tmp_path):
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "elsewhere.db")
    result = _status(f"sqlite:///{link}")
    assert result.returncode == ExitCode.USAGE
    assert not (tmp_path / "elsewhere.db").exists()


def _create(url: str) -> None:
    """Make the store as the commands that start one do (init-auth, auth-url, serve, worker)."""
    from amohook.store import open_store

    open_store(url).close()


def test_an_existing_store_with_loose_permissions_is_warned_about_not_changed(tmp_path):
    db = tmp_path / "amohook.db"
    _create(f"sqlite:///{db}")
    assert _mode(db) == 0o600  # created by amohook: private
    os.chmod(db, 0o644)
    result = _status(f"sqlite:///{db}")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("chmod 600") == 1, result.stderr  # said once, not once per layer
    doctor = run_cli(["doctor"], f"sqlite:///{db}")
    assert (doctor.stdout + doctor.stderr).count("chmod 600") == 1, doctor  # as the database check's warning
    [database] = [
        c
        for c in json.loads(run_cli(["doctor", "--json"], f"sqlite:///{db}").stdout)["checks"]
        if c["name"] == "database"
    ]
    assert database["severity"] == "warning" and database["fix"] == f"run: chmod 600 '{db}'", database
    assert _mode(db) == 0o644


def test_an_existing_directory_of_a_new_store_keeps_its_mode(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, 0o755)
    _create(f"sqlite:///{parent / 'amohook.db'}")
    assert _mode(parent) == 0o755
    assert _mode(parent / "amohook.db") == 0o600


@pytest.mark.parametrize(
    "url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite:///file::memory:?cache=shared"]
)
def test_an_in_memory_or_empty_sqlite_url_is_refused(url, tmp_path):
    result = run_cli(["status"], url)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "names no database file" in result.stderr
    assert "Traceback" not in result.stderr
