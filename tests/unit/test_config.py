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
        ({"cli": {"bind": ["127.0.0.1:1"]}}, ".app: missing"),
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
            "env workers:",
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
            "address family differs",
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
