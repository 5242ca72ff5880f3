"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for tests on machines that cannot reach the Hub.

It answers the requests `huggingface_hub` (and through it `diffusers`) sends for the paths this project uses, with
the status codes, headers and JSON shapes of the real Hub, so the client code runs unmodified against it:

    GET  /api/whoami-v2                                    who the bearer token belongs to (401 for an unknown one)
    POST /api/repos/create                                 a model repo with the Hub's initial `.gitattributes` commit
    POST /api/validate-yaml                                README.md metadata check before a commit
    GET  /api/models/{repo}[/revision/{rev}]               model info: sha, siblings, card metadata
    GET  /api/models/{repo}/tree/{rev}[/{path}]            tree listing (recursive, LFS info, lastCommit)
    POST /api/models/{repo}/preupload/{rev}                upload mode per file: lfs or regular
    POST /{repo}.git/info/lfs/objects/batch                LFS batch: basic-transfer upload and verify actions
    PUT  {cdn}/upload/{oid}                                the LFS upload itself, to a second origin (like S3)
    POST /{repo}.git/info/lfs/objects/verify               LFS verify
    POST /api/models/{repo}/commit/{rev}                   the NDJSON commit (file, lfsFile, deletedFile/Folder);
                                                           with create_pr=1 a pull request: the commit on refs/pr/N
    HEAD/GET /{repo}/resolve/{rev}/{path}                  regular files with ETag; LFS files as a 302 to the CDN
                                                           with X-Linked-Etag and X-Linked-Size; X-Repo-Commit always
    GET  {cdn}/blobs/{sha256}                              LFS content, served without authentication

Errors carry the Hub's `X-Error-Code` / `X-Error-Message` headers (RepoNotFound, RevisionNotFound, EntryNotFound)
so the client raises the same exception types. Requests are logged in `requests` and `HubServer.fail_commits_to`
makes commits to chosen repos fail with a 500, as a Hub outage would.

What it cannot prove:
- Xet transfers: the tests set HF_HUB_DISABLE_XET=1 and this server only speaks the LFS basic transfer, so the Xet
  upload and download paths (the default on the real Hub when `hf_xet` is installed) are not exercised.
- Real validation: metadata is only checked to be a YAML mapping, repo names only by a simplified rule, and upload
  modes follow the default `.gitattributes` plus a binary sniff, not the Hub's exact rules.
- Auth scopes: tokens are a fixed table with a read or write role; fine-grained tokens, organisations, gated repos,
  rate limits and quotas do not exist here.
- Scale and breadth: no pagination (over 1000 tree entries), Range requests, multipart uploads, tags or branches other
  than `main`; a pull request is only its commit and its `refs/pr/N` revision (no discussion, no merge).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKENS = {"hf_standin_write_token": ("tester", "write"), "hf_standin_read_token": ("reader", "read")}
WRITE_TOKEN = "hf_standin_write_token"
# The LFS patterns of the `.gitattributes` the Hub puts in every new model repo (abridged).
GITATTRIBUTES_LFS = ("*.bin", "*.ckpt", "*.h5", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.pkl", "*.pt", "*.pth",
                     "*.safetensors", "*.tar", "*.zip", "*tfevents*")  # fmt: skip
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in GITATTRIBUTES_LFS).encode()
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files and LFS pointers."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class StoredFile:
    """One file of a commit: its content, and whether git stores it as an LFS pointer."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        return git_blob_sha(self.pointer if self.lfs else self.data)


@dataclass
class Commit:
    sha: str
    title: str
    date: str
    files: dict[str, StoredFile]

    def card_data(self) -> dict:
        """The metadata of this commit's README.md, which the Hub shows as the model's tags and card data."""
        readme = self.files.get("README.md")
        match = re.match(r"^---\n(.*?)\n---\n", readme.data.decode() if readme else "", flags=re.DOTALL)
        return (yaml.safe_load(match[1]) or {}) if match else {}


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str = field(default_factory=now)
    commits: dict[str, Commit] = field(default_factory=dict)
    main: str = ""
    pull_requests: list[str] = field(default_factory=list)  # the commit of refs/pr/N at index N - 1

    def commit(self, title: str, files: dict[str, StoredFile], pull_request: bool = False) -> Commit:
        """Add a commit on top of `main` holding exactly `files`: to `main`, or as a new pull request."""
        sha = hashlib.sha1(f"{self.repo_id}\0{self.main}\0{title}\0{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = Commit(sha, title, now(), files)
        if pull_request:
            self.pull_requests.append(sha)
        else:
            self.main = sha
        return self.commits[sha]

    def resolve(self, revision: str) -> Commit | None:
        if m := re.fullmatch(r"refs/pr/(\d+)", revision):
            number = int(m[1])
            return self.commits[self.pull_requests[number - 1]] if 0 < number <= len(self.pull_requests) else None
        return self.commits.get(self.main if revision == "main" else revision)


class HubError(Exception):
    """An error answer: status, the Hub's X-Error-Code (if any) and message."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **body: str):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.body = status, message, code, headers or {}, body


class HubServer:
    """The API origin and a CDN origin on two ephemeral 127.0.0.1 ports, sharing one in-memory store."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, sent an Authorization header)
        self.fail_commits_to: set[str] = set()
        self.lock = threading.RLock()
        self.api = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        self.endpoint = f"http://127.0.0.1:{self.api.server_port}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_port}"
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.api, self.cdn)]

    def __enter__(self) -> HubServer:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self.api, self.cdn):
            server.shutdown()
            server.server_close()

    def client_env(self, hf_home: Path, token: str | None = WRITE_TOKEN) -> dict[str, str]:
        """This process's environment for a client of this server: no Xet, a throwaway HF_HOME, online, the token."""
        env = {name: value for name, value in os.environ.items() if name not in ("HF_TOKEN", "HF_TOKEN_PATH")}
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_HOME=str(hf_home),
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of a repo at a revision."""
        with self.lock:
            return {path: f.data for path, f in self.repos[repo_id].resolve(revision).files.items()}

    # --- request handling -------------------------------------------------------------------------------------

    def user(self, headers: dict[str, str], required: bool = False) -> tuple[str, str] | None:
        """(name, role) of the bearer token; 401 for an unknown token, or for none where one is required."""
        auth = headers.get("authorization", "")
        if not auth:
            if required:
                raise HubError(401, "Invalid username or password.")
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in TOKENS:
            raise HubError(401, "Invalid credentials in Authorization header")
        return TOKENS[token]

    def readable(self, repo_id: str, headers: dict[str, str]) -> Repo:
        """The repo, if it exists and this token may read it (the Hub answers 401 RepoNotFound for both cases)."""
        user = self.user(headers)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or repo_id.split("/")[0] != user[0])):
            raise HubError(401, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, repo_id: str, headers: dict[str, str]) -> Repo:
        name, role = self.user(headers, required=True)
        repo = self.readable(repo_id, headers)
        if role != "write" or repo_id.split("/")[0] != name:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    @staticmethod
    def commit_of(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound")
        return commit

    def whoami(self, headers: dict[str, str]) -> dict:
        name, role = self.user(headers, required=True)
        access_token = {"displayName": "stand-in", "role": role, "createdAt": now()}
        return {"type": "user", "id": hashlib.md5(name.encode()).hexdigest()[:24], "name": name, "fullname": name,
                "email": None, "emailVerified": False, "canPay": False, "isPro": False, "periodEnd": None,
                "avatarUrl": "", "orgs": [], "auth": {"type": "access_token", "accessToken": access_token}}  # fmt: skip

    def create_repo(self, headers: dict[str, str], body: dict) -> dict:
        name, role = self.user(headers, required=True)
        repo_id = f"{body.get('organization') or name}/{body['name']}"
        if body.get("type", "model") != "model":
            raise HubError(400, "The stand-in only hosts model repos.")
        if not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
            raise HubError(400, f"Invalid repo name: {repo_id}")
        if role != "write" or repo_id.split("/")[0] != name:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {name}")
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=url)
        repo = self.repos[repo_id] = Repo(repo_id, private=body.get("visibility") == "private")
        repo.commit("initial commit", {".gitattributes": StoredFile(GITATTRIBUTES, lfs=False)})
        return {"url": url, "name": repo_id, "id": hashlib.md5(repo_id.encode()).hexdigest()[:24]}

    def model_info(self, repo: Repo, revision: str, params: dict[str, list[str]]) -> dict:
        commit = self.commit_of(repo, revision)
        card = commit.card_data()
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        if params.get("blobs", ["false"])[0].lower() == "true":
            siblings = [{**s, **self.tree_entry(s["rfilename"], commit.files[s["rfilename"]])} for s in siblings]
        return {"_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.sha,
                "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": card.get("tags", []),
                "pipeline_tag": card.get("pipeline_tag"), "library_name": card.get("library_name"),
                "cardData": card or None, "siblings": siblings, "spaces": [], "usedStorage": 0}  # fmt: skip

    @staticmethod
    def tree_entry(path: str, stored: StoredFile) -> dict:
        entry = {"type": "file", "oid": stored.oid, "size": len(stored.data), "path": path}
        if stored.lfs:
            entry["lfs"] = {"oid": stored.sha256, "size": len(stored.data), "pointerSize": len(stored.pointer)}
        return entry

    def tree(self, repo: Repo, revision: str, path: str, params: dict[str, list[str]]) -> list[dict]:
        commit = self.commit_of(repo, revision)
        recursive = params.get("recursive", ["false"])[0].lower() == "true"
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        entries: dict[str, dict] = {}
        for file_path, stored in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries[folder] = {"type": "directory", "oid": git_blob_sha(folder.encode()), "size": 0,
                                       "path": folder}  # fmt: skip
            if recursive or len(parts) == 1:
                entries[file_path] = self.tree_entry(file_path, stored)
        if params.get("expand", ["false"])[0].lower() == "true":
            for entry in entries.values():
                entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
        return list(entries.values())

    def preupload(self, repo: Repo, revision: str, body: dict) -> dict:
        commit = self.commit_of(repo, revision)
        files = []
        for item in body["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = (
                any(fnmatch.fnmatch(item["path"].rsplit("/", 1)[-1], p) for p in GITATTRIBUTES_LFS)
                or b"\0" in sample
                or item["size"] >= LFS_MIN_SIZE
            )
            existing = commit.files.get(item["path"])
            oid = (existing.sha256 if existing.lfs else existing.oid) if existing else None
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})  # fmt: skip
        return {"files": files, "commitOid": commit.sha}

    def lfs_batch(self, repo_id: str, body: dict) -> dict:
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                verify = f"{self.endpoint}/{repo_id}.git/info/lfs/objects/verify"
                entry["actions"] = {
                    "upload": {"href": f"{self.cdn_url}/upload/{obj['oid']}?X-Amz-Signature=standin", "header": {}},
                    "verify": {"href": verify, "header": {"Authorization": "Basic standin"}},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_verify(self, body: dict) -> dict:
        data = self.lfs_objects.get(body["oid"])
        if data is None or len(data) != body["size"]:
            raise HubError(404, f"Object {body['oid']} was not uploaded, or has the wrong size")
        return {"success": True}

    def commit(self, repo: Repo, revision: str, lines: list[dict], params: dict[str, list[str]]) -> dict:
        if repo.repo_id in self.fail_commits_to:
            raise HubError(500, "Internal Error - We're working hard to fix this as soon as possible!")
        parent = self.commit_of(repo, revision)
        if unquote(revision) != "main":
            raise HubError(400, "The stand-in only commits to main.")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, parent.sha):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(parent.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(self.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(400, f"Unknown commit operation {key}")
        pull_request = bool(params.get("create_pr"))
        commit = repo.commit(header["summary"], files, pull_request)
        url = f"{self.endpoint}/{repo.repo_id}/commit/{commit.sha}"
        answer = {"success": True, "commitOid": commit.sha, "commitUrl": url, "hookOutput": ""}
        if pull_request:
            answer["pullRequestUrl"] = f"{self.endpoint}/{repo.repo_id}/discussions/{len(repo.pull_requests)}"
        return answer

    def resolve(self, repo: Repo, revision: str, path: str) -> tuple[int, dict[str, str], bytes]:
        commit = self.commit_of(repo, revision)
        stored = commit.files.get(unquote(path))
        if stored is None:
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if stored.lfs:
            location = f"{self.cdn_url}/blobs/{stored.sha256}?X-Amz-Signature=standin"
            headers.update({"Location": location, "ETag": f'"{stored.oid}"', "X-Linked-Etag": f'"{stored.sha256}"',
                            "X-Linked-Size": str(len(stored.data))})  # fmt: skip
            return 302, headers, f"Found. Redirecting to {location}".encode()
        headers.update({"ETag": f'"{stored.oid}"', "Content-Type": "application/octet-stream"})
        return 200, headers, stored.data

    def route(self, method: str, path: str, query: dict, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
        """Answer one request on the API origin: (status, headers, body)."""
        if path == "/api/whoami-v2" and method == "GET":
            return _json(self.whoami(headers))
        if path == "/api/repos/create" and method == "POST":
            return _json(self.create_repo(headers, json.loads(body)))
        if path == "/api/validate-yaml" and method == "POST":
            match = re.match(r"^---\n(.*?)\n---", json.loads(body)["content"], flags=re.DOTALL)
            if match and not isinstance(yaml.safe_load(match[1]) or {}, dict):
                raise HubError(400, "Invalid metadata")
            return _json({"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?", path):
            return _json(self.model_info(self.readable(m[1], headers), m[2] or "main", query))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return _json(self.tree(self.readable(m[1], headers), m[2], unquote(m[3] or ""), query))
        if (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)) and method == "POST":
            return _json(self.preupload(self.writable(m[1], headers), m[2], json.loads(body)))
        if (m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)) and method == "POST":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            return _json(self.commit(self.writable(m[1], headers), m[2], lines, query))
        if (m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)) and method == "POST":
            self.writable(m[1], headers)
            status, answer_headers, answer = _json(self.lfs_batch(m[1], json.loads(body)))
            return status, {**answer_headers, "Content-Type": "application/vnd.git-lfs+json"}, answer
        if re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/verify", path) and method == "POST":
            return _json(self.lfs_verify(json.loads(body)))
        if (m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)) and method in ("GET", "HEAD"):
            return self.resolve(self.readable(m[1], headers), m[2], m[3])
        raise HubError(404, f"Sorry, we can't find the page you are looking for: {method} {path}")

    def route_cdn(self, method: str, path: str, body: bytes) -> tuple[int, dict, bytes]:
        """Answer one request on the CDN origin: LFS uploads and downloads."""
        if (m := re.fullmatch(r"/upload/([0-9a-f]{64})", path)) and method == "PUT":
            if hashlib.sha256(body).hexdigest() != m[1]:
                raise HubError(400, "The uploaded content does not match its sha256")
            self.lfs_objects[m[1]] = body
            return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""
        if (m := re.fullmatch(r"/blobs/([0-9a-f]{64})", path)) and m[1] in self.lfs_objects and method == "GET":
            return 200, {"Content-Type": "application/octet-stream"}, self.lfs_objects[m[1]]
        raise HubError(404, "NoSuchKey")


def _json(data: object) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(data).encode()


def _handler(hub: HubServer, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep pytest's output clean
            pass

        def read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def answer(self) -> None:
            url = urlsplit(self.path)
            headers = {k.lower(): v for k, v in self.headers.items()}
            body = self.read_body()
            with hub.lock:
                hub.requests.append((self.command, ("cdn:" if cdn else "") + url.path, "authorization" in headers))
                try:
                    if cdn:
                        status, answer_headers, answer = hub.route_cdn(self.command, url.path, body)
                    else:
                        status, answer_headers, answer = hub.route(
                            self.command, url.path, parse_qs(url.query), headers, body
                        )
                except HubError as error:
                    status, answer = error.status, json.dumps({"error": error.message, **error.body}).encode()
                    answer_headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message":
                                      error.message, **error.headers}  # fmt: skip
                    if error.code:
                        answer_headers["X-Error-Code"] = error.code
            self.send_response(status)
            for key, value in answer_headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer)

        do_GET = do_HEAD = do_POST = do_PUT = answer

    return Handler
