"""Settings, declared once. Pure: no I/O; the caller reads files and the env.

Each ``Setting`` below is the single declaration of an option: it feeds the
CLI flag, the TOML key, the ``SHARDUDP_*`` environment variable and the docs
table. Precedence: defaults < file < environment < command line. Listener
settings given at the top level (file, env or CLI) are defaults for every
listener; a key inside a ``[[listener]]`` table wins for that listener.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal

from .errors import ConfigError

Scope = Literal["server", "listener"]


@dataclasses.dataclass(frozen=True)
class Address:
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


def _float(lo: float, hi: float) -> Callable[[object], float]:
    def parse(v: object) -> float:
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"expected a number, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"expected a number, got {v!r}")
        if not lo <= float(v) <= hi:
            raise ValueError(f"{v} is out of range [{lo}, {hi}]")
        return float(v)

    return parse


def _str(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a non-empty string, got {v!r}")
    return v


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
    s = _str(v)
    if not _APP_RE.match(s):
        raise ValueError(f"expected MODULE:ATTR (e.g. workers.echo:Echo), got {s!r}")
    return s


def _ip(v: object) -> str:
    s = _str(v)
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise ValueError(f"{s!r} is not an IP address (hostnames are not accepted)") from None


def parse_address(v: object) -> Address:
    """``HOST:PORT`` or ``[V6HOST]:PORT``; HOST must be an IP literal."""
    s = _str(v)
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)", s) or re.fullmatch(r"([^:\[\]]+):(\d+)", s)
    if not m:
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {s!r}")
    host = _ip(m.group(1))
    if ":" in host and not s.startswith("["):
        raise ValueError(f"IPv6 addresses need brackets: [{host}]:PORT")
    return Address(host, _int(0, 65535)(int(m.group(2))))


def _group(v: object) -> Address:
    a = parse_address(v)
    if not ipaddress.ip_address(a.host).is_multicast:
        raise ValueError(f"{a.host} is not a multicast group address")
    if a.port == 0:
        raise ValueError("a multicast listener needs a fixed port, not 0")
    return a


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str
    scope: Scope
    parse: Callable[[object], Any]
    default: Any
    help: str
    metavar: str = ""
    #: On the command line, each occurrence adds a listener.
    repeat: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return "SHARDUDP_" + self.key.upper()


SETTINGS: Final[tuple[Setting, ...]] = (
    Setting("workers", "server", _workers, "auto",
            "Worker processes (slots), or 'auto' for the number of usable CPUs.", "N|auto"),
    Setting("timeout", "server", _float(0.5, 3600), 30.0,
            "Heartbeat deadline: a worker silent this long is killed and replaced.", "SECONDS"),
    Setting("graceful_timeout", "server", _float(0.1, 3600), 10.0,
            "How long a stopping worker may take before it is killed.", "SECONDS"),
    Setting("backoff_max", "server", _float(0.0, 3600), 30.0,
            "Cap of the exponential restart delay of a crash-looping slot.", "SECONDS"),
    Setting("metrics", "server", parse_address, None,
            "Serve /metrics and /healthz on HOST:PORT (port 0 picks one and logs it).",
            "HOST:PORT"),
    Setting("metrics_interval", "server", _float(0.0, 3600), 1.0,
            "How often workers report counters; 0 turns counting off.", "SECONDS"),
    Setting("datapath", "server", _choice("auto", "c", "python", "twisted"), "auto",
            "Worker UDP port: C batch helper, pure Python, or stock Twisted.",
            "auto|c|python|twisted"),
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
            "The protocol: MODULE:ATTR naming a DatagramProtocol subclass or a factory.",
            "MODULE:ATTR"),
    Setting("bind", "listener", parse_address, None,
            "Unicast listener address; repeat for more. Port 0 gives each worker a private "
            "socket that may connect().", "HOST:PORT", repeat=True),
    Setting("multicast", "listener", _group, None,
            "Multicast listener GROUP:PORT; repeat for more.", "GROUP:PORT", repeat=True),
    Setting("multicast_mode", "listener", _choice("fanout", "single", "shard"), "shard",
            "Multicast delivery: every worker, exactly one worker, or one worker per source.",
            "fanout|single|shard"),
    Setting("multicast_interface", "listener", _ip, None,
            "Interface address to join on and send from (default: the kernel's choice).",
            "ADDR"),
    Setting("rcvbuf", "listener", _int(0, 1 << 31), 4 * 1024 * 1024,
            "SO_RCVBUF bytes to ask for (the kernel doubles it, capped by net.core.rmem_max; "
            "0 keeps the kernel default). It must hold what arrives while a worker restarts.",
            "BYTES"),
    Setting("sndbuf", "listener", _int(0, 1 << 31), None, "SO_SNDBUF bytes to ask for.",
            "BYTES"),
    Setting("max_packet_size", "listener", _int(1, 65535), 65535,
            "Largest datagram read whole; longer ones are truncated.", "BYTES"),
    Setting("name", "listener", _str, None,
            "Listener name used in metrics labels (default: derived from the address).", "NAME"),
)
BY_KEY: Final = {s.key: s for s in SETTINGS}
SERVER_KEYS: Final = frozenset(s.key for s in SETTINGS if s.scope == "server")
LISTENER_KEYS: Final = frozenset(s.key for s in SETTINGS if s.scope == "listener")


@dataclasses.dataclass(frozen=True)
class Listener:
    name: str
    app: str
    address: Address
    multicast: bool
    multicast_mode: str
    multicast_interface: str | None
    rcvbuf: int | None
    sndbuf: int | None
    max_packet_size: int

    @property
    def private(self) -> bool:
        """Port 0: each worker gets its own socket, outside any group."""
        return self.address.port == 0


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    workers: int
    timeout: float
    graceful_timeout: float
    backoff_max: float
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
            for key in ("multicast_mode", "multicast_interface"):
                if lst.multicast and getattr(lst, key) is not None:
                    d[key] = getattr(lst, key)
            for key in ("rcvbuf", "sndbuf", "max_packet_size"):
                if getattr(lst, key) is not None:
                    d[key] = getattr(lst, key)
            listeners.append(d)
        out["listener"] = listeners
        return out


def _parse_layer(raw: Mapping[str, object], where: str, errors: list[str]) -> dict[str, Any]:
    """Validate one source's values, collecting an error per bad key."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        setting = BY_KEY.get(key)
        if setting is None:
            errors.append(f"{where}{key}: unknown setting")
            continue
        try:
            if setting.repeat:
                values = value if isinstance(value, list) else [value]
                out[key] = [setting.parse(v) for v in values]
            else:
                out[key] = setting.parse(value)
        except ValueError as exc:
            errors.append(f"{where}{key}: {exc}")
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


def build(
    *,
    file_text: str | None = None,
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, object] | None = None,
    cpu_count: int = 1,
) -> ServerConfig:
    """Merge defaults < file < environment < CLI and validate the result.

    Raises ``ConfigError`` listing every problem found, each with its key path.
    """
    errors: list[str] = []
    file_top: dict[str, object] = {}
    file_listeners: list[dict[str, object]] = []
    if file_text is not None:
        file_top, file_listeners = parse_toml(file_text, errors)
    layers = [
        _parse_layer(file_top, "", errors),
        _parse_layer(env_values(environ or {}), "env ", errors),
        _parse_layer({k: v for k, v in (cli or {}).items() if v is not None}, "--", errors),
    ]
    merged: dict[str, Any] = {s.key: s.default for s in SETTINGS}
    top_listeners: list[tuple[str, Address]] | None = None
    for layer in layers:
        # Listeners named by a later source replace an earlier source's list.
        named = [("bind", a) for a in layer.get("bind", [])]
        named += [("multicast", a) for a in layer.get("multicast", [])]
        if named:
            top_listeners = named
        merged.update({k: v for k, v in layer.items() if k not in ("bind", "multicast")})

    listeners: list[Listener] = []
    if top_listeners is not None:
        for kind, addr in top_listeners:
            listeners.append(_make_listener(merged, {kind: addr}, f"--{kind} {addr}", errors))
    else:
        for i, table in enumerate(file_listeners):
            where = f"listener[{i}]."
            bad = [k for k in table if k in SERVER_KEYS]
            for k in bad:
                errors.append(f"{where}{k}: a server setting, not allowed in a listener table")
            values = _parse_layer({k: v for k, v in table.items() if k not in bad}, where, errors)
            for kind in ("bind", "multicast"):
                if kind in values:
                    values[kind] = values[kind][0] if len(values[kind]) == 1 else values[kind]
            listeners.append(_make_listener(merged, values, where.rstrip("."), errors))
    if not listeners and not errors:
        errors.append("no listener: give --bind HOST:PORT (or [[listener]] tables in --config)")
    _check_listeners(listeners, errors)

    workers = merged["workers"]
    if errors:
        raise ConfigError(errors)
    return ServerConfig(
        workers=max(1, cpu_count) if workers == "auto" else workers,
        timeout=merged["timeout"],
        graceful_timeout=merged["graceful_timeout"],
        backoff_max=merged["backoff_max"],
        metrics=merged["metrics"],
        metrics_interval=merged["metrics_interval"],
        datapath=merged["datapath"],
        log_level=merged["log_level"],
        log_file=merged["log_file"],
        control=merged["control"],
        user=merged["user"],
        group=merged["group"],
        pid_file=merged["pid_file"],
        listeners=tuple(listeners),
    )


_PLACEHOLDER: Final = Address("0.0.0.0", 0)


def _make_listener(
    defaults: Mapping[str, Any], own: Mapping[str, Any], where: str, errors: list[str]
) -> Listener:
    v = {k: defaults.get(k) for k in LISTENER_KEYS} | dict(own)
    has_bind, has_mcast = "bind" in own, "multicast" in own
    if has_bind == has_mcast:
        errors.append(f"{where}: needs exactly one of bind or multicast")
    addr = own.get("multicast") or own.get("bind") or _PLACEHOLDER
    if isinstance(addr, list):
        errors.append(f"{where}: one address per listener table")
        addr = _PLACEHOLDER
    if v["app"] is None:
        errors.append(f"{where}.app: missing (MODULE:ATTR)")
    if not has_mcast:
        for key in ("multicast_mode", "multicast_interface"):
            if key in own:
                errors.append(f"{where}.{key}: only valid on a multicast listener")
    if has_mcast and v["multicast_interface"] is not None:
        iface_v6 = ":" in v["multicast_interface"]
        if iface_v6 != (":" in addr.host):
            errors.append(f"{where}.multicast_interface: address family differs from the group")
    name = v["name"] or (
        f"{'mcast' if has_mcast else 'udp'}-{addr}".replace("[", "").replace("]", "")
    )
    return Listener(
        name=name,
        app=v["app"] or "",
        address=addr,
        multicast=has_mcast,
        multicast_mode=str(v["multicast_mode"]) if has_mcast else "fanout",
        multicast_interface=v["multicast_interface"] if has_mcast else None,
        rcvbuf=v["rcvbuf"],
        sndbuf=v["sndbuf"],
        max_packet_size=int(v["max_packet_size"] or 65535),
    )


def _check_listeners(listeners: Sequence[Listener], errors: list[str]) -> None:
    seen_names: set[str] = set()
    seen_addrs: set[Address] = set()
    for lst in listeners:
        if lst.name in seen_names:
            errors.append(f"listener {lst.name!r}: duplicate name")
        seen_names.add(lst.name)
        if lst.address in seen_addrs and lst.address.port != 0:
            errors.append(f"listener {lst.name!r}: address {lst.address} used twice")
        seen_addrs.add(lst.address)


def settings_markdown() -> str:
    """The settings table for the docs, generated from the declarations."""
    rows = [
        "| TOML key | flag | environment | default | scope | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        default = "" if s.default is None else f"`{s.default}`"
        rows.append(
            f"| `{s.key}` | `{s.flag} {s.metavar}` | `{s.env}` | {default} | {s.scope} "
            f"| {s.help} |"
        )
    return "\n".join(rows) + "\n"
