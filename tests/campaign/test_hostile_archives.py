"""Campaign B, area 3 (second round): hostile archives that attack memory and the tar
parser, and archives whose name lies about their age.

What is attacked, and the property each test holds the product to:

* sparse members made by GNU tar from real sparse files (`truncate`), in the GNU format and
  in the POSIX format with each GNU sparse version (0.0, 0.1, 1.0); members whose headers
  claim a gigabyte (or more than the limit) that the file holds as a hole; a PAX header
  and a GNU long name of 900 MiB; malformed PAX records (a size of 10^20, a negative size,
  a GNU.sparse 1.0 header with realsize=-1); members that are not regular files (FIFO,
  directory, devices, links, a "contiguous file"). For each, `--verify-backup ARCHIVE` and
  `--recover --from-backup ARCHIVE` exit 5, never 1 and never "internal error", name the
  archive, store nothing from the hostile member, and their peak memory, measured by the
  kernel in the child process (wait4's ru_maxrss), stays under a bound whatever the
  archive claims. Each child runs under an address-space limit, so a regression fails with
  a MemoryError instead of taking the machine's memory;
* an old archive copied under a newer name (a rollback): `--verify-backup` of it fails
  naming it, the default `--verify-backup` checks the real newest by manifest and warns
  about the copy, `backup` does not count it among the newest, says so, and prunes it by
  its true age.
* a member spoiled in any way is reported once; remove-key reads headers and manifests only;
* PAX records of any kind on any member: refused or harmless, never a crash.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import strategies as st

from secure_ohlcv_downloader import (
    CANARY_MEMBER,
    MANIFEST_MEMBER,
    MAX_MANIFEST_BYTES,
    MAX_MEMBER_BYTES,
    OHLCVError,
    backup_archives,
    verify_backup,
)
from tests.campaign.test_hostile_input import ARCHIVE_EXAMPLES, ArchiveLab, crash_kind, run_property
from tests.foundation_fixtures import CLI
from tests.lifecycle_fixtures import headless_site, read_members, sample_datasets, snapshot

GIB = 1 << 30
MIB = 1 << 20
# The bound asserted on every run. Before this campaign's fix the sparse bomb reached
# 6.4 GB; an ordinary verify of a small store peaks near 140 MB.
PEAK_RSS_BOUND = 400 * MIB
# No child may use more address space than this: a regression ends in MemoryError (and
# fails the test) instead of taking gigabytes of a shared machine.
ADDRESS_SPACE_LIMIT = 2 * GIB
CHILD_TIMEOUT = 120
# A member name of the opaque layout, as a candidate PAX value (IBM's own is lab.ibm_member).
IBM_LIKE = "data/00/" + "0" * 32 + ".fernet"


# -- building archives byte by byte ----------------------------------------------------------

def block_pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE, pax: dict[str, str] | None = None,
           linkname: str = "") -> bytes:
    """A member's header blocks (a PAX extended header first when `pax` is given)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type, info.linkname = size, 0o600, kind, linkname
    info.pax_headers = dict(pax or {})
    return info.tobuf(tarfile.PAX_FORMAT)


def member(name: str, data: bytes, **kwargs) -> list:
    return [header(name, len(data), **kwargs), block_pad(data)]


def write_parts(path: Path, parts: list) -> Path:
    """Write `parts` in order: bytes as they are, an int as a hole of that many zero bytes
    (the file is sparse on disk: no space or time spent), then the end-of-archive blocks."""
    with open(path, "wb") as handle:
        for part in parts:
            if isinstance(part, int):
                handle.seek(part, os.SEEK_CUR)
            else:
                handle.write(part)
        handle.write(bytes(2 * tarfile.BLOCKSIZE))
    return path


def genuine_parts(archive: Path, replace: dict[str, list] | None = None) -> list:
    """A genuine archive's members in order, each as header and data; those named in
    `replace` given by their parts instead."""
    replace = replace or {}
    parts: list = []
    for info, data in read_members(archive):
        parts += replace.get(info.name) or member(info.name, data or b"")
    return parts


def datasets_of(archive: Path) -> list[str]:
    return [info.name for info, _ in read_members(archive) if info.name.startswith("data/")]


# -- the hostile archives --------------------------------------------------------------------

def gnu_tar_sparse(lab: ArchiveLab, where: Path, name: str, *options: str) -> Path:
    """GNU tar of real sparse files: every dataset member and the canary replaced by a 1 GiB
    file that is all hole (`truncate`), then the genuine manifest: a bomb of a few KB."""
    source = where / f"{name}-files"
    names = []
    for info, data in read_members(lab.archive):
        path = source / info.name
        path.parent.mkdir(parents=True, exist_ok=True)
        if info.name == MANIFEST_MEMBER:
            path.write_bytes(data)
        else:
            subprocess.run(["truncate", "-s", "1G", str(path)], check=True)
        names.append(info.name)
    archive = where / f"{name}.tar"
    subprocess.run(["tar", "--sparse", *options, "-cf", str(archive), "-C", str(source), *names],
                   check=True, capture_output=True)
    shutil.rmtree(source)
    assert archive.stat().st_size < MIB, "tar did not write sparse members"
    return archive


def claimed_gib(archive: Path, where: Path, size: int) -> Path:
    """Every dataset member's header claims `size` bytes, all of them a hole in the file."""
    return write_parts(where / f"claims-{size}.tar", genuine_parts(
        archive, {name: [header(name, size), size + (-size % tarfile.BLOCKSIZE)]
                  for name in datasets_of(archive)}))


def huge_header(lab: ArchiveLab, where: Path, kind: bytes) -> Path:
    """A 900 MiB PAX extended header or GNU long name (a hole) before IBM's member."""
    size = 900 * MIB
    info = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "pax")
    info.type, info.size = kind, size
    block = info.tobuf(tarfile.GNU_FORMAT if kind == tarfile.GNUTYPE_LONGNAME else tarfile.USTAR_FORMAT)
    token = lab.members[lab.ibm_member]
    plain = tarfile.TarInfo(lab.ibm_member)
    plain.size, plain.mode = len(token), 0o600
    parts = [block, size, plain.tobuf(tarfile.USTAR_FORMAT), block_pad(token)]
    return write_parts(where / f"huge-{kind.decode()}.tar", genuine_parts(lab.archive, {lab.ibm_member: parts}))


def pax_ibm(lab: ArchiveLab, where: Path, label: str, pax: dict[str, str]) -> Path:
    return write_parts(where / f"pax-{label}.tar",
                       genuine_parts(lab.archive, {lab.ibm_member: member(lab.ibm_member, lab.members[lab.ibm_member], pax=pax)}))


def sparse_name(member_name: str) -> str:
    """The header name GNU tar gives a sparse member: <dir>/GNUSparseFile.0/<name>."""
    directory, name = member_name.rsplit("/", 1)
    return f"{directory}/GNUSparseFile.0/{name}"


def sparse_10_realsize(lab: ArchiveLab, where: Path, realsize: str, with_map: bool) -> Path:
    """IBM's member under GNU.sparse 1.0 PAX records with the given realsize; its data
    starts with a sparse map, or (as a hand-made header would have it) with none."""
    token = lab.members[lab.ibm_member]
    data = block_pad(f"1\n0\n{len(token)}\n".encode()) + token if with_map else token
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": lab.ibm_member,
           "GNU.sparse.realsize": realsize}
    label = f"sparse10-{realsize}-{'map' if with_map else 'nomap'}"
    return write_parts(where / f"{label}.tar", genuine_parts(
        lab.archive, {lab.ibm_member: member(sparse_name(lab.ibm_member), data, pax=pax)}))


def junk_manifest(lab: ArchiveLab, where: Path, size: int, real: bool) -> Path:
    """The manifest replaced by `size` bytes: base64 letters written out (it is read and
    tried with the key), or a hole claiming more than a manifest may take."""
    data = [b"gAAAAA" + b"A" * (size - 6)] if real else [size + (-size % tarfile.BLOCKSIZE)]
    return write_parts(where / f"manifest-{size}.tar", genuine_parts(
        lab.archive, {MANIFEST_MEMBER: [header(MANIFEST_MEMBER, size), *data]}))


def non_regular(lab: ArchiveLab, where: Path, label: str, kind: bytes, linkname: str = "",
                data: bytes = b"") -> Path:
    parts = [header(lab.ibm_member, len(data), kind=kind, linkname=linkname), block_pad(data)]
    return write_parts(where / f"kind-{label}.tar", genuine_parts(lab.archive, {lab.ibm_member: parts}))


@dataclass
class Hostile:
    archive: Path
    kind: str  # "bomb": no dataset member is usable; "member": IBM's member is hostile;
    # "malformed": the archive cannot be read at all


def hostile_archives(lab: ArchiveLab, where: Path) -> dict[str, Hostile]:
    made = {
        "gnu sparse": Hostile(gnu_tar_sparse(lab, where, "gnu", "--format=gnu"), "bomb"),
        "posix sparse 0.0": Hostile(gnu_tar_sparse(lab, where, "posix00", "--format=posix",
                                                   "--sparse-version=0.0"), "bomb"),
        "posix sparse 0.1": Hostile(gnu_tar_sparse(lab, where, "posix01", "--format=posix",
                                                   "--sparse-version=0.1"), "bomb"),
        "posix sparse 1.0": Hostile(gnu_tar_sparse(lab, where, "posix10", "--format=posix",
                                                   "--sparse-version=1.0"), "bomb"),
        "members claiming 1 GiB": Hostile(claimed_gib(lab.archive, where, MAX_MEMBER_BYTES), "bomb"),
        "members claiming over the limit": Hostile(claimed_gib(lab.archive, where, MAX_MEMBER_BYTES + 1),
                                                   "bomb"),
        "a manifest of junk at the limit": Hostile(
            junk_manifest(lab, where, MAX_MANIFEST_BYTES, True), "bomb"),
        "a manifest over the limit": Hostile(
            junk_manifest(lab, where, MAX_MANIFEST_BYTES + 1, False), "bomb"),
        "a 900 MiB PAX header": Hostile(huge_header(lab, where, tarfile.XHDTYPE), "member"),
        "a 900 MiB GNU long name": Hostile(huge_header(lab, where, tarfile.GNUTYPE_LONGNAME),
                                           "member"),
        "PAX size=99999999999999999999": Hostile(
            pax_ibm(lab, where, "size-huge", {"size": "9" * 20}), "member"),
        "PAX size=-1": Hostile(pax_ibm(lab, where, "size-negative", {"size": "-1"}), "member"),
        "GNU.sparse 1.0 realsize=-1": Hostile(sparse_10_realsize(lab, where, "-1", False),
                                              "member"),
        "GNU.sparse 1.0 realsize=-1 with a map": Hostile(
            sparse_10_realsize(lab, where, "-1", True), "member"),
        "GNU.sparse 1.0 realsize=10^20 with a map": Hostile(
            sparse_10_realsize(lab, where, "9" * 20, True), "member"),
        "a FIFO": Hostile(non_regular(lab, where, "fifo", tarfile.FIFOTYPE), "member"),
        "a directory": Hostile(non_regular(lab, where, "dir", tarfile.DIRTYPE), "member"),
        "a character device": Hostile(non_regular(lab, where, "chr", tarfile.CHRTYPE), "member"),
        "a block device": Hostile(non_regular(lab, where, "blk", tarfile.BLKTYPE), "member"),
        "a symbolic link": Hostile(non_regular(lab, where, "sym", tarfile.SYMTYPE, "/etc/passwd"),
                                   "member"),
        "a hard link": Hostile(non_regular(lab, where, "lnk", tarfile.LNKTYPE, CANARY_MEMBER),
                               "member"),
        "a contiguous file": Hostile(non_regular(lab, where, "cont", tarfile.CONTTYPE,
                                                 data=lab.members[lab.ibm_member]), "member"),
    }
    return made


# -- running the command line, measured ------------------------------------------------------

@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes, the kernel's high-water mark of the child

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def start_measured(args: list[str], cwd: Path, env: dict[str, str], out: Path) -> tuple:
    """`python secure_ohlcv_cli.py ARGS` in a new interpreter under the address-space
    limit; its output goes to files (no pipe to fill)."""
    stdout, stderr = open(out.with_suffix(".out"), "wb"), open(out.with_suffix(".err"), "wb")
    proc = subprocess.Popen([sys.executable, str(CLI), *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                            preexec_fn=_limit_address_space)
    stdout.close()
    stderr.close()
    return proc, out


def wait_measured(started: tuple) -> Run:
    """Wait for the child with wait4: its exit code and its own ru_maxrss (KiB on Linux)."""
    proc, out = started
    deadline = time.monotonic() + CHILD_TIMEOUT
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(proc.returncode, out.with_suffix(".out").read_text(errors="replace"),
               out.with_suffix(".err").read_text(errors="replace"), usage.ru_maxrss * 1024)


def run_measured(jobs: dict[str, tuple[list[str], Path, dict[str, str]]], outputs: Path,
                 parallel: int = 2) -> dict[str, Run]:
    """Each job in its own measured child, `parallel` at a time."""
    outputs.mkdir(exist_ok=True)
    results: dict[str, Run] = {}
    names = list(jobs)
    for start in range(0, len(names), parallel):
        batch = names[start:start + parallel]
        started = {name: start_measured(*jobs[name], outputs / f"run-{start + i}")
                   for i, name in enumerate(batch)}
        for name in batch:
            results[name] = wait_measured(started[name])
    return results


def mb(size: int) -> float:
    return round(size / MIB, 1)


# =========================================================================================
# Memory bombs and malformed headers
# =========================================================================================

def test_hostile_archives_exit_5_naming_the_archive_in_bounded_memory(tmp_path, figures):
    """Every hostile archive above: verify and recover exit 5 (never 1, never "internal
    error"), name the archive, store nothing from a hostile member, restore only genuine
    bytes, write nothing outside the store, and peak under PEAK_RSS_BOUND."""
    lab = ArchiveLab(tmp_path)
    where = tmp_path / "probe"
    where.mkdir()
    archives = hostile_archives(lab, where)
    site = lab.site
    lab.damage()
    baseline = site.files()
    copies = {name: shutil.copytree(site.cwd, tmp_path / "copies" / f"{i:02d}", symlinks=True)
              for i, name in enumerate(archives)}
    excluded = tuple(p for c in [site.cwd, *copies.values()]
                     for p in (c / "data", c / "state", c / "secure_downloader.log"))
    before = snapshot(tmp_path, exclude=excluded + (where, tmp_path / "runs"))
    jobs = {"genuine verify": (["--verify-backup", "--all", str(lab.archive)], site.cwd, site.env())}
    for name, hostile in archives.items():
        jobs[f"verify {name}"] = (["--verify-backup", "--all", str(hostile.archive)], site.cwd,
                                  site.env())
        jobs[f"recover {name}"] = (["--recover", "--from-backup", str(hostile.archive)],
                                   copies[name], site.env())
    runs = run_measured(jobs, tmp_path / "runs")
    after = snapshot(tmp_path, exclude=excluded + (where, tmp_path / "runs"))

    broken: dict[str, str] = {}
    genuine = runs.pop("genuine verify")
    assert genuine.code == 0, genuine.text
    for job, run in runs.items():
        command, name = job.split(" ", 1)
        hostile = archives[name]
        wrong = []
        if run.code != 5:
            wrong.append(f"exit {run.code}")
        if "internal error" in run.text or "Traceback" in run.text:
            wrong.append("internal error")
        if hostile.archive.name not in run.text:
            wrong.append("the archive is not named")
        if run.peak_rss >= PEAK_RSS_BOUND:
            wrong.append(f"peak RSS {mb(run.peak_rss)} MB")
        if command == "recover":
            current = {p.relative_to(copies[name] / "data").as_posix(): p.read_bytes()
                       for p in (copies[name] / "data").glob("??/*.fernet")}
            changed = {rel for rel in current.keys() | baseline.keys()
                       if current.get(rel) != baseline.get(rel)}
            if any(current.get(rel) != lab.originals.get(rel) for rel in changed):
                wrong.append("stored bytes that are not the backed-up ones")
            if hostile.kind != "member" and changed:
                wrong.append(f"stored {sorted(changed)} from an archive with no usable member")
            if lab.ibm_member.removeprefix("data/") in current:
                wrong.append("restored the hostile member")
        if wrong:
            broken[job] = f"{', '.join(wrong)}: {run.text.strip()[-300:]!r}"
    if after != before:
        broken["outside the stores"] = str(sorted(set(after.items()) ^ set(before.items()))[:4])

    peaks = {job: mb(run.peak_rss) for job, run in runs.items()}
    figures.record("hostile/archive-bombs", tried=len(runs), held=len(runs) - len(broken),
                   notes=f"archives: {sorted(archives)}; genuine verify peak "
                         f"{mb(genuine.peak_rss)} MB; bound {mb(PEAK_RSS_BOUND)} MB",
                   peak_rss_mb_max=max(peaks.values()), genuine_verify_rss_mb=mb(genuine.peak_rss),
                   peak_rss_mb=peaks)
    assert not list(lab.outside.iterdir()), "something was written to the outside directory"
    if broken:
        pytest.fail("hostile archives not refused in bounded memory:\n  "
                    + "\n  ".join(f"{job}: {why}" for job, why in broken.items()), pytrace=False)


# =========================================================================================
# A rolled-back archive: an old archive copied under a newer name
# =========================================================================================

def archive_name(when: datetime) -> str:
    return f"ohlcv-backup-{when:%Y%m%dT%H%M%S%fZ}.tar"


def aged(site, archive: Path, days: int) -> Path:
    """`archive` as if written `days` ago: its manifest's time and its name moved back
    together (sealed again with the site's key, as the writer would have sealed it)."""
    ring = site.ring()
    members = read_members(archive)
    manifest = json.loads(ring.decrypt(dict((i.name, d) for i, d in members)[MANIFEST_MEMBER]))
    when = datetime.fromisoformat(manifest["created_at"]) - timedelta(days=days)
    manifest["created_at"] = when.isoformat()
    sealed = ring.encrypt(json.dumps(manifest).encode())
    target = archive.with_name(archive_name(when))
    write_parts(target, [part for info, data in members
                         for part in member(info.name, sealed if info.name == MANIFEST_MEMBER
                                            else data)])
    os.chmod(target, 0o600)
    archive.unlink()
    return target


def test_a_rolled_back_archive_is_flagged_not_newest_and_pruned_by_its_true_age(tmp_path, figures):
    site = headless_site(tmp_path, OHLCV_BACKUP_KEEP="2")
    site.put(sample_datasets())
    old = aged(site, site.backup(), 30)
    real_newest = site.backup()
    rolled = site.backup_dir / archive_name(datetime.now(UTC) + timedelta(days=1))
    shutil.copy2(old, rolled)  # the attacker's copy: newest by name, forever
    held = []

    flagged = site.cli("--verify-backup", "--all", str(rolled))
    held.append(flagged.returncode == 5 and rolled.name in flagged.stdout
                and "rolled-back" in flagged.stdout)
    default = site.cli("--verify-backup")
    held.append(default.returncode == 0 and default.stdout.startswith(real_newest.name)
                and rolled.name in default.stderr and "rolled-back" in default.stderr)
    backup = site.cli("backup")
    kept = backup_archives(site.backup_dir)
    held.append(backup.returncode == 0 and real_newest in kept and len(kept) == 2
                and rolled not in kept and not old.exists()
                and rolled.name in backup.stderr and "rolled-back" in backup.stderr)

    figures.record("hostile/rolled-back-archive", tried=3, held=sum(held),
                   notes="verify of the copy, default verify, backup's pruning")
    assert held == [True, True, True], (
        f"verify ROLLED: {flagged.returncode} {flagged.stdout!r}\n"
        f"default verify: {default.returncode} {default.stdout!r} {default.stderr!r}\n"
        f"backup: {backup.returncode} {backup.stdout!r} {backup.stderr!r}; kept {kept}")


# =========================================================================================
# Each problem once; remove-key reads headers and manifests only
# =========================================================================================

def flip_in(data: bytes) -> bytes:
    return data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:]


def test_verify_all_reports_each_spoiled_member_once(tmp_path, figures):
    """`--verify-backup --all` of an archive with one member spoiled (a flipped byte, a
    member deleted, one of the wrong size, one made a link or a sparse file) names that
    member in exactly one problem: a member's fault is not counted twice."""
    lab = ArchiveLab(tmp_path)
    where = tmp_path / "probe"
    where.mkdir()
    cases = {}
    for name in [*datasets_of(lab.archive), CANARY_MEMBER]:
        token, slug = lab.members[name], name.replace("/", "_")
        for how, parts in (("flipped", member(name, flip_in(token))),
                           ("deleted", []),
                           ("longer", member(name, token + b"A")),
                           ("a link", member(name, b"", kind=tarfile.SYMTYPE, linkname="x")),
                           ("sparse", member(name, token,
                                             pax={"GNU.sparse.map": f"0,{len(token)}"}))):
            path = where / f"{slug}-{how.replace(' ', '-')}.tar"
            replaced = genuine_parts(lab.archive, {name: parts or [b""]})
            cases[f"{name} {how}"] = (name, write_parts(path, replaced))
    broken = {}
    for case, (name, archive) in cases.items():
        problems = verify_backup(archive, lab.ring, None).problems
        named = [p for p in problems if p.split(": ", 1)[0] == name]
        if len(named) != 1 or len(problems) != 1:
            broken[case] = problems
    figures.record("hostile/archive-problems-once", tried=len(cases), held=len(cases) - len(broken))
    assert not broken, f"a spoiled member not reported exactly once: {broken}"


def test_remove_key_reads_only_headers_and_manifests(tmp_path, figures):
    """remove-key lists the archives that need a retired key from their manifests: an
    archive whose members claim a gigabyte each costs it no memory."""
    site = headless_site(tmp_path)
    site.put(sample_datasets())
    retired = site.ring().primary.fingerprint
    archive = site.backup()
    bomb = claimed_gib(archive, tmp_path, MAX_MEMBER_BYTES)
    os.replace(bomb, archive)
    site.app().rotate_key()

    run = run_measured({"remove-key": (["remove-key", retired], site.cwd, site.env())},
                       tmp_path / "runs")["remove-key"]

    figures.record("hostile/remove-key-bomb", tried=1, held=int(
        run.code == 1 and run.peak_rss < PEAK_RSS_BOUND), peak_rss_mb=mb(run.peak_rss))
    assert run.code == 1 and "internal error" not in run.text, run.text
    assert f"needs {retired} (or could not be read): {archive}" in run.stdout, run.stdout
    assert run.peak_rss < PEAK_RSS_BOUND, mb(run.peak_rss)


# =========================================================================================
# Hostile PAX records, property-based
# =========================================================================================

PAX_KEYS = ("size", "path", "linkpath", "mtime", "uid", "uname", "hdrcharset",
            "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.realsize", "GNU.sparse.size",
            "GNU.sparse.map", "GNU.sparse.name", "GNU.sparse.offset", "GNU.sparse.numbytes",
            "GNU.sparse.numblocks")
PAX_VALUES = st.one_of(
    st.sampled_from(["9" * 20, "-1", "0", "1e400", "nan", "", "1,2,3", "-5,10", "0,99999999999",
                     "BINARY", IBM_LIKE, "../evil.fernet", "/etc/x", "1073741825", "\x00"]),
    st.integers(-2**70, 2**70).map(str), st.text(max_size=12))


def test_hostile_pax_records_are_refused_never_a_crash(tmp_path, figures):
    """Any PAX records on any member (sizes of 10^20 or -1, sparse maps that do not add
    up, names, link targets, charsets): verify raises nothing outside our errors, and
    calls the archive sound only when every member is still the one backed up."""
    lab = ArchiveLab(tmp_path)
    names = list(lab.members)
    path = tmp_path / "pax.tar"

    def check(case: tuple[int, dict[str, str]]) -> tuple[str, str] | None:
        index, records = case
        target = names[index % len(names)]
        write_parts(path, genuine_parts(lab.archive, {
            target: member(target, lab.members[target], pax=records)}))
        shown = f"{target} with {records!r}"[:160]
        try:
            report = verify_backup(path, lab.ring, None)
        except OHLCVError:
            return None
        except Exception as exc:  # noqa: BLE001 - the property is about exactly this
            return f"verify_backup raised {crash_kind(exc)}", shown
        if report.sound:  # then tarfile alone must read the very members backed up
            try:
                held = {info.name: data for info, data in read_members(path)}
            except Exception as exc:  # noqa: BLE001
                return "verify called sound an archive tarfile cannot read", f"{shown}: {exc}"
            if held != lab.members:
                return "verify called an altered archive sound", shown
        return None

    cases = st.tuples(st.integers(0, 100), st.dictionaries(st.sampled_from(PAX_KEYS), PAX_VALUES,
                                                           min_size=1, max_size=4))
    run_property(cases, check, figures, "hostile/archive-pax-records", budget=ARCHIVE_EXAMPLES,
                 examples=[(0, {"size": "9" * 20}),
                           (0, {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                "GNU.sparse.realsize": "-1"}),
                           (0, {"GNU.sparse.map": "1,2,3"}), (0, {"size": "-1"})])
