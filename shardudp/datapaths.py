"""Which worker data paths this host can run, answered without Twisted.

The master resolves ``--datapath`` before it binds anything (an unavailable
one is a configuration error, and ``auto`` is logged as what it chose); the
worker's ``port.port_class`` maps the same answer to a port class.
"""

from __future__ import annotations

from typing import Any, Final

from shardudp import _pybatch
from shardudp.config import DATAPATHS as NAMES

__all__ = ["C_ENGINE", "NAMES", "engine", "missing", "resolve"]

try:
    from shardudp import _batchio  # type: ignore[attr-defined, unused-ignore]
except ImportError as _exc:  # no compiler at install time, or not Linux
    _batchio = None
    _C_MISSING = f"shardudp._batchio could not be imported ({_exc})"
else:
    _C_MISSING = ""

#: The C engine type, or None where the extension was not built.
C_ENGINE: Final[Any] = None if _batchio is None else _batchio.Engine


def missing() -> dict[str, str]:
    """Why each data path that cannot run here cannot."""
    why = {"c": _C_MISSING, "python": _pybatch.MISSING}
    return {name: reason for name, reason in why.items() if reason}


def resolve(datapath: str) -> str:
    """The data path ``datapath`` (a ``--datapath`` value) means on this host.

    ValueError for an unknown name, RuntimeError (saying why) for one that
    cannot run here.
    """
    gone = missing()
    if datapath == "auto":
        return next(name for name in NAMES if name not in gone)
    if not isinstance(datapath, str) or datapath not in NAMES:
        raise ValueError(f"unknown datapath {datapath!r}; expected one of auto, "
                         f"{', '.join(NAMES)}")
    if datapath in gone:
        hint = "; python-loop needs no recvmmsg" if datapath == "python" else ""
        raise RuntimeError(f"{datapath} cannot run here: {gone[datapath]}{hint}")
    return datapath


def engine(datapath: str) -> Any:
    """The batch engine type of ``c`` or ``python``; RuntimeError if it cannot run here."""
    resolve(datapath)
    return {"c": C_ENGINE, "python": _pybatch.Engine}[datapath]
