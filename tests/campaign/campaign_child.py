"""Crash-trial children: the real command line (secure_ohlcv_cli.main), started cheaply.

Two ways to run it:

    python tests/campaign/campaign_child.py COMMAND [ARGS]
        imports the command line (the slow part), prints `ready`, waits for a line `go` on
        stdin, then runs `COMMAND ARGS` and exits with its code. cwd and environment are
        the operator's, as for secure_ohlcv_cli.py.

    python tests/campaign/campaign_child.py --fork-server
        imports the command line once, then serves JSON lines on stdin/stdout:
          {"op": "spawn", "cwd": DIR, "env": {...}, "args": [...], "stdout": FILE,
           "stderr": FILE, "fsize": BYTES or null}  ->  {"pid": PID}
          {"op": "wait", "pid": PID, "timeout": SECONDS or null}
                                                  ->  {"pid": PID, "code": CODE or null}
        Each spawn forks a fresh process that takes exactly `env` as its environment,
        changes to `cwd`, sends stdout/stderr to the files, optionally limits the size of
        any file it writes (RLIMIT_FSIZE, with SIGXFSZ ignored so a write fails with EFBIG),
        and runs the command line. `code` is the exit code, -N for death by signal N, null
        while it still runs. A crash trial SIGKILLs the pid itself.

Nothing is read from the installation before the command runs: settings, keys and the
keyring backend are chosen by the command, in the child, from its own environment.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from secure_ohlcv_cli import main  # noqa: E402


def ready_go() -> int:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 99
    return main(sys.argv[1:])


def _child(request: dict) -> None:
    """In the forked process: become the requested run, never return."""
    code = 70
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in (devnull, out, err):
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if request.get("fsize") is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        code = main(list(request["args"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def fork_server() -> int:
    reply = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "spawn":
            reply.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(request)
            answer = {"pid": pid}
        elif request["op"] == "wait":
            pid, timeout = request["pid"], request.get("timeout")
            deadline = None if timeout is None else time.monotonic() + timeout
            code = None
            while True:
                done, raw = os.waitpid(pid, os.WNOHANG if deadline is not None else 0)
                if done:
                    code = _status(raw)
                    break
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.001)
            answer = {"pid": pid, "code": code}
        else:
            answer = {"error": f"unknown op {request['op']!r}"}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()
    return 0


if __name__ == "__main__":
    sys.exit(fork_server() if sys.argv[1:] == ["--fork-server"] else ready_go())
