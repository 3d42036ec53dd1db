"""The tests' own layout: a test module never imports another (shared helpers live in tests/helpers/,
shared fixtures in tests/conftest.py), so each test module can be read, moved and run alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# Imports written inside strings count too: scripts that tests run in a process of their own.
IN_TEXT = re.compile(
    r"^\s*(?:from\s+(?:tests|\.+)(?:\.\w+)*\.test_\w+\s+import|import\s+tests(?:\.\w+)*\.test_\w+)", re.M
)


def named_test_modules(names: list[str]) -> list[str]:
    return [name for name in names if name.split(".")[-1].startswith("test_")]


def imported_named_test_modules(path: Path) -> list[str]:
    """The test modules ``path`` imports, anywhere in it (function-local imports and scripts in strings included)."""
    text = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += named_test_modules([alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names = [f"{module}.{alias.name}" for alias in node.names]
            found += named_test_modules([module]) or named_test_modules(names)
    found += [match.group(0).strip() for match in IN_TEXT.finditer(text)]
    return found


def test_no_test_module_imports_another():
    offenders = {
        str(path.relative_to(TESTS)): imported
        for path in sorted(TESTS.rglob("*.py"))
        if (imported := imported_named_test_modules(path))
    }
    assert not offenders, f"move what they share to tests/helpers/ or a fixture in tests/conftest.py: {offenders}"


def test_the_check_sees_every_form_of_import(tmp_path):
    module = tmp_path / "test_x.py"
    module.write_text(
        "import tests.test_a\n"
        "from tests.test_b import thing\n"
        "from tests.store.test_c import thing\n"
        "from tests import test_d\n"
        "from . import test_e\n"
        "def f():\n"
        "    from .test_f import thing\n"
        'SCRIPT = """\nfrom tests.test_g import thing\n"""\n'
        "from tests.helpers.deliveries import FORM\n"
        "from tests.conftest import run_cli\n"
    )
    found = imported_named_test_modules(module)
    for name in "abcdefg":
        assert any(f"test_{name}" in item for item in found), (name, found)
    assert not any("helpers" in item or "conftest" in item for item in found)
