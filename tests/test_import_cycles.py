"""tools/import_cycles.py: an import cycle between modules fails CI, function-local imports included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "import_cycles.py"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "pkg"
    for name, source in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
    return package


def _run(package: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), str(package)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_a_top_level_cycle_is_reported_with_its_import_lines(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "a.py": "from pkg.b import thing\n",
            "b.py": "from . import c\nthing = 1\n",
            "c.py": "import pkg.a\n",
            "d.py": "from pkg import a\n",  # imports into the cycle, is not part of it
        },
    )
    result = _run(package)
    assert result.returncode == 1, result.stdout
    assert "cycle 1: 3 modules: pkg.a, pkg.b, pkg.c" in result.stdout
    assert "from pkg.b import thing" in result.stdout
    assert "from . import c" in result.stdout
    assert "import pkg.a" in result.stdout
    assert "pkg.d" not in result.stdout


def test_a_cycle_through_a_function_local_import_counts(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "sub/__init__.py": "",
            "sub/x.py": "def f():\n    from ..y import g\n    return g\n",
            "y.py": "from pkg.sub import x\ng = 1\n",
        },
    )
    result = _run(package)
    assert result.returncode == 1, result.stdout
    assert "pkg.sub.x, pkg.y" in result.stdout
    assert "from ..y import g" in result.stdout


def test_a_cycle_only_under_type_checking_does_not_count(tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
            "b.py": "import typing\nfrom pkg import a\nif typing.TYPE_CHECKING:\n    import pkg.a\nclass B: ...\n",
        },
    )
    result = _run(package)
    assert result.returncode == 0, result.stdout
    assert result.stdout == ""


def test_amohook_has_no_import_cycle() -> None:
    result = _run(ROOT / "amohook")
    assert result.returncode == 0, result.stdout
