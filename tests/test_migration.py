"""--migrate-store: a store of the earlier layout (file names show symbols) moved to
opaque names, and archives of the earlier layout verified and restored into the new one
(docs/FORMAT.md, "Migration"; secure_ohlcv_downloader.py, StoreMigration).

Over real files and real command-line processes; the earlier store and archive come from
tests/earlier_layout.py (its docstring says why they are what the earlier version wrote).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from secure_ohlcv_downloader import (
    CATALOGUE_NAME,
    DatasetId,
    KeyringKeyStore,
    dataset_file,
)
from tests.download_fixtures import PREMIUM_KEY, start_emulator
from tests.earlier_layout import earlier_archive, earlier_files, earlier_site, put_earlier
from tests.foundation_fixtures import (  # noqa: F401  (keyring_backend is a fixture)
    REPO,
    handed_over_keys,
    keyring_backend,
    run_cli,
)
from tests.lifecycle_fixtures import Site, keyring_site, sample_datasets, snapshot
from tests.operations_fixtures import secret_hits
from tests.test_layout import OPAQUE, names_revealing, revealing_forms

DATASETS = sample_datasets() | {DatasetId("IBM", adjusted=True):
                                sample_datasets()[DatasetId("IBM")]}


def held_texts() -> set[str]:
    texts = {"adjusted", "intraday"}
    for d in DATASETS:
        texts |= {d.symbol, d.interval, d.name, d.identity}
        texts |= {d.month, d.month.replace("-", "")} if d.month else set()
    return texts


def data_names(site: Site) -> list[str]:
    return sorted(p.relative_to(site.data_dir).as_posix() for p in site.data_dir.rglob("*"))


@pytest.fixture
def earlier(tmp_path):
    return earlier_site(tmp_path, DATASETS)


def test_an_earlier_store_migrates_to_opaque_names_with_the_same_data(earlier):
    ring = earlier.ring()
    before = {d.identity: ring.decrypt(earlier.data_dir.joinpath(d.relative_path()).read_bytes())
              for d in DATASETS}
    refused = earlier.cli("status")
    fix = re.search(r"run `python (\S+) (--\S+)` once", refused.stderr)
    assert refused.returncode == 3 and fix is not None, refused.stderr

    result = run_cli([fix[2]], earlier.cwd, earlier.env(), script=REPO / fix[1])  # as named

    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(re.findall(r"^moved (.+)$", result.stdout, re.M)) == sorted(map(str, DATASETS))
    assert re.search(rf"^Migrated {len(DATASETS)} dataset\(s\) to opaque file names", result.stdout,
                     re.M), result.stdout
    keys = handed_over_keys(earlier.cwd)  # off a terminal: the whole ring in a 0600 file
    assert keys[0] == ring.primary.key and keys[-1].startswith("naming:")
    migrated = earlier.ring()
    assert migrated.naming is not None and migrated.naming.item == keys[-1]
    assert f"OHLCV_ENCRYPTION_KEY={','.join(keys)}" in earlier.env_file.read_text()
    names = data_names(earlier)
    files = [n for n in names if (earlier.data_dir / n).is_file() and n not in (".lock", CATALOGUE_NAME)]
    assert [n for n in files if not OPAQUE.match(n)] == []
    assert sorted(files) == sorted(dataset_file(migrated.naming.key, d).as_posix() for d in DATASETS)
    assert [n for n in names if (earlier.data_dir / n).is_dir()
            and not re.fullmatch(r"[0-9a-f]{2}", n)] == []
    assert names_revealing(names, revealing_forms(held_texts())) == []
    assert {d.identity: migrated.decrypt(earlier.file_of(d).read_bytes()) for d in DATASETS} == before
    catalogue = earlier.app().store().catalogue()
    assert catalogue.problem == "" and set(catalogue.entries) == {d.identity for d in DATASETS}


def test_the_keys_appear_in_no_log_output_or_state_file_at_debug(earlier):
    result = earlier.cli("--migrate-store", OHLCV_LOG_LEVEL="DEBUG")
    assert result.returncode == 0, result.stderr
    ring = earlier.ring()
    assert ring.naming is not None
    handed = set(earlier.state_dir.glob("new-key-*.txt"))
    texts: dict[str, str | bytes] = {"stdout": result.stdout, "stderr": result.stderr}
    texts |= {str(p): p.read_bytes() for p in earlier.cwd.rglob("*")
              if p.is_file() and p not in handed and p != earlier.env_file}

    assert "command migrate-store finished" in earlier.log_file.read_text()
    assert secret_hits(texts, {"naming key": ring.naming.key, "primary key": ring.primary.key}) == []


def test_every_command_works_after_the_migration(earlier, tmp_path):
    assert earlier.cli("--migrate-store").returncode == 0
    app = earlier.app()

    status = earlier.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert all(str(d) in status.stdout for d in DATASETS)
    exported = earlier.cli("export", "IBM", "--format", "csv")
    assert exported.returncode == 0 and exported.stdout.count("\n") == 31, exported.stderr
    assert len(app.load("TSCO.LON", "5min")) == len(DATASETS[DatasetId("TSCO.LON", "5min", month="2024-01")]) * 2
    assert list(app.load_many(["IBM", "MSFT"])["symbol"].unique()) == ["IBM", "MSFT"]
    for args in (["--check-keys"], ["gaps"], ["backup"], ["--verify-backup", "--all"], ["--cleanup"],
                 ["--recover"], ["--rotate-key"], ["status"]):
        result = earlier.cli(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
    av = start_emulator()
    try:
        result = earlier.cli("download", "AAPL", ALPHA_VANTAGE_API_KEY=PREMIUM_KEY,
                             ALPHA_VANTAGE_BASE_URL=av.origin + "/query",
                             OHLCV_BACKOFF_SECONDS="0.01")
    finally:
        av.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert earlier.file_of(DatasetId("AAPL")).is_file()
    assert names_revealing(data_names(earlier), revealing_forms(held_texts() | {"AAPL"})) == []


def test_a_migrated_store_is_said_so_and_left_unchanged(earlier):
    assert earlier.cli("--migrate-store").returncode == 0
    before = snapshot(earlier.cwd, exclude=(earlier.state_dir, earlier.log_file))

    result = earlier.cli("--migrate-store")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Already migrated"), result.stdout
    assert snapshot(earlier.cwd, exclude=(earlier.state_dir, earlier.log_file)) == before


def test_keys_in_an_outside_variable_stop_it_until_the_variable_holds_the_naming_key(tmp_path):
    site = earlier_site(tmp_path, DATASETS, key_in_variable=True)
    before = snapshot(site.data_dir, exclude=(site.data_dir / ".lock",))

    stopped = site.cli("--migrate-store")

    assert stopped.returncode == 0, stopped.stderr
    assert "no file was renamed yet" in stopped.stdout and "--migrate-store" in stopped.stdout
    assert snapshot(site.data_dir, exclude=(site.data_dir / ".lock",)) == before
    keys = handed_over_keys(site.cwd)
    assert keys[0] == site.variables["OHLCV_ENCRYPTION_KEY"] and keys[-1].startswith("naming:")
    assert site.cli("status").returncode == 3  # still the earlier layout: every command stops

    site.variables["OHLCV_ENCRYPTION_KEY"] = ",".join(keys)
    done = site.cli("--migrate-store")

    assert done.returncode == 0, done.stdout + done.stderr
    assert len(re.findall(r"^moved ", done.stdout, re.M)) == len(DATASETS)
    assert earlier_files(site.data_dir) == {}
    assert site.cli("status").returncode == 0


def test_with_keys_in_the_os_keyring_the_naming_key_is_stored_there(
        tmp_path, secret_service, keyring_backend):
    site = keyring_site(tmp_path, secret_service, keyring_backend)
    ring = site.ring()
    KeyringKeyStore(keyring_backend).save(ring.keys)  # the earlier version's entry: no naming key
    for handed in site.state_dir.glob("new-key-*"):
        handed.unlink()
    put_earlier(site.data_dir, ring, DATASETS)

    result = site.cli("--migrate-store")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "stored in: OS keyring" in result.stdout
    stored = KeyringKeyStore(keyring_backend).load()
    assert stored is not None and [k.key for k in stored[:-1]] == [ring.primary.key]
    assert stored[-1].naming and stored[-1].item == handed_over_keys(site.cwd)[-1]
    assert not site.env_file.exists()
    assert sorted(re.findall(r"^moved (.+)$", result.stdout, re.M)) == sorted(map(str, DATASETS))
    assert site.cli("status").returncode == 0


def _symlink(site: Site) -> tuple[str, Path]:
    target = site.cwd.parent / "elsewhere.fernet"
    target.write_bytes(b"not ours")
    (site.data_dir / "daily" / "AAPL.fernet").symlink_to(target)
    return "a symbolic link", target


def _fifo(site: Site) -> tuple[str, Path]:
    fifo = site.data_dir / "intraday_5min" / "TSCO.LON" / "2024-03.fernet"
    os.mkfifo(fifo, 0o600)
    return "not a regular file", fifo  # not read by the snapshot: it would wait forever


def _foreign(site: Site) -> tuple[str, Path]:
    (site.data_dir / "weekly" / "notes.txt").write_text("a file this tool did not write")
    return "not a dataset file of the earlier layout", site.log_file


def _lower_case_name(site: Site) -> tuple[str, Path]:
    ibm = site.data_dir / "daily" / "IBM.fernet"
    (site.data_dir / "daily" / "ibm.fernet").write_bytes(ibm.read_bytes())
    return "not a dataset file of the earlier layout", site.log_file


def _loose_directory(site: Site) -> tuple[str, Path]:
    os.chmod(site.data_dir / "daily", 0o755)
    return "looser than the configured", site.log_file


@pytest.mark.parametrize("plant", [_symlink, _fifo, _foreign, _lower_case_name,
                                   _loose_directory])
def test_what_the_migration_did_not_write_stops_it_before_anything_moves(earlier, plant):
    why, unread = plant(earlier)
    quiet = (earlier.log_file, earlier.data_dir / ".lock", earlier.state_dir / "runs.json", unread)
    before = snapshot(earlier.cwd, exclude=quiet)

    result = earlier.cli("--migrate-store")

    assert result.returncode == 3, result.stdout + result.stderr
    assert why in result.stderr, result.stderr
    assert snapshot(earlier.cwd, exclude=quiet) == before
    assert earlier.ring().naming is None  # no key was made or handed over
    assert sorted(earlier.state_dir.glob("new-key-*")) == []


def test_a_dataset_under_both_names_with_different_content_stops_it_naming_both(earlier):
    ring = earlier.ring()
    assert earlier.cli("--migrate-store").returncode == 0
    ibm = DatasetId("IBM")
    put_earlier(earlier.data_dir, ring, {ibm: DATASETS[DatasetId("MSFT")]})

    result = earlier.cli("--migrate-store")

    assert result.returncode == 5, result.stdout + result.stderr
    assert "daily/IBM.fernet" in result.stderr and earlier.file_of(ibm).name in result.stderr
    assert (earlier.data_dir / "daily" / "IBM.fernet").is_file()


def test_a_dataset_under_both_names_with_the_same_bytes_keeps_one(earlier):
    assert earlier.cli("--migrate-store").returncode == 0
    ibm = earlier.file_of(DatasetId("IBM"))
    (earlier.data_dir / "daily").mkdir(mode=0o700)
    (earlier.data_dir / "daily" / "IBM.fernet").write_bytes(ibm.read_bytes())

    result = earlier.cli("--migrate-store")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "dropped the old copy of IBM daily" in result.stdout
    assert not (earlier.data_dir / "daily").exists() and ibm.is_file()


def test_an_earlier_archive_verifies_and_restores_into_the_new_layout(earlier, tmp_path):
    ring = earlier.ring()
    archive = earlier_archive(earlier, ring, tmp_path / "archives")
    before = {d.identity: ring.decrypt(earlier.data_dir.joinpath(d.relative_path()).read_bytes())
              for d in DATASETS}
    assert earlier.cli("--migrate-store").returncode == 0
    migrated = earlier.ring()

    verified = earlier.cli("--verify-backup", str(archive), "--all")

    assert verified.returncode == 0, verified.stdout
    assert f"{len(DATASETS)} datasets decrypted, 0 problem(s)" in verified.stdout

    for path in earlier.data_dir.rglob("*.fernet"):
        path.unlink()
    recovered = earlier.cli("--recover", "--from-backup", str(archive))

    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert f"{len(DATASETS)} restored" in recovered.stdout
    assert "catalogue" in recovered.stderr and "rebuilt" in recovered.stderr
    assert earlier_files(earlier.data_dir) == {}
    assert {d.identity: migrated.decrypt(earlier.file_of(d).read_bytes()) for d in DATASETS} == before
    assert earlier.app().store().catalogue().problem == ""
    assert earlier.cli("status").returncode == 0


def test_an_earlier_archive_and_the_earlier_offline_copy_rebuild_a_new_machine(earlier, tmp_path):
    """The disaster case: a new machine, the offline copy from before the naming key (the
    Fernet key alone), an archive of the earlier layout."""
    ring = earlier.ring()
    archive = earlier_archive(earlier, ring, tmp_path / "archives")
    before = {d.identity: ring.decrypt(earlier.data_dir.joinpath(d.relative_path()).read_bytes())
              for d in DATASETS}
    key_file = tmp_path / "offline-copy.txt"
    key_file.write_text(f"OHLCV_ENCRYPTION_KEY={ring.primary.key}\n")
    key_file.chmod(0o600)
    (tmp_path / "new" / "site").mkdir(parents=True)
    machine = Site(tmp_path / "new" / "site", tmp_path / "new")

    result = machine.cli("--recover", "--key-file", str(key_file), "--from-backup", str(archive))

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(DATASETS)} restored" in result.stdout
    recovered = machine.ring()
    assert recovered.naming is not None
    assert handed_over_keys(machine.cwd)[-1] == recovered.naming.item  # the new offline copy
    assert earlier_files(machine.data_dir) == {}
    assert {d.identity: recovered.decrypt(machine.file_of(d).read_bytes()) for d in DATASETS} == before
    assert machine.cli("status").returncode == 0


def test_a_link_planted_at_an_opaque_name_is_refused_not_followed(tmp_path):
    site = earlier_site(tmp_path, DATASETS, key_in_variable=True)
    assert site.cli("--migrate-store").returncode == 0  # hands the naming key over, moves nothing
    site.variables["OHLCV_ENCRYPTION_KEY"] = ",".join(handed_over_keys(site.cwd))
    target = site.file_of(DatasetId("IBM"))
    target.parent.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.fernet"
    elsewhere.write_bytes(b"not ours")
    target.symlink_to(elsewhere)

    result = site.cli("--migrate-store")

    assert result.returncode == 3, result.stdout + result.stderr
    assert f"{target} is a symbolic link" in result.stderr
    assert target.is_symlink() and elsewhere.read_bytes() == b"not ours"
    assert (site.data_dir / "daily" / "IBM.fernet").is_file()


def test_the_readme_upgrade_steps_run_as_written_on_an_earlier_store(earlier):
    """README's "Upgrading" block, line by line, on a store of the earlier layout that its
    own nightly backup left an archive of: every step exits 0 (a step the unmigrated store
    refuses would leave the operator stuck at the first line)."""
    earlier_archive(earlier, earlier.ring(), earlier.cwd / "backups")
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Upgrading from an earlier version\n.*?```sh\n(.*?)```", text, re.S)
    assert block is not None
    steps = [line.split("#")[0].split() for line in block[1].splitlines() if line.strip()]
    assert steps and all(step[:2] == ["python", "secure_ohlcv_downloader.py"] for step in steps)

    for step in steps:
        result = run_cli(step[2:], earlier.cwd, earlier.env(), script=REPO / step[1])
        assert result.returncode == 0, (step, result.stdout, result.stderr)
    assert earlier.ring().naming is not None and not (earlier.data_dir / "daily").exists()
