"""Key custody: where the Fernet key ring is kept, how it changes, and how it reaches a person.

Specified here, over real components (the private Secret Service of conftest.py, real
`.env` files, real archives, the real command line in subprocesses with no terminal, or
on a pseudo-terminal where a person would sit):

1. A recovery with a key that opens nothing is refused (exit 3) and changes nothing: not
   `.env`, not the keyring entry, not the data; with or without --from-backup.
2. A key file holding part of the ring merges into custody and drops no key.
3. With the OS keyring, an unrelated key is never "re-linked" as the primary.
4. On an empty machine, the right key file and an archive recover everything; the key,
   proven by the archive's manifest, is then kept (keyring, or `.env` when headless).
5. A new key (--init, --rotate-key) reaches a person: off a terminal only as a 0600
   `state/new-key-<fingerprint>.txt` that --recover takes as --key-file and --check-keys
   warns about until it is deleted; on a terminal shown once, and no file is written.
6. remove-key lists every archive that still needs the key, in every `backup --dest`
   directory; refuses while one cannot be checked; removes from `.env` or the keyring,
   the other keys kept in order; with the keys in a variable set outside, says what to edit.
7. Every custody write keeps the previous version until the new one reads back.
8. EnvFileKeyStore keeps the key store contract of tests/test_keystore.py.

Scenarios that take several command-line runs are played once per class (class-scoped
fixtures); each test then checks one behaviour of the outcome.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from keyring.backends import SecretService, fail

from config import KEYRING_SERVICE, parse_key_list, read_env_file
from secure_ohlcv_downloader import (
    KEYRING_PREVIOUS_USERNAME,
    KEYRING_USERNAME,
    EnvFileKeyStore,
    KeyCustody,
    KeyRing,
    KeyringKeyStore,
    KeyStoreError,
    StoredKey,
    fingerprint,
    naming_fingerprint,
)
from tests.foundation_fixtures import (  # noqa: F401  (keyring_backend is a fixture)
    CLI,
    SUBPROCESS_TIMEOUT,
    keyring_backend,
    new_key,
    secret_service_keyring,
)
from tests.lifecycle_fixtures import Site, headless_site, keyring_site, sample_datasets
from tests.operations_fixtures import secret_hits
from tests.test_keystore import KeyStoreContract

FERNET_KEY = re.compile(r"[A-Za-z0-9_-]{43}=")
NAMING = "naming:"  # the naming key's prefix in a key list
KEY_LINE = re.compile(r"^OHLCV_ENCRYPTION_KEY=(\S+)$", re.M)
STORES = ["env", "keyring"]  # keys in `.env` on a headless server, or in the OS keyring


# =========================================================================================
# Helpers and fixtures
# =========================================================================================

def bare_site(root: Path, service=None, backend=None, **variables: str) -> Site:
    """An installation directory nothing has run in yet (keyring: `service`'s, if given)."""
    cwd, home = root / "site", root / "home"
    cwd.mkdir(parents=True)
    home.mkdir(exist_ok=True)
    return Site(cwd, home, dict(variables), backend if backend is not None else fail.Keyring(),
                service)


def installation(kind: str, root: Path, service=None, backend=None) -> Site:
    """An initialised installation holding the sample datasets, keys kept the `kind` way."""
    site = (headless_site(root) if kind == "env"
            else keyring_site(root, service, backend))
    site.put(sample_datasets())
    return site


def env_file_items(path: Path) -> list[str]:
    """Every item OHLCV_ENCRYPTION_KEY holds in a `.env` file, in order (`naming:...` too)."""
    values, _ = read_env_file(path)
    return [s.reveal() for s in parse_key_list(values.get("OHLCV_ENCRYPTION_KEY", ""))]


def env_file_keys(path: Path) -> list[str]:
    """The Fernet keys OHLCV_ENCRYPTION_KEY holds in a `.env` file, in order."""
    return [v for v in env_file_items(path) if not v.startswith(NAMING)]


def keyring_entry(backend) -> str | None:
    return backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME)


def keyring_items(backend) -> list[str]:
    """Every key of the keyring entry, in order, the naming key written `naming:...`."""
    raw = keyring_entry(backend)
    return [] if raw is None else [NAMING * (e["status"] == "naming") + e["key"]
                                   for e in json.loads(raw)["keys"]]


def keyring_keys(backend) -> list[str]:
    return [v for v in keyring_items(backend) if not v.startswith(NAMING)]


def stored_items(site: Site) -> list[str]:
    """Every key where this site keeps them (the keyring, or `.env`), as a key list
    writes them: Fernet keys primary first, then `naming:<key>`."""
    return keyring_items(site.backend) if site.service is not None else env_file_items(site.env_file)


def stored_keys(site: Site) -> list[str]:
    """The Fernet keys where this site keeps them, primary first."""
    return [v for v in stored_items(site) if not v.startswith(NAMING)]


def stored_naming_key(site: Site) -> str | None:
    """The naming key where this site keeps its keys (bare), or None."""
    naming = [v.removeprefix(NAMING) for v in stored_items(site) if v.startswith(NAMING)]
    assert len(naming) <= 1
    return naming[0] if naming else None


def custody_bytes(site: Site) -> tuple[bytes | None, str | None]:
    """Everything that holds keys, as stored: `.env`'s bytes and the raw keyring entry."""
    env = site.env_file.read_bytes() if site.env_file.exists() else None
    return env, keyring_entry(site.backend) if site.service is not None else None


def write_key_file(path: Path, *keys: str) -> Path:
    """A key file as an operator keeps one: 0600, OHLCV_ENCRYPTION_KEY=..., primary first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"OHLCV_ENCRYPTION_KEY={','.join(keys)}\n")
    path.chmod(0o600)
    return path


def new_key_files(site: Site) -> list[Path]:
    return sorted(site.state_dir.glob("new-key-*.txt"))


def items_in_new_key_file(path: Path) -> list[str]:
    """The value of its `OHLCV_ENCRYPTION_KEY=<keys>` line, as a list (`naming:...` too)."""
    (value,) = KEY_LINE.findall(path.read_text())
    return value.split(",")


def keys_in_new_key_file(path: Path) -> list[str]:
    """The Fernet keys of its `OHLCV_ENCRYPTION_KEY=<keys>` line, in order."""
    return [v for v in items_in_new_key_file(path) if not v.startswith(NAMING)]


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


@dataclass
class TerminalRun:
    returncode: int
    terminal: str  # what appeared on the terminal (stdout), line ends normalised
    stderr: str


def run_on_terminal(site: Site, *args: str) -> TerminalRun:
    """`python secure_ohlcv_cli.py ARGS` with stdout on a pseudo-terminal (a person is
    there), stdin on /dev/null; the terminal is read until the program closes it."""
    master, slave = os.openpty()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, str(CLI), *args], cwd=site.cwd, env=site.env(),
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=err)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer of the terminal has closed it
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        proc.wait(timeout=SUBPROCESS_TIMEOUT)
        err.seek(0)
        stderr = err.read().decode()
    return TerminalRun(proc.returncode, b"".join(chunks).decode().replace("\r\n", "\n"), stderr)


@pytest.fixture(scope="class")
def class_keyring(secret_service):
    """The private Secret Service as this process's keyring for a whole class, with no key
    ring entry before or after it (the entry's name is fixed: one installation at a time)."""
    with secret_service_keyring(secret_service) as backend:
        yield backend


def bare_site_of(kind: str, request, root: Path) -> Site:
    """An installation directory nothing has run in yet, keys to be kept the `kind` way."""
    if kind == "env":
        return bare_site(root)
    return bare_site(root, request.getfixturevalue("secret_service"),
                     request.getfixturevalue("class_keyring"))


def site_for(kind: str, request, tmp_path_factory, name: str) -> tuple[Site, Path]:
    """A new installation of `kind` under a fresh root (for class-scoped scenarios)."""
    root = tmp_path_factory.mktemp(f"{name}-{kind}")
    if kind == "env":
        return installation(kind, root), root
    secret_service = request.getfixturevalue("secret_service")
    backend = request.getfixturevalue("class_keyring")
    return installation(kind, root, secret_service, backend), root


# =========================================================================================
# 1 and 3. A key that opens nothing changes nothing
# =========================================================================================

@dataclass
class WrongKeyOutcome:
    site: Site
    before: tuple[bytes | None, str | None]
    files: dict[str, bytes]
    canary: bytes
    primary: str
    plain: subprocess.CompletedProcess = None
    after_plain: tuple = ()
    from_backup: subprocess.CompletedProcess = None
    after_from_backup: tuple = ()
    status: subprocess.CompletedProcess = None


@pytest.fixture(scope="class", params=STORES)
def wrong_key(request, tmp_path_factory) -> WrongKeyOutcome:
    site, root = site_for(request.param, request, tmp_path_factory, "wrong-key")
    archive = site.backup()
    outcome = WrongKeyOutcome(site, custody_bytes(site), site.files(), site.canary.read_bytes(),
                              stored_keys(site)[0])
    wrong = write_key_file(root / "offline" / "WRONG.key", new_key())

    outcome.plain = site.cli("--recover", "--key-file", str(wrong))
    outcome.after_plain = (custody_bytes(site), site.files(), site.canary.read_bytes())
    outcome.from_backup = site.cli("--recover", "--from-backup", str(archive),
                                   "--key-file", str(wrong))
    outcome.after_from_backup = (custody_bytes(site), site.files(), site.canary.read_bytes())
    outcome.status = site.cli("status")
    return outcome


class TestRecoveryWithAKeyThatOpensNothing:
    def test_is_refused_with_exit_3(self, wrong_key):
        assert wrong_key.plain.returncode == 3, output(wrong_key.plain)

    def test_says_the_key_opens_nothing_and_nothing_was_changed(self, wrong_key):
        assert "open nothing" in wrong_key.plain.stderr
        assert "Nothing was changed" in wrong_key.plain.stderr

    def test_leaves_env_file_and_keyring_entry_byte_identical(self, wrong_key):
        assert wrong_key.after_plain[0] == wrong_key.before

    def test_never_makes_the_unrelated_key_the_primary(self, wrong_key):
        assert stored_keys(wrong_key.site)[0] == wrong_key.primary

    def test_leaves_every_dataset_and_the_canary_untouched(self, wrong_key):
        assert wrong_key.after_plain[1:] == (wrong_key.files, wrong_key.canary)

    def test_with_from_backup_is_refused_with_exit_3(self, wrong_key):
        assert wrong_key.from_backup.returncode == 3, output(wrong_key.from_backup)
        assert "Nothing was changed" in wrong_key.from_backup.stderr

    def test_with_from_backup_changes_nothing(self, wrong_key):
        assert wrong_key.after_from_backup == (wrong_key.before, wrong_key.files,
                                               wrong_key.canary)

    def test_status_still_reads_every_dataset_afterwards(self, wrong_key):
        status = wrong_key.status
        assert status.returncode == 0, output(status)
        assert "UNREADABLE" not in status.stdout
        assert all(str(dataset) in status.stdout for dataset in sample_datasets())


# =========================================================================================
# 2. A partial key set merges and never drops a key
# =========================================================================================

@dataclass
class MergeOutcome:
    site: Site
    rotated: list[str] = field(default_factory=list)
    new_alone: subprocess.CompletedProcess = None
    after_new_alone: list[str] = field(default_factory=list)
    handed_file: subprocess.CompletedProcess = None
    after_handed_file: list[str] = field(default_factory=list)


@pytest.fixture(scope="class", params=STORES)
def merge(request, tmp_path_factory) -> MergeOutcome:
    site, root = site_for(request.param, request, tmp_path_factory, "merge")
    outcome = MergeOutcome(site)
    before = set(new_key_files(site))
    rotation = site.cli("--rotate-key")
    assert rotation.returncode == 0, output(rotation)
    outcome.rotated = stored_keys(site)
    (handed,) = set(new_key_files(site)) - before  # the rotation's new-key file: NEW,OLD

    new_alone = write_key_file(root / "offline" / "new-only.key", outcome.rotated[0])
    outcome.new_alone = site.cli("--recover", "--key-file", str(new_alone))
    outcome.after_new_alone = stored_keys(site)
    outcome.handed_file = site.cli("--recover", "--key-file", str(handed))
    outcome.after_handed_file = stored_keys(site)
    return outcome


class TestRecoveryWithPartOfTheRing:
    def test_rotation_stores_new_then_old(self, merge):
        assert len(merge.rotated) == 2 and merge.rotated[1] != merge.rotated[0]

    def test_key_file_with_the_new_key_alone_is_accepted(self, merge):
        assert merge.new_alone.returncode == 0, output(merge.new_alone)

    def test_key_file_with_the_new_key_alone_keeps_new_then_old(self, merge):
        assert merge.after_new_alone == merge.rotated

    def test_the_rotations_own_new_key_file_is_accepted(self, merge):
        assert merge.handed_file.returncode == 0, output(merge.handed_file)

    def test_the_rotations_own_new_key_file_keeps_new_then_old(self, merge):
        # The file holds NEW,OLD; OLD opens nothing on disk any more (every file is under
        # NEW), but it is already in custody and old archives need it: it must stay.
        assert merge.after_handed_file == merge.rotated


# =========================================================================================
# 4. Recovery on an empty machine
# =========================================================================================

@dataclass
class EmptyMachineOutcome:
    origin_files: dict[str, bytes]
    key: str
    archive_name: str
    site: Site
    result: subprocess.CompletedProcess = None
    check: subprocess.CompletedProcess = None


@pytest.fixture(scope="class", params=STORES)
def empty_machine(request, tmp_path_factory) -> EmptyMachineOutcome:
    origin, root = site_for(request.param, request, tmp_path_factory, "empty-machine")
    (key,) = stored_keys(origin)
    archive = origin.backup()
    carried = root / "carried" / archive.name  # what survives: the archive and the key
    carried.parent.mkdir()
    carried.write_bytes(archive.read_bytes())
    naming = origin.ring().naming
    assert naming is not None  # the offline copy is the whole ring: the file names need it
    key_file = write_key_file(root / "offline" / "ohlcv.key", key, f"naming:{naming.key}")
    origin_files = origin.files()

    if origin.service is not None:
        origin.backend.delete_password(KEYRING_SERVICE, KEYRING_USERNAME)  # the lost keyring
    site = bare_site_of(request.param, request, root / "new-machine")
    assert not any(site.cwd.iterdir()) and stored_keys(site) == []
    outcome = EmptyMachineOutcome(origin_files, key, archive.name, site)
    outcome.result = site.cli_fresh("--recover", "--from-backup", str(carried),
                                     "--key-file", str(key_file))
    outcome.check = site.cli("--check-keys")
    return outcome


class TestRecoveryOnAnEmptyMachine:
    def test_exits_0(self, empty_machine):
        assert empty_machine.result.returncode == 0, output(empty_machine.result)

    def test_the_key_is_proven_by_the_archives_manifest(self, empty_machine):
        assert (f"{fingerprint(empty_machine.key)} opens the manifest of "
                f"{empty_machine.archive_name}") in empty_machine.result.stdout

    def test_the_key_is_then_kept_where_this_machine_keeps_keys(self, empty_machine):
        assert stored_keys(empty_machine.site) == [empty_machine.key]

    def test_every_dataset_is_restored_as_it_was(self, empty_machine):
        assert empty_machine.site.files() == empty_machine.origin_files

    def test_the_recovered_store_checks_sound(self, empty_machine):
        assert empty_machine.check.returncode == 0, output(empty_machine.check)


# =========================================================================================
# 5. A new key reaches a person
# =========================================================================================

@dataclass
class HandOverOutcome:
    site: Site
    init: subprocess.CompletedProcess = None
    init_file: Path = None
    init_file_mode: int = 0
    init_file_keys: list[str] = field(default_factory=list)
    init_key: str = ""
    check_with_file: subprocess.CompletedProcess = None
    recover_init_file: subprocess.CompletedProcess = None
    rotation: subprocess.CompletedProcess = None
    rotation_file: Path = None
    rotation_file_mode: int = 0
    rotation_keys: list[str] = field(default_factory=list)
    stored_after_rotation: list[str] = field(default_factory=list)
    recover_rotation_file: subprocess.CompletedProcess = None
    check_without_files: subprocess.CompletedProcess = None


@pytest.fixture(scope="class", params=STORES)
def hand_over(request, tmp_path_factory) -> HandOverOutcome:
    """--init then --rotate-key with no terminal (stdout a pipe), as under cron."""
    root = tmp_path_factory.mktemp(f"hand-over-{request.param}")
    site = bare_site_of(request.param, request, root)
    o = HandOverOutcome(site)

    o.init = site.cli_fresh("--init")
    assert o.init.returncode == 0, output(o.init)
    (o.init_file,) = new_key_files(site)
    o.init_file_mode = stat.S_IMODE(o.init_file.lstat().st_mode)
    o.init_file_keys = keys_in_new_key_file(o.init_file)
    (o.init_key,) = stored_keys(site)
    o.check_with_file = site.cli("--check-keys")
    o.recover_init_file = site.cli("--recover", "--key-file", str(o.init_file))

    site.put(sample_datasets())
    o.rotation = site.cli_fresh("--rotate-key")
    assert o.rotation.returncode == 0, output(o.rotation)
    (o.rotation_file,) = set(new_key_files(site)) - {o.init_file}
    o.rotation_file_mode = stat.S_IMODE(o.rotation_file.lstat().st_mode)
    o.rotation_keys = keys_in_new_key_file(o.rotation_file)
    o.stored_after_rotation = stored_keys(site)
    o.recover_rotation_file = site.cli("--recover", "--key-file", str(o.rotation_file))

    for path in new_key_files(site):  # moved offline, then deleted
        path.unlink()
    o.check_without_files = site.cli("--check-keys")
    return o


class TestNewKeyWithoutATerminal:
    def test_init_never_prints_the_key(self, hand_over):
        assert hand_over.init_key not in output(hand_over.init)
        assert not FERNET_KEY.search(output(hand_over.init))

    def test_init_writes_a_new_key_file_named_by_the_fingerprint(self, hand_over):
        assert hand_over.init_file.name == f"new-key-{fingerprint(hand_over.init_key)}.txt"

    def test_init_new_key_file_is_mode_0600(self, hand_over):
        assert hand_over.init_file_mode == 0o600

    def test_init_new_key_file_holds_the_stored_key(self, hand_over):
        assert hand_over.init_file_keys == [hand_over.init_key]

    def test_init_output_names_the_new_key_file(self, hand_over):
        assert str(hand_over.init_file) in hand_over.init.stdout

    def test_init_new_key_file_works_as_key_file_for_recover(self, hand_over):
        result = hand_over.recover_init_file
        assert result.returncode == 0, output(result)
        assert f"{fingerprint(hand_over.init_key)} opens the canary" in result.stdout

    def test_check_keys_warns_on_stderr_naming_the_file_while_it_exists(self, hand_over):
        warnings = [ln for ln in hand_over.check_with_file.stderr.splitlines()
                    if ln.startswith("warning:") and str(hand_over.init_file) in ln]
        assert warnings, hand_over.check_with_file.stderr

    def test_check_keys_stops_warning_once_the_files_are_deleted(self, hand_over):
        assert hand_over.check_without_files.returncode == 0, output(hand_over.check_without_files)
        assert "new-key-" not in hand_over.check_without_files.stderr

    def test_rotation_never_prints_a_key(self, hand_over):
        assert not FERNET_KEY.search(output(hand_over.rotation))

    def test_rotation_writes_a_0600_new_key_file_named_by_the_new_fingerprint(self, hand_over):
        new_primary = hand_over.stored_after_rotation[0]
        assert hand_over.rotation_file.name == f"new-key-{fingerprint(new_primary)}.txt"
        assert hand_over.rotation_file_mode == 0o600

    def test_rotation_new_key_file_holds_the_whole_ring_new_first(self, hand_over):
        assert hand_over.rotation_keys == hand_over.stored_after_rotation
        assert hand_over.rotation_keys[1] == hand_over.init_key

    def test_rotation_output_names_the_new_key_file(self, hand_over):
        assert str(hand_over.rotation_file) in hand_over.rotation.stdout

    def test_rotation_new_key_file_works_as_key_file_for_recover(self, hand_over):
        result = hand_over.recover_rotation_file
        assert result.returncode == 0, output(result)
        assert f"{fingerprint(hand_over.rotation_keys[0])} opens the canary" in result.stdout


@dataclass
class TerminalOutcome:
    run: TerminalRun
    keys: list[str]  # the ring stored afterwards, primary first
    files_before: list[Path]
    files_after: list[Path]


@pytest.fixture(scope="class", params=STORES)
def init_on_terminal(request, tmp_path_factory) -> TerminalOutcome:
    root = tmp_path_factory.mktemp(f"init-tty-{request.param}")
    site = bare_site_of(request.param, request, root)
    run = run_on_terminal(site, "--init")
    return TerminalOutcome(run, stored_keys(site), [], new_key_files(site))


class TestInitOnATerminal:
    def test_exits_0(self, init_on_terminal):
        assert init_on_terminal.run.returncode == 0, init_on_terminal.run.stderr

    def test_shows_the_key_exactly_once(self, init_on_terminal):
        (key,) = init_on_terminal.keys
        assert init_on_terminal.run.terminal.count(key) == 1
        assert key not in init_on_terminal.run.stderr

    def test_shows_the_fingerprint_with_it(self, init_on_terminal):
        assert fingerprint(init_on_terminal.keys[0]) in init_on_terminal.run.terminal

    def test_writes_no_new_key_file(self, init_on_terminal):
        assert init_on_terminal.files_after == []


@pytest.fixture(scope="class")
def rotation_on_terminal(secret_service, class_keyring, tmp_path_factory) -> TerminalOutcome:
    """--rotate-key on a terminal, keys in gnome-keyring (it once never showed the key)."""
    site = installation("keyring", tmp_path_factory.mktemp("rotate-tty"), secret_service,
                        class_keyring)
    before = new_key_files(site)
    run = run_on_terminal(site, "--rotate-key")
    return TerminalOutcome(run, stored_keys(site), before, new_key_files(site))


class TestRotationWithTheKeyringOnATerminal:
    def test_exits_0_and_stores_a_new_primary_in_the_keyring(self, rotation_on_terminal):
        assert rotation_on_terminal.run.returncode == 0, rotation_on_terminal.run.stderr
        assert len(rotation_on_terminal.keys) == 2

    def test_shows_the_new_ring_exactly_once_new_key_first(self, rotation_on_terminal):
        new, old = rotation_on_terminal.keys
        terminal = rotation_on_terminal.run.terminal
        assert terminal.count(f"{new},{old}") == 1 and terminal.count(new) == 1
        assert new not in rotation_on_terminal.run.stderr

    def test_shows_the_new_fingerprint_with_it(self, rotation_on_terminal):
        assert fingerprint(rotation_on_terminal.keys[0]) in rotation_on_terminal.run.terminal

    def test_writes_no_new_key_file(self, rotation_on_terminal):
        assert rotation_on_terminal.files_after == rotation_on_terminal.files_before


# =========================================================================================
# 6. remove-key
# =========================================================================================

@dataclass
class RemovalOutcome:
    site: Site
    other_dir: Path
    archive: Path = None
    catalogue: list[str] = field(default_factory=list)
    ring: list[str] = field(default_factory=list)  # K2, K1, K0 after two rotations
    listing: subprocess.CompletedProcess = None
    after_listing: list[str] = field(default_factory=list)
    unmounted: subprocess.CompletedProcess = None
    after_unmounted: list[str] = field(default_factory=list)
    removal: subprocess.CompletedProcess = None
    after_removal: list[str] = field(default_factory=list)
    status: subprocess.CompletedProcess = None
    custody_text: str = ""  # every key store's raw content after the removal


@pytest.fixture(scope="class", params=STORES)
def removal(request, tmp_path_factory) -> RemovalOutcome:
    """backup --dest OTHERDIR (under K0), two rotations, then remove-key K0: listed,
    refused while OTHERDIR is away, removed once it is back."""
    site, root = site_for(request.param, request, tmp_path_factory, "remove-key")
    o = RemovalOutcome(site, root / "offsite")
    backup = site.cli("backup", "--dest", str(o.other_dir))
    assert backup.returncode == 0, output(backup)
    (o.archive,) = sorted(o.other_dir.glob("ohlcv-backup-*.tar"))
    o.catalogue = json.loads((site.state_dir / "backup-destinations.json").read_text())["dirs"]
    for _ in range(2):
        rotation = site.cli("--rotate-key")
        assert rotation.returncode == 0, output(rotation)
    o.ring = stored_keys(site)
    old_fp = fingerprint(o.ring[-1])

    o.listing = site.cli("remove-key", old_fp)
    o.after_listing = stored_keys(site)
    away = o.other_dir.with_name("offsite-unmounted")
    o.other_dir.rename(away)
    try:
        o.unmounted = site.cli("remove-key", old_fp, "--yes")
        o.after_unmounted = stored_keys(site)
    finally:
        away.rename(o.other_dir)
    o.removal = site.cli("remove-key", old_fp, "--yes")
    o.after_removal = stored_keys(site)
    env_bytes, entry = custody_bytes(site)
    previous = (site.backend.get_password(KEYRING_SERVICE, KEYRING_PREVIOUS_USERNAME)
                if site.service is not None else None)
    o.custody_text = "\n".join(t for t in ((env_bytes or b"").decode(), entry, previous) if t)
    o.status = site.cli("status")
    return o


class TestRemoveKey:
    def test_backup_dest_is_recorded_in_the_destination_catalogue(self, removal):
        assert str(removal.other_dir) in removal.catalogue

    def test_without_yes_lists_the_archive_in_the_other_directory_as_needing_the_key(
            self, removal):
        needs = [ln for ln in removal.listing.stdout.splitlines() if ln.startswith("needs ")]
        assert needs == [f"needs {fingerprint(removal.ring[-1])} (or could not be read): "
                         f"{removal.archive}"]

    def test_without_yes_exits_1_and_removes_nothing(self, removal):
        assert removal.listing.returncode == 1, output(removal.listing)
        assert removal.after_listing == removal.ring

    def test_with_a_destination_away_refuses_with_exit_1(self, removal):
        assert removal.unmounted.returncode == 1, output(removal.unmounted)

    def test_with_a_destination_away_names_it_as_not_checked(self, removal):
        assert any(ln.startswith("NOT CHECKED") and str(removal.other_dir) in ln
                   for ln in removal.unmounted.stdout.splitlines()), removal.unmounted.stdout

    def test_with_a_destination_away_keeps_the_key(self, removal):
        assert removal.after_unmounted == removal.ring

    def test_with_the_destination_back_yes_removes_the_key(self, removal):
        assert removal.removal.returncode == 0, output(removal.removal)
        assert removal.ring[-1] not in removal.after_removal

    def test_removal_keeps_the_other_keys_in_order(self, removal):
        assert removal.after_removal == removal.ring[:-1]

    def test_the_removed_key_is_left_nowhere_in_custody(self, removal):
        # Not in `.env`, not in the keyring entry, nor in its `.previous` copy.
        assert removal.ring[-1] not in removal.custody_text

    def test_every_dataset_still_reads_after_the_removal(self, removal):
        assert removal.status.returncode == 0, output(removal.status)
        assert "UNREADABLE" not in removal.status.stdout


@pytest.fixture(scope="class")
def removal_from_variable(tmp_path_factory):
    """Keys in a real OHLCV_ENCRYPTION_KEY set outside: K1 (primary), K0 (retired)."""
    primary, retired = new_key(), new_key()
    site = headless_site(tmp_path_factory.mktemp("remove-variable"), key_in_variable=True,
                         OHLCV_ENCRYPTION_KEY=f"{primary},{retired},naming:{new_key()}")
    site.put(sample_datasets())
    files, canary = site.files(), site.canary.read_bytes()
    result = site.cli("remove-key", fingerprint(retired), "--yes")
    return site, primary, retired, result, (files, canary)


class TestRemoveKeyFromAVariableSetOutside:
    def test_exits_1(self, removal_from_variable):
        _, _, _, result, _ = removal_from_variable
        assert result.returncode == 1, output(result)

    def test_says_exactly_which_item_of_the_variable_to_remove(self, removal_from_variable):
        _, primary, retired, result, _ = removal_from_variable
        assert (f"remove item 2 (key {fingerprint(retired)}) from OHLCV_ENCRYPTION_KEY where "
                f"it is set, keeping the others in order: {fingerprint(primary)}") in result.stdout
        assert "Removed" not in result.stdout

    def test_removes_nothing_and_writes_no_env_file(self, removal_from_variable):
        site, _, _, _, before = removal_from_variable
        assert not site.env_file.exists()
        assert (site.files(), site.canary.read_bytes()) == before

    def test_never_prints_a_key(self, removal_from_variable):
        _, primary, retired, result, _ = removal_from_variable
        assert primary not in output(result) and retired not in output(result)


# =========================================================================================
# 7. A custody write keeps the previous version until the new one reads back
# =========================================================================================

def another_ring(payload: str) -> str:
    """A well-formed key ring, but not the one given: a single key nobody asked for."""
    return json.dumps({"format": 1, "keys": [{"key": new_key(), "status": "primary",
                                              "added": ""}]})


def half_of_it(payload: str) -> str:
    """The first half of what was given (a keyring that truncates long secrets)."""
    return payload[: len(payload) // 2]


class LyingKeyring(SecretService.Keyring):
    """The real Secret Service, except that what it is given for the key ring's main entry
    is changed on the way in by `lie`.

    A keyring that lies cannot be made otherwise: gnome-keyring stores what it is given.
    This subclass only alters the value handed to `set_password` for
    secure-ohlcv-downloader/fernet-key-ring; the storing (and every read) underneath is
    the real Secret Service's."""

    def __init__(self, lie: Callable[[str], str]) -> None:
        super().__init__()
        self.lie = lie

    def set_password(self, service, username, password):
        if (service, username) == (KEYRING_SERVICE, KEYRING_USERNAME):
            password = self.lie(password)
        super().set_password(service, username, password)


def two_keys() -> list[StoredKey]:
    return [StoredKey(new_key(), "primary", "2024-03-01T00:00:00+00:00"),
            StoredKey(new_key(), "retired", "2023-03-01T00:00:00+00:00")]


LIES = {"another_ring": another_ring, "truncated": half_of_it}


@pytest.mark.parametrize("lie", LIES)
def test_keyring_save_that_reads_back_otherwise_raises_keystore_error(keyring_backend, lie):
    KeyringKeyStore(keyring_backend).save(two_keys())
    lying = KeyringKeyStore(LyingKeyring(LIES[lie]))

    with pytest.raises(KeyStoreError):
        lying.save(two_keys())


@pytest.mark.parametrize("lie", LIES)
def test_keyring_save_that_reads_back_otherwise_leaves_the_previous_ring_loading(
        keyring_backend, lie):
    previous = two_keys()
    KeyringKeyStore(keyring_backend).save(previous)
    lying = KeyringKeyStore(LyingKeyring(LIES[lie]))

    with pytest.raises(KeyStoreError):
        lying.save(two_keys())

    assert KeyringKeyStore(keyring_backend).load() == previous


def test_keyring_save_replaces_the_ring_and_leaves_no_previous_copy(keyring_backend):
    store = KeyringKeyStore(keyring_backend)
    store.save(two_keys())
    newer = two_keys()

    store.save(newer)

    assert KeyringKeyStore(keyring_backend).load() == newer
    assert keyring_backend.get_password(KEYRING_SERVICE, KEYRING_PREVIOUS_USERNAME) is None


class MisreadingEnvFileKeyStore(EnvFileKeyStore):
    """An EnvFileKeyStore whose read-back of the new file (the temp file, before it
    replaces `.env`) loses the last key.

    A disk that gives back other bytes than were written cannot be made in a test; the
    read-back proof reads the temp file through `_read`, so this subclass makes exactly
    that read wrong. The file is really written, fsynced and (proof permitting) renamed."""

    def _read(self, path: Path) -> list[StoredKey]:
        keys = super()._read(path)
        return keys if path == self.path else keys[:-1]


ENV_TEXT = ("# Secure OHLCV Downloader\n"
            "ALPHA_VANTAGE_API_KEY=demo\n"
            "OHLCV_ENCRYPTION_KEY={keys}\n"
            "\n"
            "OHLCV_LOG_LEVEL=DEBUG  # for now\n"
            "export OHLCV_BACKUP_KEEP=3\n")


def env_file_with(directory: Path, keys: list[str]) -> Path:
    path = directory / ".env"
    path.write_text(ENV_TEXT.format(keys=",".join(keys)))
    path.chmod(0o600)
    return path


def test_env_file_save_whose_read_back_fails_raises_keystore_error(tmp_path):
    path = env_file_with(tmp_path, [new_key()])

    with pytest.raises(KeyStoreError, match="left as it was"):
        MisreadingEnvFileKeyStore(path, 0o600).save(two_keys())


def test_env_file_save_whose_read_back_fails_leaves_env_byte_identical(tmp_path):
    path = env_file_with(tmp_path, [new_key()])
    before = path.read_bytes()

    with pytest.raises(KeyStoreError):
        MisreadingEnvFileKeyStore(path, 0o600).save(two_keys())

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]  # no temp file left


def test_env_file_save_keeps_every_other_line_in_order(tmp_path):
    path = env_file_with(tmp_path, [new_key()])
    others = [ln for ln in path.read_text().splitlines()
              if not ln.startswith("OHLCV_ENCRYPTION_KEY=")]
    keys = two_keys()

    EnvFileKeyStore(path, 0o600).save(keys)

    lines = path.read_text().splitlines()
    assert [ln for ln in lines if not ln.startswith("OHLCV_ENCRYPTION_KEY=")] == others
    assert env_file_keys(path) == [k.key for k in keys]


def test_env_file_save_keeps_the_file_private(tmp_path):
    path = env_file_with(tmp_path, [new_key()])

    EnvFileKeyStore(path, 0o600).save(two_keys())

    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# =========================================================================================
# 8. The key store contract, kept by the `.env` store
# =========================================================================================

class TestEnvFileKeyStore(KeyStoreContract):
    """The key ring as OHLCV_ENCRYPTION_KEY in a real `.env` file (0600), among other lines."""

    @pytest.fixture
    def empty_store(self, tmp_path):
        path = tmp_path / ".env"
        path.write_text("ALPHA_VANTAGE_API_KEY=demo\n")
        path.chmod(0o600)
        return EnvFileKeyStore(path, 0o600)

    @pytest.fixture
    def store_holding(self, tmp_path):
        def holding(keys):
            path = env_file_with(tmp_path, [])
            EnvFileKeyStore(path, 0o600).save(keys)  # written as the program writes it
            return EnvFileKeyStore(path, 0o600)
        return holding

    def test_load_of_a_missing_file_returns_none(self, tmp_path):
        assert EnvFileKeyStore(tmp_path / ".env", 0o600).load() is None

    def test_save_then_load_round_trips_keys_and_statuses_in_order(self, tmp_path):
        keys = two_keys() + [StoredKey(new_key(), "retired")]
        store = EnvFileKeyStore(tmp_path / ".env", 0o600)

        store.save(keys)

        assert [(k.key, k.status) for k in store.load()] == [(k.key, k.status) for k in keys]

    def test_save_creates_a_missing_file_with_mode_0600(self, tmp_path):
        EnvFileKeyStore(tmp_path / ".env", 0o600).save(two_keys())

        assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600

    def test_load_reads_the_file_afresh(self, tmp_path):
        path = env_file_with(tmp_path, [new_key()])
        store = EnvFileKeyStore(path, 0o600)
        store.load()
        replacement = [new_key(), new_key()]
        env_file_with(tmp_path, replacement)  # another run rotated

        assert [k.key for k in store.load()] == replacement


# =========================================================================================
# 9. The naming key: recovered, never replaced, never removed, added to an older ring
# =========================================================================================

def older_ring(site: Site) -> KeyRing:
    """Make `site` a store from before the naming key: its keys kept without one, no key
    file waiting. Returns the ring it held."""
    ring = site.ring()
    if site.service is not None:
        KeyringKeyStore(site.backend).save(ring.keys)
    else:
        EnvFileKeyStore(site.env_file, 0o600).save(ring.keys)
    for path in new_key_files(site):
        path.unlink()
    return ring


def without_datasets(site: Site) -> None:
    """Empty the data directory: a ring without a naming key is recovered (given a new one)
    only where no file is named under the lost one (tests/test_rekey.py: it stops there)."""
    for path in site.data_dir.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name != ".lock":
            path.unlink()


def site_of(kind: str, tmp_path: Path, request) -> Site:
    if kind == "env":
        return installation(kind, tmp_path)
    return installation(kind, tmp_path, request.getfixturevalue("secret_service"),
                        request.getfixturevalue("keyring_backend"))


def test_recover_takes_the_naming_key_from_the_offline_copy(tmp_path):
    site = installation("env", tmp_path)
    ring = site.ring()
    site.env_file.unlink()  # the keys lost; the offline copy holds the whole value
    handed_at_init = new_key_files(site)
    offline = write_key_file(tmp_path / "offline" / "ring.key", *(k.item for k in ring.stored()))

    result = site.cli("--recover", "--key-file", str(offline))

    assert result.returncode == 0, output(result)
    assert stored_naming_key(site) == ring.naming.key
    assert stored_keys(site) == [k.key for k in ring.keys]
    assert new_key_files(site) == handed_at_init  # nothing new to hand over


@pytest.mark.parametrize("kind", STORES)
def test_recover_refuses_a_naming_key_other_than_the_one_held_naming_both(tmp_path, request,
                                                                          kind):
    site = site_of(kind, tmp_path, request)
    ring, before, files = site.ring(), custody_bytes(site), site.files()
    other = new_key()
    offered = write_key_file(tmp_path / "offline" / "other.key", ring.primary.key,
                             f"naming:{other}")

    result = site.cli("--recover", "--key-file", str(offered))

    assert result.returncode == 3, output(result)
    assert naming_fingerprint(other) in result.stderr
    assert ring.naming.fingerprint in result.stderr
    assert "Nothing was changed" in result.stderr and "Fix:" in result.stderr
    assert other not in output(result) and ring.naming.key not in output(result)
    assert (custody_bytes(site), site.files()) == (before, files)


@pytest.mark.parametrize("kind", STORES)
def test_recover_with_no_naming_key_anywhere_makes_one_and_hands_it_over(tmp_path, request,
                                                                         kind):
    site = site_of(kind, tmp_path, request)
    ring = older_ring(site)
    without_datasets(site)
    offline = write_key_file(tmp_path / "offline" / "old.key", ring.primary.key)

    result = site.cli("--recover", "--key-file", str(offline))

    assert result.returncode == 0, output(result)
    naming = stored_naming_key(site)
    assert naming is not None
    (handed,) = new_key_files(site)
    assert items_in_new_key_file(handed) == [ring.primary.key, f"naming:{naming}"]
    assert str(handed) in result.stdout and naming not in output(result)


@pytest.mark.parametrize("kind", STORES)
def test_remove_key_never_removes_the_naming_key(tmp_path, request, kind):
    site = site_of(kind, tmp_path, request)
    ring, before = site.ring(), custody_bytes(site)

    result = site.cli("remove-key", ring.naming.fingerprint, "--yes")

    assert result.returncode == 2, output(result)
    assert "naming key" in result.stderr and "never be removed" in result.stderr
    assert custody_bytes(site) == before


@pytest.mark.parametrize("kind", STORES)
def test_add_naming_key_hands_the_whole_ring_over_then_stores_it(tmp_path, request, kind):
    site = site_of(kind, tmp_path, request)
    ring = older_ring(site)
    custody = KeyCustody(site.settings(), KeyringKeyStore(site.backend))

    report = custody.add_naming_key(custody.ring(), None)

    naming = stored_naming_key(site)
    assert naming is not None and report.fingerprint == naming_fingerprint(naming)
    assert not report.awaiting_env_update and report.stored_in
    assert items_in_new_key_file(report.new_key.file) == [ring.primary.key, f"naming:{naming}"]
    assert custody.ring().naming.key == naming
    assert custody.add_naming_key(custody.ring(), None) is None  # never replaced
    assert stored_naming_key(site) == naming


def test_add_naming_key_with_keys_in_a_variable_set_outside_awaits_the_operator(tmp_path):
    key = new_key()
    site = headless_site(tmp_path, key_in_variable=True, OHLCV_ENCRYPTION_KEY=key)
    custody = KeyCustody(site.settings(), KeyringKeyStore(site.backend))

    report = custody.add_naming_key(custody.ring(), None)

    assert report.awaiting_env_update and report.stored_in == []
    assert not site.env_file.exists()  # nothing stored: the variable is outside our reach
    value = report.new_key.value
    assert value.startswith(f"{key},naming:") and len(value.split(",")) == 2
    site.variables["OHLCV_ENCRYPTION_KEY"] = value
    check = site.cli("--check-keys")
    assert check.returncode == 0, output(check)
    assert report.fingerprint in check.stdout


def test_the_naming_key_never_reaches_the_log_or_the_output(tmp_path):
    site = bare_site(tmp_path, OHLCV_LOG_LEVEL="DEBUG")
    runs = [site.cli("--init")]
    site.put(sample_datasets())
    runs += [site.cli(*args) for args in (["--check-keys"], ["--rotate-key"], ["status"],
                                          ["backup"], ["--verify-backup", "--all"])]
    naming = stored_naming_key(site)

    assert naming is not None and all(r.returncode == 0 for r in runs), \
        [output(r) for r in runs]
    texts = {"log": site.log_file.read_text(),
             **{f"{' '.join(r.args)} {i}": output(r) for i, r in enumerate(runs)}}
    assert secret_hits(texts, {"naming key": naming}) == []


def test_the_typed_key_ring_brings_its_naming_key_into_custody(tmp_path):
    site = installation("env", tmp_path)
    ring = site.ring()
    site.env_file.unlink()
    typed = ",".join(k.item for k in ring.stored())

    report = site.app().recover(prompt=lambda: typed)

    assert report.key_source == "prompt" and report.new_key is None
    assert stored_naming_key(site) == ring.naming.key


def test_a_typed_key_alone_gets_a_naming_key_shown_on_the_terminal(tmp_path):
    site = installation("env", tmp_path)
    ring = older_ring(site)
    without_datasets(site)
    site.env_file.unlink()
    shown = []
    app = site.app()
    app.show_key = shown.append

    report = app.recover(prompt=lambda: ring.primary.key)

    naming = stored_naming_key(site)
    assert naming is not None and report.new_key is not None
    assert [new.value for new in shown] == [f"{ring.primary.key},naming:{naming}"]
    assert new_key_files(site) == []  # shown, so no file
