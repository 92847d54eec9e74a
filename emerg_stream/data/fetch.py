"""Download the public MovieLens archives into the data cache, verified and atomic.

``emerg-stream data fetch ml-1m`` downloads ``<base url>/ml-1m.zip`` (GroupLens by
default; ``EMERG_DATA_URL`` points elsewhere, e.g. an internal mirror), extracts it into a
temporary folder next to the destination, checks the sha256 of the files the readers use
against the pins below, and only then renames the folder to ``DEST/ml-1m``. A failed or
interrupted fetch leaves nothing behind that a reader could mistake for the dataset.

The pins are of the *extracted files*, not of the archive: they are what the readers
consume, and they stay valid if a mirror re-zips the same files. The archive's own sha256
is recorded in ``DEST/<name>/FETCHED.json`` with the URL and the time, as provenance.

The destination defaults to ``$EMERG_DATA_DIR`` when set, else
``~/.cache/emerg-stream/data``. Offline machines skip this module: copy the dataset
folders by hand and set ``EMERG_DATA_DIR`` to the folder that holds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import structlog

from emerg_stream.data._files import sha256_file
from emerg_stream.data.datasets import DATA_DIR_ENV
from emerg_stream.errors import ConfigError, DataError

__all__ = [
    "ARCHIVES",
    "DATA_URL_ENV",
    "DEFAULT_BASE_URL",
    "PROVENANCE_FILE",
    "Archive",
    "default_data_dir",
    "fetch",
    "verify",
]

log = structlog.get_logger(__name__)

#: Environment variable overriding the base URL of the archives (a mirror).
DATA_URL_ENV = "EMERG_DATA_URL"
#: Where GroupLens publishes the archives.
DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens/"
#: Written into the dataset folder after a verified fetch.
PROVENANCE_FILE = "FETCHED.json"

_CHUNK = 1 << 16


@dataclass(frozen=True)
class Archive:
    """A downloadable dataset and the sha256 of the files its reader needs.

    Args:
        name: Dataset folder name, also the archive's stem (``ml-100k`` -> ``ml-100k.zip``).
        files: File name inside the folder -> pinned lowercase hex sha256.
    """

    name: str
    files: Mapping[str, str]

    @property
    def filename(self) -> str:
        """The archive's file name on the server."""
        return f"{self.name}.zip"


#: The archives ``fetch`` knows. The pins are the official GroupLens files.
ARCHIVES: dict[str, Archive] = {
    "ml-100k": Archive(
        "ml-100k",
        {
            "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
            "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
            "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
        },
    ),
    "ml-1m": Archive(
        "ml-1m",
        {
            "ratings.dat": "506d64ca44484487c11dc2d9a28de5c54948213e6b96285e298afe28d6ea4e0f",
            "movies.dat": "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9",
            "users.dat": "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
        },
    ),
}


def default_data_dir() -> Path:
    """``$EMERG_DATA_DIR`` when set, else ``~/.cache/emerg-stream/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "emerg-stream" / "data"


def _archive(name: str) -> Archive:
    archive = ARCHIVES.get(name)
    if archive is None:
        raise ConfigError(f"unknown dataset {name!r}: fetch knows {sorted(ARCHIVES)}")
    return archive


def _base_url(base_url: str | None) -> str:
    url = base_url or os.environ.get(DATA_URL_ENV) or DEFAULT_BASE_URL
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise ConfigError(f"{DATA_URL_ENV}={url!r}: the base URL must be http:// or https://")
    return url if url.endswith("/") else url + "/"


def verify(folder: Path, name: str) -> list[str]:
    """Check the pinned files of a dataset folder.

    Args:
        folder: The dataset folder (e.g. ``~/.cache/emerg-stream/data/ml-1m``).
        name: The dataset (a key of :data:`ARCHIVES`).

    Returns:
        One line per problem (missing file, checksum mismatch); empty when all match.

    Raises:
        ConfigError: Unknown dataset name.
    """
    problems = []
    for file, expected in _archive(name).files.items():
        path = folder / file
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        actual = sha256_file(path)
        if actual != expected:
            problems.append(f"{path}: sha256 mismatch: expected {expected}, got {actual}")
    return problems


def fetch(
    name: str,
    dest: Path | None = None,
    *,
    base_url: str | None = None,
    force: bool = False,
    progress: bool = True,
    timeout_s: float = 60.0,
) -> Path:
    """Download, verify and extract one dataset into ``dest/<name>``.

    A folder that already holds verified files is left alone (no network).

    Args:
        name: ``ml-100k`` or ``ml-1m``.
        dest: Folder that holds the dataset folders (default :func:`default_data_dir`).
        base_url: Where the archives are (default ``$EMERG_DATA_URL``, else GroupLens).
        force: Replace an existing ``dest/<name>`` even if it does not verify.
        progress: Show a progress bar on stderr.
        timeout_s: Socket timeout of the download.

    Returns:
        The dataset folder.

    Raises:
        ConfigError: Unknown dataset, or a base URL that is not http(s).
        DataError: The download failed, the archive is corrupt or unsafe, a file's sha256
            differs from its pin, or ``dest/<name>`` exists without verifying (and not
            ``force``).
    """
    archive = _archive(name)
    root = (dest or default_data_dir()).expanduser()
    final = root / archive.name
    if final.exists():
        problems = verify(final, name)
        if not problems:
            log.info("dataset_present", dataset=name, path=str(final))
            return final
        if not force:
            raise DataError(
                f"{final} exists but does not verify ({'; '.join(problems)}); pass --force "
                "to replace it with a fresh download, or --dest to use another folder"
            )
    url = _base_url(base_url) + archive.filename
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data directory {root}: {exc}") from exc
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".partial", dir=root))
    ok = False
    try:
        zip_path = tmp / archive.filename
        zip_sha = _download(url, zip_path, progress=progress, timeout_s=timeout_s)
        extracted = tmp / archive.name
        _extract(zip_path, extracted, archive.name)
        problems = verify(extracted, name)
        if problems:
            raise DataError(
                f"{url} does not hold the official {name} files: "
                + "; ".join(p.replace(str(extracted), archive.name) for p in problems)
            )
        provenance = {
            "dataset": name,
            "url": url,
            "archive_sha256": zip_sha,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": dict(archive.files),
        }
        (extracted / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _install(extracted, final, tmp)
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok and created and not any(root.iterdir()):
            root.rmdir()  # leave no empty folder behind a failed first fetch
    log.info("dataset_fetched", dataset=name, path=str(final), url=url, archive_sha256=zip_sha)
    return final


def _offline_hint(name: str) -> str:
    return (
        f"for offline use, copy the {name}/ folder onto this machine and set {DATA_DIR_ENV} "
        f"to the folder that holds it (or point {DATA_URL_ENV} at a reachable mirror)"
    )


def _download(url: str, out: Path, *, progress: bool, timeout_s: float) -> str:
    """Stream ``url`` to ``out``; return the sha256 of the bytes written."""
    name = out.stem
    request = urllib.request.Request(url, headers={"User-Agent": "emerg-stream"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            written, sha = _copy(resp, out, total=total, progress=progress, label=name)
    except urllib.error.HTTPError as exc:
        raise DataError(
            f"could not download {url}: HTTP {exc.code} {exc.reason}; {_offline_hint(name)}"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"could not download {url}: {reason}; {_offline_hint(name)}") from exc
    if total is not None and written != total:
        raise DataError(
            f"download of {url} was cut short ({written} of {total} bytes); try again, or "
            + _offline_hint(name)
        )
    return sha


def _copy(
    src: IO[bytes], out: Path, *, total: int | None, progress: bool, label: str
) -> tuple[int, str]:
    """Copy ``src`` to ``out`` behind a progress bar; return (bytes, sha256 hex)."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    written = 0
    with (
        out.open("wb") as fh,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := src.read(_CHUNK):
            fh.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    return written, digest.hexdigest()


def _extract(zip_path: Path, out: Path, name: str) -> None:
    """Extract the archive's files into ``out``, dropping a leading ``<name>/`` folder.

    Members with absolute paths or ``..`` parts are refused (zip slip); directories and
    links are skipped; only regular files are written.
    """
    try:
        with zipfile.ZipFile(zip_path) as zf:
            out.mkdir()
            for info in zf.infolist():
                if info.is_dir():
                    continue
                parts = PurePosixPath(info.filename.replace("\\", "/")).parts
                if not parts or info.filename.startswith("/") or ".." in parts:
                    raise DataError(f"{zip_path.name}: unsafe member path {info.filename!r}")
                if parts[0] == name and len(parts) > 1:
                    parts = parts[1:]
                target = out.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{zip_path.name} is not a valid zip archive: {exc}") from exc


def _install(extracted: Path, final: Path, tmp: Path) -> None:
    """Rename the verified folder into place; an old ``final`` is moved aside first."""
    old = tmp / "replaced"
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(extracted, final)
    except OSError as exc:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise DataError(f"cannot move the dataset into {final}: {exc}") from exc
