"""Multi-process swarms on 127.0.0.1: `poolai` node processes, real weights, real kills."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

PROMPT = "Write a short story about a robot who learns to paint."


def poolai(*args, timeout=300, data_dir=None):
    cmd = [sys.executable, "-m", "node", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def leftover_processes(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory, model_cache):
    return tmp_path_factory.mktemp("demo")  # the demo finds the model through $POOLAI_MODEL_CACHE


def test_demo_equals_local_generation(demo_root):
    local = poolai("generate", "--local", "--json", "--prompt", PROMPT, "--max-new-tokens", "32",
                   "--data-dir", str(demo_root))
    assert local.returncode == 0, local.stderr
    expected = json.loads(local.stdout.strip().splitlines()[-1])
    demo = poolai("demo", "--json", "--prompt", PROMPT, "--max-new-tokens", "32", "--data-dir", str(demo_root))
    assert demo.returncode == 0, demo.stderr[-3000:]
    got = json.loads(demo.stdout.strip().splitlines()[-1])
    assert len(expected["tokens"]) == 32
    assert got["tokens"] == expected["tokens"]
    assert got["text"] == expected["text"]
    assert [(h["start"], h["end"]) for h in got["route"]] == [(0, 10), (10, 20), (20, 30)]
    assert len({h["peer"] for h in got["route"]}) == 3 and got["tokens_per_s"] > 0
    assert not leftover_processes(str(demo_root / "node-"))


def test_demo_stops_every_node_on_ctrl_c(demo_root, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "node", "demo", "--max-new-tokens", "400", "--data-dir",
                             str(demo_root), "--prompt", PROMPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "swarm ready" in line or not line:
            break
    assert "swarm ready" in seen, seen[-2000:]
    time.sleep(1.0)  # generating now
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, rest[-2000:]
    assert "interrupted; stopped 3 nodes" in rest and "Traceback" not in rest
    time.sleep(0.5)
    assert not leftover_processes(str(demo_root / "node-"))


def test_node_stops_cleanly_on_sigterm(tmp_path, model_cache):
    cfg = tmp_path / "n.toml"
    cfg.write_text(f"[model]\ncache_dir = '{model_cache}'\n")
    proc = subprocess.Popen([sys.executable, "-m", "node", "node", "--config", str(cfg), "--data-dir",
                             str(tmp_path / "d"), "--span", "0:3"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    state_file = tmp_path / "d" / "node.json"
    deadline = time.monotonic() + 120
    while not state_file.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    state = json.loads(state_file.read_text())
    port = int(state["addrs"][0].split("/tcp/")[1].split("/")[0])
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert not state_file.exists()
    assert "Traceback" not in err
    s = socket.socket()
    s.bind(("127.0.0.1", port))  # the listening socket is gone
    s.close()
    log = (tmp_path / "d" / "node.log").read_text()
    assert "serving blocks 0:3" in log and "received SIGTERM" in log
