"""As root, import nothing from where another user can write. Imported first, by the package.

A root master imports its own code after the command started; every
directory on ``sys.path`` (the current one included, which ``python -m`` puts
first) that another user could write into would let that user run code as
root by planting a module there. So, as root, such entries are dropped
before anything else is imported. The APP is imported only by workers,
after they dropped privileges (they put the current directory back then).

What Python itself imported before this package (its startup, ``runpy`` for
``-m``) is out of our reach: as root, start the ``shardudp`` command, or
``python -P -m shardudp``.
"""

from __future__ import annotations

import os
import stat
import sys


def writable_by_others(path: str) -> bool:
    """True if another user than root can change what ``path`` holds.

    The nearest existing directory (``path`` itself, or where a missing
    ``path`` would be made) must be writable by root alone: a sticky bit does
    not stop others creating entries in it. Above that, a sticky directory
    (``/tmp``) is fine: others cannot rename or remove root's entries there.
    """
    current = os.path.abspath(path)
    nearest = True
    while True:
        try:
            st = os.stat(current)
        except OSError:
            st = None  # missing: whoever may write its parent decides
        if st is not None:
            sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and not nearest
            if st.st_uid != 0 or (st.st_mode & 0o022 and not sticky):
                return True
            nearest = False
        parent = os.path.dirname(current)
        if parent == current:
            return False
        current = parent


def secure_sys_path() -> list[str]:
    """As root, drop every ``sys.path`` entry another user could write; return them."""
    if os.geteuid() != 0:
        return []
    dropped = [e for e in sys.path if writable_by_others(e or os.getcwd())]
    sys.path[:] = [e for e in sys.path if e not in dropped]
    return dropped


secure_sys_path()
