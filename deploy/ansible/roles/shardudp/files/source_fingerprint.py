"""Fingerprint a shardudp source tree and compare it with the installed one.

Usage: source_fingerprint.py SOURCE_DIR STAMP_FILE [PIP_EXTRA_ARGS]

Prints one JSON object: {"stale": bool, "stamp": str}. "stamp" is the text the
role writes to STAMP_FILE after a successful install; "stale" is true when
STAMP_FILE is missing or differs, i.e. when pip must run.

Why: `pip install DIR` rebuilds and reinstalls every time, so without this
the role would never be idempotent. Runs on the managed host with the plain
interpreter: standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

# Build products and caches: pip's own in-tree build writes build/ and
# *.egg-info, which must not make the next run look stale.
SKIP_DIRS = frozenset({
    ".git", ".hg", ".svn", "__pycache__", "build", "dist", ".venv", "venv",
    ".tox", ".nox", ".mypy_cache", ".ruff_cache", ".pytest_cache", "node_modules",
})
SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")


def fingerprint(root: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.endswith(SKIP_SUFFIXES)
        )
        for name in sorted(filenames):
            if name.endswith(SKIP_SUFFIXES):
                continue
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path):
                continue
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
            count += 1
    return digest.hexdigest(), count


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    source, stamp_file = argv[1], argv[2]
    extra = argv[3] if len(argv) == 4 else ""
    if not os.path.isdir(source):
        print(f"source_fingerprint: {source}: not a directory", file=sys.stderr)
        return 1
    digest, count = fingerprint(source)
    # Plain lines, not JSON: Ansible would turn a JSON-looking string into a dict.
    stamp = f"source={source}\npip_extra_args={extra}\nfiles={count}\nsha256={digest}\n"
    try:
        with open(stamp_file) as f:
            old = f.read()
    except OSError:
        old = None
    print(json.dumps({"stale": old != stamp, "stamp": stamp}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
