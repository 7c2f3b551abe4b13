"""The key and data lifecycle: --rotate-key, remove-key, backup, --verify-backup, --recover
and --cleanup, specified on real files, real subprocesses and a real Secret Service.

Every command under test runs in a process of its own, in the installation's directory,
stdin closed, with an environment built from scratch (tests/lifecycle_fixtures.py): forked
from an interpreter that has imported the command line (`site.cli`), and for each command
at least once as `python secure_ohlcv_cli.py ...` in a new interpreter (`site.cli_fresh`).
Set-up steps (datasets, earlier archives) go through the same library in this process.
A scenario that several tests read runs once (a fixture of class or module scope) and each
test asserts one behaviour of its outcome; independent runs of one scenario (the spoiled
archives) run at the same time.

Crash safety of --rotate-key under SIGKILL is in tests/test_rotation_crash.py.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from cryptography.fernet import Fernet, InvalidToken

import secure_ohlcv_downloader as product
from config import KEYRING_SERVICE, fernet_key_problem
from secure_ohlcv_cli import render_export
from secure_ohlcv_downloader import (
    CANARY_MEMBER,
    CANARY_TEXT,
    KEYRING_USERNAME,
    MANIFEST_MEMBER,
    BackupArchive,
    DatasetId,
    EnvFileKeyStore,
    KeyRing,
    KeyringKeyStore,
    StoredKey,
    atomic_write,
    backup_archives,
    encode_table,
    fingerprint,
    retention_cutoff,
    verify_backup,
)
from tests.foundation_fixtures import (  # noqa: F401  (keyring_backend is a fixture)
    delete_key_ring_entry,
    handed_over_keys,
    keyring_backend,
    new_key,
    new_key_ring,
    secret_service_keyring,
)
from tests.lifecycle_fixtures import (
    Site,
    cli_all,
    clone_site,
    daily_bars,
    file_member,
    flip_byte,
    headless_site,
    intraday_bars,
    keyring_site,
    link_member,
    lock_holder,
    many_datasets,
    member_data_offset,
    member_header_offset,
    read_members,
    rewrite_archive,
    run_all,
    sample_datasets,
    snapshot,
    weekday_bars,
)

IBM = DatasetId("IBM")
IBM_MEMBER = "<IBM's member>"  # its name is a keyed hash: member_name() gives it per site
DATASET_COUNT = len(sample_datasets())
ARCHIVE_NAME = re.compile(r"ohlcv-backup-(\d{8}T\d{12})Z\.tar")
EXPORTS = [["export", "IBM"], ["export", "BRK.B", "--interval", "weekly"],
           ["export", "TSCO.LON", "--interval", "5min"]]  # intraday: two month files


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def problems(result: subprocess.CompletedProcess) -> list[str]:
    """The `PROBLEM ...` lines of a --verify-backup report, without the prefix."""
    return [line.strip()[len("PROBLEM "):] for line in result.stdout.splitlines()
            if line.strip().startswith("PROBLEM ")]


def other_bars(frame: pd.DataFrame) -> pd.DataFrame:
    """The same bars with other prices: another, equally valid, version of a dataset."""
    return frame.assign(**{c: frame[c] + 10.0 for c in ("open", "high", "low", "close")})


def opens_with(key: str, token: bytes) -> bool:
    try:
        Fernet(key).decrypt(token)
        return True
    except InvalidToken:
        return False


def stored_statuses(site: Site) -> list[tuple[str, str]]:
    """(fingerprint, status) of every stored key, primary first, as the key store holds
    them: the keyring entry's JSON, or the order of OHLCV_ENCRYPTION_KEY (.env)."""
    if site.service is not None:
        entry = json.loads(site.backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME))
        return [(StoredKey(k["key"], k["status"]).fingerprint, k["status"])
                for k in entry["keys"]]
    return [(k.fingerprint, k.status) for k in EnvFileKeyStore(site.env_file, 0o600).load()]


# =========================================================================================
# --rotate-key, keys in .env or in the keyring
# =========================================================================================

@dataclass
class Rotation:
    site: Site
    old: KeyRing
    new: KeyRing
    files_before: dict[str, bytes]
    frames_before: dict[str, pd.DataFrame]
    archive_before: Path  # a backup written before the rotation
    result: subprocess.CompletedProcess
    statuses: list[tuple[str, str]]


@pytest.fixture(scope="class", params=["dotenv", "keyring"])
def rotation(request, tmp_path_factory):
    """One `--rotate-key` over a store whose keys live in `.env` or in the Secret Service."""
    root = tmp_path_factory.mktemp(f"rotate-{request.param}")
    if request.param == "dotenv":
        yield _rotate(headless_site(root))
        return
    service = request.getfixturevalue("secret_service")
    with secret_service_keyring(service) as backend:
        yield _rotate(keyring_site(root, service, backend))


def _rotate(site: Site) -> Rotation:
    site.put(sample_datasets())
    archive = site.backup()
    old, files, frames = site.ring(), site.files(), site.frames()
    result = site.cli_fresh("--rotate-key")
    return Rotation(site, old, site.ring(), files, frames, archive, result, stored_statuses(site))


class TestRotateKey:
    def test_reports_old_and_new_fingerprint_and_how_many_datasets_it_rotated(self, rotation):
        assert rotation.result.returncode == 0, output(rotation.result)
        assert f"Rotated {DATASET_COUNT} dataset(s)" in rotation.result.stdout
        assert (f"key {rotation.old.primary.fingerprint} -> {rotation.new.primary.fingerprint}"
                in rotation.result.stdout)

    def test_every_dataset_opens_under_the_new_key_alone(self, rotation):
        new, old = rotation.new.primary.key, rotation.old.primary.key
        files = rotation.site.files()

        assert files.keys() == rotation.files_before.keys()
        assert [rel for rel, token in files.items() if not opens_with(new, token)] == []
        assert [rel for rel, token in files.items() if opens_with(old, token)] == []

    def test_the_canary_opens_under_the_new_key_alone(self, rotation):
        assert Fernet(rotation.new.primary.key).decrypt(rotation.site.canary.read_bytes()) \
            == CANARY_TEXT

    def test_no_bar_changes(self, rotation):
        frames = rotation.site.frames()

        for rel, frame in rotation.frames_before.items():
            pd.testing.assert_frame_equal(frames[rel], frame, obj=rel)

    def test_the_old_key_stays_in_the_ring_as_retired_and_the_naming_key_unchanged(
            self, rotation):
        assert rotation.old.naming is not None
        assert rotation.statuses == [(rotation.new.primary.fingerprint, "primary"),
                                     (rotation.old.primary.fingerprint, "retired"),
                                     (rotation.old.naming.fingerprint, "naming")]

    def test_the_naming_key_is_handed_over_with_the_new_ring(self, rotation):
        # Rotation renames nothing: the value to keep offline still ends with the same
        # naming key.
        handed = rotation.site.state_dir / f"new-key-{rotation.new.primary.fingerprint}.txt"
        assert handed.read_text().rstrip().endswith(f",naming:{rotation.old.naming.key}")

    def test_the_new_key_is_never_printed(self, rotation):
        assert rotation.new.primary.key not in output(rotation.result)

    def test_a_backup_written_before_the_rotation_still_verifies(self, rotation):
        result = rotation.site.cli("--verify-backup", "--all", str(rotation.archive_before))

        assert result.returncode == 0, output(result)
        assert f"{DATASET_COUNT} datasets decrypted, 0 problem(s)" in result.stdout


def test_rotate_key_after_a_completed_rotation_starts_a_new_one(tmp_path):
    """The current behaviour: a canary under the primary key means "nothing under way", so a
    second run generates yet another key and re-encrypts every dataset again."""
    site = headless_site(tmp_path)
    site.put(sample_datasets())
    original = site.ring()
    site.app().rotate_key()  # the first rotation, complete
    after_first = site.ring()

    second = site.cli("--rotate-key")

    assert second.returncode == 0, output(second)
    after_second = site.ring()
    assert after_second.fingerprints()[1:] == after_first.fingerprints() == \
        [after_first.primary.fingerprint, original.primary.fingerprint]
    assert after_second.primary.fingerprint not in after_first.fingerprints()
    assert (f"Rotated {DATASET_COUNT} dataset(s) (0 already under the new key)" in second.stdout)
    assert (f"key {after_first.primary.fingerprint} -> {after_second.primary.fingerprint}"
            in second.stdout)


def test_a_file_no_key_opens_stops_the_rotation_and_a_re_run_after_the_fix_completes(tmp_path):
    """Datasets are re-encrypted several at a time: one bad file among many stops the run
    with its name and exit code 5, every other file still opens under a key of the ring,
    the canary keeps the old key (unfinished), and a re-run finishes the job."""
    site = headless_site(tmp_path)
    site.put(many_datasets(40))
    old = site.ring()
    files_before, frames_before = site.files(), site.frames()
    bad = sorted(files_before)[17]
    (site.data_dir / bad).write_bytes(Fernet(new_key()).encrypt(b"not ours"))

    stopped = site.cli("--rotate-key")

    assert stopped.returncode == 5, output(stopped)
    assert f"{site.data_dir / bad} does not decrypt with the key ring" in stopped.stderr
    assert "--recover" in stopped.stderr
    ring = site.ring()
    assert opens_with(old.primary.key, site.canary.read_bytes())
    assert [rel for rel, token in site.files().items() if rel != bad and not any(
        opens_with(k.key, token) for k in ring.keys)] == []

    (site.data_dir / bad).write_bytes(files_before[bad])  # as --recover would restore it
    resumed = site.cli("--rotate-key")

    assert resumed.returncode == 0, output(resumed)
    rotated, already = map(int, re.search(r"Rotated (\d+) dataset\(s\) \((\d+) already",
                                          resumed.stdout).groups())
    assert rotated + already == 40 and rotated >= 1
    assert site.ring().primary.fingerprint == ring.primary.fingerprint  # no third key
    files = site.files()
    assert [rel for rel, token in files.items() if not opens_with(ring.primary.key, token)] == []
    assert opens_with(ring.primary.key, site.canary.read_bytes())
    frames = site.frames()
    for rel, frame in frames_before.items():
        pd.testing.assert_frame_equal(frames[rel], frame, obj=rel)


# -- keys in a real environment variable -------------------------------------------------

@dataclass
class VariableRotation:
    site: Site
    key: str
    files_before: dict[str, bytes]
    canary_before: bytes
    frames_before: dict[str, pd.DataFrame]
    first: subprocess.CompletedProcess
    printed: list[str]
    files_after_first: dict[str, bytes]
    canary_after_first: bytes
    second: subprocess.CompletedProcess | None


@pytest.fixture(scope="class")
def variable_rotation(tmp_path_factory) -> VariableRotation:
    """`--rotate-key` twice where OHLCV_ENCRYPTION_KEY is a real variable: once as it is,
    then with the variable set to the value the first run printed."""
    site = headless_site(tmp_path_factory.mktemp("rotate-variable"), key_in_variable=True)
    site.put(sample_datasets())
    key = site.variables["OHLCV_ENCRYPTION_KEY"]
    files, canary, frames = site.files(), site.canary.read_bytes(), site.frames()
    first = site.cli("--rotate-key")
    printed = [",".join(handed_over_keys(site.cwd))]  # no terminal: handed over in a file
    after_first, canary_after_first = site.files(), site.canary.read_bytes()
    second = None
    if len(printed) == 1:
        site.variables["OHLCV_ENCRYPTION_KEY"] = printed[0]
        second = site.cli("--rotate-key")
    return VariableRotation(site, key, files, canary, frames, first, printed, after_first,
                            canary_after_first, second)


class TestRotateKeyWithKeysInTheVariable:
    def test_first_run_hands_the_new_key_ring_over_new_key_first(self, variable_rotation):
        run = variable_rotation

        assert run.first.returncode == 0, output(run.first)
        new, old, naming = run.printed[0].split(",")
        assert f"{old},{naming}" == run.key and new != old and fernet_key_problem(new) is None
        assert output(run.first).count(new) == 0  # off a terminal: in the file it names
        assert "new-key-" in run.first.stdout

    def test_first_run_changes_no_dataset_and_not_the_canary(self, variable_rotation):
        run = variable_rotation

        assert run.files_after_first == run.files_before
        assert run.canary_after_first == run.canary_before

    def test_the_printed_key_never_reaches_the_log(self, variable_rotation):
        new = variable_rotation.printed[0].split(",")[0]

        assert new not in variable_rotation.site.log_file.read_text()

    def test_second_run_with_the_variable_updated_re_encrypts_every_dataset(
            self, variable_rotation):
        run = variable_rotation
        new = run.printed[0].split(",")[0]

        assert run.second is not None and run.second.returncode == 0, output(run.second)
        assert f"Rotated {DATASET_COUNT} dataset(s)" in run.second.stdout
        files = run.site.files()
        assert [rel for rel, token in files.items() if not opens_with(new, token)] == []
        assert opens_with(new, run.site.canary.read_bytes())
        frames = run.site.frames()
        for rel, frame in run.frames_before.items():
            pd.testing.assert_frame_equal(frames[rel], frame, obj=rel)


# -- keys in the keyring and in the variable, agreeing -----------------------------------

@dataclass
class BothRotation:
    site: Site
    key: str                              # the key ring both held before: one key and the naming key
    result: subprocess.CompletedProcess
    printed: list[str]                    # the OHLCV_ENCRYPTION_KEY values the run printed
    keyring: KeyRing                      # what the keyring holds afterwards
    check: subprocess.CompletedProcess | None  # --check-keys with the printed value


@pytest.fixture(scope="class")
def both_rotation(secret_service, tmp_path_factory):
    """`--rotate-key` where the keyring and a real OHLCV_ENCRYPTION_KEY hold the same ring."""
    key = new_key_ring()
    with secret_service_keyring(secret_service) as backend:
        site = keyring_site(tmp_path_factory.mktemp("rotate-both"), secret_service, backend,
                            OHLCV_ENCRYPTION_KEY=key)
        site.put(sample_datasets())
        result = site.cli("--rotate-key")
        printed = [",".join(handed_over_keys(site.cwd))]  # no terminal: handed over in a file
        check = site.cli("--check-keys", OHLCV_ENCRYPTION_KEY=printed[0]) if printed else None
        yield BothRotation(site, key, result, printed, KeyRing(KeyringKeyStore(backend).load()),
                           check)


class TestRotateKeyWithKeysInTheKeyringAndTheVariable:
    def test_output_tells_to_update_the_variable_and_hands_its_value_over(self, both_rotation):
        run = both_rotation

        assert run.result.returncode == 0, output(run.result)
        assert "OHLCV_ENCRYPTION_KEY is also set outside this directory: set it to the new " \
            "value" in run.result.stdout
        new, old, naming = run.printed[0].split(",")
        assert f"{old},{naming}" == run.key and new == run.keyring.primary.key
        assert output(run.result).count(new) == 0  # off a terminal: in the file it names

    def test_every_dataset_is_re_encrypted_under_the_keyring_s_new_key(self, both_rotation):
        new = both_rotation.keyring.primary.key

        assert new != both_rotation.key
        files = both_rotation.site.files()
        assert [rel for rel, token in files.items() if not opens_with(new, token)] == []

    def test_the_printed_value_makes_keyring_and_variable_agree_again(self, both_rotation):
        check = both_rotation.check

        assert check is not None and check.returncode == 0, output(check)
        assert "keyring and variable: agree" in check.stdout


# =========================================================================================
# --init and --check-keys: the naming key
# =========================================================================================

def test_init_hands_the_naming_key_over_with_the_first_key(tmp_path):
    site = headless_site(tmp_path)
    ring = site.ring()

    assert ring.naming is not None
    assert handed_over_keys(site.cwd) == [ring.primary.key, f"naming:{ring.naming.key}"]


def test_check_keys_lists_the_naming_key_by_its_fingerprint(tmp_path):
    site = headless_site(tmp_path)
    naming = site.ring().naming

    result = site.cli("--check-keys")

    assert result.returncode == 0, output(result)
    assert re.search(rf"^ok\s+naming key\s+fingerprint {naming.fingerprint}\b", result.stdout,
                     re.M), result.stdout
    assert naming.key not in output(result)


def test_check_keys_without_a_naming_key_fails_naming_the_migration(tmp_path):
    site = headless_site(tmp_path)
    EnvFileKeyStore(site.env_file, 0o600).save(site.ring().keys)  # a store from before it

    result = site.cli("--check-keys")

    assert result.returncode == 3, output(result)
    assert re.search(r"^FAIL\s+naming key\s+no naming key: run --migrate-store$", result.stdout,
                     re.M), result.stdout


# =========================================================================================
# remove-key
# =========================================================================================

@dataclass
class RetiredKey:
    site: Site
    old: StoredKey
    new_fp: str
    needs_old: Path     # written before the rotation: its datasets are under the old key
    needs_new: Path     # written after it
    entry: str          # the keyring entry after set-up

    def entry_now(self) -> str:
        return self.site.backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME)


@pytest.fixture
def retired_key(tmp_path, secret_service, keyring_backend) -> RetiredKey:
    """A keyring installation rotated once, with a backup from before and after."""
    site = keyring_site(tmp_path, secret_service, keyring_backend)
    site.put(sample_datasets())
    old = site.ring().primary
    before = site.backup()
    site.app().rotate_key()
    after = site.backup()
    return RetiredKey(site, old, site.ring().primary.fingerprint, before, after,
                      keyring_backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME))


def test_remove_key_lists_the_backups_needing_it_and_without_yes_removes_nothing(retired_key):
    result = retired_key.site.cli_fresh("remove-key", retired_key.old.fingerprint)

    assert result.returncode == 1, output(result)
    assert (f"needs {retired_key.old.fingerprint} (or could not be read): "
            f"{retired_key.needs_old}") in result.stdout
    assert retired_key.needs_new.name not in result.stdout
    assert "Nothing removed" in result.stdout
    assert retired_key.entry_now() == retired_key.entry


def test_remove_key_with_yes_removes_it_from_the_keyring(retired_key):
    result = retired_key.site.cli("remove-key", retired_key.old.fingerprint, "--yes")

    assert result.returncode == 0, output(result)
    naming = retired_key.site.ring().naming
    assert naming is not None
    assert stored_statuses(retired_key.site) == [(retired_key.new_fp, "primary"),
                                                 (naming.fingerprint, "naming")]


def test_remove_key_refuses_the_primary_key(retired_key):
    result = retired_key.site.cli("remove-key", retired_key.new_fp, "--yes")

    assert result.returncode == 2, output(result)
    assert "primary" in result.stderr
    assert retired_key.entry_now() == retired_key.entry


def test_remove_key_refuses_while_a_dataset_is_still_under_that_key(retired_key):
    site = retired_key.site
    naming = site.ring().naming
    assert naming is not None
    site.put({IBM: sample_datasets()[IBM]}, ring=KeyRing([retired_key.old, naming]))  # not rotated yet

    result = site.cli("remove-key", retired_key.old.fingerprint, "--yes")

    assert result.returncode == 5, output(result)
    assert ibm_file(site) in result.stderr and retired_key.old.fingerprint in result.stderr
    assert retired_key.entry_now() == retired_key.entry


def test_remove_key_refuses_while_the_canary_is_still_under_that_key(retired_key):
    """A rotation killed after its last dataset and before the canary leaves the canary
    under the old key (KeyRotation rotates it last, to mark the rotation unfinished).
    Removing that key would leave a canary no key opens: --check-keys, --recover and
    --rotate-key would all refuse the installation."""
    site = retired_key.site
    atomic_write(site.canary, Fernet(retired_key.old.key).encrypt(CANARY_TEXT), 0o600)

    result = site.cli("remove-key", retired_key.old.fingerprint, "--yes")

    assert result.returncode == 5, output(result)
    assert retired_key.entry_now() == retired_key.entry


# =========================================================================================
# backup and --verify-backup
# =========================================================================================

@dataclass
class Backup:
    site: Site
    key: str
    result: subprocess.CompletedProcess
    archive: Path
    started: datetime
    finished: datetime


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory) -> Backup:
    site = headless_site(tmp_path_factory.mktemp("backup"))
    site.put(sample_datasets())
    started = datetime.now(UTC)
    result = site.cli_fresh("backup")
    finished = datetime.now(UTC)
    archives = backup_archives(site.backup_dir)
    assert result.returncode == 0 and len(archives) == 1, output(result)
    return Backup(site, site.ring().primary.key, result, archives[0], started, finished)


class TestBackup:
    def test_report_names_the_archive_and_the_number_of_datasets(self, backed_up):
        assert f"wrote {backed_up.archive} ({DATASET_COUNT} datasets, " in backed_up.result.stdout

    def test_archive_is_named_by_its_utc_time_and_has_mode_0600(self, backed_up):
        match = ARCHIVE_NAME.fullmatch(backed_up.archive.name)

        assert match, backed_up.archive.name
        stamp = datetime.strptime(match[1], "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
        assert backed_up.started <= stamp <= backed_up.finished
        assert oct(backed_up.archive.stat().st_mode & 0o777) == oct(0o600)

    def test_members_are_the_dataset_files_the_canary_and_the_manifest_only(self, backed_up):
        names = sorted(info.name for info, _ in read_members(backed_up.archive))

        expected = sorted(["data/" + rel for rel in backed_up.site.files()]
                          + [CANARY_MEMBER, MANIFEST_MEMBER])
        assert names == expected

    def test_members_are_regular_0600_files_with_no_owner_names(self, backed_up):
        members = read_members(backed_up.archive)

        assert [(i.name, i.type, i.mode, i.uname, i.gname, i.uid, i.gid) for i, _ in members] == \
            [(i.name, tarfile.REGTYPE, 0o600, "", "", 0, 0) for i, _ in members]

    def test_members_hold_the_store_s_files_byte_for_byte(self, backed_up):
        members = {info.name: data for info, data in read_members(backed_up.archive)}

        for rel, token in backed_up.site.files().items():
            assert members["data/" + rel] == token, rel
        assert members[CANARY_MEMBER] == backed_up.site.canary.read_bytes()

    def test_every_member_is_a_fernet_token_the_manifest_included(self, backed_up):
        for info, data in read_members(backed_up.archive):
            raw = base64.urlsafe_b64decode(data)
            assert raw[0] == 0x80 and len(raw) >= 57, info.name  # version, time, IV, HMAC
        members = dict((i.name, d) for i, d in read_members(backed_up.archive))
        manifest = json.loads(Fernet(backed_up.key).decrypt(members[MANIFEST_MEMBER]))
        assert sorted(e["path"] for e in manifest["datasets"]) == sorted(backed_up.site.files())

    def test_nothing_in_the_archive_is_readable_without_the_key(self, backed_up):
        raw = backed_up.archive.read_bytes()
        ring = backed_up.site.ring()

        assert backed_up.key.encode() not in raw
        for frame in sample_datasets().values():
            csv_lines = render_export(frame, "csv").decode().splitlines()
            assert [line for line in csv_lines if line.encode() in raw] == []
            prices = {f"{p:.2f}" for c in ("open", "high", "low", "close") for p in frame[c]}
            assert [p for p in prices if p.encode() in raw] == []
        for rel, token in backed_up.site.files().items():
            plaintext = ring.decrypt(token)
            assert plaintext[:32] not in raw and plaintext[-32:] not in raw, rel

    def test_the_manifest_names_keys_by_fingerprint_only(self, backed_up):
        members = dict((i.name, d) for i, d in read_members(backed_up.archive))
        manifest = Fernet(backed_up.key).decrypt(members[MANIFEST_MEMBER]).decode()

        assert backed_up.key not in manifest
        assert fingerprint(backed_up.key) in manifest


@pytest.mark.parametrize("args, decrypted", [
    (["--verify-backup"], min(5, DATASET_COUNT)),
    (["--verify-backup", "--sample", "2"], 2),
    (["--verify-backup", "--all", "ARCHIVE"], DATASET_COUNT),
], ids=["newest, default sample", "sample 2", "all, archive named"])
def test_verify_backup_passes_and_reports_members_checked_and_datasets_decrypted(
        backed_up, args, decrypted):
    args = [str(backed_up.archive) if a == "ARCHIVE" else a for a in args]

    result = backed_up.site.cli_fresh(*args)

    assert result.returncode == 0, output(result)
    assert (f"{backed_up.archive.name}: {DATASET_COUNT + 1} members checked, {decrypted} "
            f"datasets decrypted, 0 problem(s)") in result.stdout


def test_verify_backup_refuses_a_negative_sample_size_as_a_usage_error(backed_up):
    result = backed_up.site.cli("--verify-backup", "--sample", "-1")

    assert "internal error" not in result.stderr, output(result)
    assert result.returncode == 2, output(result)
    assert "--sample" in result.stderr


def test_backup_keeps_only_the_newest_OHLCV_BACKUP_KEEP_archives(tmp_path):
    site = headless_site(tmp_path, OHLCV_BACKUP_KEEP="2")
    site.put(sample_datasets())
    oldest, older = site.backup(), site.backup()

    result = site.cli("backup")

    assert result.returncode == 0, output(result)
    archives = backup_archives(site.backup_dir)
    assert len(archives) == 2 and archives[0] == older and not oldest.exists()
    assert f"pruned {oldest}" in result.stdout


# -- tampered and hostile archives ------------------------------------------------------
#
# Each case spoils a copy of an archive: spoil(archive, site) -> the archive to use, where
# `site` is the installation that wrote it. All --verify-backup runs read the module's one
# installation, so they run at once (run_all); each test asserts on one case's report.

THE_ARCHIVE = "<the archive file>"
NOT_A_TAR = b"this is not a tar archive, whatever its name says\n" * 40


def ibm_file(site: Site) -> str:
    """IBM's dataset file in `site`, relative to its data directory."""
    return site.file_of(IBM).relative_to(site.data_dir).as_posix()


def member_name(name: str, site: Site) -> str:
    """An archive member's name as `site` writes it (IBM_MEMBER: IBM's opaque one)."""
    return "data/" + ibm_file(site) if name == IBM_MEMBER else name


def flipped(member: str):
    def spoil(archive: Path, site: Site) -> Path:
        offset, size = member_data_offset(archive, member_name(member, site))
        flip_byte(archive, offset + size // 2)
        return archive
    return spoil


def re_encrypted(archive: Path, site: Site) -> Path:
    """A valid token under the installation's own key, holding other bars."""
    token = Fernet(site.ring().primary.key).encrypt(
        encode_table(other_bars(sample_datasets()[IBM]), {}))
    return rewrite_archive(archive, archive.with_name("re-encrypted.tar"),
                           replace={member_name(IBM_MEMBER, site): token})


def truncated(where: str):
    def spoil(archive: Path, site: Site) -> Path:
        offset, _ = member_data_offset(archive, MANIFEST_MEMBER)
        os.truncate(archive, offset + 10 if where == "inside" else
                    member_header_offset(archive, MANIFEST_MEMBER))
        return archive
    return spoil


def without(member: str):
    def spoil(archive: Path, site: Site) -> Path:
        return rewrite_archive(archive, archive.with_name("without.tar"),
                               drop=(member_name(member, site),))
    return spoil


def swapped_in(archive: Path, site: Site) -> Path:
    """IBM's member from a genuine later archive of the same installation, written after
    IBM's bars changed: sound on its own, not with the rest of this archive."""
    other_site = clone_site(site, archive.parent / "other")
    other_site.put({IBM: other_bars(sample_datasets()[IBM])})
    other = {info.name: data for info, data in read_members(other_site.backup())}
    return rewrite_archive(archive, archive.with_name("swapped.tar"),
                           replace={member_name(IBM_MEMBER, site): other[member_name(IBM_MEMBER, site)]})


def with_member(member):
    def spoil(archive: Path, site: Site) -> Path:
        return rewrite_archive(archive, archive.with_name("hostile.tar"), add=(member,))
    return spoil


def not_a_tar(archive: Path, site: Site) -> Path:
    archive.write_bytes(NOT_A_TAR)
    return archive


# case -> (spoil, the name the report must give)
TAMPERED = {
    "one byte flipped in a dataset member": (flipped(IBM_MEMBER), IBM_MEMBER),
    "one byte flipped in the manifest": (flipped(MANIFEST_MEMBER), MANIFEST_MEMBER),
    "one byte flipped in the canary": (flipped(CANARY_MEMBER), CANARY_MEMBER),
    "a dataset member re-encrypted with the right key": (re_encrypted, IBM_MEMBER),
    "truncated inside the manifest": (truncated("inside"), THE_ARCHIVE),
    "truncated just before the manifest": (truncated("before"), MANIFEST_MEMBER),
    "a dataset member deleted": (without(IBM_MEMBER), IBM_MEMBER),
    "a dataset member swapped in from another archive": (swapped_in, IBM_MEMBER),
}
HOSTILE = {
    "a member named ../evil.fernet":
        (with_member(file_member("../evil.fernet", b"gAAAAA-not-a-token")), "../evil.fernet"),
    "a member named /etc/x":
        (with_member(file_member("/etc/x", b"written by a hostile archive\n")), "/etc/x"),
    "a member named data/../../x.fernet":
        (with_member(file_member("data/../../x.fernet", b"gAAAAA")), "data/../../x.fernet"),
    "a symlink member":
        (with_member(link_member("data/daily/EVIL.fernet", "../../../outside.fernet")),
         "data/daily/EVIL.fernet"),
    "a hard link member":
        (with_member(link_member("data/daily/HARD.fernet", IBM_MEMBER, hard=True)),
         "data/daily/HARD.fernet"),
}


def names(result: subprocess.CompletedProcess, name: str) -> bool:
    """Whether a PROBLEM line of the report starts with `name` (as is, or quoted)."""
    return any(p.startswith((name + ":", repr(name) + ":")) for p in problems(result))


@dataclass
class Spoiled:
    archives: dict[str, Path]
    results: dict[str, subprocess.CompletedProcess]
    outside_before: tuple
    outside_after: tuple


def outside_the_store(site: Site, *roots: Path) -> tuple:
    """Everything a run in `site` must leave alone: `roots`, the installation (but its data
    and state directories and its log) and /etc/x."""
    keep_out = (site.data_dir, site.state_dir, site.log_file)
    return (tuple(snapshot(r) for r in roots), snapshot(site.cwd.parent, exclude=keep_out),
            Path("/etc/x").exists())


@pytest.fixture(scope="module")
def spoiled(backed_up, tmp_path_factory) -> Spoiled:
    root = tmp_path_factory.mktemp("spoiled")
    archives = {}
    for number, (case, (spoil, _)) in enumerate({**TAMPERED, **HOSTILE,
                                                 "not a tar file": (not_a_tar, None)}.items()):
        work = root / f"case-{number:02d}"
        work.mkdir()
        shutil.copyfile(backed_up.archive, work / backed_up.archive.name)
        archives[case] = spoil(work / backed_up.archive.name, backed_up.site)
    before = outside_the_store(backed_up.site, root)
    results = run_all({case: (backed_up.site, ["--verify-backup", "--all", str(archive)])
                       for case, archive in archives.items()})
    return Spoiled(archives, results, before, outside_the_store(backed_up.site, root))


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_archive_fails_verification_naming_what_is_wrong(spoiled, backed_up, case):
    result, named = spoiled.results[case], TAMPERED[case][1]
    named = spoiled.archives[case].name if named == THE_ARCHIVE else \
        member_name(named, backed_up.site)

    assert result.returncode == 5, output(result)
    assert names(result, named), result.stdout


def test_a_tampered_member_is_one_problem_reported_once(spoiled, backed_up):
    result = spoiled.results["one byte flipped in a dataset member"]
    member = member_name(IBM_MEMBER, backed_up.site)

    assert problems(result) and all(p.startswith(member + ":") for p in problems(result))
    assert len(problems(result)) == 1, result.stdout
    assert ", 1 problem(s)" in result.stdout


def test_a_failed_verification_is_recorded_with_its_exit_code(backed_up, tmp_path):
    """runs.json and the metrics file say what the command line exits with: a verify that
    found a problem is exit 5 there too (the library records the run, not the CLI)."""
    site = clone_site(backed_up.site, tmp_path)
    archive = flipped(IBM_MEMBER)(Path(shutil.copy(backed_up.archive, tmp_path)), site)

    result = site.cli("--verify-backup", "--all", str(archive))

    assert result.returncode == 5, output(result)
    runs = json.loads((site.state_dir / "runs.json").read_text())
    assert runs["verify-backup"]["exit_code"] == 5


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_archive_fails_verification_naming_the_refused_member(spoiled, case):
    result = spoiled.results[case]

    assert result.returncode == 5, output(result)
    assert names(result, HOSTILE[case][1]), result.stdout
    assert "refused" in result.stdout


def test_a_file_that_is_not_a_tar_archive_fails_verification_naming_it(spoiled):
    result = spoiled.results["not a tar file"]

    assert result.returncode == 5, output(result)
    assert names(result, spoiled.archives["not a tar file"].name), result.stdout


def test_verifying_spoiled_archives_writes_nothing_outside_the_store(spoiled):
    assert spoiled.outside_after == spoiled.outside_before


@dataclass
class HostileRecovery:
    site: Site
    files: dict[str, bytes]  # the store before its data directory was lost
    result: subprocess.CompletedProcess
    outside_before: tuple
    outside_after: tuple


@pytest.fixture(scope="module")
def hostile_recoveries(tmp_path_factory) -> dict[str, HostileRecovery]:
    """For each hostile case: an installation that lost its data directory, and
    `--recover --from-backup` of its own archive with the hostile member added."""
    prepared = {}
    for number, (case, (spoil, _)) in enumerate(HOSTILE.items()):
        root = tmp_path_factory.mktemp(f"hostile-recover-{number}")
        site = headless_site(root)
        site.put(sample_datasets())
        incoming = root / "incoming"
        incoming.mkdir()
        archive = incoming / site.backup().name
        shutil.copyfile(site.backup_dir / archive.name, archive)
        prepared[case] = (site, site.files(), spoil(archive, site))
        shutil.rmtree(site.data_dir)
    before = {case: outside_the_store(site) for case, (site, _, _) in prepared.items()}
    results = run_all({case: (site, ["--recover", "--from-backup", str(archive)])
                       for case, (site, _, archive) in prepared.items()})
    return {case: HostileRecovery(site, files, results[case], before[case], outside_the_store(site))
            for case, (site, files, _) in prepared.items()}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_recover_refuses_a_hostile_member_and_names_it(hostile_recoveries, case):
    result, name = hostile_recoveries[case].result, HOSTILE[case][1]

    assert result.returncode == 0, output(result)
    assert [line for line in result.stderr.splitlines()
            if "refused" in line and (name in line or repr(name) in line)], result.stderr


@pytest.mark.parametrize("case", list(HOSTILE))
def test_recover_from_a_hostile_archive_restores_what_its_manifest_vouches_for(
        hostile_recoveries, case):
    recovery = hostile_recoveries[case]

    assert recovery.site.files() == recovery.files


def test_recover_from_hostile_archives_writes_nothing_outside_the_store(hostile_recoveries):
    changed = [case for case, recovery in hostile_recoveries.items()
               if recovery.outside_after != recovery.outside_before]

    assert changed == []


def oversized(site: Site, tmp_path: Path) -> tuple[Path, int]:
    """An archive whose IBM member is one byte over a limit every other member keeps."""
    archive, member = site.backup(), member_name(IBM_MEMBER, site)
    limit = max(info.size for info, _ in read_members(archive) if info.name != member)
    return rewrite_archive(archive, tmp_path / "oversized.tar",
                           replace={member: b"A" * (limit + 1)}), limit


def test_a_member_over_the_size_limit_is_refused_unread_and_named(tmp_path, monkeypatch):
    site = headless_site(tmp_path)
    site.put(sample_datasets())
    archive, limit = oversized(site, tmp_path)
    monkeypatch.setattr(product, "MAX_MEMBER_BYTES", limit)

    backup = BackupArchive(archive, site.ring())
    report = verify_backup(archive, site.ring(), None)
    member = member_name(IBM_MEMBER, site)

    assert member not in backup.members
    assert [p for p in backup.problems if p.startswith(member + ":") and "over the limit" in p]
    assert not report.sound and [p for p in report.problems if p.startswith(member + ":")]


def test_recover_never_restores_a_member_over_the_size_limit(tmp_path, monkeypatch):
    site = headless_site(tmp_path)
    site.put(sample_datasets())
    archive, limit = oversized(site, tmp_path)
    ibm, member = site.file_of(IBM), member_name(IBM_MEMBER, site)
    shutil.rmtree(site.data_dir)
    monkeypatch.setattr(product, "MAX_MEMBER_BYTES", limit)

    report = site.app().recover(archive)

    assert str(IBM) not in report.restored and not ibm.exists()
    assert [f for f in report.failed if f.startswith(member + ":")]
    assert len(report.restored) == DATASET_COUNT - 1


# =========================================================================================
# --recover: the restore drill
# =========================================================================================

@dataclass
class Drill:
    site: Site
    key: str  # the offline copy: the whole ring, the naming key last
    archive: Path
    files: dict[str, bytes]
    exports: list[str]


@pytest.fixture(scope="module")
def drill(tmp_path_factory) -> Drill:
    """An installation with keys in .env, one backup, and its exports as CSV."""
    site = headless_site(tmp_path_factory.mktemp("drill"))
    site.put(sample_datasets())
    archive = site.backup()
    exports = cli_all(site, EXPORTS)
    assert all(e.returncode == 0 and e.stdout.count("\n") > 5 for e in exports), \
        [output(e) for e in exports]
    ring = site.ring()
    assert ring.naming is not None
    return Drill(site, f"{ring.primary.key},naming:{ring.naming.key}", archive, site.files(),
                 [e.stdout for e in exports])


def drill_copy(drill: Drill, tmp_path: Path) -> tuple[Site, Path]:
    site = clone_site(drill.site, tmp_path)
    return site, site.backup_dir / drill.archive.name


def test_restore_drill_with_the_key_in_the_variable_brings_back_identical_data(drill, tmp_path):
    site, archive = drill_copy(drill, tmp_path)
    shutil.rmtree(site.data_dir)
    site.env_file.unlink()

    result = site.cli_fresh("--recover", "--from-backup", str(archive),
                            OHLCV_ENCRYPTION_KEY=drill.key)

    assert result.returncode == 0, output(result)
    assert f"{DATASET_COUNT} restored from the backup, 0 could not be recovered" in result.stdout
    assert site.files() == drill.files
    exports = cli_all(site, EXPORTS, OHLCV_ENCRYPTION_KEY=drill.key)
    assert [e.stdout for e in exports] == drill.exports


def test_restore_with_the_fernet_key_alone_puts_every_dataset_under_a_new_naming_key(
        drill, tmp_path):
    """An offline copy from before the naming key: --recover makes a new one (handed over)
    and writes each dataset where that key names it, from the identity in the manifest."""
    site, archive = drill_copy(drill, tmp_path)
    shutil.rmtree(site.data_dir)
    site.env_file.unlink()

    result = site.cli_fresh("--recover", "--from-backup", str(archive),
                            OHLCV_ENCRYPTION_KEY=drill.key.split(",")[0])

    assert result.returncode == 0, output(result)
    assert f"{DATASET_COUNT} restored from the backup, 0 could not be recovered" in result.stdout
    files = site.files()
    assert len(files) == DATASET_COUNT and set(files).isdisjoint(drill.files)
    assert sorted(files.values()) == sorted(drill.files.values())  # the same tokens, renamed
    handed_over = ",".join(handed_over_keys(site.cwd))  # the whole new ring, to keep offline
    exports = cli_all(site, EXPORTS, OHLCV_ENCRYPTION_KEY=handed_over)
    assert [e.stdout for e in exports] == drill.exports


def test_restore_drill_with_a_key_file_brings_back_identical_data(drill, tmp_path):
    site, archive = drill_copy(drill, tmp_path)
    shutil.rmtree(site.data_dir)
    site.env_file.unlink()
    key_file = tmp_path / "offline-copy.txt"
    key_file.write_text(f"# written down at install time\nOHLCV_ENCRYPTION_KEY={drill.key}\n")
    key_file.chmod(0o600)

    result = site.cli("--recover", "--from-backup", str(archive), "--key-file", str(key_file))

    assert result.returncode == 0, output(result)
    assert f"keys from key file {key_file}" in result.stdout
    assert site.files() == drill.files
    exports = cli_all(site, EXPORTS)  # headless: recover wrote the key to .env
    assert [e.stdout for e in exports] == drill.exports


def test_restore_drill_with_a_secret_service_relinks_the_key_ring_into_the_keyring(
        tmp_path, secret_service, keyring_backend):
    site = keyring_site(tmp_path, secret_service, keyring_backend)
    site.put(sample_datasets())
    ring, archive, files = site.ring(), site.backup(), site.files()
    key = ",".join(k.item for k in ring.stored())  # the offline copy: the naming key too
    before = cli_all(site, EXPORTS)
    shutil.rmtree(site.data_dir)
    delete_key_ring_entry(keyring_backend)

    result = site.cli("--recover", "--from-backup", str(archive), OHLCV_ENCRYPTION_KEY=key)

    assert result.returncode == 0, output(result)
    assert "key ring stored in: OS keyring" in result.stdout
    entry = json.loads(keyring_backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME))
    assert [(k["key"], k["status"]) for k in entry["keys"]] == [
        (k.key, k.status) for k in ring.stored()]
    assert site.files() == files
    after = cli_all(site, EXPORTS)  # no variable now: the keys come from the keyring
    assert [e.stdout for e in after] == [e.stdout for e in before] and before[0].stdout


def test_recover_never_overwrites_a_sound_file_that_differs_from_the_backup(drill, tmp_path):
    site, archive = drill_copy(drill, tmp_path)
    site.put({IBM: other_bars(sample_datasets()[IBM])})
    sound = site.file_of(IBM).read_bytes()

    result = site.cli("--recover", "--from-backup", str(archive))

    assert result.returncode == 0, output(result)
    assert site.file_of(IBM).read_bytes() == sound
    assert "0 restored from the backup" in result.stdout


def test_recover_restores_a_corrupted_file_from_the_backup(drill, tmp_path):
    site, archive = drill_copy(drill, tmp_path)
    flip_byte(site.file_of(IBM), len(drill.files[ibm_file(site)]) // 2)

    result = site.cli("--recover", "--from-backup", str(archive))

    assert result.returncode == 0, output(result)
    assert f"restored {IBM}" in result.stdout
    assert site.files() == drill.files


def test_a_dataset_corrupted_in_store_and_backup_fails_recovery_with_exit_5_naming_it(
        drill, tmp_path):
    site, archive = drill_copy(drill, tmp_path)
    ibm = ibm_file(site)
    flip_byte(site.file_of(IBM), len(drill.files[ibm]) // 2)
    offset, size = member_data_offset(archive, member_name(IBM_MEMBER, site))
    flip_byte(archive, offset + size // 2)

    result = site.cli("--recover", "--from-backup", str(archive))

    assert result.returncode == 5, output(result)
    assert [line for line in result.stdout.splitlines()
            if "NOT RECOVERED" in line and ibm in line], result.stdout
    intact = {rel: token for rel, token in site.files().items() if rel != ibm}
    assert intact == {rel: token for rel, token in drill.files.items() if rel != ibm}


def test_recover_without_any_key_source_and_no_terminal_exits_3_with_the_fix(drill, tmp_path):
    site, archive = drill_copy(drill, tmp_path)
    shutil.rmtree(site.data_dir)
    site.env_file.unlink()

    result = site.cli_fresh("--recover", "--from-backup", str(archive))

    assert result.returncode == 3, output(result)
    assert "OHLCV_ENCRYPTION_KEY" in result.stderr and "--key-file" in result.stderr
    assert not site.data_dir.exists() or site.files() == {}


def test_recover_from_an_archive_that_is_not_a_tar_file_exits_5_naming_it(drill, tmp_path):
    """The restore drill's worst case: the archive is unusable and the store is empty. The
    operator asked for a restore and got none: that must not look like success."""
    site, _ = drill_copy(drill, tmp_path)
    shutil.rmtree(site.data_dir)
    archive = tmp_path / "ohlcv-backup-20240101T000000000000Z.tar"
    archive.write_bytes(NOT_A_TAR)

    result = site.cli("--recover", "--from-backup", str(archive))

    assert result.returncode == 5, output(result)
    assert archive.name in output(result)


def test_recover_from_an_archive_path_that_does_not_exist_exits_2_naming_it(drill, tmp_path):
    """A mistyped --from-backup is a usage error, as `--verify-backup PATH` already says
    ("is not a file", exit 2); a cron job must not read success from it."""
    site, _ = drill_copy(drill, tmp_path)
    shutil.rmtree(site.data_dir)
    archive = tmp_path / "no-such-archive.tar"

    result = site.cli("--recover", "--from-backup", str(archive))

    assert result.returncode == 2, output(result)
    assert archive.name in output(result)


def test_recover_on_a_new_machine_from_an_archive_with_an_altered_canary_restores_the_data(
        drill, tmp_path):
    """Data and state are gone; the archive's canary member has one byte flipped (the
    datasets are intact). Recover restores every dataset, names the altered member, and
    leaves a canary the key ring opens."""
    site, archive = drill_copy(drill, tmp_path)
    shutil.rmtree(site.data_dir)
    shutil.rmtree(site.state_dir)
    offset, size = member_data_offset(archive, CANARY_MEMBER)
    flip_byte(archive, offset + size // 2)

    result = site.cli("--recover", "--from-backup", str(archive))

    assert "internal error" not in result.stderr, output(result)
    assert result.returncode == 0, output(result)
    assert CANARY_MEMBER in result.stderr
    assert site.files() == drill.files
    assert Fernet(drill.key.split(",")[0]).decrypt(site.canary.read_bytes()) == CANARY_TEXT


def test_recover_on_a_new_machine_with_the_wrong_key_says_so_and_initialises_nothing(
        drill, tmp_path):
    """The key typed from the offline copy is not the one the archive was written with:
    the manifest does not decrypt. Recover must say so (a key problem, or an integrity
    failure), and must not write a canary under the wrong key, which would make the right
    key look wrong to every later run."""
    site, archive = drill_copy(drill, tmp_path)
    shutil.rmtree(site.data_dir)
    shutil.rmtree(site.state_dir)
    site.env_file.unlink()

    result = site.cli("--recover", "--from-backup", str(archive), OHLCV_ENCRYPTION_KEY=new_key())

    assert "internal error" not in result.stderr, output(result)
    assert result.returncode in (3, 5), output(result)
    assert "open nothing" in output(result) and archive.name in output(result)
    assert not site.canary.exists()


# =========================================================================================
# --cleanup
# =========================================================================================

RETENTION_DAYS = 10
STALE_HOLDER = "pid 4242 since 2024-01-01T00:00:00+00:00\n"  # a run killed long ago


def temp_files(site: Site) -> list[Path]:
    """A crashed writer's leftovers in each of the three directories."""
    return [site.file_of(IBM).with_name(f".tmp-{site.file_of(IBM).name}.0123456789ab"),
            site.state_dir / ".tmp-pending.json.0123456789ab",
            site.backup_dir / ".tmp-ohlcv-backup-20240101T000000000000Z.tar.0123456789ab"]


@dataclass
class Retention:
    """A store with bars around the retention cutoff, spare archives and temp files."""

    site: Site
    cutoff: date
    archives: list[Path]
    temps: list[Path]


def retention_site(root: Path) -> Retention:
    site = headless_site(root, OHLCV_BACKUP_KEEP="10")
    cutoff = retention_cutoff(RETENTION_DAYS)
    day = timedelta(days=1)
    site.put({
        IBM: daily_bars([cutoff - day, cutoff, cutoff + day], 131.17),
        DatasetId("OLD"): weekday_bars("2001-03-01", 5, 12.5),
        DatasetId("TSCO.LON", "5min", month="2001-01"):
            intraday_bars(["2001-01-02 09:30", "2001-01-02 09:35"], 283.11),
    })
    # 20:30 in New York the day before the cutoff is already the cutoff day in UTC, summer
    # or winter: a bar that a UTC date would wrongly keep. Each bar goes to its month's file.
    intraday = intraday_bars([f"{cutoff - day} 20:30", f"{cutoff} 09:30", f"{cutoff} 15:55"],
                             290.5)
    for month, part in intraday.groupby(intraday["timestamp"].dt.strftime("%Y-%m")):
        site.put({DatasetId("TSCO.LON", "5min", month=month): part.reset_index(drop=True)})
    archives = [site.backup() for _ in range(4)]
    temps = temp_files(site)
    for temp in temps:
        temp.write_bytes(b"half a write")
    return Retention(site, cutoff, archives, temps)


def same_day(cutoff: date) -> None:
    if retention_cutoff(RETENTION_DAYS) != cutoff:
        pytest.skip("the market day changed while the test ran; the cutoff moved")


@pytest.fixture(scope="class")
def cleaned(tmp_path_factory):
    state = retention_site(tmp_path_factory.mktemp("cleanup"))
    result = state.site.cli("--cleanup", OHLCV_RETENTION_DAYS=str(RETENTION_DAYS),
                            OHLCV_BACKUP_KEEP="2")
    same_day(state.cutoff)
    return state, result


class TestCleanup:
    def test_exits_0(self, cleaned):
        _, result = cleaned

        assert result.returncode == 0, output(result)

    def test_bars_on_the_cutoff_day_are_kept_and_the_day_before_removed(self, cleaned):
        state, _ = cleaned

        frame = state.site.app().load("IBM")

        assert [t.date() for t in frame.index] == [state.cutoff, state.cutoff + timedelta(days=1)]

    def test_intraday_bars_go_by_their_new_york_date(self, cleaned):
        state, _ = cleaned

        frame = state.site.app().load("TSCO.LON", "5min")

        assert [t.strftime("%Y-%m-%d %H:%M") for t in frame.index] == \
            [f"{state.cutoff} 09:30", f"{state.cutoff} 15:55"]

    def test_intraday_month_partitions_entirely_before_the_window_are_deleted(self, cleaned):
        state, _ = cleaned

        assert not state.site.file_of(DatasetId("TSCO.LON", "5min", month="2001-01")).exists()

    def test_a_dataset_with_no_bar_left_in_the_window_is_deleted(self, cleaned):
        state, _ = cleaned

        assert not state.site.file_of(DatasetId("OLD")).exists()

    def test_archives_beyond_OHLCV_BACKUP_KEEP_are_pruned_oldest_first(self, cleaned):
        state, result = cleaned

        assert backup_archives(state.site.backup_dir) == state.archives[-2:]
        assert all(f"removed {a}" in result.stdout for a in state.archives[:2])

    def test_crashed_writers_temp_files_are_removed(self, cleaned):
        state, result = cleaned

        assert [t for t in state.temps if t.exists()] == []
        assert all(f"removed {t}" in result.stdout for t in state.temps)

    def test_report_names_the_rows_removed_per_dataset(self, cleaned):
        _, result = cleaned

        assert "removed 1 row(s) older than the retention window from IBM daily" in result.stdout


@pytest.fixture(scope="class")
def dry_run(tmp_path_factory):
    state = retention_site(tmp_path_factory.mktemp("dry-run"))
    site = state.site
    (site.data_dir / ".lock").write_text(STALE_HOLDER)
    before = {d.name: snapshot(d) for d in (site.data_dir, site.state_dir, site.backup_dir)}
    result = site.cli("--cleanup", "--dry-run", OHLCV_RETENTION_DAYS=str(RETENTION_DAYS),
                      OHLCV_BACKUP_KEEP="1")
    after = {d.name: snapshot(d) for d in (site.data_dir, site.state_dir, site.backup_dir)}
    same_day(state.cutoff)
    return state, result, before, after


class TestCleanupDryRun:
    def test_changes_no_dataset_archive_temp_file_or_lock_file(self, dry_run):
        _, result, before, after = dry_run

        assert result.returncode == 0, output(result)
        assert after["data"] == before["data"]  # .lock included: its holder line stays
        assert after["backups"] == before["backups"]

    def test_leaves_the_state_directory_as_it_was(self, dry_run):
        _, _, before, after = dry_run

        assert after["state"] == before["state"]

    def test_reports_what_would_go(self, dry_run):
        state, result, _, _ = dry_run

        assert ("would remove 1 row(s) older than the retention window from IBM daily"
                in result.stdout)
        for path in state.archives[:-1] + state.temps + [state.site.file_of(DatasetId("OLD"))]:
            assert f"would remove {path}" in result.stdout, path
        assert "dry run: nothing changed" in result.stdout

    def test_names_each_file_once_and_the_total_in_binary_units(self, dry_run):
        state, result, _, _ = dry_run
        whole = [state.site.file_of(DatasetId("OLD")),
                 state.site.file_of(DatasetId("TSCO.LON", "5min", month="2001-01"))]
        lines = result.stdout.splitlines()

        for path, dataset in zip(whole, ("OLD daily", "TSCO.LON intraday_5min 2001-01"),
                                 strict=True):
            naming = [line for line in lines if str(path) in line or dataset in line]
            assert len(naming) == 1, naming  # one line: the file, its dataset, its rows
            assert "all " in naming[0] and dataset in naming[0], naming
        total = re.fullmatch(r"would free (\d+ bytes|\d+\.\d (KiB|MiB|GiB)) \(dry run: "
                             r"nothing changed\)", lines[-1])
        assert total, lines[-1]


def test_retention_days_0_keeps_every_bar(tmp_path):
    state = retention_site(tmp_path)
    files = state.site.files()

    result = state.site.cli("--cleanup", OHLCV_RETENTION_DAYS="0")

    assert result.returncode == 0, output(result)
    assert state.site.files() == files
    assert "older than the retention window" not in result.stdout


def test_cleanup_while_another_run_holds_the_lock_exits_1_naming_it_and_leaves_it_alone(tmp_path):
    site = headless_site(tmp_path)
    site.put(sample_datasets())
    temp = temp_files(site)[0]
    temp.write_bytes(b"half a write")
    lock = site.data_dir / ".lock"

    with lock_holder(site.data_dir) as holder:
        result = site.cli_fresh("--cleanup", OHLCV_LOCK_TIMEOUT="1")

        assert result.returncode == 1, output(result)
        assert "holds the lock" in result.stderr and str(site.data_dir) in result.stderr
        assert f"pid {holder.pid}" in result.stderr
        assert holder.poll() is None
        assert lock.read_text().startswith(f"pid {holder.pid} ")
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert temp.exists()


def test_cleanup_proceeds_once_the_lock_holder_is_killed(tmp_path):
    site = headless_site(tmp_path)
    site.put(sample_datasets())
    temp = temp_files(site)[0]
    temp.write_bytes(b"half a write")

    with lock_holder(site.data_dir) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        result = site.cli("--cleanup", OHLCV_LOCK_TIMEOUT="5")

    assert result.returncode == 0, output(result)
    assert not temp.exists()
