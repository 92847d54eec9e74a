"""The import contracts of STYLE.md §1, checked on the source (AST) and at runtime.

* ``emerg_stream.stream`` and ``emerg_stream.io`` never import ``torch``: the stream jobs
  and the codec must run (and start fast) on machines without it.
* ``emerg_stream.model``, ``.meta`` and ``.features`` never import ``confluent_kafka`` or
  ``emerg_stream.stream``: model code does not know about the bus.

The AST check catches a direct import anywhere in a module (also under ``TYPE_CHECKING``
or inside a function); the runtime check catches a transitive one. Packages that do not
exist yet are simply skipped.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "emerg_stream"

NO_TORCH = ("stream", "io")
NO_KAFKA = ("model", "meta", "features")
FORBIDDEN = {
    **{pkg: ("torch",) for pkg in NO_TORCH},
    **{pkg: ("confluent_kafka", "emerg_stream.stream") for pkg in NO_KAFKA},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, relative imports resolved, with line numbers."""
    source = path.read_text(encoding="utf-8")
    return imports_of(source, module_name(path), is_package=path.name == "__init__.py")


def imports_of(source: str, module: str, *, is_package: bool) -> list[tuple[int, str]]:
    """Every module ``source`` (the code of ``module``) imports, with line numbers."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def violations(subpackage: str) -> list[str]:
    folder = PACKAGE / subpackage
    out = []
    for path in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
        for lineno, target in imported_modules(path):
            for banned in FORBIDDEN[subpackage]:
                if target == banned or target.startswith(banned + "."):
                    out.append(f"{path.relative_to(ROOT)}:{lineno} imports {target}")
    return out


@pytest.mark.parametrize("subpackage", NO_TORCH + NO_KAFKA)
def test_no_forbidden_import_in_source(subpackage: str) -> None:
    found = violations(subpackage)
    assert not found, f"import contract broken ({FORBIDDEN[subpackage]}):\n" + "\n".join(found)


def test_the_ast_check_sees_every_import_form() -> None:
    src = (
        "import torch.nn as nn\n"
        "from torch import Tensor\n"
        "from ..model import net\n"
        "from . import broker\n"
        "import importlib\n"
        "def f():\n"
        "    return importlib.import_module('torch.cuda')\n"
    )
    found = {t for _, t in imports_of(src, "emerg_stream.stream.probe", is_package=False)}
    assert {"torch.nn", "torch", "emerg_stream.model", "emerg_stream.stream.broker"} <= found
    assert "torch.cuda" in found


RUNTIME_PROBE = """
import importlib, json, pkgutil, sys
import emerg_stream.{sub} as pkg
errors = {{}}
for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    try:
        importlib.import_module(info.name)
    except Exception as exc:
        errors[info.name] = repr(exc)
print(json.dumps({{"torch": "torch" in sys.modules, "errors": errors}}))
"""


@pytest.mark.parametrize("subpackage", NO_TORCH)
def test_importing_every_module_does_not_load_torch(subpackage: str) -> None:
    if not (PACKAGE / subpackage / "__init__.py").is_file():
        pytest.skip(f"emerg_stream.{subpackage} does not exist yet")
    proc = subprocess.run(
        [sys.executable, "-c", RUNTIME_PROBE.format(sub=subpackage)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["errors"], f"modules failed to import: {result['errors']}"
    assert not result["torch"], f"importing emerg_stream.{subpackage} loads torch (transitively)"
