"""`python tests/board_python.py ARGS...` runs `edgegan ARGS...` as on a board's install: the packages of
pyproject's `server` extra cannot be imported (as if never installed), whatever this environment holds.
With EDGEGAN_IMPORTS_TO=FILE set, the top-level names of every module imported are written there at exit."""

import atexit
import os
import re
import sys
import tomllib
from importlib.abc import MetaPathFinder
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def left_out() -> frozenset[str]:
    """The import names of the server extra's distributions (each is its own import name)."""
    extra = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["server"]
    return frozenset(re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0] for requirement in extra)


class LeftOut(MetaPathFinder):
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def write_imports(path: str) -> None:
    Path(path).write_text("\n".join(sorted({name.split(".")[0] for name in sys.modules})))


if __name__ == "__main__":
    sys.meta_path.insert(0, LeftOut(left_out()))
    if os.environ.get("EDGEGAN_IMPORTS_TO"):
        atexit.register(write_imports, os.environ["EDGEGAN_IMPORTS_TO"])
    sys.argv[0] = "edgegan"
    from edgegan.cli import entry

    entry()
