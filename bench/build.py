"""Compile the bench's C programs with the system cc into a cache directory.

Binaries are keyed by a hash of the source and the compiler command, so an
edited source rebuilds and nothing compiled is ever committed. The cache is
$SHARDUDP_BENCH_CACHE, else $XDG_CACHE_HOME/shardudp-bench, else
~/.cache/shardudp-bench.

    python -m bench.build            # build everything, print the paths
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

SOURCES: dict[str, Path] = {
    "loadgen": BENCH_DIR / "loadgen.c",
    "c_echo": BENCH_DIR / "servers" / "c_echo.c",
}

CFLAGS = ("-O2", "-std=c11", "-Wall", "-Wextra")


class BuildError(RuntimeError):
    """No compiler, or the source did not compile."""


def cache_dir() -> Path:
    explicit = os.environ.get("SHARDUDP_BENCH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shardudp-bench"


def find_cc() -> str | None:
    for name in (os.environ.get("CC") or "", "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def build(name: str) -> Path:
    """Return the path of the compiled program, compiling it if needed."""
    try:
        src = SOURCES[name]
    except KeyError:
        raise BuildError(f"unknown C program {name!r}; known: {', '.join(SOURCES)}") from None
    cc = find_cc()
    if cc is None:
        raise BuildError("no C compiler found (cc, gcc, clang; or set CC)")
    digest = hashlib.sha256()
    digest.update(src.read_bytes())
    digest.update(" ".join((cc, *CFLAGS)).encode())
    out = cache_dir() / f"{name}-{digest.hexdigest()[:16]}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: two concurrent builds (parallel
    # test runs) must never see a half-written binary.
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    proc = subprocess.run(
        [cc, *CFLAGS, "-o", str(tmp), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"{cc} failed on {src.name}:\n{proc.stderr.strip()}")
    os.replace(tmp, out)
    return out


def main() -> int:
    status = 0
    for name in SOURCES:
        try:
            print(f"{name}: {build(name)}")
        except BuildError as e:
            print(f"{name}: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
