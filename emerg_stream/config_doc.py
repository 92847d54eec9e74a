"""The configuration reference, generated from the settings classes.

``emerg-stream config doc > docs/CONFIGURATION.md`` writes it; a unit test fails when the
committed file differs from what this module generates, so the reference cannot drift
from :mod:`emerg_stream.config`.

Each variable's description is the field's ``Field(description=...)`` when set, else its
entry in the ``Args:`` section of the class docstring (where the settings classes already
document every field). A field with neither is an error, not a blank cell.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from emerg_stream import config as config_module
from emerg_stream.errors import ConfigError

__all__ = [
    "EnvVar",
    "effective_values",
    "env_vars",
    "other_variables",
    "render_markdown",
    "settings_classes",
]


@dataclass(frozen=True)
class EnvVar:
    """One environment variable read by a settings class.

    Args:
        name: Full variable name, e.g. ``EMERG_KAFKA__SASL_PASSWORD``.
        type: Human-readable type, constraints included.
        default: Rendered default (``unset`` for ``None``).
        description: One paragraph.
        secret: A credential (``SecretStr``): never printed by the jobs.
    """

    name: str
    type: str
    default: str
    description: str
    secret: bool


def other_variables() -> list[tuple[str, str]]:
    """Variables read outside the settings classes, as (name, description).

    The names come from the modules that read them, so a rename shows up here.
    """
    from emerg_stream.data.datasets import DATA_DIR_ENV
    from emerg_stream.data.fetch import DATA_URL_ENV, DEFAULT_BASE_URL
    from emerg_stream.io.schemas import SCHEMA_DIR_ENV
    from emerg_stream.meta.kernel import KERNEL_CACHE_ENV
    from emerg_stream.stream.faults import FAULT_ENV
    from emerg_stream.threads import THREADS_ENV

    return [
        (
            THREADS_ENV,
            "Most compute threads a process uses (a positive integer). Every job uses "
            "min(its CPU affinity, its cgroup CPU quota rounded down, this), logs the number "
            "and where it came from at start (`threads_resolved`), and applies it to torch, "
            "OpenMP/MKL/OpenBLAS and Arrow; unset, a user's `OMP_NUM_THREADS` caps it the "
            "same way. The worker's `--members auto` counts it; each member gets its share. "
            "See `emerg_stream/threads.py`.",
        ),
        (
            DATA_DIR_ENV,
            "Folder that holds the dataset folders (`ml-100k/`, `ml-1m/`, `taobao-ad/`); "
            "read by the offline jobs and `replay` (a `--data-dir` flag wins), and the "
            "default destination of `emerg-stream data fetch` "
            "(else `~/.cache/emerg-stream/data`).",
        ),
        (
            DATA_URL_ENV,
            f"Base URL that `emerg-stream data fetch` downloads the archives from "
            f"(default `{DEFAULT_BASE_URL}`); point it at an internal mirror.",
        ),
        (
            SCHEMA_DIR_ENV,
            "Folder of Avro schemas (`*.avsc` + `ids.json`) that replaces the packaged copy.",
        ),
        (
            KERNEL_CACHE_ENV,
            "Folder of the compiled CPU warm-up kernels, one shared library per model shape "
            "and CPU (default `$XDG_CACHE_HOME/emerg-stream/kernels`, else "
            "`~/.cache/emerg-stream/kernels`); see `EMERG_WARMUP_BACKEND`.",
        ),
        (
            "EMERG_WARMUP_COMPILE",
            "Retired: replaced by `EMERG_WARMUP_BACKEND` (`compile` is the old `true`). "
            "The worker refuses to start while it is set, rather than ignore it.",
        ),
        (
            "CXX",
            "The C++ compiler that builds the CPU kernel of warm-up and meta-training "
            "(default `c++`); without one, `EMERG_WARMUP_BACKEND=auto` (and training's "
            "`auto`) warns and uses autograd.",
        ),
        (
            FAULT_ENV,
            "Tests only: crash the worker (`os._exit(137)`) at a checkpoint step, "
            "`POINT:N` = the N-th time it reaches POINT (`mid_update`, `after_changelog`, "
            "`after_commit`, `during_restore`); see `emerg_stream/stream/faults.py`.",
        ),
        (
            "EMERG_TEST_BOOTSTRAP",
            "Tests only: run the integration tests against this Kafka cluster instead of "
            "the embedded broker.",
        ),
        (
            "EMERG_TEST_BROKER",
            "Tests only: `kafka` runs the integration tests on Apache Kafka started for the "
            "session (`make test-kafka`); `embedded` (the default) on Tansu.",
        ),
        (
            "EMERG_KAFKA_CACHE",
            "Folder of the Apache Kafka jars fetched with Maven for `emerg-stream broker "
            "--kafka` and `make test-kafka` (default `$XDG_CACHE_HOME/emerg-stream`, else "
            "`~/.cache/emerg-stream`; one `kafka-<version>` folder per version).",
        ),
        (
            "EMERG_TEST_SCHEMA_REGISTRY",
            "Tests only: `apicurio` runs the schema-registry tests on Apicurio Registry "
            "started for them (`make test-registry`); unset, they are skipped.",
        ),
        (
            "EMERG_REGISTRY_CACHE",
            "Folder of the Apicurio Registry built with Maven for `make schema-registry` "
            "and `make test-registry` (default `$XDG_CACHE_HOME/emerg-stream`, else "
            "`~/.cache/emerg-stream`; one `apicurio-registry-<version>` folder per version).",
        ),
    ]


def settings_classes() -> list[type[BaseSettings]]:
    """Every settings class of :mod:`emerg_stream.config`, root first, in source order."""
    found = [
        obj
        for _, obj in inspect.getmembers(config_module, inspect.isclass)
        if issubclass(obj, BaseSettings)
        and obj is not BaseSettings
        and obj.__module__ == config_module.__name__
    ]
    return sorted(found, key=lambda c: (len(c.__mro__), inspect.getsourcelines(c)[1]))


def _docstring_args(cls: type) -> dict[str, str]:
    """Parse the ``Args:`` section of a Google docstring into name -> one-line text."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = lines.index("Args:") + 1
    except ValueError:
        return out
    current: str | None = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        m = re.match(r"^ {4}(\w+)(?: \(.*?\))?: ?(.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current is not None and line.strip():
            out[current] = f"{out[current]} {line.strip()}"
    return out


def _description(cls: type, name: str, field: FieldInfo) -> str:
    if field.description:
        return " ".join(field.description.split())
    text = _docstring_args(cls).get(name)
    if not text:
        raise ConfigError(
            f"{cls.__name__}.{name} has no description: add it to the class docstring's "
            "Args: section (or Field(description=...))"
        )
    return text


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) < len(get_args(annotation)):
            inner = args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007
            return inner, True
    return annotation, False


def _type_name(annotation: Any) -> str:
    inner, optional = _strip_optional(annotation)
    origin = get_origin(inner)
    if origin is Literal:
        name = " \\| ".join(f"`{a}`" for a in get_args(inner))
    elif origin is dict:
        name = "JSON object"
    elif origin in (list, tuple):
        name = "JSON array"
    elif inner is SecretStr:
        name = "secret string"
    elif inner is Path:
        name = "path"
    elif isinstance(inner, type) and issubclass(inner, Enum):
        name = " \\| ".join(f"`{m.value}`" for m in inner)
    elif isinstance(inner, type):
        name = inner.__name__
    else:
        name = str(inner)
    return f"{name} (optional)" if optional else name


def _constraints(field: FieldInfo) -> str:
    parts = []
    for m in field.metadata:
        if isinstance(m, Ge):
            parts.append(f"≥ {m.ge}")
        elif isinstance(m, Gt):
            parts.append(f"> {m.gt}")
        elif isinstance(m, Le):
            parts.append(f"≤ {m.le}")
        elif isinstance(m, Lt):
            parts.append(f"< {m.lt}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, dict | list):
        return f"`{json.dumps(value)}`"
    if isinstance(value, Enum):
        value = value.value
    return f"`{value}`"


def _is_secret(annotation: Any) -> bool:
    inner, _ = _strip_optional(annotation)
    return inner is SecretStr


def _walk(model: type[BaseModel], prefix: str, fields: list[str]) -> Iterator[EnvVar]:
    for name in fields:
        field = model.model_fields[name]
        annotation = field.annotation
        env = f"{prefix}{name.upper()}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _walk(annotation, f"{env}__", list(annotation.model_fields))
            continue
        kind = _type_name(annotation)
        bounds = _constraints(field)
        yield EnvVar(
            name=env,
            type=f"{kind}, {bounds}" if bounds else kind,
            default=_default(field),
            description=_description(model, name, field),
            secret=_is_secret(annotation),
        )


def _own_fields(cls: type[BaseSettings]) -> list[str]:
    """Fields a class adds to its settings parent (all fields for a root class)."""
    parent = next(
        (b for b in cls.__mro__[1:] if issubclass(b, BaseSettings) and b is not BaseSettings),
        None,
    )
    inherited = set(parent.model_fields) if parent is not None else set()
    return [n for n in cls.model_fields if n not in inherited]


def env_vars(cls: type[BaseSettings]) -> list[EnvVar]:
    """The variables a settings class adds to its parent, nested sections expanded.

    Raises:
        ConfigError: A field without a description.
    """
    prefix = str(cls.model_config.get("env_prefix", ""))
    return list(_walk(cls, prefix, _own_fields(cls)))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[EnvVar]) -> list[str]:
    out = ["| variable | type | default | description |", "|---|---|---|---|"]
    for v in rows:
        name = f"`{v.name}` 🔒" if v.secret else f"`{v.name}`"
        desc = _rst_to_md(v.description)
        out.append(f"| {name} | {v.type} | {v.default} | {_cell(desc)} |")
    return out


def _rst_to_md(text: str) -> str:
    """Docstrings use reST literals (````x````) and roles; markdown wants single backticks."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or cls.__name__
    return _rst_to_md(doc.split("\n\n", 1)[0].replace("\n", " "))


def render_markdown() -> str:
    """The whole ``docs/CONFIGURATION.md``.

    Raises:
        ConfigError: A settings field without a description.
    """
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `emerg-stream config doc > docs/CONFIGURATION.md`; do not edit by "
        "hand. tests/unit/test_config_doc.py fails when this file is out of date. -->",
        "",
        "Every job reads its settings from environment variables with the prefix `EMERG_`;",
        "nested sections use a double underscore (`EMERG_KAFKA__BOOTSTRAP_SERVERS`). Names are",
        "case-insensitive. A `JSON object` value is written as JSON",
        '(`EMERG_KAFKA__EXTRA=\'{"linger.ms": "5"}\'`). Settings are validated at start:',
        "a bad value stops the job with one line per problem, naming the variable.",
        "",
        "Variables marked 🔒 are secrets: the jobs never print or log them (`***`). Pass them",
        "from a secret store (a Kubernetes Secret, see [DEPLOYMENT.md](DEPLOYMENT.md)), not",
        "from a file under version control.",
        "",
        "`emerg-stream config show [--worker]` prints the values in effect (secrets redacted).",
        "",
    ]
    classes = settings_classes()
    for cls in classes:
        parents = [b.__name__ for b in cls.__mro__[1:] if b in classes]
        title = cls.__name__
        lines += [f"## {title}", "", _summary(cls)]
        if parents:
            lines += ["", f"Also reads every variable of {', '.join(parents)}."]
        lines += ["", *_table(env_vars(cls)), ""]
    lines += [
        "## Other variables",
        "",
        "Read directly by the modules that need them (not part of a settings class).",
        "",
        "| variable | description |",
        "|---|---|",
    ]
    for name, desc in other_variables():
        lines.append(f"| `{name}` | {_cell(desc)} |")
    return "\n".join(lines) + "\n"


def effective_values(settings: BaseSettings) -> list[tuple[str, str, bool]]:
    """The value in effect of every variable of a settings object (secrets as ``***``).

    Args:
        settings: A loaded settings object (e.g. from :func:`emerg_stream.config.load_settings`).

    Returns:
        ``(variable, value, from_environment)`` rows in documentation order;
        ``from_environment`` is true when the variable itself is set.
    """
    import os

    env = {k.upper() for k in os.environ}
    cls = type(settings)
    prefix = str(cls.model_config.get("env_prefix", ""))
    rows: list[tuple[str, str, bool]] = []

    def walk(obj: BaseModel, env_prefix: str) -> None:
        for name in type(obj).model_fields:
            value = getattr(obj, name)
            var = f"{env_prefix}{name.upper()}"
            if isinstance(value, BaseModel):
                walk(value, f"{var}__")
                continue
            if value is None:
                shown = "unset"
            elif isinstance(value, SecretStr):
                shown = "***"
            elif isinstance(value, dict | list):
                shown = json.dumps(value)
            else:
                shown = str(value.value if isinstance(value, Enum) else value)
            rows.append((var, shown, var in env))

    walk(settings, prefix)
    return rows
