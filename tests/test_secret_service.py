"""The `secret_service` fixture gives a real, private Secret Service.

Observed on Debian 12 (keyring 25.7, SecretStorage 3.5, jeepney 0.9) when no
Secret Service is reachable, both with DBUS_SESSION_BUS_ADDRESS unset and set
to a socket path that does not exist:

* ``keyring.get_keyring()`` is ``keyring.backends.fail.Keyring`` (priority 0);
  the only "viable" backends are ``fail`` and the empty ``chainer``;
* ``SecretService.Keyring.priority`` raises (RuntimeError "Unable to
  initialize SecretService: Environment variable DBUS_SESSION_BUS_ADDRESS is
  unset" when unset; FileNotFoundError when the socket is missing), which is
  how keyring rules the backend out;
* ``set_password`` and ``get_password`` both raise ``keyring.errors.NoKeyringError``
  (not a silent None), so the application must handle that error.
"""

import json
import os
import subprocess
import sys
import uuid

import keyring
import pytest
from keyring.backends import SecretService

from config import KEYRING_SERVICE
from secure_ohlcv_downloader import KEYRING_USERNAME, KeyRing, KeyringKeyStore
from tests.foundation_fixtures import (  # noqa: F401  (keyring_backend is a fixture)
    keyring_backend,
    run_cli,
    secret_service_env,
)
from tests.secret_service import PrivateSecretService


@pytest.fixture
def ss_env(secret_service, monkeypatch):
    """Point this process at the private Secret Service."""
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    for name, value in secret_service.env.items():
        monkeypatch.setenv(name, value)
    return secret_service


def _run_python(code, env):
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_fixture_env_is_private(secret_service, tmp_path_factory):
    env = secret_service.env
    assert set(env) >= {"DBUS_SESSION_BUS_ADDRESS", "XDG_RUNTIME_DIR", "XDG_DATA_HOME"}
    assert env["DBUS_SESSION_BUS_ADDRESS"].startswith("unix:path=")
    assert env["XDG_RUNTIME_DIR"].startswith(str(tmp_path_factory.getbasetemp()))
    assert secret_service.keyring_proc.poll() is None, "gnome-keyring-daemon died"
    assert secret_service.bus_proc.poll() is None, "dbus-daemon died"


def test_secret_service_backend_is_viable(ss_env):
    backend = SecretService.Keyring()
    assert backend.priority > 0


def test_round_trip_set_get_delete(ss_env):
    backend = SecretService.Keyring()
    service, user = f"ohlcv-test-{uuid.uuid4().hex}", "alice"
    assert backend.get_password(service, user) is None

    backend.set_password(service, user, "s3cr3t-Fernet-key")
    assert backend.get_password(service, user) == "s3cr3t-Fernet-key"

    backend.set_password(service, user, "rotated")  # overwrite, not duplicate
    assert backend.get_password(service, user) == "rotated"

    backend.delete_password(service, user)
    assert backend.get_password(service, user) is None
    with pytest.raises(keyring.errors.PasswordDeleteError):
        backend.delete_password(service, user)


def test_secret_is_stored_in_the_private_keyring_files(ss_env):
    keyrings = ss_env.env["XDG_DATA_HOME"] + "/keyrings"
    SecretService.Keyring().set_password(f"ohlcv-test-{uuid.uuid4().hex}", "u", "x")
    assert "login.keyring" in os.listdir(keyrings)


def test_value_visible_from_subprocess_with_auto_selected_backend(ss_env):
    service, user, secret = f"ohlcv-test-{uuid.uuid4().hex}", "bob", "from-parent"
    SecretService.Keyring().set_password(service, user, secret)
    code = (
        "import json, sys, keyring\n"
        "kr = keyring.get_keyring()\n"
        "print(json.dumps({'backend': type(kr).__module__ + '.' + type(kr).__name__,\n"
        "                  'value': keyring.get_password(sys.argv[1], sys.argv[2])}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, service, user],
        env=ss_env.child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["backend"] == "keyring.backends.SecretService.Keyring"
    assert out["value"] == secret

    # and the other direction: child writes, parent reads
    code = "import sys, keyring; keyring.set_password(sys.argv[1], 'carol', 'from-child')"
    result = subprocess.run(
        [sys.executable, "-c", code, service],
        env=ss_env.child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert SecretService.Keyring().get_password(service, "carol") == "from-child"


NO_BACKEND_PROBE = """
import json, keyring, keyring.backend, keyring.errors
from keyring.backends import SecretService
out = {"backend": type(keyring.get_keyring()).__module__ + "." + type(keyring.get_keyring()).__name__,
       "viable": sorted(type(b).__module__ for b in keyring.backend.get_all_keyring())}
try:
    out["ss_priority"] = SecretService.Keyring.priority
except Exception as exc:
    out["ss_priority"] = "raised " + type(exc).__name__
for op, call in (("set", lambda: keyring.set_password("ohlcv-test", "u", "v")),
                 ("get", lambda: keyring.get_password("ohlcv-test", "u"))):
    try:
        out[op] = "returned " + repr(call())
    except keyring.errors.NoKeyringError:
        out[op] = "NoKeyringError"
print(json.dumps(out))
"""


@pytest.mark.parametrize("bus", ["unset", "unreachable"])
def test_without_a_reachable_bus_keyring_fails_loudly(bus, secret_service, tmp_path):
    env = secret_service.child_env()  # private XDG dirs, no keyringrc, no override
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    if bus == "unset":
        del env["DBUS_SESSION_BUS_ADDRESS"]
    else:
        env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={tmp_path}/no-such-bus"
    result = _run_python(NO_BACKEND_PROBE, env)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["backend"] == "keyring.backends.fail.Keyring"
    assert "keyring.backends.SecretService" not in out["viable"]
    assert set(out["viable"]) <= {"keyring.backends.fail", "keyring.backends.chainer"}
    assert str(out["ss_priority"]).startswith("raised ")
    assert out["set"] == "NoKeyringError"
    assert out["get"] == "NoKeyringError"


def test_stop_leaves_no_daemons(secret_service, tmp_path):
    # (requests `secret_service` only for its skip/fail when binaries are missing)
    service = PrivateSecretService(tmp_path).start()
    procs = [service.keyring_proc, service.bus_proc]
    assert all(p.poll() is None for p in procs)
    service.stop()
    assert all(p.returncode is not None for p in procs)
    for p in procs:
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)
    service.stop()  # idempotent


def test_the_naming_key_made_by_init_in_a_process_is_kept_in_gnome_keyring(
        secret_service, keyring_backend, tmp_path):
    # The command line, a process of its own, stores the ring in the real keyring; this
    # process reads the raw entry, and the ring it loads, back.
    result = run_cli(["--init"], tmp_path, secret_service_env(secret_service, tmp_path))
    assert result.returncode == 0, result.stderr

    raw = json.loads(keyring_backend.get_password(KEYRING_SERVICE, KEYRING_USERNAME))
    assert [entry["status"] for entry in raw["keys"]] == ["primary", "naming"]
    ring = KeyRing(KeyringKeyStore(keyring_backend).load())
    assert ring.naming is not None and ring.naming.key == raw["keys"][1]["key"]
    assert ring.naming.key not in result.stdout + result.stderr
    assert f"naming key fingerprint {ring.naming.fingerprint}" in result.stdout
