"""What a root master counts as a path another user could plant a module or a link in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardudp._pathguard import writable_by_others


@pytest.fixture
def root_owned(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("ownership by root is what is checked: needs root")
    os.chmod(tmp_path, 0o755)
    return tmp_path


def test_a_root_only_directory_is_safe_even_below_a_sticky_one(root_owned: Path) -> None:
    sticky = root_owned / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    private = sticky / "app"
    private.mkdir(mode=0o755)
    assert not writable_by_others(str(root_owned))
    assert not writable_by_others(str(private))  # /tmp/app, root's own: nobody can swap it


def test_a_sticky_world_writable_directory_itself_is_not_safe(root_owned: Path) -> None:
    sticky = root_owned / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    # Anyone may create entries in /tmp: a module planted there would be imported.
    assert writable_by_others(str(sticky))
    # A missing entry would be made there, by whoever comes first.
    assert writable_by_others(str(sticky / "missing" / "deeper"))


def test_group_or_other_write_or_another_owner_anywhere_above_is_not_safe(
        root_owned: Path) -> None:
    below = root_owned / "a" / "b"
    below.mkdir(parents=True)
    assert not writable_by_others(str(below))
    os.chmod(root_owned / "a", 0o775)
    assert writable_by_others(str(below))
    os.chmod(root_owned / "a", 0o755)
    os.chown(root_owned / "a", 65534, 65534)
    assert writable_by_others(str(below))
