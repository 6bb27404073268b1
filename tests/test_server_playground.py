"""The playground page at GET /, driven in headless Chromium: type a prompt, press Generate, see streamed text.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages separated
by NUL bytes on file descriptors 3 and 4), so no driver package is needed. Skipped without Debian's
chromium package (apt-get install -y chromium).
"""

import json
import os
import shutil
import subprocess
import time

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium package")


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe."""

    def __init__(self, user_data_dir):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-extensions", "--remote-debugging-pipe", f"--user-data-dir={user_data_dir}"]
        # The browser reads commands on fd 3 and writes replies on fd 4.
        cmd = f'exec "{CHROMIUM}" {" ".join(flags)} about:blank 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.proc = subprocess.Popen(["bash", "-c", cmd], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._id = 0
        self.session = None
        self.handlers = {}  # event method -> callback(params), run while waiting for replies

    def post(self, method, **params) -> int:
        """Sends a command (to the attached page once there is one) without waiting; returns its id."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        return self._id

    def send(self, method, **params):
        """Sends a command and returns its result, handling events that arrive meanwhile."""
        wanted = self.post(method, **params)
        while True:
            reply = self._read()
            if reply.get("id") == wanted:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if reply.get("method") in self.handlers:
                self.handlers[reply["method"]](reply["params"])

    def _read(self):
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 65536)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def open(self, url, intercept=False):
        """Opens a page at url and attaches to it (intercept: answer auth challenges via self.handlers)."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        if intercept:
            self.send("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && !!document.getElementById('generate')")

    def eval(self, expression):
        """Returns the value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression, timeout=30.0):
        """Polls until the expression is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.02)
        raise TimeoutError(expression)

    def close(self):
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.mark.parametrize("api_key", [None, "playground-key"])
def test_type_a_prompt_and_watch_it_stream(serve_tiny, tmp_path, api_key):
    server = serve_tiny(n_positions=256, layers=2, model_id="tiny-neo", api_key=api_key)
    browser = DevTools(tmp_path / "profile")
    try:
        if api_key:
            # As a person would in the browser's Basic-auth prompt: any user name, the key as password.
            answer = {"response": "ProvideCredentials", "username": "me", "password": api_key}
            browser.handlers["Fetch.requestPaused"] = lambda p: browser.post(
                "Fetch.continueRequest", requestId=p["requestId"])
            browser.handlers["Fetch.authRequired"] = lambda p: browser.post(
                "Fetch.continueWithAuth", requestId=p["requestId"], authChallengeResponse=answer)
        browser.open(server.url + "/", intercept=bool(api_key))
        assert browser.eval("document.getElementById('model').textContent") == "tiny-neo"
        # Type the prompt as a user would: focus the box, select its example text, insert keystrokes' text.
        browser.eval("const p = document.getElementById('prompt'); p.focus(); p.select(); true")
        browser.send("Input.insertText", text="Once upon a time")
        browser.eval("document.getElementById('temperature').value = '0';"
                     "document.getElementById('max_tokens').value = '40'; true")
        # Record every change of the output as it happens, then press Generate.
        browser.eval("window.__seen = []; new MutationObserver(() => window.__seen.push("
                     "document.getElementById('generated').textContent)).observe("
                     "document.getElementById('output'), {childList: true, characterData: true, subtree: true});"
                     "document.getElementById('generate').click(); true")
        status = browser.wait_for("document.getElementById('status').textContent.startsWith('done') && "
                                  "document.getElementById('status').textContent")
        text = browser.eval("document.getElementById('generated').textContent")
        seen = browser.eval("window.__seen")
    finally:
        browser.close()
    assert "done (" in status
    expected = server.lm.generate("Once upon a time", max_new_tokens=40, temperature=0)
    assert text == expected and text
    partial = [s for s in seen if s and s != text]
    assert len(set(partial)) >= 2 and all(text.startswith(s) for s in partial)  # it grew piece by piece
