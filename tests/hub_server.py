"""A small Hugging Face Hub look-alike for tests, served from 127.0.0.1.

Why it exists: no Hub is reachable from CI, and no installable package offers a Hub that accepts
uploads. mla-zoo talks to the Hub through the *real* ``huggingface_hub`` client, so this server
answers the HTTP calls that the client makes for what mla-zoo calls, and nothing else (checked
against huggingface_hub 2.4): ``create_repo``, ``create_commit`` (preupload, validate-yaml,
NDJSON commit), ``create_tag``, ``list_repo_refs``, ``list_repo_files`` (tree), ``model_info``
(also by revision), ``list_models`` (author, filter, cardData), ``list_collections``,
``create_collection``, ``add_collection_item``, and downloads (HEAD/GET resolve) for
``snapshot_download`` and transformers' ``from_pretrained``. Any other route answers 501, so a
new call of the product is noticed at once; a crash inside a handler answers 500 and is kept in
``HubServer.errors`` (assert ``not hub.errors``). What tests check beyond the product's own calls
(the commit history, a collection's items) they read from the server's state in Python.

Model of a repo: every commit is an immutable snapshot ``{path: blob oid}`` with a parent and a
40-hex oid; blobs live content-addressed (git blob sha1) in a temporary directory; a repo starts
with an "initial commit" holding ``.gitattributes``, like the real Hub. Preupload answers
``"uploadMode": "regular"`` for every file, so contents travel base64-encoded inside the commit
(no LFS, no Xet). Errors follow the Hub: 404 with ``X-Error-Code`` (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``), 409 on conflicts, 412 when ``parent_commit`` is stale.
Any ``Authorization: Bearer <token>`` is accepted; writes need one, private repos are hidden
without one. Nothing is logged, so tokens never are.

Configuring a client: ``HfApi(endpoint=hub.endpoint, token="t")`` in-process;
``subprocess.run(..., env=hub.client_env(hf_home))`` for a subprocess; ``hub.patch_client(
monkeypatch, hf_home)`` for code in this process that cannot take ``endpoint=`` (transformers'
``from_pretrained``, module-level huggingface_hub functions).
"""

from __future__ import annotations

import base64
import hashlib
import html
import itertools
import json
import mimetypes
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml  # huggingface_hub depends on PyYAML

DEFAULT_USER = "mla-zoo-ci"
DEFAULT_BRANCH = "main"
_GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.onnx filter=lfs diff=lfs merge=lfs -text\n"
# Variables that would send a client subprocess elsewhere than this server's endpoint and HF_HOME.
_CLIENT_ENV_DROPPED = {"HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE",
                       "HUGGING_FACE_HUB_TOKEN"}


def _now() -> str:
    """Timestamp in the one format huggingface_hub's ``parse_datetime`` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _object_id() -> str:
    """24-hex id, like the Hub's database ids (``_id`` fields)."""
    return secrets.token_hex(12)


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def card_metadata(readme: str) -> dict[str, Any]:
    """README front matter as a dict (``{}`` when there is none). Raises ValueError if invalid."""
    match = re.match(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", readme, re.S)
    if match is None:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise ValueError(f"Invalid YAML in README.md front matter: {exc}") from exc
    if not isinstance(data, dict):
        return {}
    return json.loads(json.dumps(data, default=str))  # dates and the like as plain strings


# --------------------------------------------------------------------------- errors


class HubError(Exception):
    """An HTTP error answered the way the Hub does, so the client raises its own exception.
    ``code`` goes into ``X-Error-Code``; ``extra`` is merged into the JSON body (the client reads
    ``url`` from a 409 on repo creation and ``slug`` from a 409 on collection creation)."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 headers: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = dict(headers or {}), dict(extra or {})


def _repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", code="RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


def _entry_not_found(path: str, commit: str | None = None) -> HubError:
    headers = {"X-Repo-Commit": commit} if commit else {}
    return HubError(404, f"Entry not found: {path}", code="EntryNotFound", headers=headers)


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot: ``files`` maps every path to the git blob oid of its content."""

    oid: str
    parent: str | None
    files: Mapping[str, str]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: str
    object_id: str = field(default_factory=_object_id)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def author(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def resolve(self, revision: str) -> Commit:
        """A branch, a tag, or a full or abbreviated (>= 7) commit oid."""
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [c for c in self.commits if c.startswith(revision)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise _revision_not_found(revision)
        return self.commits[oid]

    def history(self, revision: str = DEFAULT_BRANCH) -> Iterator[Commit]:
        current: Commit | None = self.resolve(revision)
        while current is not None:
            yield current
            current = self.commits[current.parent] if current.parent else None


class BlobStore:
    """Content-addressed file contents on disk, keyed by git blob oid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, content: bytes) -> str:
        oid = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()  # what git (and the client) computes
        path = self.root / oid
        if not path.exists():
            tmp = path.with_name(f"{oid}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)
        return oid

    def get(self, oid: str) -> bytes:
        return (self.root / oid).read_bytes()

    def size(self, oid: str) -> int:
        return (self.root / oid).stat().st_size


# --------------------------------------------------------------------------- the Hub logic


@dataclass
class Request:
    """What a route handler needs from an HTTP request, already parsed."""

    method: str
    params: dict[str, str]
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    token: str | None
    endpoint: str

    def arg(self, name: str) -> str | None:
        values = self.query.get(name) or self.query.get(f"{name}[]")
        return values[0] if values else None

    def args(self, name: str) -> list[str]:
        return [*self.query.get(name, []), *self.query.get(f"{name}[]", [])]

    def json(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body or b"{}")
        except json.JSONDecodeError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from exc
        if not isinstance(data, dict):
            raise HubError(400, "JSON body must be an object")
        return data


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        return cls(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"
_COLLECTION = r"/api/collections/(?P<slug>[^/]+/[^/]+)"
# (method, raw-path regex, handler name). Paths are matched *before* percent-decoding (the client
# quotes revisions with safe="").
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in [
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", r"/api/models", "list_models"),
        ("GET", _REPO, "repo_info"),
        ("GET", _REPO + r"/revision/(?P<rev>[^/]+)", "repo_info"),
        ("GET", _REPO + r"/tree/(?P<rev>[^/]+)", "tree"),
        ("GET", _REPO + r"/refs", "refs"),
        ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", _REPO + r"/tag/(?P<rev>[^/]+)", "create_tag"),
        ("GET", r"/api/collections", "list_collections"),
        ("POST", r"/api/collections", "create_collection"),
        ("POST", _COLLECTION + r"/items", "add_collection_item"),
        ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]


class HubApp:
    """The Hub's behaviour, independent of sockets: routes map a `Request` to a `Response`.
    One lock serialises every request, so commits and ref moves are trivially atomic."""

    def __init__(self, root: Path, *, user: str) -> None:
        self.blobs = BlobStore(root / "blobs")
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.collections: dict[str, dict[str, Any]] = {}
        self.lock = threading.RLock()
        self._counter = itertools.count()

    def handle(self, method: str, raw_path: str, request: Request) -> Response:
        route_method = "GET" if method == "HEAD" else method
        for verb, pattern, name in ROUTES:
            match = pattern.fullmatch(raw_path)
            if match and verb == route_method:
                request.params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self.lock:
                    return getattr(self, f"route_{name}")(request)
        raise HubError(501, f"mla-zoo test hub does not implement {method} {raw_path}")

    @staticmethod
    def _require_auth(request: Request) -> None:
        if request.token is None:
            raise HubError(401, "You must be authenticated to do this (no Authorization header)")

    def _repo(self, request: Request) -> Repo:
        """The repo named in the URL; private repos exist only for authenticated callers."""
        repo = self.repos.get(request.params["repo"])
        if repo is None or (repo.private and request.token is None):
            raise _repo_not_found(request.params["repo"])
        return repo

    def _new_commit(self, repo: Repo, parent: Commit | None, files: dict[str, str], title: str, message: str) -> Commit:
        date = _now()
        tree = "\n".join(f"{path} {oid}" for path, oid in sorted(files.items()))
        header = f"{tree}\nparent {parent.oid if parent else ''}\n{date} {next(self._counter)}\n{title}\n{message}"
        commit = Commit(hashlib.sha1(header.encode()).hexdigest(), parent.oid if parent else None,
                        MappingProxyType(dict(files)), title, message, date)
        repo.commits[commit.oid] = commit
        return commit

    def card_data(self, commit: Commit) -> dict[str, Any]:
        """README.md front matter of a commit (``{}`` when missing or invalid)."""
        oid = commit.files.get("README.md")
        try:
            return card_metadata(self.blobs.get(oid).decode("utf-8", "replace")) if oid else {}
        except ValueError:
            return {}

    def repo_json(self, repo: Repo, commit: Commit, *, full: bool, card: bool) -> dict[str, Any]:
        """The JSON of ``/api/models/{id}`` (``full``) or of one entry of ``/api/models``."""
        card_data = self.card_data(commit)
        tags = card_data.get("tags") or []
        data: dict[str, Any] = {"_id": repo.object_id, "id": repo.repo_id, "modelId": repo.repo_id,
                                "private": repo.private, "likes": 0, "downloads": 0, "createdAt": repo.created_at,
                                "tags": [tags] if isinstance(tags, str) else list(tags)}
        if full:
            data.update(author=repo.author, sha=commit.oid, lastModified=commit.date, gated=False, disabled=False,
                        siblings=[{"rfilename": path} for path in sorted(commit.files)])
        if card:
            data["cardData"] = card_data
        return data

    # ----------------------------------------------------------------- reading

    def route_repo_info(self, request: Request) -> Response:
        repo = self._repo(request)
        commit = repo.resolve(request.params.get("rev", DEFAULT_BRANCH))
        return Response.json(self.repo_json(repo, commit, full=True, card=True))

    def route_list_models(self, request: Request) -> Response:
        """``author`` and all ``filter`` tags; ``cardData`` adds the card metadata."""
        author, wanted = request.arg("author"), set(request.args("filter"))
        results = []
        for repo in self.repos.values():
            commit = repo.resolve(DEFAULT_BRANCH)
            entry = self.repo_json(repo, commit, full=False, card=_truthy(request.arg("cardData")))
            if repo.private and request.token is None or author and repo.author.lower() != author.lower():
                continue
            if wanted <= set(entry["tags"]):
                results.append(entry)
        return Response.json(results)

    def route_tree(self, request: Request) -> Response:
        """Every file of a revision (the client's recursive listing)."""
        commit = self._repo(request).resolve(request.params["rev"])
        return Response.json([{"type": "file", "oid": oid, "size": self.blobs.size(oid), "path": path}
                              for path, oid in sorted(commit.files.items())])

    def route_refs(self, request: Request) -> Response:
        repo = self._repo(request)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items()]
        tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in repo.tags.items()]
        return Response.json({"branches": branches, "converts": [], "tags": tags})

    def route_resolve(self, request: Request) -> Response:
        """File download; HEAD gets the same headers. ``X-Repo-Commit`` and ``ETag`` are mandatory for the client."""
        commit = self._repo(request).resolve(request.params["rev"])
        path = request.params["path"]
        if path not in commit.files:
            raise _entry_not_found(path, commit.oid)
        oid = commit.files[path]
        return Response(200, self.blobs.get(oid), {
            "X-Repo-Commit": commit.oid, "ETag": f'"{oid}"',
            "Content-Type": mimetypes.guess_type(path)[0] or "application/octet-stream",
        })

    # ----------------------------------------------------------------- writing

    def route_validate_yaml(self, request: Request) -> Response:
        try:
            card_metadata(request.json().get("content", ""))
        except ValueError as exc:
            return Response.json({"errors": [{"message": str(exc)}], "warnings": []}, status=400)
        return Response.json({"errors": [], "warnings": []})

    def route_create_repo(self, request: Request) -> Response:
        self._require_auth(request)
        payload = request.json()
        if (payload.get("type") or "model") != "model":
            raise HubError(400, "the test hub holds model repos only")
        repo_id = f"{payload.get('organization') or self.user}/{payload.get('name')}"
        url = f"{request.endpoint}/{repo_id}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", extra={"url": url})
        repo = Repo(repo_id, payload.get("visibility") == "private" or bool(payload.get("private")), _now())
        initial = self._new_commit(repo, None, {".gitattributes": self.blobs.put(_GITATTRIBUTES)}, "initial commit", "")
        repo.branches[DEFAULT_BRANCH] = initial.oid
        self.repos[repo_id] = repo
        return Response.json({"url": url, "name": repo_id, "id": repo.object_id})

    def route_preupload(self, request: Request) -> Response:
        """Every file is "regular" (inline base64 in the commit): no LFS, no Xet."""
        self._require_auth(request)
        commit = self._repo(request).resolve(request.params["rev"])
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": commit.files.get(f["path"])}
                 for f in request.json().get("files", [])]
        return Response.json({"files": files, "commitOid": commit.oid})

    def route_commit(self, request: Request) -> Response:
        """NDJSON commit on a branch: a header line, then ``file`` / ``deletedFile`` lines."""
        self._require_auth(request)
        repo = self._repo(request)
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header, branch = lines[0]["value"], request.params["rev"]
        if branch not in repo.branches:
            raise _revision_not_found(branch)
        base = repo.resolve(branch)
        parent = header.get("parentCommit")
        if parent and not base.oid.startswith(parent):
            raise HubError(412, f"A commit has happened since {parent}. Please refresh and try again.")
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file" and value.get("encoding", "base64") == "base64":
                files[value["path"]] = self.blobs.put(base64.b64decode(value.get("content", "")))
            elif key == "deletedFile" and value.get("path") in files:
                del files[value["path"]]
            else:
                raise HubError(400, f"the test hub does not take this commit operation: {key} {value.get('path')}")
        commit = self._new_commit(repo, base, files, header.get("summary") or "", header.get("description") or "")
        repo.branches[branch] = commit.oid
        return Response.json({"success": True, "commitOid": commit.oid, "commitMessage": commit.title,
                              "commitUrl": f"{request.endpoint}/{repo.repo_id}/commit/{commit.oid}",
                              "hookOutput": "", "pullRequestUrl": None})

    def route_create_tag(self, request: Request) -> Response:
        self._require_auth(request)
        repo = self._repo(request)
        commit = repo.resolve(request.params["rev"])
        tag = request.json().get("tag", "")
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.oid
        return Response.json({})

    # ----------------------------------------------------------------- collections

    def route_create_collection(self, request: Request) -> Response:
        self._require_auth(request)
        payload = request.json()
        namespace, title = payload.get("namespace") or self.user, payload.get("title", "")
        for slug, collection in self.collections.items():
            if collection["owner"]["name"] == namespace and collection["title"] == title:
                raise HubError(409, "A collection with this title already exists", extra={"slug": slug})
        slug = f"{namespace}/{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}-{_object_id()}"
        self.collections[slug] = {
            "slug": slug, "title": title, "description": payload.get("description"),
            "owner": {"name": namespace, "type": "org"}, "items": [], "lastUpdated": _now(),
            "private": bool(payload.get("private", False)), "theme": "default", "upvotes": 0,
            "isUpvotedByUser": False, "gating": False,
        }
        return Response.json({**self.collections[slug], "position": 0})

    def route_list_collections(self, request: Request) -> Response:
        """Filter ``owner``; items are cut to 4 as on the Hub (and ``position`` is the client's to add)."""
        owners = set(request.args("owner"))
        return Response.json([{**c, "items": c["items"][:4]} for c in self.collections.values()
                              if not owners or c["owner"]["name"] in owners])

    def route_add_collection_item(self, request: Request) -> Response:
        """The repo must exist (404 otherwise); adding the same item twice is a 409."""
        self._require_auth(request)
        collection = self.collections.get(request.params["slug"])
        if collection is None:
            raise HubError(404, f"Collection not found: {request.params['slug']}")
        payload = request.json()
        item_id, item_type = payload["item"]["id"], payload["item"]["type"]
        if item_id not in self.repos:
            raise _repo_not_found(item_id)
        if any(i["id"] == item_id for i in collection["items"]):
            raise HubError(409, f"Item {item_id} already exists in the collection")
        entry = {"_id": _object_id(), "id": item_id, "type": item_type, "position": len(collection["items"])}
        if payload.get("note"):
            entry["note"] = {"html": html.escape(payload["note"]), "text": payload["note"]}
        collection["items"].append(entry)
        return Response.json({**collection, "position": 0})


# --------------------------------------------------------------------------- HTTP adapter


class _Handler(BaseHTTPRequestHandler):
    """Turns HTTP into :class:`Request` objects and back. Keep-alive HTTP/1.1, no logging."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else header and body writes meet delayed ACKs: ~40 ms a call
    timeout = 30  # idle keep-alive connections end on their own
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the request line and headers are nobody's business, least of all the token's."""

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token(self) -> str | None:
        scheme, _, value = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        return value.strip()

    def _serve(self) -> None:
        body = self._read_body()  # always drain the body, or the next keep-alive request breaks
        split = urlsplit(self.path)
        host = self.headers.get("Host") or f"{self.server.server_address[0]}:{self.server.server_address[1]}"
        request = Request(
            method=self.command,
            params={},
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            token=self._token(),
            endpoint=f"http://{host}",
        )
        try:
            response = self.server.app.handle(self.command, split.path, request)
        except HubError as error:
            response = _error_response(error)
        except Exception:  # a bug in this server: answer 500 and keep the traceback for the test
            self.server.errors.append(f"{self.command} {split.path}\n{traceback.format_exc()}")
            response = _error_response(HubError(500, "mla-zoo test hub crashed; see HubServer.errors"))
        self._send(response)

    def _send(self, response: Response) -> None:
        try:
            self.send_response(response.status)
            headers = {"Content-Length": str(len(response.body)), **response.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _error_response(error: HubError) -> Response:
    headers = dict(error.headers)
    if error.code:
        headers["X-Error-Code"] = error.code
    # Header values must be latin-1 and single-line.
    headers["X-Error-Message"] = error.message.replace("\n", " ").encode("latin-1", "replace").decode("latin-1")
    return Response.json({"error": error.message, **error.extra}, status=error.status, headers=headers)


class _Server(ThreadingHTTPServer):
    """Threaded server that remembers open connections so ``stop()`` can cut keep-alive ones."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: HubApp, errors: list[str]) -> None:
        super().__init__(address, _Handler)
        self.app = app
        self.errors = errors
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def track(self, connection: socket.socket, is_open: bool) -> None:
        with self._connections_lock:
            (self._connections.add if is_open else self._connections.discard)(connection)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Socket-level errors (client went away) are not test failures; keep stderr quiet."""



class HubServer:
    """A Hub on ``127.0.0.1:<free port>``, served from a background thread.

    >>> with HubServer() as hub:
    ...     api = HfApi(endpoint=hub.endpoint, token="test-token")

    Its state lives in a temporary directory removed on ``stop()``; ``user`` is the namespace of a
    repo created without an organization.
    """

    def __init__(self, *, user: str = DEFAULT_USER, host: str = "127.0.0.1") -> None:
        self._tmp = tempfile.mkdtemp(prefix="mla-zoo-hub-")
        self.app = HubApp(Path(self._tmp), user=user)
        self._host = host
        self.errors: list[str] = []  # tracebacks of requests that crashed the server (answered 500)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> HubServer:
        if self._server is None:
            self._server = _Server((self._host, 0), self.app, self.errors)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # what clients need

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: the value for ``HF_ENDPOINT`` or ``endpoint=``."""
        if self._server is None:
            raise RuntimeError("HubServer is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client_env(self, hf_home: str | os.PathLike[str], token: str = "test-token") -> dict[str, str]:
        """Environment for a subprocess using huggingface_hub against this server.

        Starts from ``os.environ`` and drops variables that would redirect or disable the client.
        """
        env = {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROPPED}
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_TOKEN=token,
            HF_HUB_OFFLINE="0",
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
        )
        return env

    def patch_client(self, monkeypatch: Any, hf_home: str | os.PathLike[str], token: str = "test-token") -> None:
        """Point an already-imported huggingface_hub at this server, for the rest of a pytest test.

        Needed only for code that cannot take ``endpoint=`` (module-level functions such as
        ``huggingface_hub.upload_folder``, transformers' ``from_pretrained``). It rewrites values
        huggingface_hub computes at import time, so it depends on the client's internals.
        """
        from huggingface_hub import constants, hf_api

        for name, value in self.client_env(hf_home, token).items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        hub_cache = os.path.join(str(hf_home), "hub")
        for name, value in {
            "ENDPOINT": self.endpoint,
            "HUGGINGFACE_CO_URL_TEMPLATE": self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            "HF_HUB_DISABLE_XET": True,
            "HF_HUB_OFFLINE": False,
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": hub_cache,
            "HUGGINGFACE_HUB_CACHE": hub_cache,
            "HF_TOKEN_PATH": os.path.join(str(hf_home), "token"),
        }.items():
            monkeypatch.setattr(constants, name, value, raising=False)
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)

    # what tests check beyond the product's own calls

    def commit_titles(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> list[str]:
        """Titles of the commits of a revision, newest first."""
        with self.app.lock:
            return [c.title for c in self.app.repos[repo_id].history(revision)]

    def collection_items(self, slug: str) -> list[str]:
        with self.app.lock:
            return [item["id"] for item in self.app.collections[slug]["items"]]
