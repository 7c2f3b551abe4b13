"""The project's Alpha Vantage emulator (tests/alphavantage_emulator.py), run in a process of
its own so that its work never competes with the measured client for the GIL.

The server plays a remote service: its CPU is not the client's cost. Its price model builds
a symbol's whole synthetic history on a first request (about 55 ms for 26 years), far slower
than a real API's cache; where a timed run would otherwise wait on that, the scenario calls
`warm()` first, which builds the series the run will ask for (the emulator keeps them in its
own caches, sized here). Added latency (`latency=`) still applies to every answer.

    with RemoteEmulator(premium_keys={"KEY": 1200}, latency=0.15, cache=450) as av:
        av.warm(symbols, as_of)
        ... point ALPHA_VANTAGE_BASE_URL at av.base_url ...
        av.counters()   # request_count, violations, bytes_sent, outcomes, ...
"""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys
from datetime import date
from typing import IO, Any

COUNTERS = ("request_count", "violations", "bytes_sent", "outcomes", "violations_by_kind",
            "faults_applied")


def _send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message)
    stream.write(struct.pack("!I", len(data)) + data)
    stream.flush()


def _recv(stream: IO[bytes]) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError
    (size,) = struct.unpack("!I", head)
    return pickle.loads(stream.read(size))


class _Pipe:
    """Length-prefixed pickles over a pair of byte streams."""

    def __init__(self, reader: IO[bytes], writer: IO[bytes]) -> None:
        self.reader, self.writer = reader, writer

    def send(self, message: Any) -> None:
        _send(self.writer, message)

    def recv(self) -> Any:
        return _recv(self.reader)


def _serve(conn: Any, repo: str, options: dict[str, Any], cache: int | None) -> None:
    sys.path.insert(0, repo)
    from tests import alphavantage_emulator as emulator_module

    if cache:
        # Cache sizes of the emulator's own LRUs: enough for every symbol of the scenario.
        emulator_module.PriceModel._CACHED_SERIES = cache
        emulator_module.EconomicWalk._SHARED_LIMIT = cache
        emulator_module.QueryService._CACHED_BODIES = cache
    emu = emulator_module.AlphaVantageEmulator(**options).start()
    conn.send(emu.base_url)
    while True:
        try:
            command, args, kwargs = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        try:
            if command == "stop":
                emu.stop()
                conn.send(("ok", None))
                break
            if command == "counters":
                result = {name: _plain(getattr(emu, name)) for name in COUNTERS}
            elif command == "get":
                result = {name: _plain(getattr(emu, name)) for name in args}
            elif command == "set":
                for name, value in kwargs.items():
                    setattr(emu, name, value)
                result = None
            elif command == "warm":
                symbols, as_of = args
                for symbol in symbols:
                    emu._model.daily(symbol, as_of)
                result = len(symbols)
            elif command == "call":
                result = _plain(getattr(emu, args[0])(*args[1:], **kwargs))
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", result))
        except Exception as exc:  # reported to the caller, the server keeps running
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    emu.stop()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    return value


class RemoteEmulator:
    def __init__(self, *, cache: int | None = None, **options: Any) -> None:
        from bench.common import REPO

        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.emulator"], cwd=REPO,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._process.stdin is not None and self._process.stdout is not None
        self._conn = _Pipe(self._process.stdout, self._process.stdin)
        self._conn.send((str(REPO), options, cache))
        try:
            self.base_url: str = self._conn.recv()
        except EOFError:
            raise RuntimeError("the emulator process did not start") from None

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def _ask(self, command: str, *args: Any, **kwargs: Any) -> Any:
        self._conn.send((command, args, kwargs))
        status, result = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"emulator: {result}")
        return result

    def counters(self) -> dict[str, Any]:
        return self._ask("counters")

    def get(self, *names: str) -> dict[str, Any]:
        return self._ask("get", *names)

    def set(self, **attributes: Any) -> None:
        self._ask("set", **attributes)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._ask("call", method, *args, **kwargs)

    def reset_counters(self) -> None:
        self.call("reset_counters")

    def warm(self, symbols: list[str], as_of: date) -> int:
        return self._ask("warm", list(symbols), as_of)

    def stop(self) -> None:
        if self._process.poll() is None:
            try:
                self._ask("stop")
            except (EOFError, OSError, RuntimeError):
                pass
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.terminate()
                self._process.wait(5)

    def __enter__(self) -> RemoteEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """The server side: `python -m bench.emulator`, spoken to on stdin/stdout."""
    conn = _Pipe(sys.stdin.buffer, sys.stdout.buffer)
    sys.stdout = sys.stderr  # nothing else may write to the pipe
    repo, options, cache = conn.recv()
    _serve(conn, repo, options, cache)


if __name__ == "__main__":
    main()
