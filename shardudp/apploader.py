"""Loading the APP: ``MODULE:ATTR`` to a protocol factory, and what went wrong, where.

Used by the worker (to build its protocols) and by ``shardudp check`` (to
load them exactly as a worker will: it builds a factory's protocol, never a
class's). Errors name the phase (import, build, startProtocol) and the
``file:line`` in the user's code, so a boot failure is one line the operator
can act on; ``check`` prints the very line ``run`` would.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import importlib.util
import inspect
import os
import sys
import sysconfig
import traceback
from collections.abc import Iterator
from typing import Any, Final

from . import readymade, wire
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


def raised(phase: str, exc: BaseException, defined: str | None = None) -> AppError:
    """An AppError for ``exc``, raised by the APP in ``phase``, naming the user's file:line
    (else ``defined``, where the APP's callable is defined: a call that failed before
    entering it has no frame of the user's)."""
    where = _user_frame(exc) or defined
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


def _defined_at(obj: Any) -> str | None:
    """``file:line`` where the APP's callable ``obj`` is defined, if Python can say."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    with contextlib.suppress(ValueError):  # a __wrapped__ cycle
        obj = inspect.unwrap(obj)
    if isinstance(obj, type):
        for klass in obj.__mro__:  # the __init__ it runs, if the user's
            init = getattr(vars(klass).get("__init__"), "__code__", None)
            if init is not None:
                if not init.co_filename.startswith(_NOT_USER):
                    return f"{init.co_filename}:{init.co_firstlineno}"
                break
        try:
            return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
        except (OSError, TypeError):
            return None
    # A function, else an instance of a class with a __call__ in Python.
    code = getattr(obj, "__code__", None) or getattr(type(obj).__call__, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code is not None else None


def _builds_class(obj: Any) -> bool:
    """Whether calling ``obj`` instantiates a class (possibly through partials)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return isinstance(obj, type)


class Factory:
    """The APP, resolved: calling it builds one protocol (the worker's build phase).

    ``builds_class`` tells ``check`` whether the result's type is known without
    building it: a class's is, a factory's only by calling it.
    """

    def __init__(self, obj: Any, source: str = "?") -> None:
        self.obj = obj
        self.builds_class = _builds_class(obj)
        #: The file its module was imported from (``check`` shows it).
        self.source = source

    def __call__(self) -> Any:
        from twisted.internet.protocol import AbstractDatagramProtocol

        try:
            proto = self.obj()
        except BaseException as exc:
            raise raised("build", exc, _defined_at(self.obj)) from None
        if not isinstance(proto, AbstractDatagramProtocol):
            where = _defined_at(self.obj)
            raise AppError(f"failed in build{f' at {where}' if where else ''}: returned "
                           f"{type(proto).__name__}, not a DatagramProtocol instance (an APP "
                           "names a DatagramProtocol subclass or a callable returning an "
                           "instance)")
        return proto


def _needs_arguments(obj: Any) -> str | None:
    """Why ``obj`` cannot be called without arguments, found without calling it."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # no signature to read (some builtins): call it and see
        return None
    try:
        sig.bind()
    except TypeError as exc:
        name = getattr(obj, "__qualname__", None) or type(obj).__name__
        return (f"{name}{sig} cannot be called without arguments ({exc}): an APP names a "
                "DatagramProtocol subclass or a callable returning an instance, and a "
                "worker calls it with none")
    return None


def import_from_cwd() -> None:
    """Like gunicorn: APP modules in the current directory import without PYTHONPATH.

    Called by a worker (and by ``check``'s child) after it dropped privileges,
    never by the master: as root it must not import from a directory another
    user may write (``shardudp._pathguard``).
    """
    try:
        cwd = os.getcwd()
    except OSError:  # not ours to read any more (another user now): nothing to add
        return
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def load_app(spec: str) -> Factory:
    """Resolve ``module:attr`` (or a ready-made app's short name) to a zero-argument
    protocol factory, building nothing.

    What can be known without building is checked here, by the worker and by
    ``check`` alike: the attribute exists, a class is a DatagramProtocol
    subclass, and the callable takes no arguments.
    """
    from twisted.internet.protocol import AbstractDatagramProtocol

    spec = readymade.expand(spec)
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except BaseException as exc:  # an APP calling sys.exit() at import still gets a reason
        error = raised("import", exc)
        # Not found: the APP's module or a package of it, not what that module imports.
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        hint = readymade.moved_hint(spec) if missing and (
            module_name == missing or module_name.startswith(missing + ".")) else None
        if hint is not None:
            error = AppError(f"{error}; {hint}", exc)
        raise error from None
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
    why = _needs_arguments(obj)
    if why is not None:
        where = _defined_at(obj)
        raise AppError(f"failed in build{f' at {where}' if where else ''}: {why}")
    module = sys.modules.get(module_name)
    return Factory(obj, getattr(module, "__file__", None) or module_name)


def boot_reason(exc: AppError, run_as: tuple[int, int] | None) -> str:
    """The one line a boot failure is reported as, by ``run`` and ``check`` alike."""
    reason = str(exc)
    if run_as is not None and unreadable(exc.cause):
        reason += (f" (the worker runs as uid {run_as[0]}: are the Python installation "
                   "and the APP readable by that user?)")
    return wire.BootFailed.bounded(reason).reason


@contextlib.contextmanager
def booting(listener: Listener) -> Iterator[None]:
    """Name the APP and the listener in an AppError raised inside."""
    try:
        yield
    except AppError as exc:
        raise AppError(f"APP {listener.app!r} (listener {listener.name}) {exc}",
                       exc.cause) from None
