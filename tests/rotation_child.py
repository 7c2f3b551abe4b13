"""Test helper: runs the command line in processes forked from one that has already
imported it, so that a run costs milliseconds instead of the interpreter's ~0.7 s start-up.

    python tests/rotation_child.py

Named for its first user, tests/test_rotation_crash.py, which kills its `--rotate-key`
runs at chosen moments; tests/lifecycle_fixtures.py runs the lifecycle tests' commands
through it too. It imports the command line, prints `ready`, then answers one JSON object
per line on stdin with one JSON line on stdout:

    {"run": ARGV, "cwd": DIR, "env": {...}, "output": PREFIX}
        Fork a process that becomes `python secure_ohlcv_cli.py ARGV` run in DIR with
        exactly the environment `env` (nothing inherited), stdin on /dev/null (no
        terminal, as under cron), stdout and stderr to PREFIX.out and PREFIX.err.
        Answer {"pid": PID}. The process reads settings, `.env` and keys afresh, as a
        new interpreter would; only the imports were done before the fork.
    {"wait": PID, "timeout": SECONDS}
        Wait for that process. Answer {"pid": PID, "code": CODE}; CODE is negative when a
        signal ended it (-9: SIGKILL), and "timeout" when it outlived SECONDS (it is then
        killed).

End of input: the helper exits. It starts no thread, so forking it is safe.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secure_ohlcv_cli import main  # noqa: E402

CLI = str(Path(__file__).resolve().parent.parent / "secure_ohlcv_cli.py")


def become_command(argv: list[str], cwd: str, env: dict[str, str], output: str) -> int:
    """In the forked process: the command line, run as `python secure_ohlcv_cli.py ARGV`."""
    try:
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, output + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, output + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o600)
            os.dup2(opened, fd)
            os.close(opened)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [CLI, *argv]
        code = main(argv)
    except BaseException:  # a failure of this helper, not of the command line
        traceback.print_exc()
        code = 70
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def wait(pid: int, timeout: float) -> int | str:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.002)


def serve() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os._exit(become_command(request["run"], request["cwd"], request["env"],
                                        request["output"]))
            answer = {"pid": pid}
        else:
            answer = {"pid": request["wait"], "code": wait(request["wait"], request["timeout"])}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
