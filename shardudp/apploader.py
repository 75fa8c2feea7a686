"""Loading the APP: ``MODULE:ATTR`` to a protocol factory, and what went wrong, where.

Used by the worker (to build its protocols) and by ``shardudp check`` (to
import them exactly as a worker will, without building anything). Errors name
the phase (import, build, startProtocol) and the ``file:line`` in the user's
code, so a boot failure is one line the operator can act on.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import os
import sysconfig
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Final

from .config import Listener
from .errors import ShardUDPError


def _package_dir(name: str) -> str:
    """Where package ``name`` lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    origin = spec.origin if spec is not None and spec.origin else name
    return os.path.dirname(origin) + os.sep


#: Where code that is not the user's lives (computed before dropping privileges).
_NOT_USER: Final = ("<", os.path.dirname(__file__) + os.sep, _package_dir("twisted"))
_STDLIB: Final = tuple({sysconfig.get_path(k) + os.sep for k in ("stdlib", "platstdlib")})


class AppError(ShardUDPError):
    """The APP cannot be imported, built or started.

    The text reads after the APP's name ("APP 'm:P' failed in import at
    ..."); ``cause`` is what the APP raised, if it raised.
    """

    def __init__(self, problem: str, cause: BaseException | None = None) -> None:
        super().__init__(problem)
        self.cause = cause


def raised(phase: str, exc: BaseException) -> AppError:
    """An AppError for ``exc``, raised by the APP in ``phase``, naming the user's file:line."""
    where = _user_frame(exc)
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return AppError(f"failed in {phase}{f' at {where}' if where else ''}: {what}", exc)


def _user_frame(exc: BaseException) -> str | None:
    """``file:line`` of the innermost frame of ``exc`` in the user's code.

    That is any frame outside shardudp, Twisted, importlib and the standard
    library (a library installed in site-packages counts as the user's).
    """
    if isinstance(exc, SyntaxError) and exc.filename:  # raised by the compiler: no frame
        return f"{exc.filename}:{exc.lineno}"
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        path = frame.f_code.co_filename
        if path.startswith(_NOT_USER) or (path.startswith(_STDLIB) and "-packages" not in path):
            continue
        where = f"{path}:{lineno}"
    return where


def unreadable(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception in its cause chain says a file could not be read.

    An APP directory the worker's user may not list shows up as
    ModuleNotFoundError, an unreadable file as PermissionError.
    """
    for _ in range(16):  # a cause chain may loop
        if exc is None:
            return False
        if isinstance(exc, ImportError) or (isinstance(exc, OSError)
                                            and exc.errno in (errno.EACCES, errno.EPERM)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_app(spec: str) -> Callable[[], Any]:
    """Resolve ``module:attr`` to a zero-argument protocol factory."""
    from twisted.internet.protocol import AbstractDatagramProtocol

    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except BaseException as exc:  # an APP calling sys.exit() at import still gets a reason
        raise raised("import", exc) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppError(f"names nothing: module {module_name!r} has no attribute {attr!r}") \
                from None
    if isinstance(obj, type) and not issubclass(obj, AbstractDatagramProtocol):
        raise AppError("is a class but not a DatagramProtocol subclass")
    if not callable(obj):
        raise AppError("is neither a DatagramProtocol subclass nor a callable")

    def build() -> Any:
        try:
            proto = obj()
        except BaseException as exc:
            raise raised("build", exc) from None
        if not isinstance(proto, AbstractDatagramProtocol):
            raise AppError(f"returned {type(proto).__name__}, not a DatagramProtocol instance")
        return proto

    return build


@contextlib.contextmanager
def booting(listener: Listener) -> Iterator[None]:
    """Name the APP and the listener in an AppError raised inside."""
    try:
        yield
    except AppError as exc:
        raise AppError(f"APP {listener.app!r} (listener {listener.name}) {exc}",
                       exc.cause) from None
