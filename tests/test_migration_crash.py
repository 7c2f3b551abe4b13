"""--migrate-store killed with SIGKILL at random moments: every dataset stays readable
under exactly one of its two names, and a re-run always finishes the job.

StoreMigration's promise (secure_ohlcv_downloader.py, section 10): the naming key is
stored before any file moves, each file changes name with one os.rename (both directories
fsynced), the emptied old directories go after, and the catalogue is written last. So at
every moment each dataset is under its earlier name or its opaque one, never both, never
neither, and a re-run completes the migration.

Modelled on tests/test_rotation_crash.py, with the keys in `.env` (25 kills) and in a real
Secret Service (8), and a re-keying (10 kills: opaque files named under a naming key the
ring lacks, each renamed to the name the ring's gives it; "both layouts" then means both
naming keys): each trial copies one store of the earlier layout
(tests/earlier_layout.py) and starts a real `--migrate-store` process (the command line's
own `main`, forked by tests/rotation_child.py), then kills it with SIGKILL after a delay
drawn from a seeded generator, spread over the duration of an uninterrupted migration
measured first and a little past its end; a few land within 2 ms of the start, and two
during the start-up of a plain `python secure_ohlcv_cli.py --migrate-store`. After each
kill:

* the key ring as stored has no naming key (nothing may have moved then) or the one the
  migration made; every dataset's file is at exactly one of its two names and decrypts to
  the bytes it held before; there is no other dataset file;
* a re-run exits 0; then the store holds only opaque names (no earlier directory left),
  the catalogue naming every dataset, and each dataset's same decrypted bytes.

Where the kills landed is counted and printed (`pytest -s`), not asserted: the timing is
the machine's.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from secure_ohlcv_downloader import (
    CATALOGUE_NAME,
    TEMP_PREFIX,
    DatasetId,
    EncryptedStore,
    KeyringKeyStore,
    StoredKey,
    dataset_file,
    dataset_files,
    new_naming_key,
    uses_earlier_layout,
)
from tests.earlier_layout import earlier_site
from tests.foundation_fixtures import (  # noqa: F401  (keyring_backend is a fixture)
    CLI,
    SUBPROCESS_TIMEOUT,
    keyring_backend,
)
from tests.lifecycle_fixtures import (
    Site,
    cli_server,
    headless_site,
    many_datasets,
    month_of_5min_bars,
)
from tests.test_rotation_crash import Kill, plan  # the same kill moments as rotation's

SEED = 20261206
MID_MIGRATION = "mid-migration: datasets under both layouts"


def crash_datasets() -> dict[DatasetId, object]:
    """40 daily datasets and an intraday symbol in three months (nested old directories)."""
    months = {DatasetId("IBM", "5min", month=m): month_of_5min_bars(m, 150.0 + i)
              for i, m in enumerate(("2024-01", "2024-02", "2024-03"))}
    return many_datasets(40) | months


@dataclass
class Template:
    cwd: Path
    key: str  # the one Fernet key of the earlier ring (no naming key yet)
    plaintexts: dict[DatasetId, bytes]  # each dataset's decrypted content before migrating
    # The naming key the files are named under, when the ring holds another (re-keying);
    # None: the earlier layout
    old_naming: str | None = None

    def old_path(self, data_dir: Path, dataset: DatasetId) -> Path:
        if self.old_naming is None:
            return data_dir / dataset.relative_path()
        return data_dir / dataset_file(self.old_naming, dataset)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    datasets = crash_datasets()
    site = earlier_site(tmp_path_factory.mktemp("migration-template"), datasets)
    ring = site.ring()
    return Template(site.cwd, ring.primary.key, {d: ring.decrypt((site.data_dir / d.relative_path()).read_bytes())
                               for d in datasets})


@pytest.fixture(scope="module")
def rekey_template(tmp_path_factory) -> Template:
    """A store of opaque files named under one naming key, the ring in `.env` holding
    another (the first lost): --migrate-store renames every file."""
    datasets = crash_datasets()
    site = headless_site(tmp_path_factory.mktemp("rekey-template"))
    ring = site.ring()
    assert ring.naming is not None
    site.put(datasets)
    EncryptedStore(site.settings(), ring).save_catalogue()
    for handed in site.state_dir.glob("new-key-*"):
        handed.unlink()
    plaintexts = {d: ring.decrypt(site.file_of(d).read_bytes()) for d in datasets}
    other = new_naming_key()
    site.env_file.write_text(site.env_file.read_text().replace(ring.naming.item, other.item))
    assert site.ring().naming.key == other.key
    return Template(site.cwd, ring.primary.key, plaintexts, ring.naming.key)


class Trials:
    """Copies the template, kills a migration in it, checks it, re-runs, checks again."""

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
        KeyringKeyStore(self.backend).save([StoredKey(self.template.key, "primary", "")])
        return Site(cwd, self.home, backend=self.backend, service=self.service)

    def start(self, site: Site) -> int:
        return self.server.start(["--migrate-store"], site.cwd, site.env())

    def measure(self) -> float:
        site = self.site("uninterrupted")
        started = time.monotonic()
        result = self.server.wait(self.start(site))
        seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        self.check_complete(site, "uninterrupted run")
        return seconds

    def run(self, kills: list[Kill]) -> None:
        for number, kill in enumerate(kills):
            label = (f"trial {number:2d}: killed {kill.delay * 1000:6.1f} ms after the start"
                     + (" of a plain CLI process" if kill.at_start_up else ""))
            site = self.site(f"trial-{number:02d}")
            self.kill_migration(site, kill)
            landing = self.check_readable(site, label)
            self.landings[landing] += 1
            self.kills += 1
            print(f"  {label}: {landing}")
            result = self.server.wait(self.start(site))
            assert result.returncode == 0, \
                f"{label}: the re-run failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            self.check_complete(site, label)

    def kill_migration(self, site: Site, kill: Kill) -> None:
        if kill.at_start_up:
            victim = subprocess.Popen([sys.executable, str(CLI), "--migrate-store"], cwd=site.cwd,
                                      env=site.env(), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(kill.delay)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=SUBPROCESS_TIMEOUT)
            return
        pid = self.start(site)
        time.sleep(kill.delay)
        os.kill(pid, signal.SIGKILL)
        self.server.wait(pid)

    # -- what must hold ------------------------------------------------------------------

    def check_readable(self, site: Site, label: str) -> str:
        """Each dataset under exactly one name, decrypting to its bytes; where the kill landed."""
        ring = site.ring()
        naming = ring.naming
        opaque_count = 0
        expected_files = set()
        for dataset, plaintext in self.template.plaintexts.items():
            old = self.template.old_path(site.data_dir, dataset)
            new = site.data_dir / dataset_file(naming.key, dataset) if naming else None
            at = [p for p in (old, new) if p is not None and os.path.lexists(p)]
            assert len(at) == 1, f"{label}: {dataset} is under {len(at)} names ({at})"
            assert ring.decrypt(at[0].read_bytes()) == plaintext, \
                f"{label}: {dataset} holds other content than before"
            opaque_count += at[0] == new
            expected_files.add(at[0])
        found = {p for p in site.data_dir.rglob("*.fernet") if p.name != CATALOGUE_NAME}
        assert found == expected_files, f"{label}: other dataset files: {found - expected_files}"
        if naming is None:
            return "before the naming key was stored"
        if opaque_count == 0:
            return "naming key stored, nothing renamed yet"
        if opaque_count < len(self.template.plaintexts):
            return MID_MIGRATION
        if uses_earlier_layout(site.data_dir):
            return "every file renamed, old directories not yet removed"
        if not (site.data_dir / CATALOGUE_NAME).exists():
            return "every file renamed, the catalogue not yet written"
        return "after the migration had completed"

    def check_complete(self, site: Site, label: str) -> None:
        ring = site.ring()
        assert ring.naming is not None, label
        wanted = {dataset_file(ring.naming.key, d): d for d in self.template.plaintexts}
        files = {p.relative_to(site.data_dir): p for p in dataset_files(site.data_dir)}
        assert sorted(files) == sorted(wanted), f"{label}: not every dataset at its opaque name"
        for rel, path in files.items():
            assert ring.decrypt(path.read_bytes()) == self.template.plaintexts[wanted[rel]], \
                f"{label}: {wanted[rel]} holds other content than before"
        names = {p.name for p in site.data_dir.iterdir()} - {".lock", CATALOGUE_NAME}
        # (re-keying leaves the fan-out directories of the other naming key, emptied)
        assert names >= {rel.parts[0] for rel in wanted} and \
            all(re.fullmatch(r"[0-9a-f]{2}", n) for n in names), \
            f"{label}: something besides fan-out directories: {sorted(names)}"
        catalogue = site.app().store().catalogue()
        assert catalogue.problem == "" and set(catalogue.entries) == \
            {d.identity for d in self.template.plaintexts}, f"{label}: catalogue {catalogue.problem}"
        assert not list(site.data_dir.rglob(TEMP_PREFIX + "*")), f"{label}: temp files left"

    def report(self, title: str) -> None:
        print(f"\n{title}: {self.kills} kills")
        for landing, count in self.landings.most_common():
            print(f"  {count:3d}  {landing}")
        print(f"  kills that landed mid-migration (datasets under both layouts): "
              f"{self.landings[MID_MIGRATION]}")


def test_migration_with_keys_in_dotenv_survives_sigkill_at_any_moment(template, tmp_path):
    trials = Trials(template, tmp_path)
    uninterrupted = trials.measure()
    print(f"\nuninterrupted --migrate-store over {len(template.plaintexts)} datasets, keys in "
          f".env: {uninterrupted * 1000:.0f} ms from start to exit")

    trials.run(plan(random.Random(SEED), uninterrupted, spread=20, early=3, at_start_up=2))

    trials.report("migration crash trials, keys in .env")
    assert trials.kills == 25


def test_migration_with_keys_in_the_keyring_survives_sigkill_at_any_moment(
        template, tmp_path, secret_service, keyring_backend):
    trials = Trials(template, tmp_path, keyring_backend, secret_service)
    uninterrupted = trials.measure()
    print(f"\nuninterrupted --migrate-store over {len(template.plaintexts)} datasets, keys in "
          f"the Secret Service: {uninterrupted * 1000:.0f} ms from start to exit")

    trials.run(plan(random.Random(SEED + 1), uninterrupted, spread=7, early=1, at_start_up=0))

    trials.report("migration crash trials, keys in the Secret Service")
    assert trials.kills == 8


def test_re_keying_to_the_rings_naming_key_survives_sigkill_at_any_moment(rekey_template, tmp_path):
    """Files named under a naming key the ring lacks: each renamed to the ring's, one
    os.rename each, so a kill leaves every dataset under exactly one of its two names."""
    trials = Trials(rekey_template, tmp_path)
    uninterrupted = trials.measure()
    print(f"\nuninterrupted re-keying --migrate-store over {len(rekey_template.plaintexts)} "
          f"datasets: {uninterrupted * 1000:.0f} ms from start to exit")

    trials.run(plan(random.Random(SEED + 2), uninterrupted, spread=8, early=1, at_start_up=1))

    trials.report("re-keying crash trials, keys in .env")
    assert trials.kills == 10
