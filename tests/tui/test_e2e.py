"""The TUI against a real node: `poolai node` in a subprocess on 127.0.0.1 (trio), the real
SocketNodeClient (asyncio), and the Overview showing the node's peer ID."""

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from tui.app import PoolaiApp
from tui.client import ControlError, NodeNotRunning, SocketNodeClient

START_TIMEOUT_S = 120  # converting nothing (the model cache is shared), loading 2 blocks: seconds; CPU is shared


@pytest.fixture
def running_node(tmp_path, model_cache):
    config = tmp_path / "node.toml"
    config.write_text(f"""
[node]
listen = "/ip4/127.0.0.1/tcp/0"
span = "0:2"
log_level = "info"

[model]
cache_dir = "{model_cache}"
""")
    data_dir = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "node", "node", "--config", str(config), "--data-dir", str(data_dir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (data_dir / "node.json").exists():
            if proc.poll() is not None:
                pytest.fail(f"the node exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the node did not start within {START_TIMEOUT_S} s")
            time.sleep(0.2)
        yield data_dir, json.loads((data_dir / "node.json").read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_overview_shows_the_real_nodes_peer_id(running_node):
    data_dir, state = running_node

    async def main() -> None:
        client = SocketNodeClient(data_dir)
        # The real client's errors: an unknown call answers an error, the connection stays usable.
        try:
            await client.call("no_such_method")
        except ControlError as e:
            assert e.code == "unknown_method"
        else:
            raise AssertionError("an unknown method must be an error")
        app = PoolaiApp(client, data_dir=str(data_dir), poll_s=None)
        async with app.run_test(size=(80, 24)) as pilot:
            assert await app.poll_once()
            await pilot.pause()
            body = app.screen.query_one("#overview-body")
            text = (body.content if hasattr(body, "content") else body.renderable)
            from rich.console import Console

            console = Console(width=200, record=True, color_system=None)
            console.print(text)
            shown = console.export_text()
            assert state["peer_id"] in shown
            assert "blocks 0:2, online" in shown
            assert app.snapshot.status["addrs"] == state["addrs"]
            # The log stream delivers the node's own lines.
            for _ in range(300):
                await pilot.pause(0.05)
                if any("serving blocks 0:2" in x["message"] for x in app.query_one("#logs-pane").lines):
                    break
            assert any("serving blocks 0:2" in x["message"] for x in app.query_one("#logs-pane").lines)

    asyncio.run(main())


def test_no_node_is_a_clear_error(tmp_path):
    async def main() -> None:
        client = SocketNodeClient(tmp_path)
        try:
            await client.status()
        except NodeNotRunning as e:
            assert str(tmp_path) in str(e) and "no node is running" in str(e)
        else:
            raise AssertionError("no node runs there")

    asyncio.run(main())
