"""A naming key never orphans the store's files (docs/FORMAT.md, invariants 1 and 5).

A store's dataset files are named by its naming key; a key ring that lacks that key
(the `naming:` item dropped from `.env`, a data directory copied to a machine given the
Fernet key alone, a recovery from an old offline copy) must stop every command that
would make a new naming key or write under the wrong one, and `--migrate-store` must
rename every dataset to the ring's naming key, crash-safely.

Over real files and real command-line processes, with the Alpha Vantage emulator.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from secure_ohlcv_downloader import (
    CATALOGUE_NAME,
    DatasetId,
    EncryptedStore,
    new_naming_key,
)
from tests.download_fixtures import PREMIUM_KEY, start_emulator
from tests.earlier_layout import without_naming_key
from tests.lifecycle_fixtures import Site, headless_site, sample_datasets, snapshot

DATASETS = sample_datasets()
KEY_LINE = re.compile(r"^(OHLCV_ENCRYPTION_KEY=)(.*)$", re.M)


def migrated_site(root) -> Site:
    """An installation whose datasets sit under its naming key, catalogue written."""
    site = headless_site(root)
    site.put(DATASETS)
    EncryptedStore(site.settings(), site.ring()).save_catalogue()
    for handed in site.state_dir.glob("new-key-*"):  # init's hand-over, moved offline
        handed.unlink()
    return site


def set_env_keys(site: Site, value: str) -> None:
    text = site.env_file.read_text()
    site.env_file.write_text(KEY_LINE.sub(lambda m: m[1] + value, text))


def env_keys(site: Site) -> str:
    match = KEY_LINE.search(site.env_file.read_text())
    assert match is not None
    return match[2]


def unchanged(site: Site) -> dict[str, tuple]:
    """What a refused command must leave as it was (its run record and lock file aside)."""
    return snapshot(site.cwd, exclude=(site.log_file, site.state_dir / "runs.json",
                                       site.state_dir / "runs.lock",
                                       site.data_dir / ".lock"))


def assert_every_dataset_readable(site: Site) -> None:
    status = site.cli("status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "UNREADABLE" not in status.stdout
    listed = json.loads(status.stdout)
    text = json.dumps(listed)
    assert all(str(d) in text for d in DATASETS), status.stdout
    exported = site.cli("export", "IBM", "--format", "csv")
    assert exported.returncode == 0 and exported.stdout.count("\n") > 1, exported.stderr
    checked = site.cli("--check-keys")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def assert_stopped_with_the_fix(result, recorded: str) -> None:
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"named under naming key {recorded}" in result.stderr, result.stderr
    assert "naming:" in result.stderr and "--migrate-store" in result.stderr, result.stderr


@pytest.fixture
def site(tmp_path):
    return migrated_site(tmp_path)


@pytest.mark.parametrize("command", [["--migrate-store"], ["--recover"]])
def test_a_ring_whose_naming_key_was_dropped_stops_then_migrate_store_renames_all(site, command):
    """Repros A (--migrate-store) and C (--recover): `naming:` dropped from `.env`."""
    naming = site.ring().naming
    assert naming is not None
    set_env_keys(site, without_naming_key(env_keys(site)))
    before = unchanged(site)

    status = site.cli("status")
    assert_stopped_with_the_fix(status, naming.fingerprint)
    checked = site.cli("--check-keys")
    assert checked.returncode == 3, checked.stdout + checked.stderr
    assert f"named under naming key {naming.fingerprint}" in checked.stdout, checked.stdout
    if command == ["--recover"]:
        refused = site.cli(*command)
        assert_stopped_with_the_fix(refused, naming.fingerprint)
        assert unchanged(site) == before

    migrated = site.cli("--migrate-store")

    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert sorted(re.findall(r"^renamed (.+?) \(", migrated.stdout, re.M)) == sorted(map(str, DATASETS))
    assert f"renamed {len(DATASETS)} from another naming key (0 already there)" in migrated.stdout
    new = site.ring().naming
    assert new is not None and new.fingerprint != naming.fingerprint
    assert f"New naming key {new.fingerprint} written to " in migrated.stdout, migrated.stdout
    assert all(site.file_of(d).is_file() for d in DATASETS)
    assert_every_dataset_readable(site)


def test_a_data_directory_copied_to_a_site_given_the_fernet_key_alone_stops_init(site, tmp_path):
    """Repro B: --init must not make a naming key for a store of opaque files."""
    full = env_keys(site)
    naming = site.ring().naming
    assert naming is not None
    (tmp_path / "new" / "site").mkdir(parents=True)
    copy = Site(tmp_path / "new" / "site", tmp_path / "new")
    shutil.copytree(site.data_dir, copy.data_dir)
    for directory in (copy.state_dir, copy.backup_dir):
        directory.mkdir(mode=0o700)
    copy.variables["OHLCV_ENCRYPTION_KEY"] = without_naming_key(full)
    before = unchanged(copy)

    refused = copy.cli("--init")

    assert_stopped_with_the_fix(refused, naming.fingerprint)
    assert unchanged(copy) == before
    copy.variables["OHLCV_ENCRYPTION_KEY"] = full  # the offline copy, naming key and all
    assert copy.cli("--init").returncode == 0
    assert_every_dataset_readable(copy)


def test_a_download_with_another_naming_key_stops_before_any_request(site):
    naming = site.ring().naming  # the key the store's files and catalogue are under
    assert naming is not None
    set_env_keys(site, without_naming_key(env_keys(site)) + "," + new_naming_key().item)
    before = unchanged(site)
    av = start_emulator()
    try:
        result = site.cli("download", "AAPL", ALPHA_VANTAGE_API_KEY=PREMIUM_KEY,
                          ALPHA_VANTAGE_BASE_URL=av.origin + "/query",
                          OHLCV_BACKOFF_SECONDS="0.01")
        requests = list(av.requests)
    finally:
        av.stop()

    assert_stopped_with_the_fix(result, naming.fingerprint)
    assert requests == []
    assert unchanged(site) == before


def test_migrate_store_puts_a_hand_renamed_file_back(site):
    ibm = site.file_of(DatasetId("IBM"))
    token = ibm.read_bytes()
    elsewhere = site.data_dir / ibm.parent.name / (ibm.parent.name + "f" * 30 + ".fernet")
    ibm.rename(elsewhere)
    status = site.cli("status")
    assert "--migrate-store" in status.stdout + status.stderr

    result = site.cli("--migrate-store")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "renamed IBM daily" in result.stdout, result.stdout
    assert ibm.read_bytes() == token and not elsewhere.exists()
    assert_every_dataset_readable(site)


def test_migrate_store_leaves_an_unreadable_file_in_place_and_says_so(site):
    ibm = site.file_of(DatasetId("IBM"))
    planted = ibm.parent / (ibm.parent.name + "e" * 30 + ".fernet")
    planted.write_bytes(b"not a token of this store")
    planted.chmod(0o600)

    result = site.cli("--migrate-store")

    assert result.returncode == 5, result.stdout + result.stderr  # integrity failure found
    assert f"left in place, unreadable: {ibm.parent.name}/{planted.name}" in result.stderr
    assert planted.read_bytes() == b"not a token of this store"


def test_recover_reports_a_misnamed_file_and_points_at_migrate_store(site):
    ibm = site.file_of(DatasetId("IBM"))
    elsewhere = site.data_dir / ibm.parent.name / (ibm.parent.name + "f" * 30 + ".fernet")
    ibm.rename(elsewhere)

    result = site.cli("--recover")

    assert result.returncode == 5, result.stdout + result.stderr
    assert "--migrate-store" in result.stdout + result.stderr
    assert elsewhere.is_file()  # never deleted
    assert (site.data_dir / CATALOGUE_NAME).is_file()


def test_re_keying_a_catalogued_store_takes_identities_from_the_catalogue_not_the_files(site):
    """The catalogue written under the lost naming key still proves each file (by stat):
    re-keying 100,000 datasets must not decrypt them all, twice."""
    set_env_keys(site, without_naming_key(env_keys(site)) + "," + new_naming_key().item)
    decrypted = EncryptedStore.decrypted

    report = site.app().migrate_store()

    assert sorted(report.renamed) == sorted(map(str, DATASETS))
    assert EncryptedStore.decrypted == decrypted
    catalogue = site.app().store().catalogue()
    assert catalogue.problem == "" and set(catalogue.entries) == {d.identity for d in DATASETS}
    assert_every_dataset_readable(site)
