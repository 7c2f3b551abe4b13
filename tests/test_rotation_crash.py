"""--rotate-key killed with SIGKILL at random moments: no dataset is ever lost or left
unreadable, and a re-run always finishes the job.

KeyRotation's promise (secure_ohlcv_downloader.py, section 10): the new key ring is stored
where the keys are kept before any file changes, each file is replaced atomically, and the
canary is rotated last. So at every moment each file opens with the key ring *as stored*,
and a re-run completes the rotation.

Each trial copies one store of small datasets and starts a real `--rotate-key` process
(the command line's own `main` in a process forked by tests/rotation_child.py, so that
the 0.7 s of imports is paid once), then kills it with SIGKILL after a delay drawn from a seeded
generator. The delays are spread over the duration of an uninterrupted rotation measured
first, a little past its end; a few kills land very early: right after the start, and
during the start-up of a plain `python secure_ohlcv_cli.py --rotate-key`. After each kill:

* every dataset file and the canary decrypt with the key ring as stored, read again from
  `.env` or the keyring as the next run reads it, and no dataset file is missing;
* a re-run of `--rotate-key` exits 0; then every file opens under the ring's primary key
  alone and holds exactly the bars it held before. (A kill that came after the rotation
  had finished makes the re-run start a new rotation: the same holds.)

Each check reads the ring again and opens every file; "the same bars" is checked as the same
decrypted bytes after every trial (rotation re-encrypts, it never re-encodes) and, for the
uninterrupted run and the last trial, as the same decoded frames. Where the kills landed
(before the new key was stored, mid-rotation with datasets under both keys, ...) is counted
and printed (`pytest -s`), not asserted: the timing is the machine's.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from cryptography.fernet import Fernet, InvalidToken

from secure_ohlcv_downloader import (
    CANARY_TEXT,
    TEMP_PREFIX,
    IntegrityError,
    KeyringKeyStore,
    StoredKey,
    dataset_files,
    decode_table,
    fingerprint,
)
from tests.foundation_fixtures import (  # noqa: F401  (keyring_backend is a fixture)
    CLI,
    SUBPROCESS_TIMEOUT,
    keyring_backend,
)
from tests.lifecycle_fixtures import Site, cli_server, headless_site, many_datasets

SEED = 20240611
DATASETS = 40
SPREAD = 1.2  # kill delays go up to this many times an uninterrupted run's duration
MID_ROTATION = "mid-rotation: datasets under the new and the old key"


@dataclass
class Template:
    """The store every trial starts from: DATASETS daily datasets under one key, in .env."""

    cwd: Path
    key: str
    naming: StoredKey  # the naming key: rotation keeps it, and the file names with it
    plaintexts: dict[str, bytes]  # dataset path -> its decrypted content (Parquet bytes)
    originals: dict[str, pd.DataFrame]  # dataset path -> its bars

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    site = headless_site(tmp_path_factory.mktemp("rotation-template"))
    site.put(many_datasets(DATASETS))
    ring = site.ring()
    plaintexts = {rel: ring.decrypt(token) for rel, token in site.files().items()}
    assert ring.naming is not None
    return Template(site.cwd, ring.primary.key, ring.naming, plaintexts,
                    {rel: decode_table(data)[0] for rel, data in plaintexts.items()})


# -- starting and killing runs -------------------------------------------------------------

@dataclass
class Kill:
    at_start_up: bool  # a plain CLI process killed during its start-up, else a forked run
    delay: float       # seconds after the start


def plan(rng: random.Random, uninterrupted: float, spread: int, early: int,
         at_start_up: int) -> list[Kill]:
    """Kill moments: `at_start_up` during a CLI's start-up, `early` within 2 ms of the start,
    and `spread` uniformly over the whole rotation and a little past its end; shuffled."""
    kills = [Kill(True, rng.uniform(0.02, 0.4)) for _ in range(at_start_up)]
    kills += [Kill(False, rng.uniform(0.0, 0.002)) for _ in range(early)]
    kills += [Kill(False, rng.uniform(0.0, SPREAD * uninterrupted)) for _ in range(spread)]
    rng.shuffle(kills)
    return kills


class Trials:
    """Copies the template, kills a rotation in it, checks it, re-runs, checks again."""

    def __init__(self, template: Template, root: Path, backend=None, service=None) -> None:
        self.template, self.root = template, root
        self.backend, self.service = backend, service
        self.home = root / "home"
        self.home.mkdir()
        self.landings: Counter[str] = Counter()
        self.kills = 0
        self.server = cli_server()

    def site(self, name: str) -> Site:
        cwd = self.root / name / "site"
        shutil.copytree(self.template.cwd, cwd, symlinks=True)
        if self.service is None:
            return Site(cwd, self.home)
        (cwd / ".env").unlink()  # the keys live in the keyring: its one entry, reset per trial
        return Site(cwd, self.home, backend=self.backend, service=self.service)

    def fresh_site(self, name: str) -> Site:
        site = self.site(name)
        if self.service is not None:
            KeyringKeyStore(self.backend).save([StoredKey(self.template.key, "primary", ""),
                                                self.template.naming])
        return site

    def measure(self) -> float:
        """Seconds from the start to the end of an uninterrupted rotation (checked too)."""
        site = self.fresh_site("uninterrupted")
        started = time.monotonic()
        result = self.server.wait(self.start(site))
        seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        self.check_complete(site, "uninterrupted run")
        self.check_bars(site, "uninterrupted run")
        return seconds

    def run(self, kills: list[Kill]) -> None:
        for number, kill in enumerate(kills):
            label = (f"trial {number:2d}: killed {kill.delay * 1000:6.1f} ms after the start"
                     + (" of a plain CLI process" if kill.at_start_up else ""))
            site = self.fresh_site(f"trial-{number:02d}")
            self.kill_rotation(site, kill)
            landing = self.check_readable(site, label)
            self.landings[landing] += 1
            self.kills += 1
            print(f"  {label}: {landing}")
            result = self.server.wait(self.start(site))
            assert result.returncode == 0, \
                f"{label}: the re-run failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            self.check_complete(site, label)
        self.check_bars(site, label)  # the last trial's store, decoded bar by bar

    def kill_rotation(self, site: Site, kill: Kill) -> None:
        if kill.at_start_up:
            victim = subprocess.Popen([sys.executable, str(CLI), "--rotate-key"], cwd=site.cwd,
                                      env=site.env(), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(kill.delay)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=SUBPROCESS_TIMEOUT)
            return
        pid = self.start(site)
        time.sleep(kill.delay)
        os.kill(pid, signal.SIGKILL)  # not reaped before `wait`: the pid is still its own
        self.server.wait(pid)

    def start(self, site: Site) -> int:
        return self.server.start(["--rotate-key"], site.cwd, site.env())

    # -- what must hold ------------------------------------------------------------------

    def check_readable(self, site: Site, label: str) -> str:
        """Every file opens with the ring as stored; returns where the kill landed."""
        ring = site.ring()
        paths = dataset_files(site.data_dir)
        assert sorted(p.relative_to(site.data_dir).as_posix() for p in paths) == \
            sorted(self.template.plaintexts), f"{label}: a dataset file is missing or extra"
        under_new = 0
        for path in paths + [site.canary]:
            try:
                _, key_fp = ring.decrypt_with_fingerprint(path.read_bytes(), path)
            except IntegrityError as exc:
                raise AssertionError(
                    f"{label}: unreadable with the key ring as stored: {exc}") from exc
            under_new += path != site.canary and key_fp == ring.primary.fingerprint
        if ring.primary.fingerprint == self.template.fingerprint:
            return "before the new key was stored"
        if _opens(ring.primary.key, site.canary.read_bytes()):
            return "after the rotation had completed"
        if under_new == 0:
            return "new key stored, no dataset rotated yet"
        if under_new < len(paths):
            return MID_ROTATION
        return "every dataset rotated, the canary not yet"

    def check_complete(self, site: Site, label: str) -> None:
        """Every file under the ring's primary key alone, holding the very same content
        (decrypted bytes identical to the original's, so identical bars)."""
        primary = Fernet(site.ring().primary.key)
        assert _opens(primary, site.canary.read_bytes()), f"{label}: canary not under the primary"
        assert primary.decrypt(site.canary.read_bytes()) == CANARY_TEXT, label
        files = site.files()
        assert sorted(files) == sorted(self.template.plaintexts), label
        for rel, token in files.items():
            assert _opens(primary, token), f"{label}: {rel} does not open under the primary alone"
            assert primary.decrypt(token) == self.template.plaintexts[rel], \
                f"{label}: {rel} holds other content than before the rotation"
        assert not list(site.data_dir.rglob(TEMP_PREFIX + "*")), f"{label}: temp files left"

    def check_bars(self, site: Site, label: str) -> None:
        """Every dataset decodes to the very bars it held before the rotation."""
        for rel, frame in site.frames().items():
            pd.testing.assert_frame_equal(frame, self.template.originals[rel],
                                          obj=f"{label}: {rel}")

    def report(self, title: str) -> None:
        print(f"\n{title}: {self.kills} kills")
        for landing, count in self.landings.most_common():
            print(f"  {count:3d}  {landing}")
        print(f"  kills that landed mid-rotation (datasets under both keys): "
              f"{self.landings[MID_ROTATION]}")


def _opens(key: str | Fernet, token: bytes) -> bool:
    try:
        (key if isinstance(key, Fernet) else Fernet(key)).decrypt(token)
        return True
    except InvalidToken:
        return False


# -- the trials ----------------------------------------------------------------------------

def test_rotation_with_keys_in_dotenv_survives_sigkill_at_any_moment(template, tmp_path):
    trials = Trials(template, tmp_path)
    uninterrupted = trials.measure()
    print(f"\nuninterrupted --rotate-key over {DATASETS} datasets, keys in .env: "
          f"{uninterrupted * 1000:.0f} ms from start to exit")

    trials.run(plan(random.Random(SEED), uninterrupted, spread=20, early=3, at_start_up=2))

    trials.report("rotation crash trials, keys in .env")
    assert trials.kills == 25


def test_rotation_with_keys_in_the_keyring_survives_sigkill_at_any_moment(
        template, tmp_path, secret_service, keyring_backend):
    trials = Trials(template, tmp_path, keyring_backend, secret_service)
    uninterrupted = trials.measure()
    print(f"\nuninterrupted --rotate-key over {DATASETS} datasets, keys in the Secret "
          f"Service: {uninterrupted * 1000:.0f} ms from start to exit")

    trials.run(plan(random.Random(SEED + 1), uninterrupted, spread=7, early=1, at_start_up=0))

    trials.report("rotation crash trials, keys in the Secret Service")
    assert trials.kills == 8
