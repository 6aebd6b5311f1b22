"""The package as a user gets it: the wheel builds from the project files alone, carries
complete metadata (py.typed, the license, no runtime dependencies), installs into a fresh
virtualenv without the network, and runs the README's example there.

The build uses the test environment's setuptools (no build isolation) and the install uses
``--no-index``, so nothing is fetched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROJECT_FILES = ("pyproject.toml", "README.md", "LICENSE")


def run(cmd: list[str], cwd: Path, timeout: float = 180) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel . --no-deps`` in a copy of the project (the checkout stays untouched)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(dist)], cwd=tree)
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_is_pure_python_and_carries_complete_metadata(wheel: Path) -> None:
    assert re.fullmatch(r"pyvirtio-[0-9.]+-py3-none-any\.whl", wheel.name)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(f"{dist_info}/METADATA").decode())
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    assert "pyvirtio/py.typed" in names
    assert f"{dist_info}/licenses/LICENSE" in names
    sources = {p.relative_to(ROOT / "src").as_posix()
               for p in (ROOT / "src" / "pyvirtio").rglob("*.py")}
    assert sources - set(names) == set()  # every module of the package is in it
    assert not [n for n in names if n.startswith(("tests/", "examples/", "benchmarks/"))]
    assert meta["Name"] == "pyvirtio"
    assert meta["Summary"] and meta["Keywords"] and meta["Author"]
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["License-Expression"] == "MIT"
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "A taste" in meta.get_payload()  # the README is the long description
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3 :: Only" in classifiers
    runtime = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert runtime == []  # nothing to fetch when installing it
    assert "pyvirtio = pyvirtio.cli.main:main" in entry_points


def test_the_wheel_installs_in_a_fresh_venv_and_runs_the_readme_example(
        wheel: Path, tmp_path: Path) -> None:
    blocks = readme_python_blocks()
    assert blocks, "README.md has no ```python example"
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = str(venv / "bin" / "python")
    run([python, "-m", "pip", "install", "--no-index", "--no-deps", str(wheel)], cwd=tmp_path)
    where = run([python, "-c", "import pyvirtio; print(pyvirtio.__file__)"], cwd=tmp_path)
    assert where.strip().startswith(str(venv)), where  # the installed copy, not the checkout
    assert "serve" in run([str(venv / "bin" / "pyvirtio"), "--help"], cwd=tmp_path)
    for i, code in enumerate(blocks):
        script = tmp_path / f"readme_example_{i}.py"
        script.write_text(code)
        out = run([python, str(script)], cwd=tmp_path, timeout=60)
        if i == 0:  # the taste: 16 random bytes from our device, through our driver
            assert re.fullmatch(r"[0-9a-f]{32}\n", out), out
