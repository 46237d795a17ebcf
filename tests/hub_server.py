"""A local stand-in for the Hugging Face Hub on 127.0.0.1, for push tests.

It speaks the part of the Hub API that ``create_repo``, ``upload_folder`` /
``push_to_hub`` and ``hf_hub_download`` use (../shared/NOTES.md lists the requests):
repositories are folders under ``root``; commits arrive as NDJSON with base64 files
("regular" upload mode, no LFS). Every request's headers are recorded so a test can check
what the client sent (the token only in the Authorization header).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubState:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str, dict]] = []
        self.commits = 0
        self.heads: dict[str, str] = {}  # repo -> latest commit id

    def head(self, repo: str) -> str:
        return self.heads.get(repo, "0" * 40)

    def repo_dir(self, repo: str) -> Path:
        return self.root / repo


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body=b"", content_type="application/json", headers=None):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

        def _record(self):
            state.requests.append((self.command, self.path, dict(self.headers)))

        def do_POST(self):  # noqa: N802
            self._record()
            body = self._body()
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                data = json.loads(body)
                repo = f"{data.get('organization') or 'user'}/{data['name']}"
                if state.repo_dir(repo).exists() and not data.get("exist_ok"):
                    return self._send(409, {"error": "exists", "url": f"{self._base()}/{repo}"})
                state.repo_dir(repo).mkdir(parents=True, exist_ok=True)
                return self._send(200, {"url": f"{self._base()}/{repo}"})
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            parts = path.strip("/").split("/")
            if len(parts) >= 6 and parts[0] == "api" and parts[4] == "preupload":
                files = json.loads(body).get("files", [])
                return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                   "shouldIgnore": False} for f in files]})
            if len(parts) >= 6 and parts[0] == "api" and parts[4] == "commit":
                repo = f"{parts[2]}/{parts[3]}"
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        target = state.repo_dir(repo) / item["value"]["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(item["value"]["content"]))
                state.commits += 1
                # unique across servers and runs: a client cache keyed by commit id never
                # serves an earlier run's files
                oid = hashlib.sha1(uuid.uuid4().bytes).hexdigest()
                state.heads[repo] = oid
                return self._send(200, {"commitUrl": f"{self._base()}/{repo}/commit/{oid}",
                                        "commitOid": oid})
            return self._send(404, {"error": f"not found: {path}"})

        def _file(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, rel = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                target = state.repo_dir(repo) / rel
                if target.is_file():
                    data = target.read_bytes()
                    etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                    return self._send(200, data, "application/octet-stream",
                                      {"ETag": etag, "X-Repo-Commit": state.head(repo)})
                return self._send(404, {"error": "no such file"},
                                  headers={"X-Error-Code": "EntryNotFound"})
            if len(parts) >= 5 and parts[0] == "api" and parts[1] == "models":
                repo = f"{parts[2]}/{parts[3]}"
                folder = state.repo_dir(repo)
                if not folder.exists():
                    return self._send(404, {"error": "no such repo"},
                                      headers={"X-Error-Code": "RepoNotFound"})
                files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
                return self._send(200, {"id": repo, "sha": state.head(repo),
                                        "siblings": [{"rfilename": f} for f in files]})
            return self._send(404, {"error": "not found"})

        def do_HEAD(self):  # noqa: N802
            self._record()
            self._file()

        def do_GET(self):  # noqa: N802
            self._record()
            self._file()

        def _base(self) -> str:
            host, port = self.server.server_address[:2]
            return f"http://{host}:{port}"

    return Handler


class LocalHub:
    """``with LocalHub(tmp) as hub: hub.endpoint``: a server on a free loopback port."""

    def __init__(self, root: Path):
        self.state = HubState(Path(root))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
