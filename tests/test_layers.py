"""The layers contract of ``make lint`` (``[tool.importlinter]`` in pyproject.toml;
docs/architecture.md): cli > app > losses | evaluation > core. The contract is run on a copy of
the packages as they are (kept) and with one wrong-way import planted (broken, exit status 1,
the offending import named)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _copy(tmp_path: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for pkg in ("contrastive", "losses", "evaluation"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint(where: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(where), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--config", "pyproject.toml", "--no-cache"], cwd=where,
                          env=env, capture_output=True, text=True, timeout=300)


PLANTED = {
    "evaluation imports a loss": ("evaluation/_planted.py", "import losses  # noqa\n",
                                  "evaluation._planted -> losses"),
    # the core layer lists its modules one by one: plant the import in one of them
    "a core module imports the application": (
        "contrastive/pairs.py", "from contrastive.app import config  # noqa\n",
        "contrastive.pairs -> contrastive.app.config"),
    "losses import evaluation": ("losses/_planted.py", "import evaluation  # noqa\n",
                                 "losses._planted -> evaluation"),
    "the application imports the command line": (
        "contrastive/app/_planted.py", "from contrastive import cli  # noqa\n",
        "contrastive.app._planted -> contrastive.cli"),
}


def test_layers_contract_is_kept_as_the_code_stands(tmp_path):
    r = _lint(_copy(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("case", list(PLANTED))
def test_layers_contract_breaks_on_a_wrong_way_import(tmp_path, case):
    where = _copy(tmp_path)
    path, code, chain = PLANTED[case]
    target = where / path
    target.write_text((target.read_text() + "\n" if target.exists() else "") + code)
    r = _lint(where)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "0 kept, 1 broken" in r.stdout
    assert chain in r.stdout, r.stdout
