from __future__ import annotations

import pytest

from shardudp import config
from shardudp.config import Address, build
from shardudp.errors import ConfigError


def errors_of(**kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(**kw)  # type: ignore[arg-type]
    return info.value.errors


def test_cli_listener_with_defaults() -> None:
    cfg = build(
        cli={"app": "workers.echo:Echo", "bind": ["0.0.0.0:9999", "[::1]:9999"], "workers": "4"}
    )
    assert cfg.workers == 4
    assert [lst.address for lst in cfg.listeners] == [
        Address("0.0.0.0", 9999),
        Address("::1", 9999),
    ]
    assert all(lst.max_packet_size == 65535 for lst in cfg.listeners)
    assert cfg.timeout == 30.0


def test_workers_auto_is_the_cpu_count() -> None:
    cfg = build(cli={"app": "a:B", "bind": ["127.0.0.1:1"], "workers": "auto"}, cpu_count=7)
    assert cfg.workers == 7


def test_precedence_defaults_file_env_cli() -> None:
    text = (
        'workers = 2\ntimeout = 5\nmetrics_interval = 3\n[[listener]]\napp = "a:B"\n'
        'bind = "127.0.0.1:1000"\n'
    )
    cfg = build(file_text=text)
    assert (cfg.workers, cfg.timeout, cfg.metrics_interval) == (2, 5.0, 3.0)
    cfg = build(file_text=text, environ={"SHARDUDP_WORKERS": "3", "SHARDUDP_TIMEOUT": "6"})
    assert (cfg.workers, cfg.timeout) == (3, 6.0)
    cfg = build(file_text=text, environ={"SHARDUDP_WORKERS": "3"}, cli={"workers": "4"})
    assert cfg.workers == 4
    # Listeners named on the command line replace the file's.
    cfg = build(file_text=text, cli={"app": "c:D", "bind": ["127.0.0.1:2000"]})
    assert [(lst.app, lst.address.port) for lst in cfg.listeners] == [("c:D", 2000)]


def test_file_with_unicast_and_multicast_listeners() -> None:
    text = """
workers = 3
rcvbuf = 65536
[[listener]]
name = "echo"
app = "workers.echo:Echo"
bind = "127.0.0.1:9000"
[[listener]]
name = "disc"
app = "x:Y"
multicast = "228.0.0.5:8005"
multicast_mode = "single"
multicast_interface = "127.0.0.1"
rcvbuf = 1000000
"""
    cfg = build(file_text=text)
    echo, disc = cfg.listeners
    assert (echo.name, echo.multicast, echo.rcvbuf) == ("echo", False, 65536)
    assert (disc.multicast, disc.multicast_mode, disc.multicast_interface, disc.rcvbuf) == (
        True,
        "single",
        "127.0.0.1",
        1000000,
    )
    # --print-config shape round-trips through the file format.
    import tomllib  # noqa: F401

    again = build(file_text=_to_toml(cfg.to_dict()))
    assert again == cfg


def _to_toml(d: dict[str, object]) -> str:
    lines = []
    for k, v in d.items():
        if k != "listener":
            lines.append(f"{k} = {_val(v)}")
    for lst in d["listener"]:  # type: ignore[attr-defined]
        lines.append("[[listener]]")
        lines += [f"{k} = {_val(v)}" for k, v in lst.items()]
    return "\n".join(lines)


def _val(v: object) -> str:
    return f'"{v}"' if isinstance(v, str) else repr(v).lower() if isinstance(v, bool) else str(v)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"cli": {"app": "a:B", "bind": ["localhost:53"]}}, "--bind: 'localhost' is not an IP"),
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1"]}}, "--bind: expected HOST:PORT"),
        ({"cli": {"app": "a:B", "bind": ["::1:53"]}}, "--bind: expected HOST:PORT"),
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:65536"]}}, "--bind: 65536 is out of range"),
        ({"cli": {"app": "nocolon", "bind": ["127.0.0.1:1"]}}, "--app: expected MODULE:ATTR"),
        ({"cli": {"bind": ["127.0.0.1:1"]}}, "--bind 127.0.0.1:1: no APP"),
        ({"cli": {"app": "a:B"}}, "no listener"),
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:1"], "workers": "0"}}, "--workers: 0 is out"),
        (
            {"cli": {"app": "a:B", "bind": ["127.0.0.1:1"], "workers": "many"}},
            "--workers: expected",
        ),
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:1"], "timeout": "x"}}, "--timeout: expected a"),
        ({"cli": {"app": "a:B", "multicast": ["127.0.0.1:5"]}}, "not a multicast group"),
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:1", "127.0.0.1:1"]}}, "used twice"),
        (
            {"environ": {"SHARDUDP_WORKERS": "-1"}, "cli": {"app": "a:B", "bind": ["127.0.0.1:1"]}},
            "SHARDUDP_WORKERS: -1 is out of range",
        ),
        ({"file_text": "workers = [1"}, "not valid TOML"),
        ({"file_text": "wrkers = 2"}, "wrkers: unknown setting"),
        (
            {"file_text": 'workers = "2x"\n[[listener]]\napp="a:B"\nbind="127.0.0.1:1"'},
            "workers: expected an integer",
        ),
        (
            {"file_text": '[[listener]]\napp="a:B"\nbind="127.0.0.1:1"\nmulticast_mode="single"'},
            "listener[0].multicast_mode: only valid on a multicast listener",
        ),
        (
            {"file_text": '[[listener]]\napp="a:B"\nbind="127.0.0.1:1"\nworkers=3'},
            "listener[0].workers: a server setting",
        ),
        (
            {"file_text": '[[listener]]\napp="a:B"\nbind="127.0.0.1:1"\nmulticast="228.0.0.1:5"'},
            "listener[0]: needs exactly one of bind or multicast",
        ),
        (
            {"file_text": '[[listener]]\napp="a:B"\nbind="127.0.0.1:1"\nrcvbuf="big"'},
            "listener[0].rcvbuf: expected an integer",
        ),
        (
            {
                "file_text": '[[listener]]\napp="a:B"\nmulticast="228.0.0.1:5"\n'
                'multicast_interface="::1"'
            },
            "listener[0].multicast_interface: ::1 is not of the group's address family",
        ),
        ({"file_text": "listener = 3"}, "listener: must be an array of tables"),
    ],
)
def test_every_mistake_names_its_key(kw: dict[str, object], needle: str) -> None:
    errs = errors_of(**kw)
    assert any(needle in e for e in errs), errs


def test_all_errors_reported_at_once() -> None:
    errs = errors_of(file_text='workers = 0\ntimeout = "x"\nbogus = 1\n')
    assert len(errs) >= 3


def test_every_setting_has_one_declaration_feeding_flag_env_and_docs() -> None:
    table = config.settings_markdown()
    for s in config.SETTINGS:
        assert s.flag.startswith("--") and s.env.startswith("SHARDUDP_")
        assert f"`{s.key}`" in table and s.env in table and s.flag in table
    assert len({s.key for s in config.SETTINGS}) == len(config.SETTINGS)


def test_readme_settings_table_is_generated_from_the_declarations() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert config.settings_markdown() in readme, "run `shardudp settings` and paste into README"


def test_multicast_ttl_and_loopback_from_every_source() -> None:
    mc = {"app": "a:B", "multicast": ["228.0.0.5:5000"]}
    (lst,) = build(cli=mc).listeners
    assert (lst.multicast_ttl, lst.multicast_loopback) == (1, True)
    (lst,) = build(cli={**mc, "multicast_ttl": "7", "multicast_loopback": False}).listeners
    assert (lst.multicast_ttl, lst.multicast_loopback) == (7, False)
    env = {"SHARDUDP_MULTICAST_TTL": "3", "SHARDUDP_MULTICAST_LOOPBACK": "no"}
    (lst,) = build(cli=mc, environ=env).listeners
    assert (lst.multicast_ttl, lst.multicast_loopback) == (3, False)
    text = ('multicast_ttl = 2\n[[listener]]\napp = "a:B"\nmulticast = "228.0.0.5:5000"\n'
            "multicast_loopback = false\n[[listener]]\napp = \"a:B\"\nbind = \"127.0.0.1:1\"\n")
    cfg = build(file_text=text)
    assert [(x.multicast_ttl, x.multicast_loopback) for x in cfg.listeners] == [
        (2, False), (1, True)]
    assert build(file_text=_to_toml(cfg.to_dict())) == cfg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[listener]]\napp="a:B"\nbind="127.0.0.1:1"\nmulticast_ttl=2',
         "listener[0].multicast_ttl: only valid on a multicast listener"),
        ('[[listener]]\napp="a:B"\nbind="127.0.0.1:1"\nmulticast_loopback=false',
         "listener[0].multicast_loopback: only valid on a multicast listener"),
        ('[[listener]]\napp="a:B"\nmulticast="228.0.0.1:5"\nmulticast_ttl=256',
         "listener[0].multicast_ttl: 256 is out of range [0, 255]"),
        ('[[listener]]\napp="a:B"\nmulticast="228.0.0.1:5"\nmulticast_loopback="maybe"',
         "listener[0].multicast_loopback: expected true or false"),
    ],
)
def test_multicast_only_settings_are_refused_where_meaningless(text: str, needle: str) -> None:
    errs = errors_of(file_text=text)
    assert any(needle in e for e in errs), errs


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        # Each source names a key its own way.
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:1"], "metrics_interval": "-1"}},
         ["--metrics-interval: -1 is out of range [0, 3600]"]),
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:1"]},
          "environ": {"SHARDUDP_METRICS_INTERVAL": "-1"}},
         ["SHARDUDP_METRICS_INTERVAL: -1 is out of range [0, 3600]"]),
        ({"file_text": 'metrics_interval = -1\napp = "a:B"\nbind = "127.0.0.1:1"'},
         ["metrics_interval: -1 is out of range [0, 3600]"]),
        # setsockopt takes a C int.
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:1"], "rcvbuf": str(1 << 31)}},
         ["--rcvbuf: 2147483648 is out of range [0, 2147483647]"]),
        ({"file_text": '[[listener]]\napp="a:B"\nbind="127.0.0.1:1"\nsndbuf=2147483648'},
         ["listener[0].sndbuf: 2147483648 is out of range [0, 2147483647]"]),
        # One error per problem: no "needs exactly one of bind or multicast" on top.
        ({"file_text": '[[listener]]\napp="a:B"\nmulticast="10.0.0.1:5000"'},
         ["listener[0].multicast: 10.0.0.1 is not a multicast group address"]),
        ({"file_text": '[[listener]]\napp="a:B"\nbind=5000'},
         ["listener[0].bind: expected HOST:PORT or [IPV6]:PORT, got 5000"]),
        ({"file_text": '[[listener]]\napp="a:B"\nbind="127.0.0.1:-1"'},
         ["listener[0].bind: expected HOST:PORT or [IPV6]:PORT, got '127.0.0.1:-1'"]),
        ({"file_text": 'bind = "127.0.0.1:-1"\napp = "a:B"'},
         ["bind: expected HOST:PORT or [IPV6]:PORT, got '127.0.0.1:-1'"]),
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:1"], "metrics": "x"}},
         ["--metrics: expected PORT, HOST:PORT or [IPV6]:PORT, got 'x'"]),
        # Addresses that can never work.
        ({"cli": {"app": "a:B", "bind": ["[::ffff:127.0.0.1]:5"]}},
         ["--bind: ::ffff:127.0.0.1 is an IPv4-mapped IPv6 address: write it as 127.0.0.1"]),
        ({"cli": {"app": "a:B", "multicast": ["[ff02::1:2]:5"],
                  "multicast_interface": "::ffff:10.0.0.1"}},
         ["--multicast-interface: ::ffff:10.0.0.1 is an IPv4-mapped IPv6 address: "
          "write it as 10.0.0.1"]),
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:1"], "metrics": "[::ffff:127.0.0.1]:9"}},
         ["--metrics: ::ffff:127.0.0.1 is an IPv4-mapped IPv6 address: write it as 127.0.0.1"]),
        ({"cli": {"app": "a:B", "bind": ["255.255.255.255:5"]}},
         ["--bind: 255.255.255.255 is the broadcast address, not one of this host's: "
          "bind 0.0.0.0 to receive broadcasts"]),
        ({"cli": {"app": "a:B", "bind": ["[ff02::1]:5"]}},
         ["--bind: ff02::1 is a multicast group: use --multicast (TOML: multicast), not bind"]),
        ({"cli": {"app": "a:B", "multicast": ["228.0.0.1:5"],
                  "multicast_interface": "255.255.255.255"}},
         ["--multicast-interface: 255.255.255.255 is not an interface address: give one of "
          "this host's addresses"]),
        ({"cli": {"app": "a:B", "multicast": ["228.0.0.1:5"], "multicast_interface": "::1"}},
         ["--multicast 228.0.0.1:5: --multicast-interface: ::1 is not of the group's "
          "address family"]),
        ({"cli": {"app": "a:B", "bind": ["0.0.0.0:5", "127.0.0.1:5"]}},
         ["listeners 'udp-0.0.0.0:5' (0.0.0.0:5) and 'udp-127.0.0.1:5' (127.0.0.1:5) overlap: "
          "0.0.0.0:5 covers 127.0.0.1:5; use distinct ports"]),
        ({"cli": {"app": "a:B", "bind": ["0.0.0.0:5"], "multicast": ["228.0.0.1:5"]}},
         ["listeners 'udp-0.0.0.0:5' (0.0.0.0:5) and 'mcast-228.0.0.1:5' (228.0.0.1:5) "
          "overlap: 0.0.0.0:5 covers 228.0.0.1:5; use distinct ports"]),
        ({"cli": {"app": "a:B", "bind": ["[::1]:5", "[::]:5"]}},
         ["listeners 'udp-[::1]:5' ([::1]:5) and 'udp-[::]:5' ([::]:5) overlap: [::]:5 covers "
          "[::1]:5; use distinct ports"]),
        # A file declares its listeners one way.
        ({"file_text": 'app="a:B"\nbind="127.0.0.1:1"\n[[listener]]\nbind="127.0.0.1:2"'},
         ["bind: a top-level listener address next to [[listener]] tables; move it into a "
          "[[listener]] table of its own"]),
        # Listeners from the command line replace the file's tables, and their apps.
        ({"file_text": '[[listener]]\napp="a:B"\nbind="127.0.0.1:1"',
          "cli": {"bind": ["127.0.0.1:2"]}},
         ["--bind 127.0.0.1:2: no APP: give MODULE:ATTR as `shardudp run APP` or --app (a "
          "listener given here replaces the file's [[listener]] tables)"]),
        ({"file_text": '[[listener]]\napp="a:B"\nbind="127.0.0.1:1"',
          "environ": {"SHARDUDP_MULTICAST": "228.0.0.1:5"}},
         ["SHARDUDP_MULTICAST 228.0.0.1:5: no APP: give MODULE:ATTR as `shardudp run APP` or "
          "--app (a listener given here replaces the file's [[listener]] tables)"]),
        # A bad APP is one error, named as it was given, not a second "no APP" too.
        ({"cli": {"app": "workers.echo", "bind": ["127.0.0.1:1"]}, "cli_labels": {"app": "APP"}},
         ["APP: expected MODULE:ATTR (e.g. myapp:Echo) or a ready-made app (echo, sink, "
          "helloer, multicast_ping, multicast_ping_client), got 'workers.echo'"]),
        ({"file_text": 'app = "x"\n[[listener]]\nbind = "127.0.0.1:1"'},
         ["app: expected MODULE:ATTR (e.g. myapp:Echo) or a ready-made app (echo, sink, "
          "helloer, multicast_ping, multicast_ping_client), got 'x'"]),
        # Multicast settings from the command line or the environment need a multicast
        # listener, as in a listener table.
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:1"], "multicast_ttl": "4"}},
         ["--multicast-ttl: only valid with a multicast listener, and there is none (add "
          "--multicast GROUP:PORT)"]),
        ({"cli": {"app": "a:B", "bind": ["127.0.0.1:1"], "multicast_loopback": False}},
         ["--multicast-loopback: only valid with a multicast listener, and there is none (add "
          "--multicast GROUP:PORT)"]),
        ({"file_text": '[[listener]]\napp="a:B"\nbind="127.0.0.1:1"',
          "environ": {"SHARDUDP_MULTICAST_MODE": "single"},
          "cli": {"multicast_interface": "127.0.0.1"}},
         ["SHARDUDP_MULTICAST_MODE: only valid with a multicast listener, and there is none "
          "(add --multicast GROUP:PORT)",
          "--multicast-interface: only valid with a multicast listener, and there is none "
          "(add --multicast GROUP:PORT)"]),
        # A bad --bind does not fall back to the file's listeners (and their errors).
        ({"file_text": '[[listener]]\nbind="x"', "cli": {"app": "a:B", "bind": ["y"]}},
         ["--bind: expected HOST:PORT or [IPV6]:PORT, got 'y'"]),
    ],
)
def test_exactly_one_error_naming_the_key_as_written(kw: dict[str, object],
                                                     expected: list[str]) -> None:
    assert errors_of(**kw) == expected


def test_listeners_from_a_later_source_take_the_app_from_the_cli_or_the_file() -> None:
    text = 'app = "file:App"\n[[listener]]\napp = "table:App"\nbind = "127.0.0.1:1"\n'
    cfg = build(file_text=text, cli={"bind": ["127.0.0.1:2"]})
    assert [(x.app, str(x.address)) for x in cfg.listeners] == [("file:App", "127.0.0.1:2")]
    cfg = build(file_text=text, environ={"SHARDUDP_BIND": "127.0.0.1:3"}, cli={"app": "c:D"})
    assert [(x.app, str(x.address)) for x in cfg.listeners] == [("c:D", "127.0.0.1:3")]
    # The file's own tables stay when no later source names a listener.
    cfg = build(file_text=text, cli={"app": "c:D"})
    assert [(x.app, str(x.address)) for x in cfg.listeners] == [("table:App", "127.0.0.1:1")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("9100", Address("127.0.0.1", 9100)), (":9100", Address("127.0.0.1", 9100)),
     (9100, Address("127.0.0.1", 9100)), ("0", Address("127.0.0.1", 0)),
     ("0.0.0.0:9100", Address("0.0.0.0", 9100)), ("[::1]:9100", Address("::1", 9100))],
)
def test_metrics_port_alone_means_loopback(value: object, expected: Address) -> None:
    assert build(cli={"app": "a:B", "bind": ["127.0.0.1:1"], "metrics": value}).metrics == expected


def test_the_config_remembers_where_each_value_came_from() -> None:
    cfg = build(file_text='user = "a"\nlog_file = "/x"\n[[listener]]\napp="a:B"\n'
                          'bind="127.0.0.1:1"', environ={"SHARDUDP_GROUP": "g"},
                cli={"log_file": "/y"})
    assert (cfg.label("user"), cfg.label("group"), cfg.label("log_file")) == (
        "user", "SHARDUDP_GROUP", "--log-file")
    assert cfg.label("pid_file") == "pid_file"


def test_lookup_merges_one_setting_without_needing_a_listener() -> None:
    text = 'control = "/from/file.sock"\nworkers = 0\n'
    assert config.lookup("control") == ("auto", None)
    assert config.lookup("control", file_text=text) == ("/from/file.sock", "control")
    env = {"SHARDUDP_CONTROL": "/from/env.sock", "SHARDUDP_WORKERS": "x"}
    assert config.lookup("control", file_text=text, environ=env) == (
        "/from/env.sock", "SHARDUDP_CONTROL")
    assert config.lookup("control", file_text=text, environ=env,
                         cli={"control": "/from/cli.sock"}) == ("/from/cli.sock", "--control")
    with pytest.raises(ConfigError) as info:
        config.lookup("control", file_text="control = 3")
    assert info.value.errors == ["control: expected a non-empty string, got 3"]


def test_an_empty_listener_variable_replaces_nothing() -> None:
    text = '[[listener]]\napp = "a:B"\nbind = "127.0.0.1:1"\n'
    cfg = build(file_text=text, environ={"SHARDUDP_BIND": ""})
    assert [str(x.address) for x in cfg.listeners] == ["127.0.0.1:1"]


def test_multicast_defaults_are_fine_where_a_multicast_listener_takes_them() -> None:
    # On the command line next to one, or at the top of a file (a default for its listeners).
    cfg = build(cli={"app": "a:B", "bind": ["127.0.0.1:1"], "multicast": ["228.0.0.1:5"],
                     "multicast_ttl": "4"})
    assert [x.multicast_ttl for x in cfg.listeners] == [1, 4]
    cfg = build(file_text='multicast_ttl = 4\n[[listener]]\napp="a:B"\nbind="127.0.0.1:1"')
    assert cfg.listeners[0].multicast_ttl == 1
    text = '[[listener]]\napp="a:B"\nmulticast="228.0.0.1:5"'
    assert build(file_text=text, environ={"SHARDUDP_MULTICAST_TTL": "3"}).listeners[0] \
        .multicast_ttl == 3


def test_listener_names_keep_ipv6_brackets() -> None:
    cfg = build(cli={"app": "a:B", "bind": ["[::]:5", "[::1]:6", "127.0.0.1:7"],
                     "multicast": ["[ff02::1:3]:8"]})
    assert [x.name for x in cfg.listeners] == [
        "udp-[::]:5", "udp-[::1]:6", "udp-127.0.0.1:7", "mcast-[ff02::1:3]:8"]
