"""Talk to a real JupyterHub and its users' Jupyter servers over HTTP and the kernel websocket, as a browser does.

Used by the hub end-to-end tests: log in with a password through the hub's login form,
start the user's server, get an API token, then call the server's REST API (contents,
kernels, nbgrader's assignment list, formgrader) and run code in a kernel.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import requests
import websocket


class HubSession:
    """One person's browser session on the hub (cookies included)."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.http = requests.Session()

    def _xsrf(self) -> dict[str, str]:
        return {"X-XSRFToken": self.http.cookies.get("_xsrf", "")}

    def login(self, name: str, password: str) -> HubSession:
        self.http.get(f"{self.base}/hub/login", timeout=30)
        r = self.http.post(f"{self.base}/hub/login?next=", timeout=60, allow_redirects=False,
                           data={"username": name, "password": password, "_xsrf": self.http.cookies.get("_xsrf", "")})
        if r.status_code not in (302, 303) or "jupyterhub-session-id" not in self.http.cookies:
            raise AssertionError(f"login of {name} failed: HTTP {r.status_code} {r.text[:300]}")
        self.name = name
        return self

    def api(self, method: str, path: str, **kw) -> requests.Response:
        return self.http.request(method, f"{self.base}/hub/api{path}", headers=self._xsrf(), timeout=60, **kw)

    def start_server(self, timeout: float = 180) -> None:
        r = self.api("POST", f"/users/{self.name}/server")
        if r.status_code not in (201, 202, 400):  # 400: already running
            raise AssertionError(f"spawn for {self.name}: HTTP {r.status_code} {r.text[:300]}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{self.name}").json()
            server = model.get("servers", {}).get("", {})
            if server.get("ready"):
                return
            time.sleep(1)
        raise AssertionError(f"the server of {self.name} was not ready within {timeout:.0f} s")

    def token(self) -> str:
        r = self.api("POST", f"/users/{self.name}/tokens", json={"note": "test", "expires_in": 3600})
        if r.status_code != 201:
            raise AssertionError(f"token for {self.name}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()["token"]


@dataclass
class Output:
    text: str = ""
    errors: list[str] = field(default_factory=list)


class UserServer:
    """A user's Jupyter server behind the hub's proxy, called with an API token."""

    def __init__(self, hub_base: str, name: str, token: str):
        self.base = f"{hub_base.rstrip('/')}/user/{name}"
        self.headers = {"Authorization": f"token {token}"}

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(f"{self.base}{path}", headers=self.headers, timeout=120, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(f"{self.base}{path}", headers=self.headers, timeout=300, **kw)

    def put(self, path: str, **kw) -> requests.Response:
        return requests.put(f"{self.base}{path}", headers=self.headers, timeout=120, **kw)

    def start_kernel(self, path: str = "") -> str:
        r = self.post("/api/kernels", json={"name": "python3", "path": path})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def run(self, kernel_id: str, code: str, timeout: float = 300) -> Output:
        """Execute code in a kernel over its websocket; return its printed text and errors."""
        url = self.base.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
        ws = websocket.create_connection(url, header=[f"{k}: {v}" for k, v in self.headers.items()], timeout=timeout)
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        out = Output()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = json.loads(ws.recv())
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["header"]["msg_type"], msg["content"]
                if kind == "stream":
                    out.text += content["text"]
                elif kind in ("execute_result", "display_data"):
                    out.text += content.get("data", {}).get("text/plain", "") + "\n"
                elif kind == "error":
                    out.errors.append(f"{content['ename']}: {content['evalue']}")
                elif kind == "status" and content["execution_state"] == "idle":
                    return out
            raise AssertionError(f"code did not finish within {timeout:.0f} s; output so far: {out.text[-500:]}")
        finally:
            ws.close()
