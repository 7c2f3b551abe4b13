"""Key stores: one contract, kept by the OS keyring store and by the environment store.

The contract class follows keyring's own `keyring/testing/backend.py` (BackendBasicTests):
the tests live in a base class, and each store subclasses it, saying how to build an
empty store and one that holds given keys. The OS keyring is a real Secret Service
(gnome-keyring on a private D-Bus, the `secret_service` fixture of conftest.py).
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken
from keyring.backend import KeyringBackend
from keyring.backends import fail

from config import KEYRING_SERVICE, Secret
from secure_ohlcv_downloader import (
    KEYRING_USERNAME,
    EnvKeyStore,
    KeyCustody,
    KeyRing,
    KeyringKeyStore,
    KeyStoreError,
    StoredKey,
    describe_backend,
    fingerprint,
    naming_fingerprint,
)
from tests.foundation_fixtures import (  # noqa: F401  (keyring_backend is a fixture)
    handed_over_keys,
    headless_env,
    init_in_process,
    keyring_backend,
    new_key,
    run_cli,
    secret_service_env,
    settings_for,
)

FINGERPRINT = re.compile(r"[0-9a-f]{12}")


def three_keys() -> list[StoredKey]:
    return [StoredKey(new_key(), "primary", "2024-03-01T00:00:00+00:00"),
            StoredKey(new_key(), "retired", "2023-03-01T00:00:00+00:00"),
            StoredKey(new_key(), "retired", "2022-03-01T00:00:00+00:00")]


def keys_with_naming() -> list[StoredKey]:
    """Three Fernet keys, then the naming key, as every store saves a ring."""
    return three_keys() + [StoredKey(new_key(), "naming", "2024-03-01T00:00:00+00:00")]


def as_item(key: StoredKey) -> str:
    """`key` as one item of OHLCV_ENCRYPTION_KEY: the naming key is written naming:<key>."""
    return ("naming:" if key.status == "naming" else "") + key.key


# =========================================================================================
# The contract
# =========================================================================================

class KeyStoreContract:
    """What every key store does. Subclasses provide the `empty_store` fixture and the
    `store_holding` fixture (a function: keys -> a store from which they load)."""

    @pytest.fixture
    def empty_store(self):
        raise NotImplementedError

    @pytest.fixture
    def store_holding(self):
        raise NotImplementedError

    def test_load_of_an_empty_store_returns_none(self, empty_store):
        assert empty_store.load() is None

    def test_load_gives_back_the_keys_and_statuses_primary_first(self, store_holding):
        keys = three_keys()

        loaded = store_holding(keys).load()

        assert [(k.key, k.status) for k in loaded] == [(k.key, k.status) for k in keys]

    def test_fingerprints_are_twelve_hex_characters(self, store_holding):
        loaded = store_holding(three_keys()).load()

        assert all(FINGERPRINT.fullmatch(k.fingerprint) for k in loaded)

    def test_fingerprints_are_stable_across_loads(self, store_holding):
        keys = three_keys()
        store = store_holding(keys)

        first, second = store.load(), store.load()

        assert [k.fingerprint for k in first] == [k.fingerprint for k in second] \
            == [fingerprint(k.key) for k in keys]

    def test_fingerprints_differ_per_key(self, store_holding):
        loaded = store_holding(three_keys()).load()

        assert len({k.fingerprint for k in loaded}) == 3

    def test_the_naming_key_comes_back_last_marked_and_named_in_its_own_domain(
            self, store_holding):
        keys = keys_with_naming()

        loaded = store_holding(keys).load()

        assert [(k.key, k.status) for k in loaded] == [(k.key, k.status) for k in keys]
        naming = loaded[-1]
        assert naming.fingerprint == naming_fingerprint(naming.key) != fingerprint(naming.key)
        assert KeyRing(loaded).naming == naming

    def test_loaded_keys_never_show_in_repr(self, store_holding):
        loaded = store_holding(three_keys()).load()

        assert all(k.key not in repr(k) for k in loaded)


class TestKeyringKeyStore(KeyStoreContract):
    """The key ring in the OS keyring: a real Secret Service."""

    @pytest.fixture
    def empty_store(self, keyring_backend):
        return KeyringKeyStore(keyring_backend)

    @pytest.fixture
    def store_holding(self, keyring_backend):
        def holding(keys):
            KeyringKeyStore(keyring_backend).save(keys)
            return KeyringKeyStore(keyring_backend)  # a fresh instance: nothing cached
        return holding

    def test_save_then_load_round_trips_every_field_in_order(self, keyring_backend):
        keys = three_keys()
        KeyringKeyStore(keyring_backend).save(keys)

        assert KeyringKeyStore(keyring_backend).load() == keys

    def test_save_replaces_the_previous_key_ring(self, keyring_backend):
        store = KeyringKeyStore(keyring_backend)
        store.save(three_keys())
        newer = three_keys()

        store.save(newer)

        assert store.load() == newer

    def test_entry_lives_under_the_documented_service_and_username(self, keyring_backend):
        keys = three_keys()
        KeyringKeyStore(keyring_backend).save(keys)

        raw = keyring_backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME)

        assert [e["key"] for e in json.loads(raw)["keys"]] == [k.key for k in keys]

    @pytest.mark.parametrize("junk", ["JunkPasswordNotJson", '{"keys": "JunkNotAList"}',
                                      '{"keys": [{"status": "primary"}]}', "[1, 2, 3]"])
    def test_malformed_entry_is_a_keystore_error_that_hides_it(self, keyring_backend, junk):
        keyring_backend.set_password(KEYRING_SERVICE, KEYRING_USERNAME, junk)

        with pytest.raises(KeyStoreError) as caught:
            KeyringKeyStore(keyring_backend).load()

        assert "Junk" not in str(caught.value) and junk not in str(caught.value)
        assert KEYRING_SERVICE in str(caught.value)


class TestEnvKeyStore(KeyStoreContract):
    """The key ring in OHLCV_ENCRYPTION_KEY: read-only, primary first."""

    @pytest.fixture
    def empty_store(self, tmp_path):
        return EnvKeyStore(settings_for(tmp_path))

    @pytest.fixture
    def store_holding(self, tmp_path):
        def holding(keys):
            return EnvKeyStore(settings_for(
                tmp_path, OHLCV_ENCRYPTION_KEY=",".join(as_item(k) for k in keys)))
        return holding

    def test_save_is_refused(self, tmp_path):
        store = EnvKeyStore(settings_for(tmp_path, OHLCV_ENCRYPTION_KEY=new_key()))

        with pytest.raises(KeyStoreError, match="read-only"):
            store.save(three_keys())


def test_fingerprint_of_a_fixed_key_never_changes():
    # Fingerprints are printed, logged and written next to backups: the function is frozen.
    assert fingerprint("A" * 43 + "=") == "224938bf0fd0"


def test_naming_fingerprint_of_a_fixed_key_never_changes():
    # The catalogue records it: the function is frozen, and its domain is not fingerprint's.
    assert naming_fingerprint("A" * 43 + "=") == "7dc00188ccf7"


# =========================================================================================
# The key ring and its naming key
# =========================================================================================

def test_the_ring_keeps_the_naming_key_apart_from_the_fernet_keys():
    keys = keys_with_naming()

    ring = KeyRing(keys)

    assert ring.keys == keys[:3] and ring.primary == keys[0]
    assert ring.naming == keys[3]
    assert ring.fingerprints() == [k.fingerprint for k in keys[:3]]
    assert ring.stored() == keys


def test_the_naming_key_encrypts_and_decrypts_nothing():
    keys = keys_with_naming()
    ring = KeyRing(keys)
    token = ring.encrypt(b"bars")

    assert Fernet(keys[0].key).decrypt(token) == b"bars"
    with pytest.raises(InvalidToken):
        Fernet(keys[3].key).decrypt(token)
    with pytest.raises(InvalidToken):  # a token under the naming key is not the ring's
        ring.decrypt(Fernet(keys[3].key).encrypt(b"bars"))


def test_a_generated_ring_has_a_primary_key_and_a_naming_key():
    ring = KeyRing.generate()

    assert [k.status for k in ring.stored()] == ["primary", "naming"]
    assert ring.naming is not None and ring.naming.key != ring.primary.key
    assert ring.naming.key in Secret.known()  # redacted from the moment it exists


def test_a_ring_with_two_naming_keys_is_refused_naming_both_fingerprints():
    keys = keys_with_naming() + [StoredKey(new_key(), "naming")]

    with pytest.raises(KeyStoreError) as caught:
        KeyRing(keys)

    assert keys[3].fingerprint in str(caught.value) and keys[4].fingerprint in str(caught.value)
    assert keys[3].key not in str(caught.value) and keys[4].key not in str(caught.value)


# =========================================================================================
# Backends
# =========================================================================================

class PlaintextFileKeyring(KeyringBackend):
    """Stands in for keyrings.alt's PlaintextKeyring (which we do not install): a keyring
    backend that keeps passwords readable in a file. Never picked automatically (it has no
    priority, so keyring does not consider it viable)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _entries(self) -> dict[str, str]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def get_password(self, service, username):
        return self._entries().get(f"{service}/{username}")

    def set_password(self, service, username, password):
        entries = self._entries()
        entries[f"{service}/{username}"] = password
        self.path.write_text(json.dumps(entries))


def test_secret_service_is_a_secure_backend(keyring_backend):
    info = describe_backend(keyring_backend)

    assert (info.usable, info.secure) == (True, True)
    assert "SecretService" in info.name


def test_fail_backend_is_unusable_and_says_what_to_do():
    info = describe_backend(fail.Keyring())

    assert info.usable is False
    assert "OHLCV_ENCRYPTION_KEY" in info.problem


def test_plaintext_backend_is_usable_but_insecure(tmp_path):
    info = describe_backend(PlaintextFileKeyring(tmp_path / "keyring.json"))

    assert (info.usable, info.secure) == (True, False)
    assert "PlaintextFileKeyring" in info.problem


def test_plaintext_backend_is_warned_about_when_keys_are_read(tmp_path):
    store = KeyringKeyStore(PlaintextFileKeyring(tmp_path / "keyring.json"))
    store.save(three_keys())

    sources = KeyCustody(settings_for(tmp_path), store).sources()

    assert any("insecure keyring backend" in w for w in sources.warnings)


# =========================================================================================
# Which store wins: KeyCustody(...).sources().choose()
# =========================================================================================

def test_keyring_alone_supplies_the_key_ring(tmp_path, keyring_backend):
    keys = three_keys()
    store = KeyringKeyStore(keyring_backend)
    store.save(keys)

    ring, source = KeyCustody(settings_for(tmp_path), store).sources().choose()

    assert (ring.fingerprints(), source) == ([k.fingerprint for k in keys], "OS keyring")


def test_variable_alone_supplies_the_key_ring_on_a_headless_server(tmp_path):
    primary, older = new_key(), new_key()
    settings = settings_for(tmp_path, OHLCV_ENCRYPTION_KEY=f"{primary},{older}")

    ring, source = KeyCustody(settings, KeyringKeyStore(fail.Keyring())).sources().choose()

    assert (ring.fingerprints(), source) == ([fingerprint(primary), fingerprint(older)],
                                             "OHLCV_ENCRYPTION_KEY")


def test_keyring_and_variable_agreeing_give_that_key_ring(tmp_path, keyring_backend):
    keys = three_keys()
    store = KeyringKeyStore(keyring_backend)
    store.save(keys)
    settings = settings_for(tmp_path, OHLCV_ENCRYPTION_KEY=keys[0].key)

    ring, _ = KeyCustody(settings, store).sources().choose()

    assert ring.primary.key == keys[0].key


def test_keyring_and_variable_disagreeing_is_an_error_naming_both(tmp_path, keyring_backend):
    in_keyring, in_variable = new_key(), new_key()
    store = KeyringKeyStore(keyring_backend)
    store.save([StoredKey(in_keyring)])
    settings = settings_for(tmp_path, OHLCV_ENCRYPTION_KEY=in_variable)

    with pytest.raises(KeyStoreError) as caught:
        KeyCustody(settings, store).sources().choose()

    message = str(caught.value)
    assert fingerprint(in_keyring) in message and fingerprint(in_variable) in message
    assert "disagree" in message and "Fix:" in message and "--recover" in message
    assert in_keyring not in message and in_variable not in message


@pytest.mark.parametrize("variable_naming", ["another", "none"])
def test_keyring_and_variable_disagreeing_on_the_naming_key_is_an_error_naming_both(
        tmp_path, keyring_backend, variable_naming):
    keys = keys_with_naming()
    store = KeyringKeyStore(keyring_backend)
    store.save(keys)
    other = new_key()
    value = ",".join(k.key for k in keys[:3]) + (f",naming:{other}"
                                                  if variable_naming == "another" else "")
    settings = settings_for(tmp_path, OHLCV_ENCRYPTION_KEY=value)

    with pytest.raises(KeyStoreError) as caught:
        KeyCustody(settings, store).sources().choose()

    message = str(caught.value)
    assert keys[3].fingerprint in message
    assert (naming_fingerprint(other) if variable_naming == "another" else "none") in message
    assert "disagree" in message and "Fix:" in message and "--recover" in message
    assert keys[3].key not in message and other not in message


def test_no_key_anywhere_tells_to_run_init(tmp_path, keyring_backend):
    sources = KeyCustody(settings_for(tmp_path), KeyringKeyStore(keyring_backend)).sources()

    with pytest.raises(KeyStoreError, match="--init"):
        sources.choose()


def test_no_key_and_no_backend_tells_to_set_the_variable(tmp_path):
    sources = KeyCustody(settings_for(tmp_path), KeyringKeyStore(fail.Keyring())).sources()

    with pytest.raises(KeyStoreError, match="OHLCV_ENCRYPTION_KEY"):
        sources.choose()


# =========================================================================================
# The command line with a real Secret Service
# =========================================================================================

def _stored_ring(backend) -> list[str]:
    raw = backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME)
    return [] if raw is None else [e["key"] for e in json.loads(raw)["keys"]]


@pytest.fixture
def desktop(tmp_path, secret_service, keyring_backend):
    """Run the CLI in tmp_path with the private Secret Service as the OS keyring."""
    def run(*args, **variables):
        return run_cli(list(args), tmp_path, secret_service_env(secret_service, tmp_path,
                                                                **variables))
    return run


def test_cli_init_stores_a_generated_key_in_the_keyring(desktop, keyring_backend, tmp_path):
    result = desktop("--init")

    assert result.returncode == 0, result.stderr
    key, naming = _stored_ring(keyring_backend)
    assert "Stored in: OS keyring" in result.stdout
    # No terminal: handed over in a file, the naming key with it.
    assert handed_over_keys(tmp_path) == [key, f"naming:{naming}"]
    for secret in (key, naming):
        assert secret not in result.stdout and secret not in result.stderr


def test_cli_init_twice_changes_nothing(desktop, keyring_backend, tmp_path):
    init_in_process(tmp_path, keyring_backend)
    entry = keyring_backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME)
    canary = (tmp_path / "state" / "canary.fernet").read_bytes()

    again = desktop("--init")

    assert again.returncode == 0, again.stderr
    assert "Already initialised; nothing changed" in again.stdout
    for key in _stored_ring(keyring_backend):
        assert key not in again.stdout + again.stderr
    assert keyring_backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME) == entry
    assert (tmp_path / "state" / "canary.fernet").read_bytes() == canary


def test_cli_check_keys_passes_and_names_the_secret_service(desktop, keyring_backend, tmp_path):
    init_in_process(tmp_path, keyring_backend)

    result = desktop("--check-keys")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "keyring.backends.SecretService.Keyring: secure" in result.stdout
    assert "Result: sound" in result.stdout


def test_cli_check_keys_fails_when_the_variable_holds_another_key(desktop, keyring_backend,
                                                                  tmp_path):
    init_in_process(tmp_path, keyring_backend)
    other = new_key()

    result = desktop("--check-keys", OHLCV_ENCRYPTION_KEY=other)

    assert result.returncode == 3
    assert "disagree" in result.stdout
    assert other not in result.stdout + result.stderr


def test_cli_init_imports_the_variable_into_the_keyring(desktop, keyring_backend, tmp_path):
    key = new_key()

    result = desktop("--init", OHLCV_ENCRYPTION_KEY=key)

    assert result.returncode == 0, result.stderr
    stored, naming = _stored_ring(keyring_backend)
    assert stored == key  # taken as it is, and given the naming key it lacked
    assert handed_over_keys(tmp_path) == [key, f"naming:{naming}"]
    assert key not in result.stdout + result.stderr


# =========================================================================================
# The command line with no keyring backend (headless server)
# =========================================================================================

def test_headless_init_imports_the_variable_without_printing_it(tmp_path):
    key = new_key()
    env = headless_env(tmp_path, OHLCV_ENCRYPTION_KEY=key)

    result = run_cli(["--init"], tmp_path, env)

    assert result.returncode == 0, result.stderr
    assert "Key ring from OHLCV_ENCRYPTION_KEY" in result.stdout
    assert key not in result.stdout + result.stderr
    # The variable lacks the naming key made now: the operator is told to set it.
    assert "lacks the naming key" in result.stderr
    handed = handed_over_keys(tmp_path)
    assert handed[0] == key and handed[1].startswith("naming:")
    assert handed[1].removeprefix("naming:") not in result.stdout + result.stderr
    env["OHLCV_ENCRYPTION_KEY"] = ",".join(handed)
    assert run_cli(["--check-keys"], tmp_path, env).returncode == 0


def test_headless_init_without_a_key_hands_the_new_one_over_in_a_file_with_a_warning(tmp_path):
    result = run_cli(["--init"], tmp_path, headless_env(tmp_path))

    assert result.returncode == 0, result.stderr
    (key, naming) = handed_over_keys(tmp_path)
    assert naming.startswith("naming:")
    assert re.findall(r"[A-Za-z0-9_-]{43}=", result.stdout + result.stderr) == []
    assert "warning:" in result.stderr and "OHLCV_ENCRYPTION_KEY" in result.stderr
    assert "new-key-" in result.stdout and "move it offline" in result.stdout


def test_headless_init_keeps_the_new_key_in_a_private_env_file(tmp_path):
    report = init_in_process(tmp_path, fail.Keyring())

    env_file = tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert f"OHLCV_ENCRYPTION_KEY={report.new_key.value}\n" in env_file.read_text()
    assert run_cli(["--check-keys"], tmp_path, headless_env(tmp_path)).returncode == 0


def test_headless_check_keys_without_the_variable_fails_after_init(tmp_path):
    init_in_process(tmp_path, fail.Keyring())
    (tmp_path / ".env").unlink()

    result = run_cli(["--check-keys"], tmp_path, headless_env(tmp_path))

    assert result.returncode == 3
    assert "NOT sound" in result.stdout
