"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol with websocket-client.

No browser download and no driver binary: Chromium opens a DevTools websocket, and this helper
sends it JSON commands (navigate, evaluate, screenshot) and keeps the console / exception /
log events it pushes, so tests can assert "no errors in the browser console". If Chromium is
missing or does not start, :func:`open_browser` raises :class:`BrowserUnavailable` with the
reason; tests turn that into ``pytest.skip(reason)`` so it is reported, never counted as a pass.
"""
from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserUnavailable(RuntimeError):
    """Chromium is not installed or did not start; the message says which."""


def chromium_path() -> str | None:
    env = os.environ.get("DISTZO2_CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class Browser:
    """One headless Chromium with one page; `events` holds every DevTools event received."""

    def __init__(self, width: int = 1280, height: int = 900, start_timeout: float = 30.0):
        import websocket  # websocket-client

        exe = chromium_path()
        if exe is None:
            raise BrowserUnavailable("Chromium is not installed (apt-get install -y chromium as root; "
                                     f"looked for {', '.join(CANDIDATES)} on PATH and $DISTZO2_CHROMIUM)")
        self.profile = tempfile.mkdtemp(prefix="distzo2-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + start_timeout
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
                self.close()
                raise BrowserUnavailable(f"{exe} did not start (exit code {self.proc.returncode}): {err}")
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self._ids = itertools.count(1)
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    # -- protocol ---------------------------------------------------------------------------
    def send(self, method: str, **params) -> dict:
        """One DevTools command; returns its result (events that arrive meanwhile are kept)."""
        i = next(self._ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def pump(self, seconds: float) -> None:
        """Receive events for `seconds` (console messages, exceptions)."""
        import websocket

        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            if "method" in msg:
                self.events.append(msg)
        self.ws.settimeout(60)

    # -- page -------------------------------------------------------------------------------
    def goto(self, url: str, settle: float = 1.0) -> None:
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout=60)
        self.pump(settle)

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails'].get('text')}: {expression[:200]}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, poll: float = 0.25):
        """Evaluate `expression` until it is truthy; returns its value (TimeoutError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for: {expression}")
            self.pump(poll)

    def screenshot(self, path: str, clip: dict | None = None) -> str:
        """PNG of the viewport (or `clip` = {x, y, width, height} in CSS px) written to `path`."""
        params = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        with open(path, "wb") as f:
            f.write(data)
        return path

    def console_errors(self, ignore: tuple[str, ...] = ()) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                text = d.get("exception", {}).get("description") or d.get("text", "exception")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                text = f"{p['entry'].get('text')} ({p['entry'].get('url', '')})"
            else:
                continue
            if not any(s in text for s in ignore):
                out.append(text)
        return out

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_browser(**kwargs) -> Browser:
    return Browser(**kwargs)


def browser_or_skip(what: str, **kwargs) -> Browser:
    """A headless Chromium, or pytest.skip saying plainly that `what` was not tested in a browser."""
    import pytest

    try:
        return Browser(**kwargs)
    except BrowserUnavailable as e:
        pytest.skip(f"no headless Chromium, {what}: {e}")


def image_stats(path: str) -> dict:
    """Distinct colours and the share of pixels that differ from the most common one (the
    background): a blank or single-colour screenshot has ~0 of both."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(io.BytesIO(f.read())).convert("RGB")
    small = img.resize((max(1, img.width // 2), max(1, img.height // 2)))
    counts = small.getcolors(maxcolors=1 << 20) or []
    total = small.width * small.height
    top = max((c for c, _ in counts), default=total)
    return {"colours": len(counts), "non_background": 1 - top / total, "size": img.size}
