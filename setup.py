"""Build hook: ship the top-level ``schemas/`` folder inside the package.

The Avro schemas live once, in ``schemas/`` at the repository root (the contract for
producers and consumers in any language). A wheel carries them as package data in
``emerg_stream/schemas/``, copied here at build time; a source checkout (editable
install) reads ``schemas/`` directly (:func:`emerg_stream.io.schemas.schema_dir`).
Everything else about the build is in ``pyproject.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SCHEMAS = Path(__file__).resolve().parent / "schemas"


class BuildPyWithSchemas(build_py):
    """``build_py`` that also copies ``schemas/`` to ``emerg_stream/schemas`` in the build."""

    def run(self) -> None:
        """Build the package as usual, then add the schemas."""
        super().run()
        if not (SCHEMAS / "ids.json").is_file():
            raise FileNotFoundError(f"{SCHEMAS} holds no ids.json: the schemas are missing")
        target = Path(self.build_lib) / "emerg_stream" / "schemas"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(SCHEMAS, target, ignore=shutil.ignore_patterns("*~", ".*"))


setup(cmdclass={"build_py": BuildPyWithSchemas})
