"""A non-editable install finds its Avro schemas (package data made from ``schemas/``).

Builds the wheel from a copy of the source files (no network: the build runs in this
interpreter with ``--no-build-isolation``), installs it into a folder of its own and, from
a directory outside the checkout, loads every record's schema there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from emerg_stream.topic_roles import RECORD_NAMES

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "emerg_stream", "jobs")

PROBE = """
import json
from emerg_stream.io import schemas
root = schemas.schema_dir()
print(json.dumps({
    "root": str(root),
    "file": schemas.__file__,
    "names": sorted(schemas.load_manifest().records),
    "loaded": [schemas.load_schema(n)["name"] for n in schemas.RECORD_NAMES],
}))
"""


def test_a_wheel_install_reads_the_schemas_from_package_data(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build")
    for name in SOURCES:
        path = REPO / name
        if not path.exists():
            continue  # e.g. no top-level jobs/ (a layout with the jobs inside the package)
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    shutil.copytree(REPO / "schemas", src / "schemas")
    dist = tmp_path / "dist"
    where = ["-w", str(dist), str(src)]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", *where],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("emerg_stream-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.startswith("emerg_stream/schemas/")}
    want = {
        f"emerg_stream/schemas/{p.relative_to(REPO / 'schemas')}"
        for p in (REPO / "schemas").rglob("*")
        if p.is_file()
    }
    assert shipped == want
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)  # what a non-editable install puts in site-packages
    away = tmp_path / "elsewhere"
    away.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=away,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site)},
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(site)), got
    assert got["root"] == str(site / "emerg_stream" / "schemas")
    assert got["names"] == sorted(RECORD_NAMES)
    assert got["loaded"] == list(RECORD_NAMES)
