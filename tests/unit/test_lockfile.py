"""requirements.lock, the image's pinned dependencies, agrees with pyproject.toml.

The lock is generated (see the Dockerfile's header for the command) and cannot be
regenerated offline, so this test checks what can be checked without the package index:
every runtime dependency of pyproject.toml is locked at a version its specifier allows,
the lock names no direct dependency pyproject.toml no longer has, every entry is pinned
with hashes, and the Dockerfile installs exactly the lock.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
DOCKERFILE = ROOT / "Dockerfile"
PROJECT_VIA = "flowlog-shipper (pyproject.toml)"

_ENTRY = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<op>===?|[<>~!]=?)(?P<version>[^\s;\\]+)")


@dataclass
class Locked:
    """One entry of the lock: name, pinned version, hashes, and who needs it (via)."""

    name: str
    op: str
    version: str
    hashes: list[str] = field(default_factory=list)
    via: list[str] = field(default_factory=list)


def parse_lock(text: str) -> dict[str, Locked]:
    """Parse a `uv pip compile --generate-hashes` lock into entries by canonical name."""
    entries: dict[str, Locked] = {}
    cur: Locked | None = None
    in_via = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            if line.startswith("#"):
                continue
            m = _ENTRY.match(line)
            assert m, f"requirements.lock: cannot parse {line!r}"
            cur = Locked(canonicalize_name(m["name"]), m["op"], m["version"])
            entries[cur.name] = cur
            in_via = False
            continue
        assert cur is not None, f"requirements.lock: indented line before any entry: {line!r}"
        s = line.strip()
        if s.startswith("--hash="):
            cur.hashes.append(s.removeprefix("--hash=").rstrip(" \\"))
        elif s == "# via":
            in_via = True
        elif s.startswith("# via "):
            cur.via.append(s.removeprefix("# via ").strip())
            in_via = False
        elif in_via and s.startswith("#   "):
            cur.via.append(s.removeprefix("#   ").strip())
    return entries


def project_requirements() -> dict[str, Requirement]:
    """pyproject.toml's runtime dependencies by canonical name."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps]
    return {canonicalize_name(r.name): r for r in reqs}


def regenerate_hint() -> str:
    """The regeneration command, as the lock's own header records it."""
    for line in LOCK.read_text().splitlines()[:5]:
        if "uv pip compile" in line:
            return f"regenerate the lock: {line.lstrip('# ').strip()}"
    return "regenerate the lock (command in the Dockerfile's header)"


class TestLockMatchesPyproject:
    """The lock is current for pyproject.toml's runtime dependencies."""

    def test_every_dependency_locked_within_its_specifier(self) -> None:
        """Each pyproject.toml dependency is in the lock at a version it allows."""
        lock = parse_lock(LOCK.read_text())
        problems = []
        for name, req in project_requirements().items():
            entry = lock.get(name)
            if entry is None:
                problems.append(f"{req} is not in requirements.lock")
            elif not req.specifier.contains(entry.version, prereleases=True):
                problems.append(f"{req} but requirements.lock has {name}=={entry.version}")
        assert problems == [], "\n".join([*problems, regenerate_hint()])

    def test_lock_has_no_stale_direct_dependency(self) -> None:
        """Every entry the lock records as wanted by pyproject.toml is still a dependency
        there (a removed dependency must leave the lock too)."""
        lock = parse_lock(LOCK.read_text())
        direct = {n for n, e in lock.items() if PROJECT_VIA in e.via}
        stale = sorted(direct - set(project_requirements()))
        missing_via = sorted(set(project_requirements()) - direct)
        assert stale == [] and missing_via == [], (
            f"in the lock as direct but not in pyproject.toml: {stale}; "
            f"in pyproject.toml but not direct in the lock: {missing_via}; {regenerate_hint()}")

    def test_every_entry_pinned_with_hashes(self) -> None:
        """Every lock entry is an exact == pin with sha256 hashes (pip --require-hashes
        installs nothing else)."""
        lock = parse_lock(LOCK.read_text())
        assert lock, "requirements.lock has no entries"
        loose = [f"{e.name}{e.op}{e.version}" for e in lock.values() if e.op != "=="]
        unhashed = [e.name for e in lock.values()
                    if not e.hashes or not all(h.startswith("sha256:") for h in e.hashes)]
        assert loose == [] and unhashed == [], (loose, unhashed)

    def test_parser_reads_multi_line_via(self) -> None:
        """The lock parser keeps every name of a multi-line `# via` block, so a direct
        dependency that is also needed by another package is recognised."""
        text = ("# header\n"
                "h11==0.16.0 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n"
                "    # via\n    #   flowlog-shipper (pyproject.toml)\n    #   wsproto\n"
                "idna==3.20 ; sys_platform != 'win32' \\\n    --hash=sha256:cc\n"
                "    # via anyio\n")
        lock = parse_lock(text)
        assert lock["h11"].via == [PROJECT_VIA, "wsproto"]
        assert lock["h11"].hashes == ["sha256:aa", "sha256:bb"]
        assert (lock["idna"].version, lock["idna"].via) == ("3.20", ["anyio"])


class TestDockerfileUsesLock:
    """The image gets exactly the locked versions."""

    def test_dependencies_installed_from_lock_with_hashes(self) -> None:
        """The Dockerfile installs requirements.lock with --require-hashes and the project
        itself with --no-deps (nothing resolved again at build time)."""
        runs = [line for line in DOCKERFILE.read_text().splitlines()
                if line.startswith("RUN") and "pip install" in line]
        assert any("--require-hashes" in r and "-r requirements.lock" in r for r in runs), runs
        project = [r for r in runs if r.rstrip().endswith(" .")]
        assert project and all("--no-deps" in r for r in project), runs

    def test_lock_targets_the_image_python(self) -> None:
        """The lock was compiled for the Python minor version of the image's base."""
        header = LOCK.read_text().splitlines()[:5]
        m = re.search(r"--python-version (\d+\.\d+)", " ".join(header))
        assert m, f"requirements.lock header names no --python-version: {header}"
        bases = re.findall(r"^FROM python:(\d+\.\d+)", DOCKERFILE.read_text(), re.M)
        assert bases and set(bases) == {m[1]}, (bases, m[1])
