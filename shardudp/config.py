"""Settings, declared once. Pure: no I/O; the caller reads files and the env.

Each ``Setting`` below is the single declaration of an option: it feeds the
CLI flag, the TOML key, the ``SHARDUDP_*`` environment variable and the docs
table. Precedence: defaults < file < environment < command line. Listener
settings given at the top level (file, env or CLI) are defaults for every
listener; a key inside a ``[[listener]]`` table wins for that listener.
Listener addresses (``bind``, ``multicast``) named by a later source replace
an earlier source's listeners, the file's ``[[listener]]`` tables included.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal

from .errors import ConfigError
from .readymade import APPS, expand

#: "multicast" is a listener setting that only a multicast listener takes.
Scope = Literal["server", "listener", "multicast"]


@dataclasses.dataclass(frozen=True)
class Address:
    """A listener or endpoint address: an IP literal and a port."""

    host: str
    port: int

    @property
    def family_name(self) -> str:
        return "ipv6" if ":" in self.host else "ipv4"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# -- value parsers: each takes an untrusted value and raises ValueError naming the problem


def _int(lo: int, hi: int) -> Callable[[object], int]:
    def parse(v: object) -> int:
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"{v} is out of range [{lo}, {hi}]")
        return v

    return parse


#: setsockopt takes a C int.
_INT_MAX: Final = (1 << 31) - 1


def _float(lo: float, hi: float) -> Callable[[object], float]:
    def parse(v: object) -> float:
        f = v
        if isinstance(v, str):
            try:
                f = float(v)
            except ValueError:
                raise ValueError(f"expected a number, got {v!r}") from None
        if isinstance(f, bool) or not isinstance(f, int | float):
            raise ValueError(f"expected a number, got {v!r}")
        if not lo <= float(f) <= hi:
            raise ValueError(f"{v} is out of range [{lo:g}, {hi:g}]")
        return float(f)

    return parse


_SIZE_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _size(v: object) -> int:
    """Bytes: an integer, or a number with K, M or G (powers of 1024)."""
    text = str(v).strip().lower().removesuffix("ib").removesuffix("b") \
        if isinstance(v, str) else v
    if isinstance(text, str):
        m = re.fullmatch(r"(\d+)\s*([kmg]?)", text)
        if not m:
            raise ValueError(f"expected a size like 512M or 2G, got {v!r}")
        return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    return _int(0, 1 << 50)(text)


def _str(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v


_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})


def _bool(v: object) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {v!r}")


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(v: object) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}; got {v!r}")
        return str(v)

    return parse


def _workers(v: object) -> int | str:
    if v == "auto":
        return "auto"
    return _int(1, 1024)(v)


_APP_RE: Final = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _app(v: object) -> str:
    s = expand(_str(v))
    if not _APP_RE.match(s):
        raise ValueError(f"expected MODULE:ATTR (e.g. myapp:Echo) or a ready-made app "
                         f"({', '.join(APPS)}), got {s!r}")
    return s


_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")


def parse_ip(v: object) -> str:
    """An IP literal in canonical form; ValueError for hostnames and IPv4-mapped IPv6."""

    s = _str(v)
    try:
        ip = ipaddress.ip_address(s)
    except ValueError:
        raise ValueError(f"{s!r} is not an IP address (hostnames are not accepted)") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # The kernel serves it as IPv4 on an IPv6 socket: a second server there
        # would share a port that the duplicate-server check sees as different.
        raise ValueError(f"{s} is an IPv4-mapped IPv6 address: write it as {ip.ipv4_mapped}")
    return str(ip)


def _interface(v: object) -> str:
    host = parse_ip(v)
    ip = ipaddress.ip_address(host)
    if ip.is_multicast or ip == _BROADCAST:
        raise ValueError(f"{host} is not an interface address: give one of this host's addresses")
    return host


def parse_address(v: object) -> Address:
    """``HOST:PORT`` or ``[V6HOST]:PORT``; HOST must be an IP literal."""
    s = v if isinstance(v, str) else ""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", s) or re.fullmatch(r"([^:\[\]]+):(\d+)", s)
    if not m:
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {v!r}")
    host = parse_ip(m.group(1))
    if ":" in host and not s.startswith("["):
        raise ValueError(f"IPv6 addresses need brackets: [{host}]:PORT")
    return Address(host, _int(0, 65535)(int(m.group(2))))


def _unicast(v: object) -> Address:
    a = parse_address(v)
    ip = ipaddress.ip_address(a.host)
    if ip.is_multicast:
        raise ValueError(f"{a.host} is a multicast group: use --multicast (TOML: multicast), "
                         "not bind")
    if ip == _BROADCAST:
        raise ValueError(f"{a.host} is the broadcast address, not one of this host's: "
                         "bind 0.0.0.0 to receive broadcasts")
    return a


def _group(v: object) -> Address:
    a = parse_address(v)
    if not ipaddress.ip_address(a.host).is_multicast:
        raise ValueError(f"{a.host} is not a multicast group address")
    if a.port == 0:
        raise ValueError("a multicast listener needs a fixed port, not 0")
    return a


def _local_address(v: object) -> Address:
    """``HOST:PORT``, or ``PORT`` / ``:PORT`` meaning loopback: nothing is public unasked."""
    if (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, str) and re.fullmatch(r":?\d+", v)):
        return Address("127.0.0.1", _int(0, 65535)(str(v).lstrip(":")))
    if isinstance(v, str) and ":" not in v:
        raise ValueError(f"expected PORT, HOST:PORT or [IPV6]:PORT, got {v!r}")
    return parse_address(v)


def flag_of(key: str) -> str:
    """The command-line flag of setting ``key``."""

    return "--" + key.replace("_", "-")


def env_of(key: str) -> str:
    """The environment variable of setting ``key``."""

    return "SHARDUDP_" + key.upper()


@dataclasses.dataclass(frozen=True)
class Setting:
    """The single declaration of one option: its TOML key, flag, variable, parser and docs."""

    key: str
    scope: Scope
    parse: Callable[[object], Any]
    default: Any
    help: str
    metavar: str = ""
    #: On the command line, each occurrence adds a listener.
    repeat: bool = False
    #: A boolean: the command line has ``--key`` and ``--no-key`` and takes no value.
    switch: bool = False

    @property
    def flag(self) -> str:
        return flag_of(self.key)

    @property
    def env(self) -> str:
        return env_of(self.key)


#: The worker data paths (shardudp.datapaths says which run here); ``auto``
#: takes the first of c, python, python-loop that does.
DATAPATHS: Final = ("c", "python", "python-loop", "twisted")

SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("workers", "server", _workers, "auto",
            "Worker processes (slots), or 'auto' for the number of usable CPUs.", "N|auto"),
    Setting("timeout", "server", _float(0.5, 3600), 30.0,
            "Heartbeat deadline: a worker silent this long is killed and replaced.", "SECONDS"),
    Setting("graceful_timeout", "server", _float(0.1, 3600), 10.0,
            "How long a stopping worker may take before it is killed.", "SECONDS"),
    Setting("backoff_max", "server", _float(0.0, 3600), 30.0,
            "Cap of the exponential restart delay of a crash-looping slot.", "SECONDS"),
    Setting("steering", "server", _bool, True,
            "Attach the flow-steering program to unicast listeners (consistent flow-to-slot "
            "mapping, flows of unread slots served by the others); off leaves flows to the "
            "kernel's own hash.", switch=True),
    Setting("steer_grace", "server", _float(0.0, 60.0), 0.2,
            "How long a slot may go unread (no worker, not READY, not responding, its port "
            "closed) before its flows are steered to the slots that are read.", "SECONDS"),
    Setting("quarantine", "server", _float(0.0, 86400.0), 300.0,
            "How long a source is refused after datagrams from it killed two workers "
            "(0: never refuse).", "SECONDS"),
    Setting("max_worker_memory", "server", _size, 0,
            "Replace a worker whose resident memory passes this (its successor first, "
            "nothing lost), like uWSGI's reload-on-rss; 512M, 2G or bytes; 0: no limit.",
            "BYTES"),
    Setting("metrics", "server", _local_address, None,
            "Serve /metrics and /healthz on HOST:PORT; PORT alone means 127.0.0.1:PORT "
            "(port 0 picks one and logs it).", "HOST:PORT"),
    Setting("metrics_interval", "server", _float(0.0, 3600), 1.0,
            "How often workers report counters; 0 turns counting off.", "SECONDS"),
    Setting("datapath", "server", _choice("auto", *DATAPATHS), "auto",
            "Worker UDP port: batches via the C helper or via ctypes (python), one "
            "recvfrom per datagram (python-loop), or stock Twisted.",
            "|".join(("auto", *DATAPATHS))),
    Setting("log_level", "server", _choice("debug", "info", "warning", "error"), "info",
            "Log level of the master and the workers.", "LEVEL"),
    Setting("log_file", "server", _str, None,
            "Append logs to this file instead of stderr (reopened by `ctl reopen-logs`).",
            "PATH"),
    Setting("control", "server", _str, "auto",
            "Control socket path; 'auto' is under the runtime dir, 'none' disables it.",
            "PATH|auto|none"),
    Setting("user", "server", _str, None,
            "Run workers as this user (the master binds first, as root).", "USER"),
    Setting("group", "server", _str, None,
            "Run workers with this group (default: the user's primary group).", "GROUP"),
    Setting("pid_file", "server", _str, None,
            "Write the master's pid here; refuse to start over a live one.", "PATH"),
    Setting("app", "listener", _app, None,
            "The protocol: MODULE:ATTR naming a DatagramProtocol subclass or a factory, or a "
            "ready-made app by name (echo = shardudp.workers.echo:Echo, sink, helloer, "
            "multicast_ping, multicast_ping_client).", "MODULE:ATTR"),
    Setting("bind", "listener", _unicast, None,
            "Unicast listener address; repeat for more. Port 0 gives each worker a private "
            "socket that may connect().", "HOST:PORT", repeat=True),
    Setting("multicast", "listener", _group, None,
            "Multicast listener GROUP:PORT; repeat for more.", "GROUP:PORT", repeat=True),
    Setting("multicast_mode", "multicast", _choice("fanout", "single", "shard"), "shard",
            "Multicast delivery: every worker, exactly one worker, or one worker per source.",
            "fanout|single|shard"),
    Setting("multicast_interface", "multicast", _interface, None,
            "Interface address to join on and send from (default: the kernel's choice).",
            "ADDR"),
    Setting("multicast_ttl", "multicast", _int(0, 255), 1,
            "IP_MULTICAST_TTL / IPV6_MULTICAST_HOPS of what the listener sends to a group.",
            "HOPS"),
    Setting("multicast_loopback", "multicast", _bool, True,
            "Whether datagrams the listener sends to a group loop back to local sockets.",
            switch=True),
    Setting("rcvbuf", "listener", _int(0, _INT_MAX), 4 * 1024 * 1024,
            "SO_RCVBUF bytes to ask for (the kernel doubles it, capped by net.core.rmem_max; "
            "0 keeps the kernel default). It must hold what arrives while a worker restarts.",
            "BYTES"),
    Setting("sndbuf", "listener", _int(0, _INT_MAX), None, "SO_SNDBUF bytes to ask for.",
            "BYTES"),
    Setting("max_packet_size", "listener", _int(1, 65535), 65535,
            "Largest datagram read whole; longer ones are truncated.", "BYTES"),
    Setting("session_idle", "listener", _float(0.0, 86400.0), 0.0,
            "Session keeping: a flow (source address and port) that sent nothing for this "
            "long has ended. Flows active within it stay with their worker across a reload or "
            "scale until they go idle (or drain_timeout). 0 turns session keeping off.",
            "SECONDS"),
    Setting("drain_timeout", "listener", _float(0.1, 86400.0), 60.0,
            "Session keeping: how long a replaced worker keeps serving its flows at most; "
            "those still busy then are cut and go to the new worker.", "SECONDS"),
    Setting("session_table", "listener", _int(16, 1 << 20), 65536,
            "Session keeping: flows each worker tracks per listener (least recently seen "
            "evicted first, counted).", "FLOWS"),
    Setting("name", "listener", _str, None,
            "Listener name used in metrics labels (default: derived from the address).", "NAME"),
)
BY_KEY: Final = {s.key: s for s in SETTINGS}
SERVER_KEYS: Final = frozenset(s.key for s in SETTINGS if s.scope == "server")
LISTENER_KEYS: Final = frozenset(s.key for s in SETTINGS if s.scope != "server")
_MULTICAST_ONLY: Final = tuple(s.key for s in SETTINGS if s.scope == "multicast")


@dataclasses.dataclass(frozen=True)
class Listener:
    """One validated listener: an address, its APP, and its socket and multicast settings."""

    name: str
    app: str
    address: Address
    multicast: bool
    multicast_mode: str
    multicast_interface: str | None
    multicast_ttl: int
    multicast_loopback: bool
    rcvbuf: int | None
    sndbuf: int | None
    max_packet_size: int
    session_idle: float
    drain_timeout: float
    session_table: int

    @property
    def sessions(self) -> bool:
        """Whether this listener keeps sessions across reloads and scaling."""
        return self.session_idle > 0

    @property
    def private(self) -> bool:
        """Port 0: each worker gets its own socket, outside any group."""
        return self.address.port == 0


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The merged, validated configuration of a server (``build`` makes it; read-only)."""

    workers: int
    timeout: float
    graceful_timeout: float
    backoff_max: float
    steering: bool
    steer_grace: float
    quarantine: float
    max_worker_memory: int
    metrics: Address | None
    metrics_interval: float
    datapath: str
    log_level: str
    log_file: str | None
    control: str
    user: str | None
    group: str | None
    pid_file: str | None
    listeners: tuple[Listener, ...]
    #: key -> how the user spelled it where the value came from, for errors
    #: found later (``--log-file``, ``SHARDUDP_LOG_FILE`` or ``log_file``).
    origin: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False,
                                                  repr=False)

    def label(self, key: str) -> str:
        return self.origin.get(key, key)

    def to_dict(self) -> dict[str, Any]:
        """The effective config in the file's own shape (for --print-config)."""
        out: dict[str, Any] = {}
        for key in sorted(SERVER_KEYS):
            v = getattr(self, key)
            if v is not None:
                out[key] = str(v) if isinstance(v, Address) else v
        listeners = []
        for lst in self.listeners:
            d: dict[str, Any] = {"name": lst.name, "app": lst.app}
            d["multicast" if lst.multicast else "bind"] = str(lst.address)
            for key in _MULTICAST_ONLY:
                if lst.multicast and getattr(lst, key) is not None:
                    d[key] = getattr(lst, key)
            for key in ("rcvbuf", "sndbuf", "max_packet_size"):
                if getattr(lst, key) is not None:
                    d[key] = getattr(lst, key)
            if lst.sessions:
                for key in ("session_idle", "drain_timeout", "session_table"):
                    d[key] = getattr(lst, key)
            listeners.append(d)
        out["listener"] = listeners
        return out


Label = Callable[[str], str]
_ADDRESS_KEYS: Final = ("bind", "multicast")


def _file_label(prefix: str) -> Label:
    return lambda key: prefix + key


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One source's raw and validated values, and how it names a key in errors."""

    raw: Mapping[str, object]
    values: Mapping[str, Any]
    label: Label


def _parse_layer(raw: Mapping[str, object], label: Label, errors: list[str]) -> dict[str, Any]:
    """Validate one source's values, collecting an error per bad key."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        setting = BY_KEY.get(key)
        if setting is None:
            near = difflib.get_close_matches(key, BY_KEY, n=1)
            errors.append(f"{label(key)}: unknown setting"
                          + (f" (did you mean {label(near[0])}?)" if near else ""))
            continue
        try:
            if setting.repeat:
                values = value if isinstance(value, list) else [value]
                out[key] = [setting.parse(v) for v in values]
            else:
                out[key] = setting.parse(value)
        except ValueError as exc:
            errors.append(f"{label(key)}: {exc}")
    return out


def parse_toml(text: str, errors: list[str]) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Split an untrusted TOML document into top-level and per-listener values."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        errors.append(f"config file: not valid TOML: {exc}")
        return {}, []
    tables = doc.pop("listener", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        errors.append("listener: must be an array of tables ([[listener]])")
        tables = []
    return doc, tables


def env_values(environ: Mapping[str, str]) -> dict[str, object]:
    """The ``SHARDUDP_*`` variables that name a setting (repeatable ones comma-split)."""
    out: dict[str, object] = {}
    for s in SETTINGS:
        if s.env in environ:
            raw = environ[s.env]
            out[s.key] = [p.strip() for p in raw.split(",") if p.strip()] if s.repeat else raw
    return out


def _layers(file_top: Mapping[str, object], environ: Mapping[str, str],
            cli: Mapping[str, object], errors: list[str],
            cli_labels: Mapping[str, str] | None = None) -> list[_Layer]:
    """The sources in precedence order, lowest first, each validated.

    ``cli_labels`` names command-line values not given as their flag (the
    positional ``APP``).
    """
    spelled = dict(cli_labels or {})
    sources: list[tuple[Mapping[str, object], Label]] = [
        (file_top, _file_label("")),
        (env_values(environ), env_of),
        ({k: v for k, v in cli.items() if v is not None},
         lambda key: spelled.get(key) or flag_of(key)),
    ]
    return [_Layer(raw, _parse_layer(raw, label, errors), label) for raw, label in sources]


def lookup(
    key: str,
    *,
    file_text: str | None = None,
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, object] | None = None,
) -> tuple[Any, str | None]:
    """One server setting merged as ``build`` does, without needing the rest to be valid
    (``ctl`` only wants the control socket's path), and how its source names it (None
    for the default)."""
    errors: list[str] = []
    file_top = parse_toml(file_text, errors)[0] if file_text is not None else {}

    def pick(source: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in source.items() if k in (key, env_of(key))}

    value, label = BY_KEY[key].default, None
    for layer in _layers(pick(file_top), pick(environ or {}), pick(cli or {}), errors):
        if key in layer.values:
            value, label = layer.values[key], layer.label(key)
    if errors:
        raise ConfigError(errors)
    return value, label


def build(
    *,
    file_text: str | None = None,
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, object] | None = None,
    cli_labels: Mapping[str, str] | None = None,
    cpu_count: int = 1,
) -> ServerConfig:
    """Merge defaults < file < environment < CLI and validate the result.

    Raises ``ConfigError`` listing every problem found, each with its key path.
    Listeners named by a later source (``--bind``, ``SHARDUDP_MULTICAST``)
    replace an earlier source's, the file's ``[[listener]]`` tables included.
    ``cli_labels`` names command-line values given other than by their flag.
    """
    errors: list[str] = []
    file_top: dict[str, object] = {}
    tables: list[dict[str, object]] = []
    if file_text is not None:
        file_top, tables = parse_toml(file_text, errors)
    layers = _layers(file_top, environ or {}, cli or {}, errors, cli_labels)
    merged: dict[str, Any] = {s.key: s.default for s in SETTINGS}
    origin: dict[str, str] = {}
    source: _Layer | None = None
    for layer in layers:
        # Given counts even when invalid: a bad --bind must not fall back to the file's.
        if any(layer.raw.get(k) for k in _ADDRESS_KEYS):
            source = layer
        for key, value in layer.values.items():
            if key not in _ADDRESS_KEYS:
                merged[key], origin[key] = value, layer.label(key)

    # An APP given but invalid was reported already: do not call it missing too.
    app_given = any(layer.raw.get("app") is not None for layer in layers)
    listeners: list[Listener | None] = []
    if tables and source is layers[0]:
        key = next(k for k in _ADDRESS_KEYS if file_top.get(k))
        errors.append(f"{key}: a top-level listener address next to [[listener]] tables; "
                      "move it into a [[listener]] table of its own")
    elif source is not None:
        replaced = " (a listener given here replaces the file's [[listener]] tables)" \
            if tables and source is not layers[0] else ""
        for kind in _ADDRESS_KEYS:
            for addr in source.values.get(kind, []):
                where = f"{source.label(kind)} {addr}"
                if not app_given:
                    errors.append(f"{where}: no APP: give MODULE:ATTR as `shardudp run APP` or "
                                  f"--app{replaced}")
                listeners.append(_make_listener(merged, origin, {}, kind, addr, where, errors))
    else:
        for i, table in enumerate(tables):
            listeners.append(_table_listener(merged, origin, table, f"listener[{i}]",
                                             app_given, errors))
    if not listeners and not errors:
        errors.append("no listener: give --bind HOST:PORT (or [[listener]] tables in --config)")
    mcast_given = bool(source.raw.get("multicast")) if source is not None else any(
        "multicast" in t for t in tables)
    if listeners and not mcast_given:
        _refuse_multicast_only(layers[1:], errors)
    built = [lst for lst in listeners if lst is not None]
    _check_listeners(built, errors)
    if not merged["steering"] and any(lst.sessions for lst in built):
        errors.append(f"{origin.get('steering', 'steering')}: session keeping (session_idle) "
                      "needs the steering program; turn steering on or session keeping off")

    workers = merged["workers"]
    cfg = ServerConfig(
        workers=max(1, cpu_count) if workers == "auto" else workers,
        timeout=merged["timeout"],
        graceful_timeout=merged["graceful_timeout"],
        backoff_max=merged["backoff_max"],
        steering=merged["steering"],
        steer_grace=merged["steer_grace"],
        quarantine=merged["quarantine"],
        max_worker_memory=merged["max_worker_memory"],
        metrics=merged["metrics"],
        metrics_interval=merged["metrics_interval"],
        datapath=merged["datapath"],
        log_level=merged["log_level"],
        log_file=merged["log_file"],
        control=merged["control"],
        user=merged["user"],
        group=merged["group"],
        pid_file=merged["pid_file"],
        listeners=tuple(built),
        origin=origin,
    )
    if errors:
        # What was valid, for `check` to go on with: it imports the listeners' APPs too.
        raise ConfigError(errors, partial=cfg)
    return cfg


def _refuse_multicast_only(layers: Sequence[_Layer], errors: list[str]) -> None:
    """Multicast settings given on the command line or in the environment without any
    multicast listener: a mistake, like such a key in a unicast listener's table.
    (A file's top-level value is only a default, and may serve other listeners.)"""
    for key in _MULTICAST_ONLY:
        given = [layer for layer in layers if key in layer.raw]
        if given:
            errors.append(f"{given[-1].label(key)}: only valid with a multicast listener, and "
                          "there is none (add --multicast GROUP:PORT)")


def _table_listener(merged: Mapping[str, Any], origin: Mapping[str, str],
                    table: Mapping[str, object], where: str, app_given: bool,
                    errors: list[str]) -> Listener | None:
    label = _file_label(where + ".")
    bad = [k for k in table if k in SERVER_KEYS]
    for k in bad:
        errors.append(f"{label(k)}: a server setting, not allowed in a listener table")
    own = _parse_layer({k: v for k, v in table.items() if k not in bad}, label, errors)
    kinds = [k for k in _ADDRESS_KEYS if k in table]
    # A misspelt address key was reported as unknown already.
    typo = any(difflib.get_close_matches(k, _ADDRESS_KEYS, n=1) for k in table if k not in BY_KEY)
    if len(kinds) > 1 or not (kinds or typo):
        errors.append(f"{where}: needs exactly one of bind or multicast")
    kind = kinds[0] if len(kinds) == 1 else None
    addrs = own.get(kind, []) if kind else []
    if len(addrs) > 1:
        errors.append(f"{label(kinds[0])}: one address per listener table")
    if not app_given and "app" not in table:
        errors.append(f"{label('app')}: missing (MODULE:ATTR)")
    own = {k: v for k, v in own.items() if k not in _ADDRESS_KEYS}
    # An address that failed to parse was reported above: check the rest, build nothing.
    addr = addrs[0] if len(addrs) == 1 else None
    return _make_listener(merged, origin, own, kind, addr, where, errors)


def _make_listener(
    merged: Mapping[str, Any], origin: Mapping[str, str], own: Mapping[str, Any],
    kind: str | None, addr: Address | None, where: str, errors: list[str],
) -> Listener | None:
    """A listener from the merged defaults and its own table's values (``own``)."""
    def label(key: str) -> str:
        return f"{where}.{key}" if key in own else f"{where}: {origin.get(key, key)}"

    v: dict[str, Any] = {k: merged.get(k) for k in LISTENER_KEYS} | dict(own)
    mcast = kind == "multicast"
    if kind == "bind":
        for key in _MULTICAST_ONLY:
            if key in own:
                errors.append(f"{label(key)}: only valid on a multicast listener")
    iface = v["multicast_interface"]
    if mcast and addr is not None and iface is not None and (":" in iface) != (":" in addr.host):
        errors.append(f"{label('multicast_interface')}: {iface} is not of the group's "
                      "address family")
    if v["session_idle"] and addr is not None and (mcast or addr.port == 0):
        errors.append(f"{label('session_idle')}: session keeping needs a unicast listener on a "
                      "fixed port (a reuseport group to steer); this one is "
                      + ("multicast" if mcast else "on port 0"))
    if addr is None or v["app"] is None:
        return None
    return Listener(
        # Brackets kept: "udp-[::]:5" is unambiguous, "udp-:::5" is not.
        name=v["name"] or f"{'mcast' if mcast else 'udp'}-{addr}",
        app=v["app"],
        address=addr,
        multicast=mcast,
        multicast_mode=str(v["multicast_mode"]) if mcast else "fanout",
        multicast_interface=iface if mcast else None,
        multicast_ttl=int(v["multicast_ttl"]) if mcast else BY_KEY["multicast_ttl"].default,
        multicast_loopback=bool(v["multicast_loopback"]) if mcast
        else BY_KEY["multicast_loopback"].default,
        rcvbuf=v["rcvbuf"],
        sndbuf=v["sndbuf"],
        max_packet_size=int(v["max_packet_size"] or 65535),
        session_idle=float(v["session_idle"]),
        drain_timeout=float(v["drain_timeout"]),
        session_table=int(v["session_table"]),
    )


def _check_listeners(listeners: Sequence[Listener], errors: list[str]) -> None:
    seen_names: set[str] = set()
    for lst in listeners:
        if lst.name in seen_names:
            errors.append(f"listener {lst.name!r}: duplicate name")
        seen_names.add(lst.name)
    for i, a in enumerate(listeners):
        for b in listeners[i + 1:]:
            # Every IPv6 socket is V6ONLY (shardudp.sockets): [::]:P never
            # covers an IPv4 address, so only listeners of one family overlap.
            if a.address.port == 0 or a.address.port != b.address.port or \
                    a.address.family_name != b.address.family_name:
                continue
            if a.address == b.address:
                errors.append(f"listeners {a.name!r} and {b.name!r}: address {a.address} "
                              "used twice")
                continue
            wild = next((x for x in (a, b) if ipaddress.ip_address(x.address.host)
                         .is_unspecified), None)
            if wild is not None:
                other = b if wild is a else a
                errors.append(f"listeners {a.name!r} ({a.address}) and {b.name!r} "
                              f"({b.address}) overlap: {wild.address} covers {other.address}; "
                              "use distinct ports")


def settings_markdown() -> str:
    """The settings table for the docs, generated from the declarations."""
    rows = [
        "| TOML key | flag | environment | default | scope | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        default = "" if s.default is None else f"`{str(s.default).lower()}`" if isinstance(
            s.default, bool) else f"`{s.default}`"
        flag = f"`{s.flag}`, `--no-{s.flag[2:]}`" if s.switch else f"`{s.flag} {s.metavar}`"
        scope = "multicast listener" if s.scope == "multicast" else s.scope
        cells = [f"`{s.key}`", flag, f"`{s.env}`", default, scope, s.help]
        # GitHub splits table cells at a bare | even inside backticks.
        rows.append("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"
