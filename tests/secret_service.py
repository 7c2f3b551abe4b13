"""A private, real Secret Service (D-Bus + gnome-keyring) for tests.

``PrivateSecretService(tmp_dir)`` starts:

* its own ``dbus-daemon`` (session-bus type) from a generated config that has
  **no service directories**, so nothing can be D-Bus-activated behind our
  back (no stray, locked gnome-keyring spawned by the bus), listening on a
  unix socket inside a private 0700 ``XDG_RUNTIME_DIR``;
* ``gnome-keyring-daemon --foreground --unlock --components=secrets`` on
  that bus, with a throwaway password on stdin and private ``HOME`` /
  ``XDG_DATA_HOME`` / ``XDG_CONFIG_HOME`` / ``XDG_RUNTIME_DIR`` and no display.

It waits until ``org.freedesktop.secrets`` is owned on the bus and the
default collection is unlocked, then exposes ``.env``: the variables to apply
to ``os.environ`` (e.g. with ``monkeypatch.setenv``) or to a child process so
that ``keyring`` / ``secretstorage`` talk to this private service and never to
the developer's own keyring. ``.stop()`` terminates both daemons and reaps them.

Linux only. Needs the Debian packages ``dbus`` and ``gnome-keyring`` and the
Python package ``secretstorage`` (a dependency of ``keyring`` on Linux).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECRETS_BUS_NAME = "org.freedesktop.secrets"
REQUIRED_BINARIES = ("dbus-daemon", "gnome-keyring-daemon")
INSTALL_HINT = "install the Debian packages: apt-get install dbus gnome-keyring"

# Variables that would let a child reach the developer's real session or GUI.
_SCRUBBED_VARS = (
    "DISPLAY",
    "WAYLAND_DISPLAY",
    "GNOME_KEYRING_CONTROL",
    "GNOME_KEYRING_PID",
    "SSH_AUTH_SOCK",
    "DBUS_SESSION_BUS_PID",
    "PYTHON_KEYRING_BACKEND",
)
_MAX_UNIX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


def secret_service_available() -> tuple[bool, str]:
    """Whether a private Secret Service can be started here: (ok, reason)."""
    if not sys.platform.startswith("linux"):
        return False, f"the private Secret Service needs Linux (this is {sys.platform})"
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    if missing:
        return False, f"{', '.join(missing)} not found on PATH; {INSTALL_HINT}"
    return True, ""


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the daemon if the test process dies (even SIGKILL)."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # best effort only
        pass


class SecretServiceError(RuntimeError):
    pass


class PrivateSecretService:
    """Context manager running a private D-Bus session bus + gnome-keyring.

    ``env`` keys: DBUS_SESSION_BUS_ADDRESS, XDG_RUNTIME_DIR, XDG_DATA_HOME,
    XDG_CONFIG_HOME. (The daemons also get a private HOME.)
    """

    password = "throwaway-test-password"

    def __init__(self, tmp_dir: os.PathLike | str, *, timeout: float = 20.0) -> None:
        self.root = Path(tmp_dir).resolve()
        self.timeout = timeout
        self.env: dict[str, str] = {}
        self.bus_proc: subprocess.Popen | None = None
        self.keyring_proc: subprocess.Popen | None = None
        self._short_dir: str | None = None
        self._logs: dict[str, Path] = {}

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> PrivateSecretService:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> PrivateSecretService:
        ok, reason = secret_service_available()
        if not ok:
            raise SecretServiceError(reason)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        dirs = {name: self.root / name for name in ("runtime", "data", "config", "home")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o700)
        runtime = dirs["runtime"]

        socket = runtime / "bus"
        if len(str(socket)) > _MAX_UNIX_SOCKET_PATH:  # e.g. a long --basetemp
            self._short_dir = tempfile.mkdtemp(prefix="sbus-")
            socket = Path(self._short_dir) / "bus"
        config = self.root / "bus.conf"
        config.write_text(_BUS_CONFIG.format(socket=socket))

        base_env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_VARS}
        base_env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        base_env.update(
            HOME=str(dirs["home"]),
            XDG_RUNTIME_DIR=str(runtime),
            XDG_DATA_HOME=str(dirs["data"]),
            XDG_CONFIG_HOME=str(dirs["config"]),
        )

        address = self._start_bus(config, base_env)
        daemon_env = dict(base_env, DBUS_SESSION_BUS_ADDRESS=address)

        log = self._log("gnome-keyring-daemon")
        with open(log, "wb") as err:
            self.keyring_proc = subprocess.Popen(
                ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
                stdin=subprocess.PIPE,
                stdout=err,
                stderr=subprocess.STDOUT,
                env=daemon_env,
                cwd=self.root,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        assert self.keyring_proc.stdin is not None
        self.keyring_proc.stdin.write(self.password.encode())
        self.keyring_proc.stdin.close()

        self.env = {
            "DBUS_SESSION_BUS_ADDRESS": address,
            "XDG_RUNTIME_DIR": str(runtime),
            "XDG_DATA_HOME": str(dirs["data"]),
            "XDG_CONFIG_HOME": str(dirs["config"]),
        }
        self._wait_until_ready(address)

    def _log(self, name: str) -> Path:
        path = self.root / f"{name}.log"
        self._logs[name] = path
        return path

    def _start_bus(self, config: Path, env: dict[str, str]) -> str:
        read_fd, write_fd = os.pipe()
        try:
            with open(self._log("dbus-daemon"), "wb") as err:
                self.bus_proc = subprocess.Popen(
                    [
                        "dbus-daemon",
                        f"--config-file={config}",
                        "--nofork",
                        "--nopidfile",
                        f"--print-address={write_fd}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.root,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            os.close(write_fd)
            write_fd = -1
            data = b""
            deadline = time.monotonic() + self.timeout
            while not data.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                    raise self._error("dbus-daemon did not print its address in time")
                chunk = os.read(read_fd, 4096)
                if not chunk:  # EOF: the daemon died
                    raise self._error("dbus-daemon exited before printing its address")
                data += chunk
            return data.decode().strip()
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)

    def _wait_until_ready(self, address: str) -> None:
        """Poll until the secrets name is owned and the default collection unlocked."""
        import secretstorage
        from jeepney import DBusAddress, new_method_call
        from jeepney.io.blocking import open_dbus_connection

        dbus = DBusAddress("/org/freedesktop/DBus", "org.freedesktop.DBus", "org.freedesktop.DBus")
        deadline = time.monotonic() + self.timeout
        last = "not started"
        while time.monotonic() < deadline:
            if self.keyring_proc is not None and self.keyring_proc.poll() is not None:
                raise self._error(
                    f"gnome-keyring-daemon exited with code {self.keyring_proc.returncode}"
                )
            try:
                with open_dbus_connection(bus=address) as conn:
                    reply = conn.send_and_get_reply(
                        new_method_call(dbus, "NameHasOwner", "s", (SECRETS_BUS_NAME,)), timeout=2
                    )
                    if reply.body[0]:
                        collection = secretstorage.get_default_collection(conn)
                        if not collection.is_locked():
                            return
                        last = "default collection is locked"
                    else:
                        last = f"{SECRETS_BUS_NAME} not owned on the bus yet"
            except Exception as exc:  # bus not answering yet, collection not created...
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.05)
        raise self._error(f"Secret Service not ready after {self.timeout:.0f}s ({last})")

    def _error(self, message: str) -> SecretServiceError:
        parts = [message]
        for name, path in self._logs.items():
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                text = ""
            parts.append(f"--- {name} output ---\n{text or '(empty)'}")
        return SecretServiceError("\n".join(parts))

    def stop(self) -> None:
        """Terminate the daemons (keyring first, then the bus) and reap them."""
        for attr in ("keyring_proc", "bus_proc"):
            proc: subprocess.Popen | None = getattr(self, attr)
            if proc is None:
                continue
            if proc.returncode is None:
                # Not reaped yet, so its process group id is still ours: signal
                # the daemon and anything it may have spawned in its group.
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=5)
            setattr(self, attr, None)
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # start_new_session=True: pgid == pid
        except ProcessLookupError:
            pass
        except PermissionError:
            proc.send_signal(sig)

    # -- helpers -------------------------------------------------------------
    def child_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for a subprocess: ``base`` (default os.environ) with
        display/keyring overrides removed and ``self.env`` applied."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if k not in _SCRUBBED_VARS}
        env.update(self.env)
        return env
