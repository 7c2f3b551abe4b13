"""A store and a backup archive as the earlier layout wrote them (before opaque names):
for the migration tests (tests/test_migration.py, tests/test_migration_crash.py) and the
campaign's crash trials.

Faithful because only the names changed: a dataset file of the earlier layout is the same
Fernet token of the same Parquet table (docs/FORMAT.md, "Dataset file"), so writing one
with today's codec and key at the earlier path (`daily/IBM.fernet`,
`intraday_5min/IBM/2024-01.fernet`, directories 0700, files 0600) gives what the earlier
version wrote; its metadata names `symbol` and `dataset` and, as then, no `month`. The
earlier key ring had no naming key, and there was no catalogue. The archive follows the
earlier manifest format (docs/FORMAT.md before the change): members `data/<earlier path>`,
`state/canary.fernet`, `manifest.fernet`; manifest entries with `path` and no `dataset`.
The migration was also checked once by hand against stores and archives written by the
earlier version itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from secure_ohlcv_downloader import (
    CATALOGUE_NAME,
    DatasetId,
    KeyRing,
    archive_name_for,
    encode_table,
)
from tests.lifecycle_fixtures import Site, headless_site

_KEY_LINE = re.compile(r"^(OHLCV_ENCRYPTION_KEY=)(.*)$", re.MULTILINE)


def without_naming_key(value: str) -> str:
    """A key list as the earlier version held it: the Fernet keys alone."""
    return ",".join(k for k in value.split(",") if not k.startswith("naming:"))


def earlier_site(root: Path, datasets: dict[DatasetId, pd.DataFrame], *,
                 key_in_variable: bool = False) -> Site:
    """An installation of the earlier version holding `datasets` at their earlier paths."""
    site = headless_site(root, key_in_variable=key_in_variable)
    ring = site.ring()
    if key_in_variable:
        site.variables["OHLCV_ENCRYPTION_KEY"] = without_naming_key(
            site.variables["OHLCV_ENCRYPTION_KEY"])
    else:
        text = site.env_file.read_text()
        site.env_file.write_text(_KEY_LINE.sub(lambda m: m[1] + without_naming_key(m[2]), text))
    (site.data_dir / CATALOGUE_NAME).unlink(missing_ok=True)
    for handed in site.state_dir.glob("new-key-*"):  # init's hand-over, long moved offline
        handed.unlink()
    put_earlier(site.data_dir, ring, datasets)
    assert site.ring().naming is None
    return site


def put_earlier(data_dir: Path, ring: KeyRing, datasets: dict[DatasetId, pd.DataFrame]) -> None:
    """Each dataset encrypted under the ring's primary key at its earlier path."""
    for dataset, frame in datasets.items():
        path = data_dir / dataset.relative_path()
        for directory in reversed(path.relative_to(data_dir).parents[:-1]):
            (data_dir / directory).mkdir(mode=0o700, exist_ok=True)
        meta = {"symbol": dataset.symbol, "dataset": dataset.name,
                "written_at": "2024-06-01T00:00:00+00:00",
                "checked_at": "2024-06-01T00:00:00+00:00"}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(ring.encrypt(encode_table(frame, meta)))


def earlier_files(data_dir: Path) -> dict[str, bytes]:
    """The earlier layout's dataset files: path relative to the data directory -> bytes."""
    return {p.relative_to(data_dir).as_posix(): p.read_bytes()
            for p in sorted(data_dir.rglob("*.fernet"))
            if p.relative_to(data_dir).parts[0] != p.name and not re.fullmatch(
                r"[0-9a-f]{2}", p.relative_to(data_dir).parts[0])}


def earlier_archive(site: Site, ring: KeyRing, directory: Path) -> Path:
    """A backup archive of `site`'s earlier-layout store, as the earlier `backup` wrote it."""
    from secure_ohlcv_downloader import decode_table

    now = datetime.now(UTC)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = directory / archive_name_for(now)
    entries, members = [], []
    for rel, token in earlier_files(site.data_dir).items():
        frame, _ = decode_table(ring.decrypt(token))
        entries.append({"path": rel, "size": len(token),
                        "sha256": hashlib.sha256(token).hexdigest(),
                        "key": ring.primary.fingerprint, "rows": len(frame),
                        "first_bar": str(frame["timestamp"].iloc[0]),
                        "last_bar": str(frame["timestamp"].iloc[-1])})
        members.append(("data/" + rel, token))
    canary = site.canary.read_bytes()
    members.append(("state/canary.fernet", canary))
    manifest = {"format": 1, "created_at": now.isoformat(), "datasets": entries,
                "primary_key": ring.primary.fingerprint,
                "canary": {"size": len(canary), "sha256": hashlib.sha256(canary).hexdigest()}}
    members.append(("manifest.fernet", ring.encrypt(json.dumps(manifest).encode())))
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, int(now.timestamp())
            tar.addfile(info, io.BytesIO(data))
    os.chmod(target, 0o600)
    return target
