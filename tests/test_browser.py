"""The web page, driven in headless Chromium over the DevTools protocol: type, submit, read."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest

websockets = pytest.importorskip("websockets")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _devtools_url(port: int, deadline: float) -> str:
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as r:
                pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            time.sleep(0.2)
    raise AssertionError("Chromium did not open its DevTools endpoint")


async def _drive(ws_url: str, page_url: str, mode: str) -> tuple[str, str]:
    async with websockets.connect(ws_url, max_size=None) as ws:
        counter = 0

        async def call(method, **params):
            nonlocal counter
            counter += 1
            await ws.send(json.dumps({"id": counter, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == counter:
                    return msg.get("result", {})

        async def js(expr):
            r = await call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
            return r.get("result", {}).get("value")

        await call("Page.enable")
        await call("Page.navigate", url=page_url)
        for _ in range(100):
            if await js("document.readyState") == "complete" and await js("!!document.getElementById('prompt')"):
                break
            await asyncio.sleep(0.1)
        # type into the prompt box like a user: focus, clear, insert text
        await js("document.getElementById('prompt').focus(); document.getElementById('prompt').select()")
        await call("Input.insertText", text="JULIET:")
        await js(
            "document.getElementById('temperature').value = '0'; document.getElementById('max_tokens').value = '12'; "
            f"document.getElementById('mode').value = '{mode}'"
        )
        await js("document.getElementById('submit').click()")
        for _ in range(300):
            if await js("document.getElementById('status').textContent") in ("done",) or (
                await js("document.getElementById('status').textContent") or ""
            ).startswith("error"):
                break
            await asyncio.sleep(0.1)
        return await js("document.getElementById('status').textContent"), await js(
            "document.getElementById('output').textContent"
        )


@pytest.mark.parametrize("mode", ["complete", "chat"])
def test_page_types_submits_and_streams_the_result(server, mode):
    url, _ = server
    assert CHROMIUM, "chromium is not installed (scripts/test.sh installs it with apt-get)"
    import httpx

    if mode == "chat":  # the typed text is the user's turn; the answer streams in under it
        messages = [{"role": "user", "content": "JULIET:"}]
        answer = httpx.post(
            url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0}
        ).json()
        expected = "You: JULIET:\n\nAssistant: " + answer["choices"][0]["message"]["content"]
    else:
        answer = httpx.post(url + "/v1/completions", json={"prompt": "JULIET:", "max_tokens": 12, "temperature": 0})
        expected = "JULIET:" + answer.json()["choices"][0]["text"]
    port = 9300 + int(time.time()) % 500
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            ws_url = _devtools_url(port, time.time() + 30)
            status, output = asyncio.run(_drive(ws_url, url + "/", mode))
        finally:  # Chromium starts helper processes: end the whole group
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
    assert status == "done", status
    assert output == expected
