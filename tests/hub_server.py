"""A small Hub-compatible HTTP server on 127.0.0.1 for tests: enough of the Hub API for a real push and download.

huggingface_hub 2.x talks HTTP through httpx2, which ``responses``/``requests-mock`` cannot intercept, so the tests
run the real client against this server instead (``HF_ENDPOINT=http://127.0.0.1:<port>``). Implemented endpoints,
as called by ``HfApi.create_repo``, ``HfApi.create_commit`` (regular, non-LFS uploads), ``model_info`` and
``hf_hub_download`` (what ``timm.create_model("hf-hub:...")`` uses):

    POST /api/repos/create                       -> {"url": ...}; 409 if it exists
    POST /api/validate-yaml                      -> {} (README front matter accepted)
    POST /api/models/{repo}/preupload/{rev}      -> every file "regular" (sent base64 inside the commit)
    POST /api/models/{repo}/commit/{rev}         -> ndjson header + files; {"commitUrl", "commitOid"}
    GET  /api/models/{repo}[/revision/{rev}]     -> {"id", "sha", "siblings": [...]}
    HEAD/GET /{repo}/resolve/{rev}/{path}        -> the file, with X-Repo-Commit / ETag / Content-Length
    GET  /api/whoami-v2                          -> {"name": "user", "orgs": [...], "auth": {"accessToken": {"role"}}}

Write requests need ``Authorization: Bearer <token>`` when the server is started with ``token=...``; a
``read_token`` is known to whoami (role "read") but refused for writes (HTTP 403).

Example:
    >>> with HubServer(token="hf_test") as hub:     # doctest: +SKIP
    ...     os.environ["HF_ENDPOINT"] = hub.url
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"


class _State:
    def __init__(self, token: str | None, read_token: str | None = None, orgs: dict[str, str] | None = None):
        self.token = token
        self.read_token = read_token
        self.orgs = dict(orgs or {})  # organisation -> the user's role in it ("read", "write", "admin")
        self.repos: dict[str, dict] = {}  # repo_id -> {"files": {path: bytes}, "sha": str, "commits": [msg]}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers) for assertions
        self.fail_commits = 0  # answer this many commit requests with HTTP 503 first (to test retries)
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"
    state: _State

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- helpers -------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes | dict | None = None, headers: dict | None = None) -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
        self.send_response(status)
        content_type = "application/json" if isinstance(body, dict) else "application/octet-stream"
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorised(self) -> bool:
        if self.state.token is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {self.state.token}":
            return True
        if self.state.read_token and self.headers.get("Authorization") == f"Bearer {self.state.read_token}":
            self._error(403, "You don't have the rights to create a model under this namespace")
            return False
        self._error(401, "Invalid credentials in Authorization header")
        return False

    def _path(self) -> str:
        return unquote(urlsplit(self.path).path)

    def _record(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.state.lock:
            self.state.requests.append((self.command, self._path(), headers))

    # -- routes --------------------------------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        self._record()
        path = self._path()
        body = self._body()
        if path == "/api/validate-yaml":
            return self._send(200, {})
        if not self._authorised():
            return None
        if path == "/api/repos/create":
            payload = json.loads(body or b"{}")
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            url = f"http://{self.headers['Host']}/{repo_id}"
            with self.state.lock:
                if repo_id in self.state.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": url})
                self.state.repos[repo_id] = {
                    "files": {},
                    "sha": "0" * 40,
                    "commits": [],
                    "private": payload.get("private"),
                }
            return self._send(200, {"url": url, "name": repo_id, "id": repo_id})
        m = re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", path)
        if m:
            if m["repo"] not in self.state.repos:
                return self._error(404, "Repository not found", "RepoNotFound")
            files = json.loads(body)["files"]
            out = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self._send(200, {"files": out, "commitOid": self.state.repos[m["repo"]]["sha"]})
        m = re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", path)
        if m:
            if self.state.fail_commits > 0:
                self.state.fail_commits -= 1
                return self._error(503, "Service temporarily unavailable")
            repo = self.state.repos.get(m["repo"])
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            summary = ""
            with self.state.lock:
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    if item["key"] == "header":
                        summary = item["value"]["summary"]
                    elif item["key"] == "file":
                        repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        repo["files"].pop(item["value"]["path"], None)
                    else:
                        return self._error(400, f"unsupported commit operation {item['key']!r}")
                digest = hashlib.sha1(repr(sorted(repo["files"].items())).encode() + summary.encode())
                repo["sha"] = digest.hexdigest()
                repo["commits"].append(summary)
            url = f"http://{self.headers['Host']}/{m['repo']}/commit/{repo['sha']}"
            return self._send(200, {"commitUrl": url, "commitOid": repo["sha"], "pullRequestUrl": None})
        return self._error(404, f"no route for POST {path}")

    def do_GET(self) -> None:  # noqa: N802
        self._record()
        path = self._path()
        if path == "/api/whoami-v2":
            roles = {f"Bearer {self.state.token}": "write", f"Bearer {self.state.read_token}": "read"}
            role = roles.get(self.headers.get("Authorization") or "")
            if role is None:
                return self._error(401, "Invalid credentials in Authorization header")
            orgs = [{"name": name, "roleInOrg": r} for name, r in sorted(self.state.orgs.items())]
            token = {"displayName": "test", "role": role}
            return self._send(200, {"type": "user", "name": "user", "orgs": orgs, "auth": {"accessToken": token}})
        m = re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", path)
        if m:
            repo = self.state.repos.get(m["repo"])
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            siblings = [{"rfilename": p, "size": len(b)} for p, b in sorted(repo["files"].items())]
            return self._send(200, {"id": m["repo"], "modelId": m["repo"], "sha": repo["sha"], "siblings": siblings})
        m = re.fullmatch(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if m:
            repo = self.state.repos.get(m["repo"])
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            data = repo["files"].get(m["file"])
            if data is None:
                return self._error(404, "Entry not found", "EntryNotFound")
            etag = '"' + hashlib.sha256(data).hexdigest() + '"'
            return self._send(200, data, {"X-Repo-Commit": repo["sha"], "ETag": etag})
        return self._error(404, f"no route for GET {path}")

    do_HEAD = do_GET  # noqa: N815  (same headers, no body: _send skips it)


class HubServer:
    """Run the fake Hub on ``127.0.0.1`` (a free port) in a daemon thread; a context manager.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        repos: ``{repo_id: {"files": {path: bytes}, "sha", "commits": [summary, ...]}}``.
        requests: every request seen, as ``(method, path, lower-cased headers)``.
    """

    def __init__(self, token: str | None = None, *, read_token: str | None = None, orgs: dict | None = None):
        self.state = _State(token, read_token, orgs)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def repos(self) -> dict:
        return self.state.repos

    @property
    def requests(self) -> list:
        return self.state.requests

    def fail_next_commits(self, count: int) -> None:
        """Answer the next ``count`` commit requests with HTTP 503."""
        self.state.fail_commits = count

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python tests/hub_server.py, then HF_ENDPOINT=<printed url>
    import time

    with HubServer() as hub:
        print(hub.url, flush=True)
        while True:
            time.sleep(3600)
