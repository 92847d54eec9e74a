"""The CLI's one registry of jobs: modules of the package, a thin script each, no `jobs` install."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_namespace_packages

from emerg_stream.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_every_command_is_a_module_of_the_package():
    assert all(module.startswith("emerg_stream.jobs.") for module in COMMANDS.values())
    usage = build_parser().format_help()  # every module imported, every job listed
    assert all(name in usage for name in COMMANDS)


def test_each_job_has_one_thin_script_that_names_it():
    scripts = {p.stem: p.read_text() for p in (ROOT / "jobs").glob("*.py")}
    modules = {module.rsplit(".", 1)[1]: name for name, module in COMMANDS.items()}
    assert set(scripts) == set(modules)
    for stem, name in modules.items():
        assert f'cli.main(["{name}", *sys.argv[1:]])' in scripts[stem], stem


def test_a_thin_script_runs_its_job(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "split.py"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "usage: emerg-stream split" in res.stdout and "--dataset" in res.stdout


def test_the_install_holds_no_top_level_package_but_emerg_stream():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = find_namespace_packages(where=str(ROOT), include=find["find"]["include"])
    assert "emerg_stream.jobs" in packages
    assert {p.split(".")[0] for p in packages} == {"emerg_stream"}


def test_building_the_parser_does_not_import_torch():
    """Every job registers its flags without torch (jobs import it inside ``run``), so
    ``--help`` and the broker-only jobs start in a fraction of a second."""
    code = "import sys; from emerg_stream.cli import build_parser; build_parser(); "
    code += "print('torch' in sys.modules)"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert res.stdout.strip() == "False"
