"""``data fetch``: download from a local HTTP server, verify pins, install atomically."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from emerg_stream import cli
from emerg_stream.data import fetch as fetch_mod
from emerg_stream.data.fetch import PROVENANCE_FILE, Archive, fetch, verify
from emerg_stream.errors import ConfigError, DataError

FILES = {"u.data": b"1\t2\t5\t881250949\n", "u.item": b"2|Toy|01-Jan-1995\n", "u.user": b"1|24|M\n"}


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_zip(files: dict[str, bytes], prefix: str = "ml-100k/") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        if prefix:
            zf.writestr(prefix, b"")  # the folder entry, as GroupLens archives have
        for name, data in files.items():
            zf.writestr(prefix + name, data)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def no_logging_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.main would bind structlog to this test's captured stderr, closed afterwards."""
    monkeypatch.setattr("emerg_stream.logging.configure_logging", lambda **_: None)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EMERG_DATA_DIR", "EMERG_DATA_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin ml-100k to the test files' hashes."""
    archive = Archive("ml-100k", {k: sha(v) for k, v in FILES.items()})
    monkeypatch.setitem(fetch_mod.ARCHIVES, "ml-100k", archive)


class Server:
    """A static file server on 127.0.0.1 that counts its requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                body = owner.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    s = Server()
    monkeypatch.setenv("EMERG_DATA_URL", s.url)
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_fetch_downloads_verifies_and_installs(tmp_path: Path, server: Server, pinned: None):
    server.files["mirror/ml-100k.zip"] = make_zip(FILES)
    folder = fetch("ml-100k", tmp_path, progress=False)
    assert folder == tmp_path / "ml-100k"
    for name, data in FILES.items():
        assert (folder / name).read_bytes() == data
    assert verify(folder, "ml-100k") == []
    prov = json.loads((folder / PROVENANCE_FILE).read_text())
    assert prov["url"] == server.url + "ml-100k.zip"
    assert prov["archive_sha256"] == sha(server.files["mirror/ml-100k.zip"])
    assert leftovers(tmp_path) == []  # the temporary folder is gone
    # a second fetch finds the verified copy and does not download again
    assert fetch("ml-100k", tmp_path, progress=False) == folder
    assert server.requests == 1


def test_fetch_defaults_to_emerg_data_dir(
    tmp_path: Path, server: Server, pinned: None, monkeypatch: pytest.MonkeyPatch
):
    server.files["mirror/ml-100k.zip"] = make_zip(FILES, prefix="")  # no top folder
    monkeypatch.setenv("EMERG_DATA_DIR", str(tmp_path / "cache"))
    assert fetch("ml-100k", progress=False) == tmp_path / "cache" / "ml-100k"
    assert verify(tmp_path / "cache" / "ml-100k", "ml-100k") == []


def test_checksum_mismatch_names_both_hashes_and_installs_nothing(
    tmp_path: Path, server: Server, pinned: None
):
    tampered = dict(FILES, **{"u.data": b"1\t2\t1\t881250949\n"})
    server.files["mirror/ml-100k.zip"] = make_zip(tampered)
    with pytest.raises(DataError) as err:
        fetch("ml-100k", tmp_path, progress=False)
    msg = str(err.value)
    assert "u.data" in msg
    assert sha(FILES["u.data"]) in msg  # expected
    assert sha(tampered["u.data"]) in msg  # actual
    assert not (tmp_path / "ml-100k").exists()
    assert leftovers(tmp_path) == []


def test_a_missing_pinned_file_is_an_error(tmp_path: Path, server: Server, pinned: None):
    server.files["mirror/ml-100k.zip"] = make_zip({"u.data": FILES["u.data"]})
    with pytest.raises(DataError, match=r"u\.item is missing"):
        fetch("ml-100k", tmp_path, progress=False)
    assert not (tmp_path / "ml-100k").exists()


def test_server_down_says_how_to_work_offline(tmp_path: Path, pinned: None):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError) as err:
        fetch("ml-100k", tmp_path, base_url=f"http://127.0.0.1:{port}/", progress=False)
    msg = str(err.value)
    assert "could not download" in msg
    assert "EMERG_DATA_DIR" in msg
    assert not (tmp_path / "ml-100k").exists()
    assert leftovers(tmp_path) == []
    with pytest.raises(DataError):  # a first fetch leaves no empty folder behind either
        fetch("ml-100k", tmp_path / "new", base_url=f"http://127.0.0.1:{port}/", progress=False)
    assert not (tmp_path / "new").exists()


def test_http_404_is_reported_with_the_url(tmp_path: Path, server: Server, pinned: None):
    with pytest.raises(DataError, match=r"ml-100k\.zip: HTTP 404"):
        fetch("ml-100k", tmp_path, progress=False)


def test_zip_slip_is_refused(tmp_path: Path, server: Server, pinned: None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/../../evil", b"x")
    server.files["mirror/ml-100k.zip"] = buf.getvalue()
    with pytest.raises(DataError, match="unsafe member"):
        fetch("ml-100k", tmp_path / "d", progress=False)
    assert not (tmp_path / "evil").exists()


def test_an_unverified_existing_folder_needs_force(tmp_path: Path, server: Server, pinned: None):
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_bytes(b"hand-made")
    server.files["mirror/ml-100k.zip"] = make_zip(FILES)
    with pytest.raises(DataError, match="--force"):
        fetch("ml-100k", tmp_path, progress=False)
    assert server.requests == 0
    folder = fetch("ml-100k", tmp_path, force=True, progress=False)
    assert (folder / "u.data").read_bytes() == FILES["u.data"]
    assert leftovers(tmp_path) == []


def test_unknown_name_and_bad_scheme_are_config_errors(tmp_path: Path, pinned: None):
    with pytest.raises(ConfigError, match="ml-100k"):
        fetch("ml-10m", tmp_path)
    with pytest.raises(ConfigError, match="EMERG_DATA_URL"):
        fetch("ml-100k", tmp_path, base_url="file:///etc/")


@pytest.mark.data
def test_real_pins_match_the_shared_copy(data_dir: Path):
    """The ml-100k pins and ml-1m's movies/users pins agree with the official files."""
    for name in ("ml-100k", "ml-1m"):
        problems = [p for p in verify(data_dir / name, name) if "ratings.dat" not in p]
        assert problems == []


def test_cli_fetch_verify_and_list(
    tmp_path: Path, server: Server, pinned: None, capsys: pytest.CaptureFixture[str]
):
    server.files["mirror/ml-100k.zip"] = make_zip(FILES)
    assert cli.main(["data", "fetch", "ml-100k", "--dest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "ml-100k")
    assert cli.main(["data", "verify", "ml-100k", "--dest", str(tmp_path)]) == 0
    assert cli.main(["data", "list", "--dest", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ml-100k    ok" in out
    assert "ml-1m      absent" in out
    (tmp_path / "ml-100k" / "u.user").write_bytes(b"changed")
    assert cli.main(["data", "verify", "ml-100k", "--dest", str(tmp_path)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err
