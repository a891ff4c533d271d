"""Headless Chromium driven over the DevTools protocol, for tests of the Airflow web UI.

Debian's chromium (installed by `make browser`, which `make test` runs) and the `websockets` client
Airflow already depends on: no browser download, no extra driver. Just enough protocol to open a
page, wait for text, type into inputs, click, and take screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# DevTools errors of an evaluation whose page navigated away under it: worth a second try.
NAVIGATED = ("navigated or closed", "Cannot find context", "Execution context was destroyed")
NAVIGATION_RETRIES = 5
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,1000",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]


class Browser:
    def __init__(self) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="umchrome-"))
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.loads(response.read()) if t["type"] == "page")
        self._closing = contextlib.ExitStack()
        self.ws = self._closing.enter_context(
            # No keepalive pings: a test that waits a minute between two commands (a DAG run) does
            # not read the socket meanwhile, and a busy machine then missed the pong's deadline.
            connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10, ping_interval=None)
        )
        self._id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, **params: Any) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def goto(self, url: str, timeout: float = 60) -> None:
        """Navigate and return once the new document has replaced the old one (no stale clicks)."""
        self.js("window.__leaving = true")
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self.js("window.__leaving === true || document.readyState !== 'complete'"):
                    return
            except RuntimeError:  # the old context went away mid-evaluation: still loading
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not load within {timeout} s")
            time.sleep(0.2)

    def js(self, expression: str) -> Any:
        """Evaluate in the page; an evaluation cut off by a navigation (the single-page app redirects
        itself, e.g. to the login form, after the document loaded) is tried again in the new one."""
        for attempt in range(NAVIGATION_RETRIES + 1):
            try:
                result = self.send(
                    "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
                )
                break
            except RuntimeError as exc:
                if attempt == NAVIGATION_RETRIES or not any(m in str(exc) for m in NAVIGATED):
                    raise
                time.sleep(0.3)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"page never showed {needles!r}; it shows: {text[:1500]!r}")
            time.sleep(0.5)

    def frame_text(self, selector: str = "iframe") -> str:
        """The text of a same-origin iframe's document ('' until it has one)."""
        return (
            self.js(
                f"""(() => {{
                    const frame = document.querySelector({json.dumps(selector)});
                    try {{ return frame.contentDocument.body.innerText; }} catch (e) {{ return ''; }}
                }})()"""
            )
            or ""
        )

    def wait_for_frame_text(self, *needles: str, selector: str = "iframe", timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.frame_text(selector)
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"the frame never showed {needles!r}; it shows: {text[:1500]!r}")
            time.sleep(0.5)

    def window(self, width: int, height: int) -> None:
        """Resize the page's viewport (taller screenshots)."""
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def wait_for(self, selector: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.js(f"!!document.querySelector({json.dumps(selector)})"):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no element {selector} on {self.js('location.href')}: {self.text()[:800]!r}"
                )
            time.sleep(0.5)

    def fill(self, selector: str, value: str) -> None:
        """Type into a React-controlled input (the value setter React listens to, then an input event)."""
        self.js(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                const setter = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
                setter.call(el, {json.dumps(value)});
                el.dispatchEvent(new Event('input', {{bubbles: true}}));
            }})()"""
        )

    def click(self, selector: str, timeout: float = 60) -> None:
        """Click the element once it exists: React renders buttons some time after the page's text."""
        self.wait_for(selector, timeout=timeout)
        self.js(f"document.querySelector({json.dumps(selector)}).click()")

    def click_text(self, text: str) -> None:
        """Click the innermost link or button whose visible text is ``text``."""
        found = self.js(
            f"""(() => {{
                const els = [...document.querySelectorAll('a, button, [role=tab]')]
                    .filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)});
                if (!els.length) return false;
                els[0].click();
                return true;
            }})()"""
        )
        if not found:
            raise AssertionError(f"nothing to click named {text!r} on {self.js('location.href')}")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            if getattr(self, "_closing", None):
                self._closing.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
