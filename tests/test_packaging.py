"""The package installs like a package: a wheel built from the source holds every subpackage
and its data files, and a non-editable install of it gives a working `ttt-pipe`.

Offline and quick (~20 s): the wheel is built with the project venv's own setuptools
(`--no-build-isolation`, nothing downloaded) from a copy of the sources (the build leaves
`build/` and `*.egg-info` behind), installed with `--no-deps` into a throwaway venv, and run
from a folder outside the source tree with PYTHONPATH cleared, so only the wheel's files can
be imported. `venv --system-site-packages` over the project venv's python sees the
*interpreter's* site-packages, not the project venv's, so a `.pth` line adds the project
venv's site-packages (torch, ray, ...) as a plain path: its `.pth` files, among them the
editable install of this repository, are not executed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from helpers import write_dataset

from pipeline.corruptions.imagenet_c.weather import FROST_FILES

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "engines", "jobs")
DATA_GLOBS = ("*.txt", "*.json")  # pyproject.toml's [tool.setuptools.package-data]


def _source_packages() -> set[str]:
    """Every package folder (has __init__.py) under the top-level packages, as 'a/b'."""
    return {str(p.parent.relative_to(ROOT)) for top in PACKAGES
            for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}


def _source_data_files() -> set[str]:
    return {str(p.relative_to(ROOT)) for pkg in _source_packages() for pattern in DATA_GLOBS
            for p in (ROOT / pkg).glob(pattern)}


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for top in PACKAGES:
        shutil.copytree(ROOT / top, src / top, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", dist, src])
    (found,) = dist.glob("ttt_pipe-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel (bin/ of it)."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    assert site.is_dir(), site
    (site / "_ttt_pipe_project_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # The project venv's pip, told to install into the new venv's interpreter paths.
    _run([sys.executable, "-m", "pip", "--python", env_dir / "bin" / "python", "install",
          "--no-deps", "--no-index", "--ignore-installed", "-q", wheel])
    return env_dir / "bin"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "TTT_PIPE_OFFLINE": "1", "COLUMNS": "200"}


def test_wheel_holds_every_subpackage_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    folders = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert _source_packages() - folders == set()
    assert {"pipeline/corruptions", "pipeline/report", "jobs/commands"} <= folders
    assert _source_data_files() - names == set()
    frost = {f"pipeline/corruptions/imagenet_c/frost/{f}" for f in (*FROST_FILES, "NOTICE.txt")}
    assert frost - names == set()  # frost's photos ship: no imagecorruptions needed at run time
    assert not [n for n in names if n.startswith("tests/")]
    assert any(n.endswith("entry_points.txt") for n in names)


def test_installed_wheel_runs_outside_the_source_tree(installed, tmp_path):
    env, cwd = _clean_env(), tmp_path / "elsewhere"
    cwd.mkdir()
    where = _run([installed / "python", "-c",
                  "import jobs, pipeline.corruptions, pipeline.report, jobs.commands, engines; "
                  "print(jobs.__file__)"], cwd=cwd, env=env).stdout.strip()
    assert Path(where).is_relative_to(installed.parent), where  # the wheel's copy, not the repo
    assert "Usage" in _run([installed / "ttt-pipe", "--help"], cwd=cwd, env=env).stdout
    data = write_dataset(tmp_path / "mnist", n_train=10, n_test=12)
    out = tmp_path / "shards"
    result = _run([installed / "ttt-pipe", "corrupt", "--dataset", "mnist", "--data-dir", data,
                   "--corruptions", "gaussian_noise", "--severities", "3", "--no-identity",
                   "--shard-size", "8", "--out", out], cwd=cwd, env=env)
    assert "wrote 2 shards" in result.stdout, result.stdout
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "gaussian_noise-s3-00000.parquet", "gaussian_noise-s3-00001.parquet"]
