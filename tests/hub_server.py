"""A Hub-compatible HTTP server for tests: the part of the Hugging Face Hub API that ``huggingface_hub`` uses to
create a repo, upload to it (regular and LFS files) and download from it.

The real ``huggingface_hub`` client talks to it unchanged once ``huggingface_hub.constants.ENDPOINT`` points at
``HubServer.endpoint`` (see ``hub_endpoint`` in ``tests/test_hub.py``). Two listeners share one state:

* the Hub (``endpoint``): ``/api/...`` JSON routes, ``/{repo}.git/info/lfs/objects/batch`` and
  ``/{repo}/resolve/{revision}/{path}``;
* a storage host (``storage_endpoint``, another port, so another origin, like the Hub's S3 bucket and CDN):
  LFS objects are PUT there and downloads of LFS files are redirected there, so the client drops its
  ``Authorization`` header for them, as it does with the Hub.

Routes (what ``huggingface_hub`` 2.4 calls):

=========================================================  ===============================================
``POST /api/repos/create``                                 ``create_repo`` (409 when it exists)
``POST /api/validate-yaml``                                ``create_commit`` of a README.md, ``ModelCard.validate``
``GET  /api/whoami-v2``                                    ``whoami``
``GET  /api/models/{repo}[/revision/{rev}]``               ``model_info`` / ``repo_info`` (``snapshot_download``)
``GET  /api/models/{repo}/tree/{rev}[/{path}]``            ``list_repo_tree`` / ``list_repo_files``
``POST /api/models/{repo}/preupload/{rev}``                upload mode of each file (regular or lfs)
``POST /{repo}.git/info/lfs/objects/batch``                LFS batch API, ``basic`` transfer
``PUT  {storage}/lfs/{oid}``                               LFS object upload (sha256 and size checked)
``POST /{repo}.git/info/lfs/objects/verify``               LFS verify
``POST /api/models/{repo}/commit/{rev}``                   NDJSON commit (``file`` base64, ``lfsFile``, deletions)
``HEAD|GET /{repo}/resolve/{rev}/{path}``                  ``hf_hub_download``; LFS files: 302 to the storage host
``HEAD|GET {storage}/lfs/{oid}``                           LFS object download
=========================================================  ===============================================

Headers follow the Hub: ``X-Repo-Commit``, ``ETag`` (git blob sha1 of a regular file), ``X-Linked-Etag`` and
``X-Linked-Size`` (sha256 and size of an LFS file), ``X-Error-Code`` (``RepoNotFound``, ``EntryNotFound``,
``RevisionNotFound``). No ``X-Xet-*`` header is ever sent, so downloads use plain HTTP. Uploads: the client
chooses Xet by itself when ``hf_xet`` is installed, so the tests set ``huggingface_hub.constants.HF_HUB_DISABLE_XET``
and this server implements the LFS protocol only (not Xet).

Writes need ``Authorization: Bearer <token>`` with the server's token (else 401); reads of public repos don't.

Failure injection: ``server.fail(route, status=...)`` answers ``route`` with an HTTP error, ``server.fail(route,
drop=True)`` reads part of the request body and closes the connection without an answer (an interrupted upload);
``times`` limits how many requests fail. ``stop()`` / ``start()`` take the server down and up on the same ports
with the same repos.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

# Files stored with LFS, as the Hub's default .gitattributes says (suffixes), and any file over 10 MB.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".model", ".npy", ".npz",
    ".pkl", ".pickle", ".tflite", ".ot", ".gguf", ".zip", ".gz", ".tar", ".arrow", ".parquet",
)  # fmt: skip
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
DEFAULT_USER = "test-user"
ROUTES = (
    "create", "validate", "whoami", "info", "tree", "preupload", "lfs_batch", "lfs_upload", "lfs_verify",
    "commit", "resolve", "lfs_download",
)  # fmt: skip


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: ``sha1(b"blob <size>\\0" + data)`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class RepoFile:
    """One file of a commit: its bytes (regular file) or the sha256 of an LFS object."""

    size: int
    content: bytes | None = None
    lfs_sha256: str | None = None

    @property
    def git_oid(self) -> str:
        if self.lfs_sha256 is None:
            return git_blob_sha1(self.content)
        return git_blob_sha1(lfs_pointer(self.lfs_sha256, self.size))

    @property
    def etag(self) -> str:
        """What the Hub's ETag / X-Linked-Etag says: git sha1 of a regular file, sha256 of an LFS file."""
        return self.git_oid if self.lfs_sha256 is None else self.lfs_sha256


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, RepoFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid

    def commit_at(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return next((c for c in self.commits if c.oid == oid), None)


@dataclass
class Failure:
    status: int | None
    drop: bool
    remaining: int | None


class HubState:
    """Repos, LFS objects, injected failures and a log of requests, shared by the server's threads."""

    def __init__(self, token: str):
        self.token = token
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.failures: dict[str, Failure] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.authorization_seen: list[tuple[str, str | None]] = []  # (path, Authorization header)

    def create_repo(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id=repo_id, private=private)
        initial = Commit(
            oid=hashlib.sha1(f"initial {repo_id}".encode()).hexdigest(),
            message="initial commit",
            files={".gitattributes": RepoFile(size=len(GITATTRIBUTES), content=GITATTRIBUTES)},
        )
        repo.commits.append(initial)
        repo.branches["main"] = initial.oid
        self.repos[repo_id] = repo
        return repo


GITATTRIBUTES = "".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES
).encode()


class HubError(Exception):
    """An HTTP error answer: status, message and the Hub's ``X-Error-Code``."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.headers, self.extra = headers or {}, extra or {}


REPO = r"(?P<repo>[^/]+/[^/]+?)"
HUB_ROUTES: list[tuple[str, str, re.Pattern]] = [
    ("POST", "create", re.compile(r"/api/repos/create")),
    ("POST", "validate", re.compile(r"/api/validate-yaml")),
    ("GET", "whoami", re.compile(r"/api/whoami-v2")),
    ("GET", "tree", re.compile(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")),
    ("POST", "preupload", re.compile(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)")),
    ("POST", "commit", re.compile(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)")),
    ("GET", "info", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?")),
    ("POST", "lfs_batch", re.compile(rf"/{REPO}\.git/info/lfs/objects/batch")),
    ("POST", "lfs_verify", re.compile(rf"/{REPO}\.git/info/lfs/objects/verify")),
    ("HEAD", "resolve", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")),
    ("GET", "resolve", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")),
]
STORAGE_ROUTES: list[tuple[str, str, re.Pattern]] = [
    ("PUT", "lfs_upload", re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})")),
    ("HEAD", "lfs_download", re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})")),
    ("GET", "lfs_download", re.compile(r"/lfs/(?P<oid>[0-9a-f]{64})")),
]


class _Handler(BaseHTTPRequestHandler):
    """Dispatches a request to ``HubServer.<route>(request)``; set per listener by ``HubServer``."""

    hub: HubServer
    routes: list[tuple[str, str, re.Pattern]]
    protocol_version = "HTTP/1.0"  # one request per connection: no stale pooled connection after stop()

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self):
        url = urlsplit(self.path)
        path = unquote(url.path)
        name, match = next(
            (
                (n, m)
                for method, n, pattern in self.routes
                if method == self.command and (m := pattern.fullmatch(path))
            ),
            (None, None),
        )
        self.hub.state.authorization_seen.append((path, self.headers.get("Authorization")))
        try:
            failure = self.hub._take_failure(name)
            if failure is not None and failure.drop:
                self._read_body(limit=1024)  # part of what the client sends, then hang up
                self.hub._log(self.command, path, 0)
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if failure is not None:
                raise HubError(failure.status, f"Injected failure: HTTP {failure.status} on {name}.")
            if name is None:
                raise HubError(404, f"No route for {self.command} {path}")
            request = Request(self, match.groupdict(), parse_qs(url.query), self.hub.endpoint)
            status, headers, body = getattr(self.hub, name)(request)
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.error_code:
                headers["X-Error-Code"] = err.error_code
            status, body = err.status, {"error": err.message, **err.extra}
            if name == "validate" and err.status == 400:
                body = {"errors": [{"message": err.message}], "warnings": []}
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        self.hub._log(self.command, path, status)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if limit is not None and sum(map(len, chunks)) >= limit:
                    return b"".join(chunks)
        length = int(self.headers.get("Content-Length", 0))
        return self.rfile.read(length if limit is None else min(length, limit))


@dataclass
class Request:
    handler: _Handler
    params: dict[str, str | None]
    query: dict[str, list[str]]
    endpoint: str

    @property
    def body(self) -> bytes:
        if not hasattr(self, "_body"):
            self._body = self.handler._read_body()
        return self._body

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    @property
    def authorized(self) -> bool:
        return self.handler.headers.get("Authorization") == f"Bearer {self.handler.hub.state.token}"


class HubServer:
    """The server: ``with HubServer(token=...) as hub: ... hub.endpoint ...``."""

    def __init__(self, token: str = "hf_test_token"):
        self.state = HubState(token)
        self._listeners: dict[str, ThreadingHTTPServer] = {}
        self._ports: dict[str, int] = {"hub": 0, "storage": 0}

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        for role, routes in (("hub", HUB_ROUTES), ("storage", STORAGE_ROUTES)):
            handler = type(f"{role}Handler", (_Handler,), {"hub": self, "routes": routes})
            listener = ThreadingHTTPServer(("127.0.0.1", self._ports[role]), handler)
            listener.daemon_threads = True
            self._ports[role] = listener.server_address[1]
            threading.Thread(
                target=listener.serve_forever, args=(0.05,), daemon=True, name=f"hub-server-{role}"
            ).start()
            self._listeners[role] = listener
        return self

    def stop(self) -> None:
        for listener in self._listeners.values():
            listener.shutdown()
            listener.server_close()
        self._listeners.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._ports['hub']}"

    @property
    def storage_endpoint(self) -> str:
        return f"http://127.0.0.1:{self._ports['storage']}"

    # ---- failure injection and inspection -------------------------------------------------------------------
    def fail(
        self, route: str, *, status: int | None = None, drop: bool = False, times: int | None = None
    ) -> None:
        """Make the next ``times`` requests to ``route`` (all, if None) fail with ``status`` or be dropped."""
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}.")
        if (status is None) == (not drop):
            raise ValueError("Pass either status=<HTTP status> or drop=True.")
        self.state.failures[route] = Failure(status=status, drop=drop, remaining=times)

    def heal(self) -> None:
        """Remove every injected failure."""
        self.state.failures.clear()

    def _take_failure(self, route: str | None) -> Failure | None:
        with self.state.lock:
            failure = self.state.failures.get(route)
            if failure is None:
                return None
            if failure.remaining is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    del self.state.failures[route]
            return failure

    def _log(self, method: str, path: str, status: int) -> None:
        self.state.requests.append((method, path, status))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of ``repo_id`` at ``revision`` with its content (LFS objects resolved)."""
        commit = self._commit(repo_id, revision)
        return {
            path: f.content if f.lfs_sha256 is None else self.state.lfs_objects[f.lfs_sha256]
            for path, f in commit.files.items()
        }

    def commits(self, repo_id: str) -> list[Commit]:
        return list(self.state.repos[repo_id].commits)

    # ---- helpers --------------------------------------------------------------------------------------------
    def _repo(self, request: Request, *, write: bool = False) -> Repo:
        repo_id = request.params["repo"]
        repo = self.state.repos.get(repo_id)
        if write and not request.authorized:
            raise HubError(
                401, "Invalid credentials in Authorization header", "RepoNotFound" if repo is None else None
            )
        if repo is None or (repo.private and not request.authorized):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _commit(self, repo_id: str, revision: str) -> Commit:
        commit = self.state.repos[repo_id].commit_at(unquote(revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _require_write(self, request: Request) -> None:
        if not request.authorized:
            raise HubError(401, "Invalid credentials in Authorization header")

    # ---- routes ---------------------------------------------------------------------------------------------
    def create(self, request: Request):
        self._require_write(request)
        payload = request.json()
        if payload.get("type", "model") != "model":
            raise HubError(400, "This server hosts model repos only.")
        repo_id = f"{payload.get('organization') or DEFAULT_USER}/{payload['name']}"
        url = f"{request.endpoint}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                raise HubError(409, "You already created this model repo", extra={"url": url})
            self.state.create_repo(repo_id, private=payload.get("visibility", "public") == "private")
        return 200, {}, {"url": url, "name": repo_id, "id": repo_id}

    def whoami(self, request: Request):
        self._require_write(request)
        return 200, {}, {"type": "user", "name": DEFAULT_USER, "orgs": [], "auth": {"type": "access_token"}}

    def validate(self, request: Request):
        """The Hub's metadata check, to the extent ``huggingface_hub`` can do it: the YAML block parses to a
        mapping, ``ModelCardData`` accepts it (``model-index`` parses into ``EvalResult``s) and the fields the Hub
        types are typed so."""
        from huggingface_hub import ModelCardData
        from huggingface_hub.repocard import REGEX_YAML_BLOCK

        payload = request.json()
        match = REGEX_YAML_BLOCK.search(payload["content"])
        if match is None:
            return (
                200,
                {},
                {"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]},
            )
        try:
            metadata = yaml.safe_load(match.group(2))
        except yaml.YAMLError as err:
            raise HubError(400, f"YAML metadata does not parse: {err}") from err
        if not isinstance(metadata, dict):
            raise HubError(400, f"YAML metadata must be a mapping, got {type(metadata).__name__}.")
        for key in ("tags", "datasets", "language", "base_model", "metrics"):
            value = metadata.get(key)
            if value is not None and not (
                isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            ):
                raise HubError(400, f'"{key}" must be a string or an array of strings, got {value!r}.')
        for key in ("license", "pipeline_tag", "library_name"):
            if metadata.get(key) is not None and not isinstance(metadata[key], str):
                raise HubError(400, f'"{key}" must be a string, got {metadata[key]!r}.')
        try:
            ModelCardData(**metadata)
        except (ValueError, TypeError) as err:
            raise HubError(400, f"Invalid metadata: {err}") from err
        return 200, {}, {"errors": [], "warnings": []}

    def info(self, request: Request):
        repo = self._repo(request)
        commit = self._commit(repo.repo_id, request.params["rev"] or "main")
        card = commit.files.get("README.md")
        card_data = None
        if card is not None:
            match = re.match(r"^\s*---\n([\S\s]*?)\n---", card.content.decode())
            card_data = yaml.safe_load(match.group(1)) if match else None
        return (
            200,
            {},
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": (card_data or {}).get("tags", []),
                "pipeline_tag": (card_data or {}).get("pipeline_tag"),
                "cardData": card_data,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            },
        )

    def tree(self, request: Request):
        repo = self._repo(request)
        commit = self._commit(repo.repo_id, request.params["rev"])
        prefix = (request.params["path"] or "").strip("/")
        recursive = request.query.get("recursive", ["False"])[0].lower() == "true"
        entries, folders = [], set()
        for path, f in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            parts = rest.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if folder not in folders and (recursive or depth == 1):
                    folders.add(folder)
                    entries.append(
                        {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())}
                    )
            if len(parts) > 1 and not recursive:
                continue
            entry = {"type": "file", "path": path, "size": f.size, "oid": f.git_oid}
            if f.lfs_sha256 is not None:
                pointer = lfs_pointer(f.lfs_sha256, f.size)
                entry["lfs"] = {"oid": f.lfs_sha256, "size": f.size, "pointerSize": len(pointer)}
            entries.append(entry)
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
        return 200, {}, entries

    def preupload(self, request: Request):
        repo = self._repo(request, write=True)
        commit = self._commit(repo.repo_id, request.params["rev"])
        files = []
        for item in request.json()["files"]:
            is_lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] > LFS_SIZE_THRESHOLD
            existing = commit.files.get(item["path"])
            oid = None
            if existing is not None:
                oid = existing.lfs_sha256 if existing.lfs_sha256 is not None else existing.git_oid
            files.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if is_lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return 200, {}, {"files": files, "commitOid": commit.oid}

    def lfs_batch(self, request: Request):
        repo = self._repo(request, write=True)
        payload = request.json()
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(422, "This server supports LFS uploads with the basic transfer only.")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.storage_endpoint}/lfs/{obj['oid']}", "expires_in": 3600},
                    "verify": {"href": f"{request.endpoint}/{repo.repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return (
            200,
            {"Content-Type": "application/vnd.git-lfs+json"},
            {"transfer": "basic", "objects": objects},
        )

    def lfs_upload(self, request: Request):
        oid, data = request.params["oid"], request.body
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} ({len(data)} bytes received).")
        with self.state.lock:
            self.state.lfs_objects[oid] = data
        return 200, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}, b""

    def lfs_verify(self, request: Request):
        self._repo(request, write=True)
        payload = request.json()
        data = self.state.lfs_objects.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            raise HubError(404, f"LFS object {payload['oid']} of size {payload['size']} was not uploaded.")
        return 200, {}, {"success": True}

    def commit(self, request: Request):
        repo = self._repo(request, write=True)
        revision = unquote(request.params["rev"])
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if "create_pr" in request.query:
            raise HubError(400, "This server does not implement pull requests.")
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "The commit payload must start with a header line.")
        header = lines[0]["value"]
        with self.state.lock:
            parent = repo.commit_at(revision)
            if header.get("parentCommit") not in (None, parent.oid):
                raise HubError(412, f"A commit has happened since {header['parentCommit']}.")
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    content = base64.b64decode(value["content"])
                    files[value["path"]] = RepoFile(size=len(content), content=content)
                elif key == "lfsFile":
                    data = self.state.lfs_objects.get(value["oid"])
                    if data is None:
                        raise HubError(
                            422, f"LFS object {value['oid']} for {value['path']} was never uploaded."
                        )
                    files[value["path"]] = RepoFile(size=len(data), lfs_sha256=value["oid"])
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"File to delete not found: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}.")
            digest = hashlib.sha1(parent.oid.encode() + json.dumps(header).encode())
            for path in sorted(files):
                digest.update(f"{path}:{files[path].git_oid}".encode())
            new = Commit(oid=digest.hexdigest(), message=header["summary"], files=files)
            repo.commits.append(new)
            repo.branches[revision] = new.oid
        return (
            200,
            {},
            {
                "success": True,
                "commitOid": new.oid,
                "commitUrl": f"{request.endpoint}/{repo.repo_id}/commit/{new.oid}",
                "pullRequestUrl": None,
            },
        )

    def resolve(self, request: Request):
        repo = self._repo(request)
        commit = self._commit(repo.repo_id, request.params["rev"])
        path = request.params["path"]
        headers = {"X-Repo-Commit": commit.oid}
        f = commit.files.get(path)
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
        headers["ETag"] = f'"{f.git_oid}"'
        if f.lfs_sha256 is not None:
            location = f"{self.storage_endpoint}/lfs/{f.lfs_sha256}?filename={quote(path)}"
            headers.update({"X-Linked-Etag": f'"{f.etag}"', "X-Linked-Size": f.size, "Location": location})
            return 302, headers, b""
        headers["Content-Type"] = "application/octet-stream"
        return 200, headers, f.content

    def lfs_download(self, request: Request):
        data = self.state.lfs_objects.get(request.params["oid"])
        if data is None:
            raise HubError(404, "Object not found")
        return 200, {"ETag": f'"{request.params["oid"]}"', "Content-Type": "application/octet-stream"}, data
