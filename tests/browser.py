"""A real headless Chromium for tests, driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: the browser reads commands on its fd 3 and answers on fd 4,
JSON messages ending in a NUL byte). No driver, no network port, no Python dependency.

    with Chromium(profile_dir) as browser:
        page = browser.open("http://127.0.0.1:8000/")
        page.evaluate("document.title")
        png = page.screenshot()
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

_FIRST_FREE_FD = 10  # the pipe ends go above 0-9, which the redirections below write to


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class BrowserError(Exception):
    pass


class Chromium:
    """One headless browser process; ``close()`` asks it to leave, then kills what is
    left, and waits for it."""

    def __init__(self, profile_dir: Path, *, width: int = 900, height: int = 800) -> None:
        binary = find_chromium()
        if binary is None:
            raise BrowserError("no chromium on PATH")
        commands_r, commands_w = os.pipe()
        answers_r, answers_w = os.pipe()
        # The browser's ends, moved above fd 9 so that `3<&N 4>&M` cannot clobber them.
        theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FIRST_FREE_FD)
                  for fd in (commands_r, answers_w)]  # fmt: skip
        for fd in (commands_r, answers_w):
            os.close(fd)
        args = [
            binary, "--headless", "--remote-debugging-pipe", "--no-sandbox",  # root in CI
            "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-background-networking", "--mute-audio",
            f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "about:blank",
        ]  # fmt: skip
        redirect = f'exec "$0" "$@" 3<&{theirs[0]} 4>&{theirs[1]} {theirs[0]}<&- {theirs[1]}>&-'
        self.log_path = profile_dir / "chromium.log"
        profile_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", redirect, *args],
                pass_fds=theirs,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its renderers and helpers go with its group
            )
        for fd in theirs:
            os.close(fd)
        self.commands, self.answers = commands_w, answers_r
        self.buffer = b""
        self.next_id = 0

    def call(self, method: str, params: dict[str, Any] | None = None, *,
             session: str | None = None, timeout: float = 10.0) -> dict[str, Any]:  # fmt: skip
        """Send one command and return its result; events in between are skipped."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") != self.next_id:
                    continue
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer["result"]
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer in {timeout} s")
            if select.select([self.answers], [], [], left)[0]:
                chunk = os.read(self.answers, 1 << 20)
                if not chunk:
                    raise BrowserError(f"the browser left: {self.log_path.read_text()[-2000:]}")
                self.buffer += chunk

    def open(self, url: str) -> Page:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        return Page(self, session["sessionId"])

    def close(self) -> None:
        with contextlib.suppress(BrowserError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait()
        for fd in (self.commands, self.answers):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Page:
    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser, self.session = browser, session

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (JSON-able)."""
        result = self.browser.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True},
            session=self.session,
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, clip: dict[str, float] | None = None) -> bytes:
        """A PNG of the page, or of ``clip`` (x, y, width, height in CSS pixels)."""
        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        data = self.browser.call("Page.captureScreenshot", params, session=self.session)
        return base64.b64decode(data["data"])
