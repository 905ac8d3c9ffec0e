"""The wheel ships every module of the package (its subpackages included) and
no test double: what `pip install .` and the Dockerfile install is what the
tests ran."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module_and_no_test_double(tmp_path: Path) -> None:
    tree = tmp_path / "src"  # a copy: the build leaves nothing behind in the checkout
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "proxy", tree / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(  # noqa: S603 - our own interpreter and paths
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
         "-w", str(tmp_path), str(tree)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("authproxy-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("proxy/")}
    source = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "proxy").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".so"
    }
    assert source - shipped == set(), "modules missing from the wheel"
    assert not [name for name in shipped if "fakes" in name]
