"""Every bad input of `poolai node` ends with exit code 2 and one line naming the problem."""

import socket
from pathlib import Path
import time

import pytest

from node.cli import main


def run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def write(tmp_path, text, name="node.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_missing_config(tmp_path, capsys):
    code, line = run(capsys, ["node", "--config", str(tmp_path / "nope.toml"), "--data-dir", str(tmp_path)])
    assert code == 2 and "does not exist" in line and "nope.toml" in line


def test_malformed_config(tmp_path, capsys):
    cfg = write(tmp_path, "[node\nlisten = 3")
    code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(tmp_path)])
    assert code == 2 and "not valid TOML" in line


def test_unknown_key(tmp_path, capsys):
    cfg = write(tmp_path, "[node]\nlisten = '/ip4/127.0.0.1/tcp/0'\nspan_size = 3\n")
    code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(tmp_path)])
    assert code == 2 and "unknown config key 'node.span_size'" in line


def test_wrong_type(tmp_path, capsys):
    cfg = write(tmp_path, "[server]\ncache_tokens = 'lots'\n")
    code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(tmp_path)])
    assert code == 2 and "'server.cache_tokens' must be a whole number in 1..10000000" in line


@pytest.mark.parametrize(("text", "key", "want"), [
    ("[swarm]\nannounce_interval_s = nan\n", "swarm.announce_interval_s", "a number of seconds in (0, 86400]"),
    ("[server]\nsession_idle_timeout_s = inf\n", "server.session_idle_timeout_s", "a number of seconds"),
    ("[ledger]\nsync_interval_s = -1\n", "ledger.sync_interval_s", "a number of seconds"),
    ("[server]\nthroughput = nan\n", "server.throughput", "a number in [0, 1e+09]"),
    ("[server]\ncache_tokens = 100000000000\n", "server.cache_tokens", "a whole number in 1..10000000"),
    ("[server]\nmax_sessions = 0\n", "server.max_sessions", "a whole number in 1..4096"),
    ("[node]\ntorch_threads = 100000\n", "node.torch_threads", "a whole number in 0..1024"),
])
def test_values_out_of_range_are_named(tmp_path, capsys, text, key, want):
    """NaN, infinities and absurd sizes are refused at load, not met later as a hang or a huge allocation."""
    code, line = run(capsys, ["node", "--config", write(tmp_path, text), "--data-dir", str(tmp_path)])
    assert code == 2 and f"'{key}' must be {want}" in line, line


@pytest.mark.parametrize("addr,match", [
    ("/ip4/127.0.0.1/tcp/notaport", "not a valid multiaddr"),
    ("/ip4/999.0.0.1/tcp/1", "not a valid multiaddr"),
    ("/ip4/127.0.0.1/udp/1", "must be a TCP multiaddr"),
])
def test_bad_listen_multiaddr(tmp_path, capsys, addr, match):
    cfg = write(tmp_path, "")
    code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(tmp_path), "--listen", addr])
    assert code == 2 and match in line


def test_bootstrap_without_peer_id(tmp_path, capsys):
    cfg = write(tmp_path, "[swarm]\nbootstrap = ['/ip4/127.0.0.1/tcp/4001']\n")
    code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(tmp_path)])
    assert code == 2 and "lacks the peer ID" in line


@pytest.mark.parametrize("span,match", [("10", "not of the form A:B"), ("5:5", "empty"), ("a:b", "not of the form")])
def test_bad_span_syntax(tmp_path, capsys, span, match):
    code, line = run(capsys, ["node", "--config", write(tmp_path, ""), "--data-dir", str(tmp_path), "--span", span])
    assert code == 2 and match in line


def test_span_outside_model(tmp_path, capsys, model_cache):
    cfg = write(tmp_path, f"[model]\ncache_dir = '{model_cache}'\n")
    code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(tmp_path), "--span", "20:40"])
    assert code == 2 and "span 20:40 is outside the model's 30 blocks" in line


def test_port_in_use(tmp_path, capsys, model_cache):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        cfg = write(tmp_path, f"[model]\ncache_dir = '{model_cache}'\n")
        code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(tmp_path), "--span", "0:1",
                                  "--listen", f"/ip4/127.0.0.1/tcp/{port}"])
    finally:
        taken.close()
    assert code == 2 and "cannot listen on" in line and str(port) in line and "in use" in line


def test_unreachable_bootstrap_times_out(tmp_path, capsys, model_cache):
    # A peer that accepts TCP and never speaks: the worst case for a dial (120 s inside libp2p).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    port = silent.getsockname()[1]
    peer = "12D3KooWEvjjXganJA2Qu4tgVDM3tGfqoaQcxSSZhyadL1bG7Fd1"
    cfg = write(tmp_path, f"[model]\ncache_dir = '{model_cache}'\n[swarm]\nbootstrap_timeout_s = 1.5\n"
                          f"bootstrap = ['/ip4/127.0.0.1/tcp/{port}/p2p/{peer}']\n")
    t0 = time.monotonic()
    try:
        code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(tmp_path), "--span", "0:1"])
    finally:
        silent.close()
    assert code == 2 and "no bootstrap peer reachable" in line and "no answer within 1.5 s" in line
    assert time.monotonic() - t0 < 30


def test_data_dir_owned_by_another_node(tmp_path, capsys):
    from node.runtime import lock_data_dir

    held = lock_data_dir(tmp_path)
    try:
        code, line = run(capsys, ["node", "--config", write(tmp_path, ""), "--data-dir", str(tmp_path)])
    finally:
        held.close()
    assert code == 2 and "another poolai node is running" in line


def test_unusable_data_dirs_are_named(tmp_path, capsys):
    cfg = write(tmp_path, "")
    afile = tmp_path / "afile"
    afile.write_text("")
    code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(afile)])
    assert code == 2 and "is a file, not a directory" in line
    code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(afile / "below")])
    assert code == 2 and "cannot create data dir" in line
    deep = tmp_path / ("d" * 100)
    code, line = run(capsys, ["node", "--config", cfg, "--data-dir", str(deep)])
    assert code == 2 and "too deep" in line and "Unix socket" in line
    code, line = run(capsys, ["status", "--data-dir", str(afile)])
    assert code == 2 and "cannot reach a node" in line


def test_listen_on_a_host_name_is_refused(tmp_path, capsys):
    """py-libp2p would listen on every interface for /dns4/localhost: the operator must name an address."""
    code, line = run(capsys, ["node", "--config", write(tmp_path, ""), "--data-dir", str(tmp_path),
                              "--listen", "/dns4/localhost/tcp/0"])
    assert code == 2 and "must name an IP address" in line


@pytest.mark.parametrize("value", ["nan", "inf", "-0.5"])
def test_generate_refuses_temperatures_outside_the_range(capsys, value):
    code, line = run(capsys, ["generate", "--local", "--prompt", "hi", "--temperature", value])
    assert code == 2 and "--temperature must be in 0..100" in line


def test_generate_bad_flags(capsys):
    code, line = run(capsys, ["generate", "--local", "--prompt", "hi", "--max-new-tokens", "0"])
    assert code == 2 and "--max-new-tokens" in line
    code, line = run(capsys, ["generate", "--prompt", "hi"])
    assert code == 2 and "needs --local" in line
    code, line = run(capsys, ["node"])
    assert code == 2 and "--config" in line


def test_the_shipped_configs_load_and_the_template_names_every_key():
    """The template promises every key explained: it must parse, and name each key the schema knows."""
    import tomllib

    from node.config import SCHEMA, NodeConfig, load_config

    root = Path(__file__).resolve().parents[2] / "bootstrap"
    template = load_config(root / "template.toml")
    load_config(root / "local.toml")
    data = tomllib.loads((root / "template.toml").read_text())
    text = (root / "template.toml").read_text()
    for section, keys in SCHEMA.items():
        if section == "demo":  # the demo's own keys live in local.toml
            continue
        for key in keys:
            assert key in data.get(section, {}) or f"# {key} =" in text, f"template lacks {section}.{key}"
    # the values it shows are the defaults, except the two a real swarm's node must change
    d = NodeConfig()
    assert (template.cache_tokens, template.max_sessions, template.ledger_credit_limit, template.metrics_port) == \
        (d.cache_tokens, d.max_sessions, d.ledger_credit_limit, d.metrics_port)
    assert template.listen == ("/ip4/0.0.0.0/tcp/4001",) and template.span is None
