"""``python -m amohook``."""

import os
import sys
from pathlib import Path


def _drop_working_directory() -> None:
    """`python -m` puts the working directory first on the import path; amohook then imports
    stdlib modules (tomllib, …) lazily, and a file of that name there would run instead. Keep it
    only when amohook itself is being run from a checkout in that directory."""
    if not sys.path or sys.flags.safe_path:
        return
    first = sys.path[0]
    cwd = os.getcwd()
    if first not in ("", cwd):
        return
    if Path(__file__).resolve().parent.parent == Path(cwd).resolve():
        return
    del sys.path[0]


_drop_working_directory()

from amohook.cli.app import main  # noqa: E402

if __name__ == "__main__":
    main()
