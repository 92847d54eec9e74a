"""The topic roles have one owner (:mod:`emerg_stream.topic_roles`); the rest derive from it.

* Every derived list (the settings' fields, topic admin's roles and defaults, the worker's
  start-up check, the record schemas, the infra files) equals the table.
* Adding an output topic is one row: a copy of the table with a row added yields the new
  setting, topic spec, start-up check entry and infra block, with no other file changed.
* A source scan fails when a list of roles, topic names or record names is written out by
  hand again outside the table.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import yaml

from emerg_stream.config import TopicSettings
from emerg_stream.io import schemas
from emerg_stream.stream import metrics, topics
from emerg_stream.topic_roles import (
    INPUT_ROLES,
    RECORD_NAMES,
    ROLES,
    TOPIC_ROLES,
    read_roles,
    render_configmap_topics,
    render_topics_yaml,
    update_configmap,
    write_infra,
    written_roles,
)

ROOT = Path(__file__).resolve().parents[2]
TABLE = ROOT / "emerg_stream" / "topic_roles.py"


def test_settings_topic_admin_and_schemas_derive_from_the_table() -> None:
    fields = list(TopicSettings.model_fields)
    assert fields == [*ROLES, "partitions", "replication"]
    assert TopicSettings().names() == {r.role: r.default_name for r in TOPIC_ROLES}
    assert topics.ROLES == ROLES
    specs = topics.load_topic_specs()
    assert [(s.role, s.partitions, dict(s.config)) for s in specs] == [
        (r.role, r.partitions, dict(r.config)) for r in TOPIC_ROLES
    ]
    assert tuple(dict.fromkeys(r.record for r in TOPIC_ROLES)) == schemas.RECORD_NAMES
    assert metrics.ROLES == INPUT_ROLES == ("items", "interactions")
    assert set(written_roles()) == {"item_params", "predictions", "dead_letter", "changelog"}
    assert set(read_roles()) == {*INPUT_ROLES, "changelog"}


def test_committed_infra_files_are_generated_from_the_table() -> None:
    text = (ROOT / "infra" / "topics.yaml").read_text(encoding="utf-8")
    assert text == render_topics_yaml(), "run `make infra` after changing the table"
    assert set(yaml.safe_load(text)["topics"]) == set(ROLES)
    configmap = (ROOT / "infra" / "k8s" / "configmap.yaml").read_text(encoding="utf-8")
    assert render_configmap_topics() in configmap
    assert update_configmap(configmap) == configmap
    assert configmap.count("EMERG_TOPICS__") == len(ROLES) + 1  # + REPLICATION


def test_make_infra_rewrites_both_files(tmp_path) -> None:
    (tmp_path / "infra" / "k8s").mkdir(parents=True)
    configmap = (ROOT / "infra" / "k8s" / "configmap.yaml").read_text(encoding="utf-8")
    stale = configmap.replace('  EMERG_TOPICS__PREDICTIONS: "prod.emerg.predictions"\n', "")
    assert stale != configmap
    (tmp_path / "infra" / "k8s" / "configmap.yaml").write_text(stale)
    (tmp_path / "infra" / "topics.yaml").write_text("stale\n")
    write_infra(tmp_path)
    assert (tmp_path / "infra" / "k8s" / "configmap.yaml").read_text() == configmap
    assert (tmp_path / "infra" / "topics.yaml").read_text() == render_topics_yaml()


ADD_ROW = """
import importlib.util, json, sys
src = open(sys.argv[1], encoding="utf-8").read()
row = '    TopicRole("scores", "emerg.scores", "Prediction", "Scores.", worker_writes=True),\\n'
end = src.index("\\n)\\n", src.index("TOPIC_ROLES: tuple"))
src = src[: end + 1] + row + src[end + 1 :]
spec = importlib.util.spec_from_loader("emerg_stream.topic_roles", loader=None)
mod = importlib.util.module_from_spec(spec)
sys.modules["emerg_stream.topic_roles"] = mod
exec(compile(src, sys.argv[1], "exec"), mod.__dict__)
from emerg_stream.config import TopicSettings
from emerg_stream.io.schemas import RECORD_NAMES
from emerg_stream.stream import topics
print(json.dumps({
    "setting": TopicSettings(scores="prod.scores").names()["scores"],
    "specs": [s.role for s in topics.load_topic_specs()],
    "writes": list(mod.written_roles()),
    "records": list(RECORD_NAMES),
    "yaml": "  scores:\\n    partitions: 4\\n" in mod.render_topics_yaml(),
}))
"""


def test_adding_an_output_topic_is_one_row_of_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-c", ADD_ROW, str(TABLE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["setting"] == "prod.scores"
    assert got["specs"] == [*ROLES, "scores"]
    assert got["writes"][-1] == "scores"
    assert got["records"] == list(RECORD_NAMES)  # an existing record: no new schema
    assert got["yaml"]


# -- no second copy ------------------------------------------------------------------

WORDS = (
    {r.role for r in TOPIC_ROLES}
    | {r.default_name for r in TOPIC_ROLES}
    | {r.record for r in TOPIC_ROLES}
)


def hand_written_lists(path: Path) -> list[str]:
    """Literal tuples, lists, sets and dict keys naming three or more roles/topics/records.

    Two are allowed: code about the two input roles (co-partitioning, their counters).
    ``__all__`` (the record classes' own module exports them) is not a list of roles.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        elts: list[ast.expr | None] | None = None
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            elts = list(node.elts)
        elif isinstance(node, ast.Dict):
            elts = list(node.keys)
        if elts is None:
            continue
        hits = [e.value for e in elts if isinstance(e, ast.Constant) and e.value in WORDS]
        if len(hits) >= 3:
            found.append(f"{path}:{node.lineno} {hits}")
    return found


def test_no_list_of_roles_is_written_by_hand_outside_the_table() -> None:
    files = [
        p
        for folder in ("emerg_stream", "jobs")
        for p in sorted((ROOT / folder).rglob("*.py"))
        if p != TABLE
    ]
    found = [hit for p in files for hit in hand_written_lists(p)]
    assert not found, "derive it from emerg_stream.topic_roles:\n" + "\n".join(found)


def test_the_scan_sees_a_copy(tmp_path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        '__all__ = ["ItemEvent", "Interaction", "ItemParams"]\n'
        'ROLES = ("items", "interactions", "item_params")\n'
        'DEFAULT = {"emerg.items": 4, "emerg.interactions": 4, "emerg.dead-letter": 1}\n'
        'PAIR = ("items", "interactions")\n'
    )
    assert len(hand_written_lists(probe)) == 2
