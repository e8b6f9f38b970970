"""A minimal Hugging Face Hub on 127.0.0.1 for tests: real HTTP, served to huggingface_hub's own
(httpx) client. Only what push and download use: create repo, validate YAML, preupload, commit
(NDJSON, base64 files), delete repo, model info, and HEAD/GET resolve with X-Repo-Commit and ETag headers.
`fail_commits = True` answers every commit with a server error (a push that dies after creating the repo)."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"sha": str, "files": {path: bytes}}
        self.requests: list[str] = []
        self.fail_commits = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not (head or self.command == "HEAD"):  # a HEAD reply carries headers only
                self.wfile.write(body)

        def _json(self, code: int, obj, extra: dict | None = None):
            headers = {"Content-Type": "application/json", **(extra or {})}
            self._send(code, json.dumps(obj).encode(), headers)

        def _not_found(self, kind="Repo"):
            self._json(404, {"error": f"{kind} not found"}, {"X-Error-Code": f"{kind}NotFound"})

        def do_POST(self):
            hub.requests.append(f"POST {self.path}")
            body = self._body()
            if self.path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
                if repo_id in hub.repos:
                    return self._json(409,
                                      {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                hub.repos[repo_id] = {"sha": "0" * 40, "files": {}}
                return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if self.path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            m = re.match(r"^/api/models/(.+?/.+?)/(preupload|commit)/(.+)$", self.path)
            if not m or m.group(1) not in hub.repos:
                return self._not_found()
            repo_id, action = m.group(1), m.group(2)
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files], "commitOid": hub.repos[repo_id]["sha"]})
            if hub.fail_commits:
                return self._json(500, {"error": "Internal Error"})
            repo = hub.repos[repo_id]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo["sha"] = hashlib.sha1(repo["sha"].encode() + body).hexdigest()
            return self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{repo['sha']}",
                                    "commitOid": repo["sha"], "pullRequestUrl": None})

        def do_DELETE(self):
            hub.requests.append(f"DELETE {self.path}")
            req = json.loads(self._body())
            repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
            if self.path != "/api/repos/delete" or hub.repos.pop(repo_id, None) is None:
                return self._not_found()
            return self._send(200)

        def do_GET(self):
            self._get(head=False)

        def do_HEAD(self):
            self._get(head=True)

        def _get(self, head: bool):
            hub.requests.append(f"{'HEAD' if head else 'GET'} {self.path}")
            path = self.path.split("?")[0]
            m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
            if m:
                repo = hub.repos.get(m.group(1))
                if repo is None:
                    return self._not_found()
                return self._json(200, {"id": m.group(1), "modelId": m.group(1), "sha": repo["sha"], "private": False,
                                        "siblings": [{"rfilename": f} for f in sorted(repo["files"])]})
            m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m:
                repo = hub.repos.get(m.group(1))
                if repo is None:
                    return self._not_found()
                data = repo["files"].get(m.group(3))
                if data is None:
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                         "X-Repo-Commit": repo["sha"]})
                etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                return self._send(200, data, {"X-Repo-Commit": repo["sha"], "ETag": etag,
                                              "Content-Type": "application/octet-stream"}, head=head)
            self._not_found()

    return Handler


def seed_cache(cache_dir, repo_id: str, files: dict[str, bytes], sha: str = "a" * 40) -> None:
    """Lay out a Hub cache entry by hand (models--owner--name/refs/main, snapshots/<sha>/...),
    as a previous online download would have left it."""
    from pathlib import Path
    root = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(sha)
    for name, data in files.items():
        target = root / "snapshots" / sha / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
