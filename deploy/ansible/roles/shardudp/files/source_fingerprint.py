"""Fingerprint what pip would package from a source tree, and compare it with
the fingerprint recorded at the last install.

Usage: source_fingerprint.py SOURCE_DIR STAMP_FILE [PIP_EXTRA_ARGS]

Prints one JSON object: {"stale": bool, "stamp": str}. "stamp" is the text the
role writes to STAMP_FILE after a successful install; "stale" is true when
STAMP_FILE is missing or differs, i.e. when pip must run.

Why: `pip install DIR` rebuilds and reinstalls every time, so without this
the role would never be idempotent. Only what the package is built from
counts: the build files, the readme pyproject names and the package
directories. A checkout's tests/, bench/ results or deploy/ files changing
must not reinstall and restart a production server. Runs on the managed host
with the interpreter that makes the venv (3.11 or newer, for tomllib),
standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tomllib

BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in")
# Bytecode, and build products: pip's in-tree build writes build/ and
# *.egg-info; `setup.py build_ext --inplace` puts the extension next to its
# sources. None of them is what the wheel is built from.
SKIP_DIRS = frozenset({"__pycache__", "build", "dist"})
SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".egg-info")


def _package_dir(package: str, mapping: dict[str, str]) -> str:
    """Where setuptools finds ``package``: its ``package-dir`` mapping (the longest
    mapped prefix, e.g. ``"shardudp.workers" = "workers"``), else under the root's."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in mapping:
            return "/".join([mapping[prefix].strip("/"), *parts[i:]])
    return "/".join([p for p in (mapping.get("", "").strip("/"),) if p] + parts)


def packaged_paths(root: str) -> list[str]:
    """Files and directories (relative to ``root``) that the built package comes from."""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    paths = [name for name in BUILD_FILES if os.path.isfile(os.path.join(root, name))]
    readme = meta.get("project", {}).get("readme")
    if isinstance(readme, dict):
        readme = readme.get("file")
    if isinstance(readme, str):
        paths.append(readme)
    setuptools = meta.get("tool", {}).get("setuptools", {})
    packages = setuptools.get("packages")
    if isinstance(packages, list):
        mapping = setuptools.get("package-dir")
        dirs = sorted({_package_dir(p, mapping if isinstance(mapping, dict) else {})
                       for p in packages})
        # A package inside another listed one is walked with it.
        paths.extend(d for d in dirs
                     if not any(d.startswith(other + "/") for other in dirs if other != d))
    else:
        # No explicit list: what setuptools' discovery would find (src layout,
        # or top-level packages).
        top = sorted(os.listdir(root))
        paths.extend(["src"] if "src" in top else [
            d for d in top if os.path.isfile(os.path.join(root, d, "__init__.py"))])
    return paths


def fingerprint(root: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    count = 0

    def add(path: str) -> None:
        nonlocal count
        digest.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
        count += 1

    for rel in packaged_paths(root):
        top = os.path.join(root, rel)
        if os.path.isfile(top):
            add(top)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(
                d for d in dirnames if d not in SKIP_DIRS and not d.endswith(SKIP_SUFFIXES))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not name.endswith(SKIP_SUFFIXES) and os.path.isfile(path):
                    add(path)
    return digest.hexdigest(), count


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    source, stamp_file = argv[1], argv[2]
    extra = argv[3] if len(argv) == 4 else ""
    if not os.path.isfile(os.path.join(source, "pyproject.toml")):
        print(f"source_fingerprint: {source}: no pyproject.toml there", file=sys.stderr)
        return 1
    try:
        digest, count = fingerprint(source)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"source_fingerprint: {source}: {exc}", file=sys.stderr)
        return 1
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
