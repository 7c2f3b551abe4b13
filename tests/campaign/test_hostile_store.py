"""Campaign B, area 7: the opaque store against a hostile local user and a lying disk.

Threat model (SECURITY.md): whoever can write inside the data directory (another account
after a careless chmod, a restore tool, a disk that returns old or odd blocks) but holds
no key. What they plant is outside input; the property each test holds the product to:

* the catalogue (`catalogue.fernet`) is a cache: whatever it says, `status` lists what the
  files hold, never crashes, reads it through no link, no FIFO and never past a bound,
  and the next writer rewrites it (never over the bound). An entry is trusted only for
  the file its identity names and only while the file's stat still proves it: a
  catalogue rolled back to an older copy, or a file put back in place with its mtime
  reset, is read again;
* a fan-out directory (`data/ab/`) that is a link, a file, looser than OHLCV_DIR_MODE or
  another user's stops every command that would read or write it (exit 3, the path and
  the fix named); nothing in a link's target is read, created or changed;
* a dataset file replaced by a link or a FIFO is never followed nor opened for a read
  that could block: status names it unreadable (with the dataset the catalogue knew it
  as), export and download of that dataset stop with exit 3, backup refuses (exit 5);
* a file of a foreign name in the data or a fan-out directory is ignored: never read,
  never listed, never archived, never deleted;
* nothing but the log names a dataset on disk (the pending queue is sealed), and an
  archive's members come in name order, not in the identity order that would group them
  by interval and rank them by symbol.

Every check runs the real command line or the product's own API over real files; the
store comes from real downloads against the local Alpha Vantage emulator.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from secure_ohlcv_downloader import (
    CATALOGUE_NAME,
    MAX_CATALOGUE_BYTES,
    Catalogue,
    DatasetId,
    status_of,
)
from tests.operations_fixtures import OpsWorkspace

SYMBOLS = ["IBM", "MSFT", "BRK.B"]
NOBODY = 65534


@pytest.fixture(scope="module")
def template(tmp_path_factory, emulator):
    """One store of three daily datasets, downloaded once; each test gets a copy."""
    ws = OpsWorkspace(tmp_path_factory.mktemp("hostile-store"), emulator).init()
    assert ws.download(SYMBOLS).exit_code == 0
    return ws


@pytest.fixture
def ws(template, tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(template.cwd, copy, symlinks=True)
    workspace = OpsWorkspace(copy, template.av)
    workspace.variables = dict(template.variables)
    return workspace


def data(ws: OpsWorkspace) -> Path:
    return ws.cwd / "data"


def rows_by_status(ws: OpsWorkspace) -> dict[str, int | str]:
    """status as the operator sees it: rows per dataset, or the error text."""
    return {row["dataset"]: row.get("rows", row.get("error"))
            for row in status_of(ws.app().ctx)["datasets"]}


def rows_by_reading(ws: OpsWorkspace) -> dict[str, int]:
    """Rows of every dataset, each file decrypted whole (no catalogue involved)."""
    store = ws.app().store()
    return {str(d): len(store.read(d)[0]) for d in map(DatasetId, SYMBOLS)}


def catalogue_document(ws: OpsWorkspace) -> dict:
    ring = ws.app().store().key_ring
    return json.loads(ring.decrypt((data(ws) / CATALOGUE_NAME).read_bytes()))


def seal(ws: OpsWorkspace, plaintext: bytes) -> None:
    """Write a catalogue sealed under the store's own primary key (the strongest liar)."""
    (data(ws) / CATALOGUE_NAME).write_bytes(ws.app().store().key_ring.encrypt(plaintext))


def file_of(ws: OpsWorkspace, symbol: str) -> Path:
    return ws.app().store().path(DatasetId(symbol))


def output(result) -> str:
    return result.stdout + result.stderr


def tree(root: Path) -> dict[str, tuple]:
    """Everything under `root` (links not followed): kind, mode and bytes, to compare."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = os.lstat(path)
        key = path.relative_to(root).as_posix()
        if stat.S_ISLNK(info.st_mode):
            found[key] = ("link", os.readlink(path))
        elif stat.S_ISREG(info.st_mode):
            found[key] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
        else:
            found[key] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
    return found


# -- the catalogue: entries that lie ----------------------------------------------------------

def _retarget(target: str):
    """IBM's entry, its stat kept (so it would be proven), pointed at `target`."""
    def lie(ws: OpsWorkspace) -> None:
        document = catalogue_document(ws)
        document["datasets"]["daily/IBM"]["file"] = target(ws) if callable(target) else target
        document["datasets"]["daily/IBM"]["rows"] = 999_999
        seal(ws, json.dumps(document).encode())
    return lie


def _msft_file(ws: OpsWorkspace) -> str:
    return ws.app().store().relative(file_of(ws, "MSFT"))


def _alias_identity(ws: OpsWorkspace) -> None:
    """IBM's entry a second time under 'daily/ibm' (the same dataset spelled otherwise),
    its rows a lie: one file, two entries."""
    document = catalogue_document(ws)
    entry = dict(document["datasets"]["daily/IBM"], rows=999_999)
    document["datasets"] = {"daily/ibm": entry, **document["datasets"]}
    seal(ws, json.dumps(document).encode())


def _duplicate_identity(ws: OpsWorkspace) -> None:
    """Two 'daily/IBM' keys in one JSON object; the later one lies about the rows."""
    document = catalogue_document(ws)
    entry = document["datasets"]["daily/IBM"]
    text = json.dumps(document)
    liar = json.dumps(dict(entry, rows=999_999))
    seal(ws, (text[:-2] + f', "daily/IBM": {liar}' + "}}").encode())


def _bad_value(field: str, value):
    def lie(ws: OpsWorkspace) -> None:
        document = catalogue_document(ws)
        entry = document["datasets"]["daily/IBM"]
        if field.startswith("meta."):
            entry["meta"][field[5:]] = value
        else:
            entry[field] = value
        seal(ws, json.dumps(document).encode())
    return lie


def _foreign_key(ws: OpsWorkspace) -> None:
    """The very catalogue, sealed under a key that is not in the ring."""
    plaintext = json.dumps(catalogue_document(ws)).encode()
    (data(ws) / CATALOGUE_NAME).write_bytes(Fernet(Fernet.generate_key()).encrypt(plaintext))


LIES = {
    "file outside the layout": _retarget("../../x"),
    "absolute file": _retarget("/etc/passwd"),
    "another dataset's file": _retarget(_msft_file),
    "the same dataset spelled otherwise": _alias_identity,
    "a duplicate identity": _duplicate_identity,
    "deeply nested JSON": lambda ws: seal(ws, b"[" * 200_000 + b"]" * 200_000),
    "not UTF-8": lambda ws: seal(ws, b'{"format": 1, "\xff": 1}'),
    "first bar not a time": _bad_value("first_bar", "yesterday"),
    "negative rows": _bad_value("rows", -5),
    "rows not a number": _bad_value("rows", "5"),
    "stale_after not a time": _bad_value("meta.stale_after", "soon"),
    "checked_at not a time": _bad_value("meta.checked_at", "soon"),
    "gaps not a count": _bad_value("meta.gaps", "many"),
    "sealed under a key not in the ring": _foreign_key,
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_lying_catalogue_never_makes_status_wrong_and_the_next_writer_rewrites_it(ws, lie, figures):
    expected = rows_by_status(ws)
    assert expected == rows_by_reading(ws)
    LIES[lie](ws)

    result = ws.run("status", "--json")
    assert result.returncode == 0, output(result)
    shown = {row["dataset"]: row.get("rows") for row in json.loads(result.stdout)["datasets"]}
    problem = ws.app().store().catalogue().problem
    assert ws.download(["IBM"]).exit_code == 0  # a writer: it rewrites the catalogue

    assert shown == expected
    assert problem == "damaged"
    assert ws.app().store().catalogue().problem == ""
    assert rows_by_status(ws) == expected
    figures.record("hostile store: lying catalogue", tried=1, held=1, notes=lie)


def test_a_catalogue_larger_than_the_bound_is_never_read_into_memory(ws):
    """A sparse file one byte over MAX_CATALOGUE_BYTES costs no memory: refused by its
    size, then status reads the files' footers."""
    expected = rows_by_status(ws)
    catalogue = data(ws) / CATALOGUE_NAME
    catalogue.unlink()
    with open(catalogue, "wb") as handle:
        handle.truncate(MAX_CATALOGUE_BYTES + 1)
    store = ws.app().store()

    tracemalloc.start()
    try:
        found = Catalogue.load(store.root, store.key_ring, store.naming_key, store.dir_mode)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert found.problem == "damaged"
    assert peak < 1 << 20, f"reading the catalogue took {peak} bytes"
    assert rows_by_status(ws) == expected


def test_a_writer_never_writes_a_catalogue_readers_would_refuse(ws, monkeypatch, caplog):
    """Over the bound the catalogue is not written (readers would refuse it on every run
    and each writer write it again in vain): the one in place stays, status stays right."""
    catalogue = data(ws) / CATALOGUE_NAME
    before = catalogue.read_bytes()
    monkeypatch.setattr("secure_ohlcv_downloader.MAX_CATALOGUE_BYTES", len(before) + 100)

    assert ws.download(["AAPL", "NVDA"]).exit_code == 0

    assert catalogue.read_bytes() == before
    assert any("not rewritten" in r.getMessage() for r in caplog.records), caplog.text
    assert set(rows_by_status(ws)) == {f"{s} daily" for s in SYMBOLS + ["AAPL", "NVDA"]}


def test_a_catalogue_that_is_a_link_or_a_fifo_is_never_followed_nor_waited_for(ws, tmp_path):
    """A link to a copy of the real catalogue would be proven true: it must not be read.
    A FIFO would block status for ever in open() or read()."""
    expected = rows_by_status(ws)
    catalogue = data(ws) / CATALOGUE_NAME
    elsewhere = tmp_path / "planted.fernet"
    shutil.copy(catalogue, elsewhere)
    catalogue.unlink()
    catalogue.symlink_to(elsewhere)

    linked = ws.app().store().catalogue().problem
    status_linked = ws.run("status", "--json")
    catalogue.unlink()
    os.mkfifo(catalogue)
    status_fifo = ws.run("status", "--json")  # without the fix: the subprocess timeout
    download = ws.run("download", "IBM")

    assert linked == "damaged"
    assert status_linked.returncode == 0 and status_fifo.returncode == 0, output(status_fifo)
    assert {r["dataset"]: r["rows"] for r in json.loads(status_fifo.stdout)["datasets"]} == expected
    assert download.returncode == 0, output(download)
    assert stat.S_ISREG(os.lstat(catalogue).st_mode)  # the writer put a real one back
    assert elsewhere.read_bytes() and ws.app().store().catalogue().problem == ""


# -- the catalogue: rolled back ---------------------------------------------------------------

def test_a_catalogue_rolled_back_to_an_older_copy_leaves_status_and_download_right(ws):
    """An older catalogue put back after IBM was rewritten shorter and MSFT deleted: the
    stat of the rewritten file disagrees, the deleted one is not listed, and a download
    reads the file itself."""
    older = (data(ws) / CATALOGUE_NAME).read_bytes()
    store = ws.app().store()
    frame, meta = store.read(DatasetId("IBM"))
    with store.lock():
        store.write(DatasetId("IBM"), frame.iloc[:10], meta)
        store.path(DatasetId("MSFT")).unlink()
        store.save_catalogue()
    (data(ws) / CATALOGUE_NAME).write_bytes(older)

    rows = rows_by_status(ws)
    download = ws.download(["IBM"])

    assert rows["IBM daily"] == 10 and "MSFT daily" not in rows
    assert download.exit_code == 0
    assert rows_by_status(ws)["IBM daily"] == len(ws.stored(DatasetId("IBM"))[0]) > 10


def test_a_file_put_back_in_place_with_its_mtime_reset_is_read_again(ws):
    """A same-size older version written over the file in place (same inode) and its
    mtime set back to the catalogue's: size, mtime and inode all agree. The change time
    cannot be set back: it tells the catalogue's entry no longer describes the file."""
    store = ws.app().store()
    ibm = DatasetId("IBM")
    frame, meta = store.read(ibm)
    path = store.path(ibm)
    with store.lock():
        store.write(ibm, frame, dict(meta, gaps=3))
    older = path.read_bytes()
    with store.lock():
        store.write(ibm, frame, dict(meta, gaps=4))
        store.save_catalogue()
    newer = os.stat(path)
    assert len(older) == newer.st_size and rows_by_status(ws)["IBM daily"] == len(frame)
    _wait_for_the_change_time_to_move(path.parent, newer.st_ctime_ns)

    with open(path, "r+b") as handle:  # in place: the inode stays
        handle.write(older)
    os.utime(path, ns=(newer.st_atime_ns, newer.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == \
        (newer.st_ino, newer.st_size, newer.st_mtime_ns)

    row = {r["dataset"]: r for r in status_of(ws.app().ctx)["datasets"]}["IBM daily"]

    assert row["gaps"] == 3


def _wait_for_the_change_time_to_move(directory: Path, ctime_ns: int) -> None:
    """File systems stamp times from a coarse clock: wait (no bound on how long) until a
    fresh file's change time is past `ctime_ns`, as any real attack's would be."""
    probe = directory / ".probe"
    while True:
        probe.write_bytes(b"")
        if os.stat(probe).st_ctime_ns > ctime_ns:
            probe.unlink()
            return


# -- fan-out directories ----------------------------------------------------------------------

def _fan_out_of(ws: OpsWorkspace, symbol: str) -> Path:
    return file_of(ws, symbol).parent


def _plant_link(ws: OpsWorkspace, elsewhere: Path) -> Path:
    """IBM's fan-out directory moved out of the store; a link to it in its place."""
    fan = _fan_out_of(ws, "IBM")
    shutil.move(fan, elsewhere)
    fan.symlink_to(elsewhere)
    return fan


def _plant_file(ws: OpsWorkspace, elsewhere: Path) -> Path:
    fan = _fan_out_of(ws, "IBM")
    shutil.move(fan, elsewhere)
    fan.write_bytes(b"planted")
    fan.chmod(0o600)
    return fan


def _loosen(ws: OpsWorkspace, elsewhere: Path) -> Path:
    fan = _fan_out_of(ws, "IBM")
    fan.chmod(0o777)
    return fan


def _give_away(ws: OpsWorkspace, elsewhere: Path) -> Path:
    fan = _fan_out_of(ws, "IBM")
    os.chown(fan, NOBODY, NOBODY)
    return fan


PLANTED_DIRS = {"a link": _plant_link, "a file": _plant_file,
                "a directory others may write": _loosen, "another user's directory": _give_away}


@pytest.mark.parametrize("planted", list(PLANTED_DIRS))
def test_a_fan_out_directory_that_is_not_ours_stops_every_command(ws, tmp_path, planted, figures):
    elsewhere = tmp_path / "elsewhere"
    fan = PLANTED_DIRS[planted](ws, elsewhere)
    before = tree(data(ws)), tree(elsewhere) if elsewhere.exists() else {}
    name = fan.relative_to(ws.cwd).as_posix()

    runs = {" ".join(args): ws.run(*args) for args in (
        ["status"], ["export", "IBM"], ["download", "IBM"], ["backup"], ["gaps"],
        ["--rotate-key"], ["--cleanup"])}

    wrong = {args: (r.returncode, r.stderr[-400:]) for args, r in runs.items()
             if r.returncode != 3 or name not in r.stderr or "Fix:" not in r.stderr}
    assert wrong == {}
    assert (tree(data(ws)), tree(elsewhere) if elsewhere.exists() else {}) == before
    figures.record("hostile store: planted fan-out directory", tried=len(runs),
                   held=len(runs) - len(wrong), notes=planted)


# -- dataset files ----------------------------------------------------------------------------

def _file_to_link(ws: OpsWorkspace, elsewhere: Path) -> Path:
    """IBM's file moved out, a link to it in its place: a real token of ours, so a reader
    that followed it would show IBM as if nothing had happened."""
    path = file_of(ws, "IBM")
    elsewhere.mkdir()
    shutil.move(path, elsewhere / path.name)
    path.symlink_to(elsewhere / path.name)
    return path


def _file_to_fifo(ws: OpsWorkspace, elsewhere: Path) -> Path:
    path = file_of(ws, "IBM")
    path.unlink()
    os.mkfifo(path, 0o600)
    return path


PLANTED_FILES = {"a link": _file_to_link, "a FIFO": _file_to_fifo}


@pytest.mark.parametrize("planted", list(PLANTED_FILES))
def test_a_dataset_file_replaced_by_a_link_or_fifo_is_never_followed(ws, tmp_path, planted, figures):
    elsewhere = tmp_path / "elsewhere"
    path = PLANTED_FILES[planted](ws, elsewhere)
    name = path.relative_to(ws.cwd / "data").as_posix()
    outside = tree(elsewhere) if elsewhere.exists() else {}

    status = ws.run("status", "--json")
    export = ws.run("export", "IBM")
    download = ws.run("download", "IBM")
    backup = ws.run("backup")
    others = ws.run("export", "MSFT")

    rows = {r["dataset"]: r for r in json.loads(status.stdout)["datasets"]}
    assert status.returncode == 5, output(status)  # as for any unreadable dataset
    assert rows["IBM daily"]["path"] == name and "not a regular file" in rows["IBM daily"]["error"]
    for run in (export, download):
        assert run.returncode == 3, output(run)
        assert name in run.stderr and "Fix:" in run.stderr
    assert backup.returncode == 5 and "not a regular file" in backup.stderr, output(backup)
    assert others.returncode == 0, output(others)
    assert (tree(elsewhere) if elsewhere.exists() else {}) == outside
    assert stat.S_ISLNK(os.lstat(path).st_mode) or stat.S_ISFIFO(os.lstat(path).st_mode)
    figures.record("hostile store: planted dataset file", tried=5, held=5, notes=planted)


def test_foreign_files_are_ignored_never_read_listed_archived_or_deleted(ws, tmp_path):
    """Files the store did not name: beside the catalogue, in a fan-out directory, a
    directory of a foreign name. A FIFO among them would block whoever opened it."""
    planted = {data(ws) / "notes.txt": b"mine", _fan_out_of(ws, "IBM") / "README": b"x",
               _fan_out_of(ws, "MSFT") / ("ab" * 16 + ".fernet.bak"): b"y"}
    for path, content in planted.items():
        path.write_bytes(content)
    (data(ws) / "zz").mkdir(mode=0o700)
    os.mkfifo(_fan_out_of(ws, "IBM") / "pipe")
    expected = {f"{s} daily" for s in SYMBOLS}

    status = ws.run("status", "--json")
    backup = ws.run("backup")
    cleanup = ws.run("--cleanup")

    assert status.returncode == 0 and backup.returncode == 0 and cleanup.returncode == 0
    assert {r["dataset"] for r in json.loads(status.stdout)["datasets"]} == expected
    (archive,) = (ws.cwd / "backups").glob("ohlcv-backup-*.tar")
    with tarfile.open(archive) as tar:
        assert len([m for m in tar.getnames() if m.startswith("data/")]) == len(SYMBOLS)
    assert all(path.read_bytes() == content for path, content in planted.items())


# -- what the disk still tells --------------------------------------------------------------

def test_no_file_but_the_log_names_a_dataset_after_the_quota_leaves_some_pending(ws):
    """The daily budget spent after one more request: the other symbols wait in the
    pending queue, which must name them to no reader of the disk (the log, the operator's
    record, does; SECURITY.md). Long symbols: a chance match inside random base64 is nil."""
    wanted = ["QUOTAFIRST", "QUOTASECOND", "QUOTATHIRD"]
    used = len(SYMBOLS)  # today's requests of the template's downloads
    report = ws.download(wanted, overrides={"OHLCV_RATE_LIMIT_PER_DAY": str(used + 1)})
    assert len(report.pending) == 2, [r.line() for r in report.results]

    naming = {p.relative_to(ws.cwd).as_posix(): [s for s in wanted if s.encode() in p.read_bytes()]
              for p in ws.cwd.rglob("*") if p.is_file() and not p.is_symlink()
              and not p.name.startswith("secure_downloader.log")}
    pending = status_of(ws.app().ctx)["pending"]

    assert {name: found for name, found in naming.items() if found} == {}
    assert sorted(pending) == sorted(str(r.dataset) for r in report.pending)


def test_the_order_of_an_archive_s_members_follows_the_opaque_names(ws):
    """Members in identity order (daily/AAPL, daily/BRK.B, ..., intraday_5min/...) would
    tell, with their sizes, which interval each group is and each symbol's alphabetical
    rank. Six datasets: identity order matches name order by chance once in 720."""
    assert ws.download(["AAPL", "NVDA", "TSLA"]).exit_code == 0
    archive = ws.app().backup().path
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getnames() if m.startswith("data/")]

    assert len(members) == 6
    assert members == sorted(members)
