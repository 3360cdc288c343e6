"""A small Hugging Face Hub look-alike for tests, served from 127.0.0.1.

Why it exists: no Hub is reachable from CI, and no installable package offers a Hub that
accepts uploads. The project's publish/browse code talks to the Hub through the *real*
``huggingface_hub`` client, so this server answers exactly the HTTP calls that client makes
(checked against huggingface_hub 2.4.0), with the fields and headers it reads. Standard
library only, so it adds no dependency (PyYAML is used for README front matter when it is
importable, which it always is next to huggingface_hub; a tiny fallback parser covers the rest).

Model of a repo: every commit is an immutable snapshot ``{path: blob oid}`` with a parent,
a message and a 40-hex sha1 oid; blobs live content-addressed (git blob sha1) in a temporary
directory; branches (``main`` first), tags and ``refs/pr/N`` are refs to commits. A new repo
starts with an "initial commit" holding ``.gitattributes``, like the real Hub.

Uploads: the preupload endpoint answers ``"uploadMode": "regular"`` for every file, so file
contents travel base64-encoded inside the NDJSON commit: no LFS, no Xet. An ``lfsFile`` commit
line is refused with 400.

Configuring a client (pick one):

* Explicit endpoint (cleanest, in-process): ``HfApi(endpoint=hub.endpoint, token="t")``,
  ``hf_hub_download(..., endpoint=hub.endpoint, token="t", cache_dir=tmp)`` and
  ``snapshot_download(..., endpoint=hub.endpoint, ...)`` all take ``endpoint=``.
* Subprocess: ``subprocess.run(..., env=hub.client_env(hf_home))`` sets ``HF_ENDPOINT``,
  ``HF_HUB_DISABLE_XET=1``, ``HF_TOKEN``, ``HF_HUB_OFFLINE=0`` and ``HF_HOME``. This is the only
  way that also covers code calling the module-level functions (``huggingface_hub.upload_folder``
  is bound to an ``HfApi`` created at import time) or transformers' ``from_pretrained``,
  because huggingface_hub reads ``HF_ENDPOINT`` (and ``HF_HUB_DISABLE_XET``, ``HF_HOME``...)
  into ``huggingface_hub.constants`` when it is imported.
* In-process, for such code: ``hub.patch_client(monkeypatch, hf_home)`` rewrites those
  import-time constants and the module-level ``HfApi``'s endpoint (relies on client internals).
  Clients older than about 1.33 need this (or ``HF_ENDPOINT``) even with ``endpoint=``:
  1.0.x parses the returned commit URL against ``constants.ENDPOINT``.

Xet: with ``hf_xet`` installed and ``HF_HUB_DISABLE_XET`` unset, ``upload_folder`` goes through
huggingface_hub's multi-commit pipeline (batches of up to ~250 files per commit, no
validate-yaml call) instead of ``create_commit``; both paths work here since every file is
"regular", but only the latter guarantees one commit per call.

Endpoints: see ``ROUTES`` (repo create/delete/settings, validate-yaml, preupload, commit,
tag and branch create/delete, refs, repo info by revision, tree, paths-info, commits, model
and dataset lists, whoami, collections, HEAD/GET resolve).

Errors follow the Hub: 404 with ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``) plus ``{"error": ...}``, 409 on conflicts, 412 when ``parent_commit`` is
stale. Unknown routes answer 501 so a missing endpoint is obvious; a crash inside a handler
answers 500 and is recorded in ``HubServer.errors`` (note that the client retries 5xx on some
calls, with back-off, so assert ``not hub.errors`` rather than waiting for a timeout).

Auth: any ``Authorization: Bearer <token>`` is accepted (or only ``token=`` if given); writes
need one, private repos are hidden without one. Nothing is logged, so tokens never are.
"""

from __future__ import annotations

import base64
import fnmatch
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

try:  # Only for README front matter; huggingface_hub itself depends on PyYAML.
    import yaml as _yaml
except ImportError:  # pragma: no cover - exercised only without PyYAML
    _yaml = None

DEFAULT_USER = "mla-zoo-ci"
DEFAULT_ORGS = ("mla-zoo",)
DEFAULT_BRANCH = "main"

# URL segment <-> repo type, as in huggingface_hub.constants.REPO_TYPES_MAPPING.
_TYPE_BY_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
# Prefix of web/resolve URLs per repo type (models have none).
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# File formats the Hub turns into model tags.
_FILE_TAGS = {".safetensors": "safetensors", ".gguf": "gguf", ".onnx": "onnx"}

# Variables that would send a client subprocess elsewhere than this server's endpoint and HF_HOME.
_CLIENT_ENV_DROPPED = {
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_TOKEN_PATH",
    "TRANSFORMERS_OFFLINE",
    "HUGGING_FACE_HUB_TOKEN",
}

_GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
"""


# --------------------------------------------------------------------------- helpers


def _now() -> str:
    """Timestamp in the one format huggingface_hub's ``parse_datetime`` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(content: bytes) -> str:
    """Git blob sha1: what the client computes locally to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _object_id() -> str:
    """24-hex id, like the Hub's database ids (``_id`` fields)."""
    return secrets.token_hex(12)


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def _as_list(value: Any) -> list[str]:
    """Card fields such as ``tags`` or ``base_model`` may be a string or a list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def _split_front_matter(text: str) -> str | None:
    """YAML block between leading ``---`` lines of a README, or None when absent."""
    match = re.match(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", text, re.S)
    if match is None:
        # An empty block "---\n---" has no inner newline.
        return "" if re.match(r"\A\ufeff?---[ \t]*\r?\n---[ \t]*(?:\r?\n|\Z)", text) else None
    return match.group(1)


def _mini_yaml(text: str) -> dict[str, Any]:
    """Just enough YAML for model cards: ``key: value``, ``key: [a, b]`` and ``- item`` lists."""
    data: dict[str, Any] = {}
    key: str | None = None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = re.match(r"\s*-\s+(.*)", line)
        if item and key is not None:
            if not isinstance(data.get(key), list):
                data[key] = []
            data[key].append(item.group(1).strip().strip("'\""))
            continue
        pair = re.match(r"([^\s:][^:]*):\s*(.*)", line)
        if pair is None:
            raise ValueError(f"cannot parse YAML line: {raw!r}")
        key, value = pair.group(1).strip(), pair.group(2).strip()
        if value.startswith("[") and value.endswith("]"):
            data[key] = [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
        elif value:
            data[key] = value.strip("'\"")
        else:
            data[key] = None
    return data


def parse_card_metadata(readme: str) -> dict[str, Any]:
    """README front matter as a dict (``{}`` when there is none). Raises ValueError if invalid."""
    block = _split_front_matter(readme)
    if block is None or not block.strip():
        return {}
    try:
        data = _yaml.safe_load(block) if _yaml is not None else _mini_yaml(block)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ValueError(f"Invalid YAML in README.md front matter: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("README.md front matter must be a YAML mapping")
    # Round-trip through JSON so dates and the like become plain strings.
    return json.loads(json.dumps(data, default=str))


def _gitignore_matcher(content: str | None) -> Callable[[str], bool]:
    """Simplified .gitignore rules (no negation): enough for preupload's ``shouldIgnore``."""
    patterns = [
        line.strip()
        for line in (content or "").splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "!"))
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        for pattern in patterns:
            anchored = pattern.startswith("/")
            pat = pattern.strip("/")
            if "/" in pat or anchored:
                prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
                if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
                    return True
            elif any(fnmatch.fnmatchcase(part, pat) for part in parts):
                return True
        return False

    return ignored


# --------------------------------------------------------------------------- errors


class HubError(Exception):
    """An HTTP error answered the way the Hub does, so the client raises its own exception.

    ``code`` goes into ``X-Error-Code`` (huggingface_hub maps ``RepoNotFound``,
    ``RevisionNotFound`` and ``EntryNotFound`` to its exception classes); ``extra`` is merged
    into the JSON body (the client reads ``url`` from a 409 on repo creation and ``slug`` from a
    409 on collection creation).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


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
    author: str
    date: str


@dataclass
class Repo:
    """A repository: commits by oid plus the refs pointing into them."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    object_id: str = field(default_factory=_object_id)
    gated: str | bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pulls: dict[int, str] = field(default_factory=dict)

    @property
    def author(self) -> str:
        return self.repo_id.split("/", 1)[0]

    @property
    def url_path(self) -> str:
        """``ns/name`` with the type prefix used in web and resolve URLs."""
        return _URL_PREFIX[self.repo_type] + self.repo_id


class BlobStore:
    """Content-addressed file contents on disk, keyed by git blob oid."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, oid: str) -> Path:
        return self.root / oid[:2] / oid

    def put(self, content: bytes) -> str:
        oid = git_blob_oid(content)
        path = self._path(oid)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{oid}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(content)
            os.replace(tmp, path)  # atomic: concurrent writers of one blob write the same bytes
        return oid

    def get(self, oid: str) -> bytes:
        return self._path(oid).read_bytes()

    def size(self, oid: str) -> int:
        return self._path(oid).stat().st_size


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

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name) or self.query.get(f"{name}[]")
        return values[0] if values else default

    def args(self, name: str) -> list[str]:
        return [*self.query.get(name, []), *self.query.get(f"{name}[]", [])]

    def json(self) -> dict[str, Any]:
        """The JSON object body (every JSON endpoint of the Hub takes an object)."""
        if not self.body:
            return {}
        try:
            data = json.loads(self.body)
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
        body = json.dumps(data).encode()
        return cls(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})


_REPO = r"/api/(?P<types>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_COLLECTION = r"/api/collections/(?P<slug>[^/]+/[^/]+)"

# (method, raw-path regex, handler name). Paths are matched *before* percent-decoding, because
# the client quotes revisions and tree paths with safe="" (``refs%2Fpr%2F1``).
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("DELETE", r"/api/repos/delete", "delete_repo"),
        ("GET", r"/api/(?P<types>models|datasets|spaces)", "list_repos"),
        ("GET", _REPO, "repo_info"),
        ("GET", _REPO + r"/revision/(?P<rev>[^/]+)", "repo_info"),
        ("GET", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("POST", _REPO + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("GET", _REPO + r"/refs", "refs"),
        ("GET", _REPO + r"/commits/(?P<rev>[^/]+)", "commits"),
        ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", _REPO + r"/tag/(?P<rev>[^/]+)", "create_tag"),
        ("DELETE", _REPO + r"/tag/(?P<tag>[^/]+)", "delete_tag"),
        ("POST", _REPO + r"/branch/(?P<branch>[^/]+)", "create_branch"),
        ("DELETE", _REPO + r"/branch/(?P<branch>[^/]+)", "delete_branch"),
        ("PUT", _REPO + r"/settings", "repo_settings"),
        ("GET", r"/api/collections", "list_collections"),
        ("POST", r"/api/collections", "create_collection"),
        ("GET", _COLLECTION, "get_collection"),
        ("PATCH", _COLLECTION, "update_collection"),
        ("DELETE", _COLLECTION, "delete_collection"),
        ("POST", _COLLECTION + r"/items", "add_collection_item"),
        ("DELETE", _COLLECTION + r"/items/(?P<item>[^/]+)", "delete_collection_item"),
        (
            "GET",
            r"/(?:(?P<types>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
            "resolve",
        ),
    ]
]


class HubApp:
    """The Hub's behaviour, independent of sockets: routes map a :class:`Request` to a :class:`Response`.

    One lock serialises every request that touches state; tests are small, and it keeps the
    "a commit is atomic" and "refs move atomically" guarantees trivially true.
    """

    def __init__(self, root: Path, *, user: str, orgs: Iterable[str], token: str | None) -> None:
        self.blobs = BlobStore(root / "blobs")
        self.user = user
        self.orgs = tuple(orgs)
        self.accepted_token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.collections: dict[str, dict[str, Any]] = {}
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._card_cache: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------- dispatch

    def handle(self, method: str, raw_path: str, request: Request) -> Response:
        route_method = "GET" if method == "HEAD" else method
        for verb, pattern, name in ROUTES:
            match = pattern.fullmatch(raw_path)
            if match and verb == route_method:
                request.params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                self._check_token(request)
                with self.lock:
                    return getattr(self, f"route_{name}")(request)
        raise HubError(501, f"mla-zoo test hub does not implement {method} {raw_path}")

    def _check_token(self, request: Request) -> None:
        if request.token is not None and self.accepted_token not in (None, request.token):
            raise HubError(401, "Invalid credentials in Authorization header")

    @staticmethod
    def _require_auth(request: Request) -> None:
        if request.token is None:
            raise HubError(401, "You must be authenticated to do this (no Authorization header)")

    # ----------------------------------------------------------------- repos and revisions

    def _repo(self, request: Request) -> Repo:
        """The repo named in the URL; private repos exist only for authenticated callers."""
        repo_type = _TYPE_BY_PLURAL.get(request.params.get("types", "models"), "model")
        repo_id = request.params["repo"]
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and request.token is None):
            raise _repo_not_found(repo_id)
        return repo

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> Commit:
        """Branch, then tag, then ``refs/...`` names, then a full or abbreviated (>= 7) commit oid."""
        oid = repo.branches.get(revision) or repo.tags.get(revision)
        if oid is None and revision.startswith("refs/heads/"):
            oid = repo.branches.get(revision.removeprefix("refs/heads/"))
        if oid is None and revision.startswith("refs/tags/"):
            oid = repo.tags.get(revision.removeprefix("refs/tags/"))
        if oid is None and (pr := re.fullmatch(r"refs/pr/(\d+)", revision)):
            oid = repo.pulls.get(int(pr.group(1)))
        if oid is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [c for c in repo.commits if c.startswith(revision)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise _revision_not_found(revision)
        return repo.commits[oid]

    def _new_commit(self, repo: Repo, parent: Commit | None, files: dict[str, str], title: str, message: str) -> Commit:
        """Build and store an immutable commit; its oid hashes content, ancestry and a unique counter."""
        date = _now()
        tree = "\n".join(f"{path} {oid}" for path, oid in sorted(files.items()))
        parent_oid = parent.oid if parent else ""
        header = f"{tree}\nparent {parent_oid}\n{self.user} {date} {next(self._counter)}\n{title}\n{message}"
        commit = Commit(
            oid=hashlib.sha1(header.encode()).hexdigest(),
            parent=parent.oid if parent else None,
            files=MappingProxyType(dict(files)),
            title=title,
            message=message,
            author=self.user,
            date=date,
        )
        repo.commits[commit.oid] = commit
        return commit

    def _history(self, repo: Repo, commit: Commit) -> Iterator[Commit]:
        current: Commit | None = commit
        while current is not None:
            yield current
            current = repo.commits[current.parent] if current.parent else None

    def _last_commit(self, repo: Repo, commit: Commit, path: str) -> Commit:
        """Most recent commit that changed ``path`` (a file, or anything under a folder)."""

        def snapshot(c: Commit) -> tuple[tuple[str, str], ...]:
            if path in c.files:
                return ((path, c.files[path]),)
            prefix = path + "/"
            return tuple(sorted((p, o) for p, o in c.files.items() if p.startswith(prefix)))

        latest = commit
        for older in itertools.islice(self._history(repo, commit), 1, None):
            if snapshot(older) != snapshot(latest):
                break
            latest = older
        return latest

    # ----------------------------------------------------------------- card metadata and JSON views

    def card_data(self, commit: Commit) -> dict[str, Any]:
        """README.md front matter of a commit (``{}`` when missing or invalid), cached by blob."""
        oid = commit.files.get("README.md")
        if oid is None:
            return {}
        if oid not in self._card_cache:
            try:
                self._card_cache[oid] = parse_card_metadata(self.blobs.get(oid).decode("utf-8", "replace"))
            except ValueError:
                self._card_cache[oid] = {}
        return self._card_cache[oid]

    def _config(self, commit: Commit) -> dict[str, Any] | None:
        """The parts of config.json the Hub surfaces (``config`` field, model tags)."""
        oid = commit.files.get("config.json")
        if oid is None:
            return None
        try:
            config = json.loads(self.blobs.get(oid))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(config, dict):
            return None
        return {k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config}

    def repo_tags(self, commit: Commit) -> list[str]:
        """Tags as the Hub derives them: card ``tags`` plus library, task, license, base model, files."""
        card = self.card_data(commit)
        tags = _as_list(card.get("tags"))
        tags += _as_list(card.get("library_name"))
        tags += _as_list(card.get("pipeline_tag"))
        config = self._config(commit) or {}
        tags += _as_list(config.get("model_type"))
        if "auto_map" in config:
            tags.append("custom_code")
        extensions = {os.path.splitext(p)[1] for p in commit.files}
        tags += [tag for ext, tag in _FILE_TAGS.items() if ext in extensions]
        tags += [f"dataset:{d}" for d in _as_list(card.get("datasets"))]
        tags += _as_list(card.get("language"))
        relation = card.get("base_model_relation")
        for base in _as_list(card.get("base_model")):
            tags.append(f"base_model:{base}")
            if relation:
                tags.append(f"base_model:{relation}:{base}")
        tags += [f"license:{lic}" for lic in _as_list(card.get("license"))]
        return list(dict.fromkeys(tags))

    def repo_json(
        self,
        repo: Repo,
        commit: Commit,
        *,
        full: bool = True,
        card: bool = True,
        blobs: bool = False,
        config: bool = True,
        expand: list[str] | None = None,
    ) -> dict[str, Any]:
        """The JSON of ``/api/models/{id}`` (``full``) or of one entry of ``/api/models``."""
        card_data = self.card_data(commit)
        data: dict[str, Any] = {
            "_id": repo.object_id,
            "id": repo.repo_id,
            "private": repo.private,
            "likes": 0,
            "downloads": 0,
            "trendingScore": 0,
            "tags": self.repo_tags(commit),
            "createdAt": repo.created_at,
        }
        if repo.repo_type == "model":
            data["modelId"] = repo.repo_id
            for key in ("pipeline_tag", "library_name"):
                if isinstance(card_data.get(key), str):
                    data[key] = card_data[key]
        if full:
            data.update(
                author=repo.author,
                sha=commit.oid,
                lastModified=commit.date,
                gated=repo.gated,
                disabled=False,
                siblings=[self._sibling(path, oid, blobs) for path, oid in sorted(commit.files.items())],
                spaces=[],
                usedStorage=sum(self.blobs.size(oid) for oid in set(commit.files.values())),
            )
        if card:
            data["cardData"] = card_data
        if config and repo.repo_type == "model" and (cfg := self._config(commit)) is not None:
            data["config"] = cfg
        if expand:
            data = {k: v for k, v in data.items() if k in {"_id", "id", *expand}}
        return data

    def _sibling(self, path: str, oid: str, blobs: bool) -> dict[str, Any]:
        if not blobs:
            return {"rfilename": path}
        return {"rfilename": path, "size": self.blobs.size(oid), "blobId": oid}

    # ----------------------------------------------------------------- account

    def route_whoami(self, request: Request) -> Response:
        if request.token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        orgs = [
            {"type": "org", "name": org, "fullname": org, "id": _object_id(), "roleInOrg": "admin"} for org in self.orgs
        ]
        return Response.json(
            {
                "type": "user",
                "id": _object_id(),
                "name": self.user,
                "fullname": self.user,
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def route_validate_yaml(self, request: Request) -> Response:
        content = request.json().get("content", "")
        try:
            metadata = parse_card_metadata(content)
        except ValueError as exc:
            return Response.json({"errors": [{"message": str(exc)}], "warnings": []}, status=400)
        warnings = [] if metadata else [{"message": "Empty or missing yaml metadata in repo card"}]
        return Response.json({"errors": [], "warnings": warnings})

    # ----------------------------------------------------------------- repo lifecycle

    def route_create_repo(self, request: Request) -> Response:
        self._require_auth(request)
        payload = request.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Unsupported repo type: {repo_type}")
        name = payload.get("name")
        if not name or "/" in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{payload.get('organization') or self.user}/{name}"
        url = f"{request.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        initial = self._new_commit(repo, None, {".gitattributes": self.blobs.put(_GITATTRIBUTES)}, "initial commit", "")
        repo.branches[DEFAULT_BRANCH] = initial.oid
        self.repos[(repo_type, repo_id)] = repo
        return Response.json({"url": url, "name": repo_id, "id": repo.object_id})

    def route_delete_repo(self, request: Request) -> Response:
        self._require_auth(request)
        payload = request.json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload.get('name')}"
        if self.repos.pop((repo_type, repo_id), None) is None:
            raise _repo_not_found(repo_id)
        return Response.json({})

    def route_repo_settings(self, request: Request) -> Response:
        self._require_auth(request)
        repo = self._repo(request)
        payload = request.json()
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        if "private" in payload:
            repo.private = bool(payload["private"])
        if "gated" in payload:
            repo.gated = payload["gated"]
        return Response.json({})

    # ----------------------------------------------------------------- reading

    def route_repo_info(self, request: Request) -> Response:
        repo = self._repo(request)
        commit = self._resolve(repo, request.params.get("rev", DEFAULT_BRANCH))
        expand = request.args("expand") or None
        return Response.json(self.repo_json(repo, commit, blobs=_truthy(request.arg("blobs")), expand=expand))

    def route_list_repos(self, request: Request) -> Response:
        """``/api/models``: ``author``, ``search``, all ``filter`` tags, ``pipeline_tag``, ``sort``, ``limit``."""
        repo_type = _TYPE_BY_PLURAL[request.params["types"]]
        author = request.arg("author")
        search = (request.arg("search") or "").lower()
        wanted = set(request.args("filter"))
        pipeline_tag = request.arg("pipeline_tag")
        full = _truthy(request.arg("full"))
        card = _truthy(request.arg("cardData")) or full
        expand = request.args("expand") or None
        results = []
        for repo in self.repos.values():
            if repo.repo_type != repo_type or (repo.private and request.token is None):
                continue
            if author is not None and repo.author.lower() != author.lower():
                continue
            if search and search not in repo.repo_id.lower():
                continue
            commit = repo.commits[repo.branches[DEFAULT_BRANCH]]
            entry = self.repo_json(
                repo, commit, full=full, card=card, config=_truthy(request.arg("config")), expand=expand
            )
            tags = set(self.repo_tags(commit))
            if not wanted <= tags or (pipeline_tag and self.card_data(commit).get("pipeline_tag") != pipeline_tag):
                continue
            results.append((repo, commit, entry))
        results = self._sorted(results, request.arg("sort"))
        limit = request.arg("limit")
        if limit is not None:
            results = results[: int(limit)]
        return Response.json([entry for _, _, entry in results])

    @staticmethod
    def _sorted(results: list[tuple[Repo, Commit, dict]], sort: str | None) -> list[tuple[Repo, Commit, dict]]:
        """Descending, like the Hub; counters are all zero here so those sorts keep creation order."""
        if sort == "lastModified":
            return sorted(results, key=lambda r: r[1].date, reverse=True)
        if sort == "createdAt":
            return sorted(results, key=lambda r: r[0].created_at, reverse=True)
        return results

    def _tree_entry(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict[str, Any]:
        """One ``/tree`` or ``/paths-info`` item: a file, or a directory with a content-derived oid."""
        if path in commit.files:
            oid = commit.files[path]
            entry: dict[str, Any] = {"type": "file", "oid": oid, "size": self.blobs.size(oid), "path": path}
        else:
            prefix = path + "/"
            listing = "\n".join(f"{p} {o}" for p, o in sorted(commit.files.items()) if p.startswith(prefix))
            entry = {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            last = self._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    @staticmethod
    def _directories(commit: Commit) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)}

    def route_tree(self, request: Request) -> Response:
        repo = self._repo(request)
        commit = self._resolve(repo, request.params["rev"])
        base = request.params.get("path", "").strip("/")
        directories = self._directories(commit)
        if base and base not in directories:
            raise _entry_not_found(base, commit.oid)
        prefix = f"{base}/" if base else ""
        recursive = _truthy(request.arg("recursive"))
        paths = sorted(
            p
            for p in [*directories, *commit.files]
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])
        )
        expand = _truthy(request.arg("expand"))
        return Response.json([self._tree_entry(repo, commit, p, expand) for p in paths])

    def route_paths_info(self, request: Request) -> Response:
        repo = self._repo(request)
        commit = self._resolve(repo, request.params["rev"])
        if request.headers.get("content-type", "").startswith("application/json"):
            form = request.json()
            paths, expand = _as_list(form.get("paths")), bool(form.get("expand"))
        else:
            form = parse_qs(request.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy((form.get("expand") or ["false"])[0])
        known = set(commit.files) | self._directories(commit)
        entries = [self._tree_entry(repo, commit, p.strip("/"), expand) for p in paths if p.strip("/") in known]
        return Response.json(entries)

    def route_refs(self, request: Request) -> Response:
        repo = self._repo(request)

        def ref(name: str, full: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": oid}

        data: dict[str, Any] = {
            "branches": [ref(b, f"refs/heads/{b}", oid) for b, oid in repo.branches.items()],
            "converts": [],
            "tags": [ref(t, f"refs/tags/{t}", oid) for t, oid in repo.tags.items()],
        }
        if _truthy(request.arg("include_prs")):
            data["pullRequests"] = [ref(f"refs/pr/{n}", f"refs/pr/{n}", oid) for n, oid in repo.pulls.items()]
        return Response.json(data)

    def route_commits(self, request: Request) -> Response:
        repo = self._repo(request)
        commit = self._resolve(repo, request.params["rev"])
        formatted = "formatted" in request.args("expand")
        items = []
        for c in self._history(repo, commit):
            item: dict[str, Any] = {
                "id": c.oid,
                "title": c.title,
                "message": c.message,
                "date": c.date,
                "authors": [{"user": c.author, "avatar": None}],
            }
            if formatted:
                item["formatted"] = {"title": html.escape(c.title), "message": html.escape(c.message)}
            items.append(item)
        return Response.json(items)

    def route_resolve(self, request: Request) -> Response:
        """File download; HEAD gets the same headers. ``X-Repo-Commit`` and ``ETag`` are mandatory for the client."""
        repo = self._repo(request)
        commit = self._resolve(repo, request.params["rev"])
        path = request.params["path"]
        oid = commit.files.get(path)
        if oid is None:
            raise _entry_not_found(path, commit.oid)
        content = self.blobs.get(oid)
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": mimetypes.guess_type(path)[0] or "application/octet-stream",
            "Content-Disposition": f'inline; filename="{os.path.basename(path)}"',
        }
        byte_range = request.headers.get("range")
        if byte_range:
            start, end = _parse_range(byte_range, len(content))
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return Response(206, content[start : end + 1], headers)
        return Response(200, content, headers)

    # ----------------------------------------------------------------- writing

    def _branch_for_write(self, repo: Repo, revision: str) -> tuple[str, Commit]:
        """Commits land on a branch or a ``refs/pr/N``; tags and commit oids cannot move."""
        name = revision.removeprefix("refs/heads/")
        if name in repo.branches:
            return name, repo.commits[repo.branches[name]]
        if (pr := re.fullmatch(r"refs/pr/(\d+)", revision)) and int(pr.group(1)) in repo.pulls:
            return revision, repo.commits[repo.pulls[int(pr.group(1))]]
        raise _revision_not_found(revision)

    def _move_ref(self, repo: Repo, ref: str, oid: str) -> None:
        if pr := re.fullmatch(r"refs/pr/(\d+)", ref):
            repo.pulls[int(pr.group(1))] = oid
        else:
            repo.branches[ref] = oid

    def route_preupload(self, request: Request) -> Response:
        """Every file is "regular" (inline base64 in the commit): no LFS, no Xet."""
        self._require_auth(request)
        repo = self._repo(request)
        revision = request.params["rev"]
        commit = (
            repo.commits[repo.branches[DEFAULT_BRANCH]]
            if _truthy(request.arg("create_pr"))
            else self._resolve(repo, revision)
        )
        payload = request.json()
        gitignore = payload.get("gitIgnore")
        if gitignore is None and ".gitignore" in commit.files:
            gitignore = self.blobs.get(commit.files[".gitignore"]).decode("utf-8", "replace")
        ignored = _gitignore_matcher(gitignore)
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": ignored(f["path"]),
                "oid": commit.files.get(f["path"]),
            }
            for f in payload.get("files", [])
        ]
        return Response.json({"files": files, "commitOid": commit.oid})

    def route_commit(self, request: Request) -> Response:
        """NDJSON commit: a header line, then ``file`` / ``deletedFile`` / ``deletedFolder`` lines."""
        self._require_auth(request)
        repo = self._repo(request)
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "Commit payload must start with a header line")
        header = lines[0]["value"]
        if _truthy(request.arg("create_pr")):
            base = repo.commits[repo.branches[DEFAULT_BRANCH]]
            pr_num = max(repo.pulls, default=0) + 1
            repo.pulls[pr_num] = base.oid
            ref = f"refs/pr/{pr_num}"
        else:
            ref, base = self._branch_for_write(repo, request.params["rev"])
        parent_commit = header.get("parentCommit")
        if parent_commit and not base.oid.startswith(parent_commit):
            raise HubError(412, f"A commit has happened since {parent_commit}. Please refresh and try again.")
        files = self._apply_operations(dict(base.files), lines[1:], base)
        commit = self._new_commit(repo, base, files, header.get("summary") or "", header.get("description") or "")
        self._move_ref(repo, ref, commit.oid)
        pr_url = (
            f"{request.endpoint}/{repo.url_path}/discussions/{ref.rsplit('/', 1)[1]}"
            if ref.startswith("refs/pr/")
            else None
        )
        return Response.json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{request.endpoint}/{repo.url_path}/commit/{commit.oid}",
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _apply_operations(
        self, files: dict[str, str], operations: list[dict[str, Any]], base: Commit
    ) -> dict[str, str]:
        for operation in operations:
            key, value = operation.get("key"), operation.get("value", {})
            raw_path = value.get("path", "")
            path = _clean_path(raw_path.rstrip("/") if key == "deletedFolder" else raw_path)
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')}")
                files[path] = self.blobs.put(base64.b64decode(value.get("content", "")))
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise _entry_not_found(f"{path} (A file with this name doesn't exist)", base.oid)
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise _entry_not_found(f"{path} (A folder with this name doesn't exist)", base.oid)
                for p in doomed:
                    del files[p]
            elif key == "lfsFile":
                raise HubError(400, f"The test hub stores no LFS objects; {path} should have been a regular file")
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        return files

    def route_create_tag(self, request: Request) -> Response:
        self._require_auth(request)
        repo = self._repo(request)
        commit = self._resolve(repo, request.params["rev"])
        tag = request.json().get("tag", "")
        if not tag or not re.fullmatch(r"[\w.\-/]+", tag) or tag.startswith(("refs/", "/")):
            raise HubError(400, f"Invalid tag name: {tag!r}")
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.oid
        return Response.json({})

    def route_delete_tag(self, request: Request) -> Response:
        self._require_auth(request)
        repo = self._repo(request)
        if repo.tags.pop(request.params["tag"], None) is None:
            raise _revision_not_found(request.params["tag"])
        return Response.json({})

    def route_create_branch(self, request: Request) -> Response:
        self._require_auth(request)
        repo = self._repo(request)
        branch = request.params["branch"]
        if branch.startswith("refs/") or not re.fullmatch(r"[\w.\-/]+", branch):
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = request.json().get("startingPoint") or DEFAULT_BRANCH
        repo.branches[branch] = self._resolve(repo, start).oid
        return Response.json({})

    def route_delete_branch(self, request: Request) -> Response:
        self._require_auth(request)
        repo = self._repo(request)
        branch = request.params["branch"]
        if branch == DEFAULT_BRANCH:
            raise HubError(403, "Cannot delete the default branch")
        if repo.branches.pop(branch, None) is None:
            raise _revision_not_found(branch)
        return Response.json({})

    # ----------------------------------------------------------------- collections

    def _collection(self, slug: str) -> dict[str, Any]:
        if slug not in self.collections:
            raise HubError(404, f"Collection not found: {slug}")
        return self.collections[slug]

    def _collection_json(
        self, collection: dict[str, Any], *, with_position: bool = True, max_items: int | None = None
    ) -> dict[str, Any]:
        """Hub shape. ``owner`` is an object ``{"name": ...}`` there, so the client passes it on as a dict.

        ``position`` is left out of list results: ``list_collections`` adds it itself, and a
        duplicate keyword would raise a TypeError in ``Collection(**data)``.
        """
        data = {k: v for k, v in collection.items() if not k.startswith("_")}
        data["items"] = [dict(item) for item in collection["items"][:max_items]]
        if not with_position:
            data.pop("position", None)
        return data

    def route_create_collection(self, request: Request) -> Response:
        self._require_auth(request)
        payload = request.json()
        namespace = payload.get("namespace") or self.user
        title = payload.get("title", "")
        for slug, collection in self.collections.items():
            if collection["owner"]["name"] == namespace and collection["title"] == title:
                raise HubError(409, "A collection with this title already exists", extra={"slug": slug})
        slugified = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "collection"
        slug = f"{namespace}/{slugified}-{_object_id()}"
        self.collections[slug] = {
            "slug": slug,
            "title": title,
            "description": payload.get("description"),
            "owner": {"name": namespace, "type": "org" if namespace in self.orgs else "user"},
            "items": [],
            "lastUpdated": _now(),
            "position": sum(c["owner"]["name"] == namespace for c in self.collections.values()),
            "private": bool(payload.get("private", False)),
            "theme": "default",
            "upvotes": 0,
            "isUpvotedByUser": False,
            "gating": False,
        }
        return Response.json(self._collection_json(self.collections[slug]))

    def route_get_collection(self, request: Request) -> Response:
        return Response.json(self._collection_json(self._collection(request.params["slug"])))

    def route_list_collections(self, request: Request) -> Response:
        """Filters ``owner`` and ``item`` (``models/ns/name``); items are cut to 4 as on the Hub."""
        owners = set(request.args("owner"))
        wanted_items = set(request.args("item"))
        results = []
        for collection in self.collections.values():
            if owners and collection["owner"]["name"] not in owners:
                continue
            keys = {f"{item['type']}s/{item['id']}" for item in collection["items"]}
            if wanted_items and not wanted_items <= keys:
                continue
            results.append(self._collection_json(collection, with_position=False, max_items=4))
        limit = request.arg("limit")
        return Response.json(results[: int(limit)] if limit else results)

    def route_update_collection(self, request: Request) -> Response:
        self._require_auth(request)
        collection = self._collection(request.params["slug"])
        for key, value in request.json().items():
            if key in ("title", "description", "private", "theme", "position"):
                collection[key] = value
        collection["lastUpdated"] = _now()
        return Response.json({"success": True, "data": self._collection_json(collection)})

    def route_delete_collection(self, request: Request) -> Response:
        self._require_auth(request)
        self._collection(request.params["slug"])
        del self.collections[request.params["slug"]]
        return Response.json({})

    def route_add_collection_item(self, request: Request) -> Response:
        """Repos must exist (404 otherwise); adding the same item twice is a 409."""
        self._require_auth(request)
        collection = self._collection(request.params["slug"])
        payload = request.json()
        item = payload.get("item", {})
        item_id, item_type = item.get("id"), item.get("type")
        if item_type in _URL_PREFIX and (item_type, item_id) not in self.repos:
            raise _repo_not_found(item_id)
        if any(i["id"] == item_id and i["type"] == item_type for i in collection["items"]):
            raise HubError(409, f"Item {item_id} already exists in the collection")
        entry: dict[str, Any] = {
            "_id": _object_id(),
            "id": item_id,
            "type": item_type,
            "position": len(collection["items"]),
        }
        if payload.get("note"):
            entry["note"] = {"html": html.escape(payload["note"]), "text": payload["note"]}
        collection["items"].append(entry)
        collection["lastUpdated"] = _now()
        return Response.json(self._collection_json(collection))

    def route_delete_collection_item(self, request: Request) -> Response:
        self._require_auth(request)
        collection = self._collection(request.params["slug"])
        kept = [i for i in collection["items"] if i["_id"] != request.params["item"]]
        if len(kept) == len(collection["items"]):
            raise HubError(404, f"Item not found: {request.params['item']}")
        collection["items"] = [{**item, "position": n} for n, item in enumerate(kept)]
        return Response.json({})


def _clean_path(path: str) -> str:
    """Reject paths a git tree cannot hold (absolute, ``..``, ``.git/``)."""
    path = path.strip()
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """One ``bytes=a-b`` / ``a-`` / ``-n`` range, inclusive; 416 when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or match.groups() == ("", ""):
        raise HubError(416, f"Unsupported Range header: {header}")
    first, last = match.groups()
    if first == "":
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise HubError(416, f"Range not satisfiable: {header}", headers={"Content-Range": f"bytes */{size}"})
    return start, end


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


# --------------------------------------------------------------------------- public API


class HubServer:
    """A Hub on ``127.0.0.1:<free port>``, served from a background thread.

    >>> with HubServer() as hub:
    ...     api = HfApi(endpoint=hub.endpoint, token="test-token")

    ``root`` defaults to a temporary directory removed on ``stop()``. ``user`` and ``orgs`` are
    what ``whoami`` reports (and the namespace used when a repo id has none). ``token``, when
    given, is the only bearer token accepted; by default any token is.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        user: str = DEFAULT_USER,
        orgs: Iterable[str] = DEFAULT_ORGS,
        token: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self._tmp = tempfile.mkdtemp(prefix="mla-zoo-hub-") if root is None else None
        self.root = Path(root if root is not None else self._tmp)
        self.app = HubApp(self.root, user=user, orgs=orgs, token=token)
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
        if self._tmp is not None:
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
