"""The opaque layout and the encrypted catalogue (docs/FORMAT.md), over real files.

A listing of the data directory or of a backup archive's members tells nothing of what is
held; the catalogue lets status answer without decrypting a dataset, and a catalogue that
is stale or damaged costs speed, never a wrong answer. Datasets come from real downloads
against the local Alpha Vantage emulator.
"""

from __future__ import annotations

import base64
import json
import re
import tarfile
from datetime import UTC, datetime

import pytest

from secure_ohlcv_downloader import (
    CATALOGUE_NAME,
    DatasetId,
    EncryptedStore,
    dataset_file,
    status_of,
)
from tests.download_fixtures import start_emulator
from tests.foundation_fixtures import new_key
from tests.operations_fixtures import OpsWorkspace

OPAQUE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{32}\.fernet$")
SYMBOLS = ["IBM", "MSFT", "BRK.B"]


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A store holding daily, daily adjusted, weekly and intraday months of several symbols."""
    av = start_emulator()
    try:
        ws = OpsWorkspace(tmp_path_factory.mktemp("layout"), av).init()
        assert ws.download(SYMBOLS).exit_code == 0
        assert ws.download(["IBM"], adjusted=True).exit_code == 0
        assert ws.download(["MSFT"], interval="weekly").exit_code == 0
        assert ws.download(["IBM"], interval="5min").exit_code == 0
        yield ws
    finally:
        av.stop()


@pytest.fixture
def small(tmp_path):
    """A store of its own (tests here change it): three daily datasets."""
    av = start_emulator()
    try:
        ws = OpsWorkspace(tmp_path, av).init()
        assert ws.download(SYMBOLS).exit_code == 0
        yield ws
    finally:
        av.stop()


def base64_forms(text: str) -> set[str]:
    """`text` as it shows inside any base64 (standard or url-safe) string: at each of the
    three alignments, the characters its bytes alone determine."""
    forms = set()
    raw = text.encode()
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw + b"\0\0").decode()
        whole = [i for i in range(len(encoded))
                 if shift * 8 <= 6 * i and 6 * i + 5 < (shift + len(raw)) * 8]
        if whole:
            inner = encoded[whole[0]:whole[-1] + 1]
            forms |= {inner, inner.replace("+", "-").replace("/", "_")}
    return forms


def revealing_forms(held_texts: set[str]) -> set[str]:
    """Each text as is, hex-encoded and in base64, lower case (names are compared so)."""
    forms = set()
    for text in held_texts:
        forms |= {text, text.encode().hex()} | base64_forms(text)
    return {f.lower() for f in forms if len(f) >= 3}


def held_texts(ws: OpsWorkspace) -> set[str]:
    store = ws.app().store()
    texts = set()
    for dataset in store.datasets():
        texts |= {dataset.symbol, dataset.interval, dataset.name, dataset.identity}
        texts |= {dataset.month, dataset.month.replace("-", "")} if dataset.month else set()
    return texts | {"adjusted", "intraday"}


def names_revealing(names: list[str], forms: set[str]) -> list[tuple[str, str]]:
    return [(name, form) for name in names for form in forms if form in name.lower()]


def test_no_name_under_the_data_directory_reveals_a_symbol_interval_or_month(held):
    data = held.cwd / "data"
    names = [p.relative_to(data).as_posix() for p in data.rglob("*")]
    datasets = list(held.app().store().datasets())
    intervals = {(d.interval, d.adjusted) for d in datasets}

    assert {("daily", False), ("daily", True), ("weekly", False), ("5min", False)} <= intervals
    assert sum(1 for d in datasets if d.month) >= 1
    files = [n for n in names if (data / n).is_file() and n not in (".lock", CATALOGUE_NAME)]
    assert len(files) == len(datasets)
    assert [n for n in files if not OPAQUE.match(n)] == []
    assert [n for n in names if (data / n).is_dir() and not re.fullmatch(r"[0-9a-f]{2}", n)] == []
    assert names_revealing(names, revealing_forms(held_texts(held))) == []


def test_no_member_name_of_a_backup_reveals_what_is_held_and_it_restores(held, tmp_path):
    """Members are the opaque paths; the manifest (encrypted) names each dataset, and
    restoring into an empty data directory puts every one back at its opaque path."""
    report = held.app().backup(tmp_path / "archives")
    with tarfile.open(report.path) as tar:
        members = tar.getnames()
    data = [m.removeprefix("data/") for m in members if m.startswith("data/")]

    assert sorted(set(members) - {f"data/{d}" for d in data}) == ["manifest.fernet",
                                                                   "state/canary.fernet"]
    assert [d for d in data if not OPAQUE.match(d)] == []
    assert len(data) == report.datasets == len(list(held.app().store().datasets()))
    assert names_revealing(members, revealing_forms(held_texts(held))) == []
    assert held.app().verify_backup(report.path, sample=None).sound


def test_recover_restores_a_backup_into_the_opaque_layout_and_rebuilds_the_catalogue(small):
    before = small.stored_rows()
    names = sorted(p.relative_to(small.cwd / "data").as_posix() for p in small.dataset_files())
    archive = small.app().backup().path
    for path in small.dataset_files():
        path.unlink()
    (small.cwd / "data" / CATALOGUE_NAME).unlink()

    report = small.app().recover(from_backup=archive)

    assert sorted(report.restored) == sorted(before)
    assert any("catalogue" in w and "rebuilt" in w for w in report.warnings), report.warnings
    assert sorted(p.relative_to(small.cwd / "data").as_posix()
                  for p in small.dataset_files()) == names
    assert small.stored_rows() == before
    assert small.app().store().catalogue().problem == ""


def test_intraday_files_record_their_month(held):
    store = held.app().store()
    months = [d for d in store.datasets() if d.month]

    assert months
    assert [store.read(d)[1].get("month") for d in months] == [d.month for d in months]


def test_a_file_without_its_month_is_of_the_month_of_its_first_bar_in_new_york():
    """Files written before `month` was recorded: 00:30 UTC on 1 February is still
    January in New York."""
    first_bar = datetime(2024, 2, 1, 0, 30, tzinfo=UTC)
    meta = {"dataset": "intraday_5min", "symbol": "IBM"}

    assert DatasetId.from_meta(meta, first_bar) == DatasetId("IBM", "5min", month="2024-01")
    assert DatasetId.from_meta({"dataset": "daily_adjusted", "symbol": "IBM"},
                               datetime(2024, 2, 1)) == DatasetId("IBM", adjusted=True)


def test_a_name_is_a_keyed_hash_of_the_identity():
    """The same dataset under two naming keys gets unrelated names; two datasets under
    one key, different names."""
    one, other = new_key(), new_key()
    ibm, ibm_5min = DatasetId("IBM"), DatasetId("IBM", "5min", month="2024-01")

    assert ibm.identity == "daily/IBM" and ibm_5min.identity == "intraday_5min/IBM/2024-01"
    assert dataset_file(one, ibm) != dataset_file(other, ibm)
    assert dataset_file(one, ibm) != dataset_file(one, ibm_5min)
    assert OPAQUE.match(dataset_file(one, ibm).as_posix())


# -- the catalogue ---------------------------------------------------------------------------

def status_rows(ws: OpsWorkspace) -> dict[str, dict]:
    app = ws.app()
    return {row["dataset"]: row for row in status_of(app.ctx)["datasets"]}


def full_read_rows(ws: OpsWorkspace) -> dict[str, int]:
    """Rows of every dataset file, each decrypted whole, found by listing the files alone."""
    store = ws.app().store()
    return {str(item.dataset): len(store.read_file(store.root / item.file)[0])
            for item in store.listing(catalogue=_empty(store))}


def _empty(store: EncryptedStore):
    return type(store.catalogue())({})


def test_status_from_a_fresh_catalogue_decrypts_no_dataset(held):
    EncryptedStore.decrypted = 0
    rows = status_rows(held)

    assert EncryptedStore.decrypted == 0
    assert {name: row["rows"] for name, row in rows.items()} == held.stored_rows()
    assert all(OPAQUE.match(row["path"]) for row in rows.values())


def test_a_stale_catalogue_never_makes_status_wrong(small):
    """After the catalogue was written: one dataset rewritten, one file deleted, one
    added. Status reads those three from the files, and trusts the rest."""
    store = small.app().store()
    ibm, msft, extra = DatasetId("IBM"), DatasetId("MSFT"), DatasetId("NEWCO")
    frame, meta = store.read(ibm)
    with store.lock():
        store.write(ibm, frame.iloc[:5], meta)
        store.write(extra, frame.iloc[:7], meta)
        store.path(msft).unlink()
    EncryptedStore.decrypted = 0

    rows = {name: row["rows"] for name, row in status_rows(small).items()}
    decrypted = EncryptedStore.decrypted

    assert decrypted == 2  # the rewritten and the added file, no other
    assert rows == full_read_rows(small)
    assert rows["IBM daily"] == 5 and rows["NEWCO daily"] == 7 and "MSFT daily" not in rows


def test_a_file_rewritten_with_the_same_rows_is_read_again(small):
    """Same rows, one flag changed: the catalogue's stat (inode, mtime) tells it apart."""
    store = small.app().store()
    ibm = DatasetId("IBM")
    frame, meta = store.read(ibm)
    assert not meta.get("partial_history")
    with store.lock():
        store.write(ibm, frame, dict(meta, partial_history=True))

    row = status_rows(small)["IBM daily"]

    assert row["partial_history"] is True and row["rows"] == len(frame)


def sealed(ws: OpsWorkspace, document) -> bytes:
    return ws.app().store().key_ring.encrypt(json.dumps(document).encode())


def swapped_entries(ws: OpsWorkspace) -> bytes:
    """The catalogue, sealed as it should be, but IBM's entry filed under MSFT and back."""
    ring = ws.app().store().key_ring
    document = json.loads(ring.decrypt((ws.cwd / "data" / CATALOGUE_NAME).read_bytes()))
    entries = document["datasets"]
    entries["daily/IBM"], entries["daily/MSFT"] = entries["daily/MSFT"], entries["daily/IBM"]
    return sealed(ws, document)


def without_a_field(ws: OpsWorkspace) -> bytes:
    ring = ws.app().store().key_ring
    document = json.loads(ring.decrypt((ws.cwd / "data" / CATALOGUE_NAME).read_bytes()))
    del document["datasets"]["daily/IBM"]["last_bar"]
    return sealed(ws, document)


DAMAGE = {"not a token": lambda ws: b"not a token", "empty": lambda ws: b"",
          "JSON that is not a catalogue": lambda ws: sealed(ws, [1]),
          "entries filed under each other's dataset": swapped_entries,
          "an entry without a field": without_a_field}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_catalogue_leaves_status_right_and_the_next_writer_rewrites_it(small, damage):
    catalogue = small.cwd / "data" / CATALOGUE_NAME
    expected = status_rows(small)
    catalogue.write_bytes(DAMAGE[damage](small))

    assert status_rows(small) == expected
    assert small.app().store().catalogue().problem == "damaged"
    assert small.download(["IBM"]).exit_code == 0  # nothing new to fetch: still a writer
    assert small.app().store().catalogue().problem == ""
    assert {name: row["rows"] for name, row in status_rows(small).items()} == \
        {name: row["rows"] for name, row in expected.items()}


def test_a_file_renamed_by_hand_is_reported_not_taken_for_another_dataset(small):
    store = small.app().store()
    ibm_path, msft_path = store.path(DatasetId("IBM")), store.path(DatasetId("MSFT"))
    msft_path.unlink()
    ibm_path.rename(msft_path)

    rows = status_of(small.app().ctx)["datasets"]
    unreadable = [row for row in rows if "error" in row]

    assert [row["path"] for row in unreadable] == [store.relative(msft_path)]
    assert "renamed by hand" in unreadable[0]["error"]
    assert "IBM daily" not in {row["dataset"] for row in rows}


# -- what stops -----------------------------------------------------------------------------

def test_without_a_naming_key_a_command_stops_with_the_migration_fix(small):
    fernet_only = str(small.variables["OHLCV_ENCRYPTION_KEY"]).split(",")[0]

    result = small.run("status", OHLCV_ENCRYPTION_KEY=fernet_only)

    assert result.returncode == 3, result.stderr
    # its files are under a naming key the ring lacks: the offline copy's, or a re-keying
    assert "--migrate-store" in result.stderr and "ends with `naming:" in result.stderr


def test_a_store_still_in_the_earlier_layout_stops_with_the_migration_fix(small):
    earlier = small.cwd / "data" / "daily"
    earlier.mkdir(mode=0o700)
    (earlier / "IBM.fernet").write_bytes(b"")

    before = {p: p.read_bytes() for p in sorted(small.cwd.rglob("*"))
              if p.is_file() and "logs" not in p.parts and p.suffix not in (".log", ".json")}

    for args in (["status"], ["download", "IBM"], ["backup"], ["--rotate-key"], ["--cleanup"],
                 ["--init"], ["--recover"], ["gaps"], ["export", "IBM"],
                 ["remove-key", "0123456789ab", "--yes"]):
        result = small.run(*args)
        assert result.returncode == 3, (args, result.stderr)
        assert "--migrate-store" in result.stderr, args
    after = {p: p.read_bytes() for p in before}
    assert [p for p in before if before[p] != after[p]] == []
    assert sorted(small.cwd.glob("state/new-key-*")) == []  # no key was made or handed over


def test_the_catalogue_is_a_single_fernet_token_that_names_no_dataset(held):
    token = (held.cwd / "data" / CATALOGUE_NAME).read_bytes()
    plain = json.loads(held.app().store().key_ring.decrypt(token))

    assert base64.urlsafe_b64decode(token)[:1] == b"\x80"  # Fernet version byte
    assert plain["format"] == 1 and set(plain["datasets"]) == \
        {d.identity for d in held.app().store().datasets()}
    assert all(OPAQUE.match(e["file"]) and "scales" not in e["meta"]
               for e in plain["datasets"].values())


def test_a_damaged_file_is_named_by_the_dataset_the_catalogue_knew_it_as(small):
    """Its opaque name is all the disk says; the catalogue still knows whose name it is,
    so status and gaps name the dataset (gaps exits 5, as for any unreadable file)."""
    path = small.app().store().path(DatasetId("MSFT"))
    token = bytearray(path.read_bytes())
    token[len(token) // 2] ^= 1
    path.write_bytes(bytes(token))

    rows = {row["dataset"]: row for row in status_of(small.app().ctx)["datasets"]}
    gaps = small.run("gaps")

    assert "does not decrypt" in rows["MSFT daily"]["error"]
    assert gaps.returncode == 5, gaps.stderr
    assert "MSFT daily" in gaps.stdout


def test_the_catalogue_a_download_leaves_says_what_the_files_footers_say(held):
    """Writers record each entry as they write (no second decryption); it must be exactly
    what reading the file's footer gives, daily and intraday (time zone kept) alike."""
    store = held.app().store()
    from_catalogue = {x.dataset.identity: x.entry for x in store.listing()}
    from_footers = {x.dataset.identity: x.entry for x in store.listing(catalogue=_empty(store))}

    assert from_catalogue == from_footers


def test_a_download_of_new_symbols_decrypts_no_file_to_write_the_catalogue(small):
    EncryptedStore.decrypted = 0
    assert small.download(["AAPL", "NVDA"]).exit_code == 0
    decrypted = EncryptedStore.decrypted

    assert decrypted == 0
    assert {"AAPL daily", "NVDA daily"} <= set(status_rows(small))
    assert EncryptedStore.decrypted == 0  # and status found them in the catalogue


def test_rotation_rewrites_the_catalogue_under_the_new_key_without_decrypting_it_again(small):
    """Keys in a variable: the first run hands the new ring over, the second (variable set)
    re-encrypts. The catalogue then names the new key for every dataset, is sealed under
    it, and says what the footers say; building it decrypted no dataset a second time."""
    first = small.app().rotate_key()
    assert first.awaiting_env_update and first.new_key is not None
    value = first.new_key.value
    naming = str(small.variables["OHLCV_ENCRYPTION_KEY"]).split(",")[-1]
    small.variables["OHLCV_ENCRYPTION_KEY"] = value if "naming:" in value else f"{value},{naming}"
    EncryptedStore.decrypted = 0

    report = small.app().rotate_key()
    decrypted = EncryptedStore.decrypted

    store = small.app().store()
    new_fp = store.key_ring.primary.fingerprint
    catalogue = (small.cwd / "data" / CATALOGUE_NAME).read_bytes()
    assert report.rotated == len(SYMBOLS) and decrypted == 0
    assert store.key_ring.signed_by_primary(catalogue)
    entries = {x.dataset.identity: x.entry for x in store.listing()}
    assert {e["key"] for e in entries.values()} == {new_fp}
    assert entries == {x.dataset.identity: x.entry for x in store.listing(catalogue=_empty(store))}


def test_check_keys_fails_when_the_naming_key_is_not_the_one_the_store_was_named_with(small):
    right = small.run("--check-keys")
    primary = str(small.variables["OHLCV_ENCRYPTION_KEY"]).split(",")[0]

    wrong = small.run("--check-keys", OHLCV_ENCRYPTION_KEY=f"{primary},naming:{new_key()}")

    assert right.returncode == 0, right.stdout + right.stderr
    assert wrong.returncode != 0
    assert "naming key of the store" in wrong.stdout + wrong.stderr
    assert "ends with `naming:" in wrong.stdout and "--migrate-store" in wrong.stdout


def test_a_catalogue_that_cannot_be_written_costs_a_note_not_the_run(small):
    """The catalogue is a cache: when it cannot be replaced (here a directory stands in its
    place), the download still succeeds and says so, and status reads the files."""
    catalogue = small.cwd / "data" / CATALOGUE_NAME
    catalogue.unlink()
    catalogue.mkdir(mode=0o700)
    (catalogue / "keep").write_bytes(b"")  # os.replace cannot put a file over it

    result = small.run("download", "AAPL")

    assert result.returncode == 0, result.stderr
    assert "catalogue could not be rewritten" in result.stderr
    assert "AAPL daily" in status_rows(small)
