"""Publish releases to the Hugging Face Hub and browse the zoo, through `huggingface_hub` only.

publish: the release's `hub/` folder goes up in ONE commit (`create_commit` with every file, and a
delete for each file of the previous release that this one no longer has), made against the
`main` head read together with the tags (`parent_commit`), so a concurrent push fails it instead
of being mixed into it. The tag `vX.Y.Z` is created only after that commit succeeded; a version
whose tag already exists is refused before anything is written. Last, the repo is added to the
owner's "mla-zoo" Collection (found with `list_collections(owner=...)`, created if missing).

The token is whatever huggingface_hub resolves (`HF_TOKEN`, else the stored login); this module
never reads, prints or logs it. The endpoint likewise (`HF_ENDPOINT`, default the public Hub).
Every request runs inside `hub_client.hub_call`: a time limit, bounded attempts (browsing: one),
and errors that say what was being done.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from mla_zoo.modeling.common import HubError, VersionExists, atomic_directory, changed_files, check_output_dir
from mla_zoo.modeling.hub_client import hub_call

from .manifest import ReleaseManifest
from .recipe import SEMVER, semver_key

ZOO_TAG = "mla-zoo"
COLLECTION_TITLE = "mla-zoo"
DEFAULT_ORG = "mla-zoo"
PULL_MARKERS = (ReleaseManifest.FILE, ".cache/huggingface")  # what `pull --local-dir` leaves in a directory


def default_org() -> str:
    return os.environ.get("MLA_ZOO_ORG", DEFAULT_ORG)


def make_api(api=None):
    from huggingface_hub import HfApi

    return api if api is not None else HfApi()


# ----------------------------------------------------------------------------- releases on disk


def load_release(release_dir: str | Path) -> tuple[Path, ReleaseManifest]:
    """(hub folder, release.json) of a built release, after checking every file against its hash."""
    release_dir = Path(release_dir)
    manifest, hub = release_dir / ReleaseManifest.FILE, release_dir / "hub"
    if not manifest.is_file() or not hub.is_dir():
        raise HubError(f"{release_dir} holds no built release (no release.json / hub/): run `mla-zoo build` "
                       "first; a failed gate or an unfinished stage leaves none")
    release = ReleaseManifest.read(manifest)
    changed = changed_files(hub, {k: asdict(v) for k, v in release.files.items()})
    if changed:
        raise HubError(f"{hub / changed[0]} is missing or differs from release.json: the release changed after it "
                       "was built; run `mla-zoo build` again")
    extra = sorted({p.relative_to(hub).as_posix() for p in hub.rglob("*") if p.is_file()}
                   - set(release.files) - {ReleaseManifest.FILE})
    if extra:
        raise HubError(f"{hub} has files release.json does not list ({', '.join(extra[:3])}): "
                       "run `mla-zoo build` again")
    return hub, release


@dataclass
class PublishPlan:
    repo_id: str
    version: str
    tag: str
    files: list[tuple[str, Path, int]]  # (path in repo, local path, size)
    release: ReleaseManifest
    private: bool = False

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]

def plan_publish(release_dir: str | Path, repo_id: str | None = None, private: bool = False) -> PublishPlan:
    hub, release = load_release(release_dir)
    built_for = release.repo_id
    if repo_id is not None and repo_id != built_for:
        raise HubError(f"the release was built for {built_for} (release.repo_id in the recipe), and its model card "
                       f"and usage snippets name that repo; set release.repo_id = \"{repo_id}\" and rebuild, "
                       f"or publish with `repo` {built_for}")
    files = [(rel, hub / rel, meta.size) for rel, meta in sorted(release.files.items())]
    files.append((ReleaseManifest.FILE, hub / ReleaseManifest.FILE, (hub / ReleaseManifest.FILE).stat().st_size))
    return PublishPlan(built_for, release.version, release.tag, files, release, private)


# ----------------------------------------------------------------------------- publish


def released_versions(api, repo_id: str) -> list[dict]:
    """Release tags (vX.Y.Z) of a repo, oldest first: [{version, tag, commit}]."""
    with hub_call(f"listing the tags of {repo_id}"):
        refs = api.list_repo_refs(repo_id)
    found = []
    for tag in refs.tags:
        if tag.name.startswith("v") and re.fullmatch(SEMVER, tag.name[1:]):
            found.append({"version": tag.name[1:], "tag": tag.name, "commit": tag.target_commit})
    return sorted(found, key=lambda v: semver_key(v["version"]))


def prepare_repo(api, plan: PublishPlan) -> str:
    """Create the repo if needed, refuse an existing version; returns the head of main to commit on."""
    from huggingface_hub.errors import RepositoryNotFoundError

    with hub_call(f"preparing {plan.repo_id}"):
        try:
            refs = api.list_repo_refs(plan.repo_id)
        except RepositoryNotFoundError:
            api.create_repo(plan.repo_id, exist_ok=True, private=plan.private)
            refs = api.list_repo_refs(plan.repo_id)
    if any(t.name == plan.tag for t in refs.tags):
        raise VersionExists(f"{plan.repo_id} already has version {plan.tag}; a released version is never "
                            "overwritten: bump release.version in the recipe and rebuild")
    main = [b.target_commit for b in refs.branches if b.name == "main"]
    if not main:
        raise HubError(f"{plan.repo_id} has no main branch")
    return main[0]


def collection_slug(api, owner: str, create: bool = True) -> str | None:
    """The owner's mla-zoo collection (created when missing and `create`)."""
    with hub_call(f"finding the {COLLECTION_TITLE} collection of {owner}"):
        for collection in api.list_collections(owner=owner, limit=100):
            if collection.title == COLLECTION_TITLE:
                return collection.slug
        if not create:
            return None
        return api.create_collection(COLLECTION_TITLE, namespace=owner, exists_ok=True,
                                     description="MLA (MHA2MLA) conversions with a smaller KV cache, by mla-zoo").slug


def publish(release_dir: str | Path, repo_id: str | None = None, *, api=None, private: bool = False,
            log: Callable[[str], None] | None = None) -> dict:
    """Publish a built release."""
    return execute_publish(plan_publish(release_dir, repo_id, private), api=api, log=log)


def dry_run_check(api, plan: PublishPlan) -> str:
    """Read-only: would the Hub accept this version?"""
    try:
        with hub_call(f"reading the versions of {plan.repo_id}", browse=True):
            tags = [v["tag"] for v in released_versions(api, plan.repo_id)]
    except HubError as e:
        return f"could not check the Hub ({e})" if "not found" not in str(e) else "the repo does not exist yet"
    if plan.tag in tags:
        return f"{plan.tag} ALREADY EXISTS: publishing would be refused"
    return f"released versions: {', '.join(tags) or 'none'}; {plan.tag} is new"


def execute_publish(plan: PublishPlan, api=None, log: Callable[[str], None] | None = None) -> dict:
    from huggingface_hub import get_token

    api = make_api(api)
    if getattr(api, "token", None) is None and get_token() is None:
        raise HubError("not logged in to the Hub: set HF_TOKEN or run `hf auth login`")
    return commit_release(api, plan, prepare_repo(api, plan), log)


def commit_release(api, plan: PublishPlan, head: str, log: Callable[[str], None] | None = None) -> dict:
    """One commit on top of `head` (refused by the Hub if main moved since), then the tag, then the collection."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    log = log or (lambda msg: print(msg, file=sys.stderr))
    with hub_call(f"listing the files of {plan.repo_id}"):
        existing = api.list_repo_files(plan.repo_id, revision=head)
    wanted = {path for path, _, _ in plan.files}
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local)) for path, local, _ in plan.files]
    operations += [CommitOperationDelete(path_in_repo=p) for p in existing if p not in wanted and p != ".gitattributes"]
    release = plan.release
    log(f"uploading {len(plan.files)} files to {plan.repo_id} in one commit")
    with hub_call(f"uploading {plan.tag} to {plan.repo_id} (nothing was tagged)"):
        commit = api.create_commit(
            plan.repo_id, operations, parent_commit=head,
            commit_message=f"Release {plan.tag}: {release.name}",
            commit_description=f"mla-zoo release built from recipe `{release.recipe.name}` "
                               f"(sha256 {release.recipe.sha256[:12]}).",
        )
    with hub_call(f"tagging commit {commit.oid} as {plan.tag} (the commit is on main but untagged)"):
        api.create_tag(plan.repo_id, tag=plan.tag, revision=commit.oid, tag_message=f"mla-zoo release {plan.tag}")
    log(f"published {plan.repo_id} {plan.tag} (commit {commit.oid})")
    slug = None
    try:
        slug = collection_slug(api, plan.owner)
        kv = release.kv_cache.reduction
        note = f"{release.name}: d_kv {release.settings.kv_rank_per_head}, KV cache -{100 * kv:.1f}%"
        with hub_call(f"adding {plan.repo_id} to the collection {slug}"):
            api.add_collection_item(slug, plan.repo_id, "model", note=note, exists_ok=True)
    except HubError as e:  # the release itself is complete; say so and go on
        log(f"warning: {e}")
    return {"repo_id": plan.repo_id, "tag": plan.tag, "commit": commit.oid, "collection": slug,
            "files": len(plan.files)}


# ----------------------------------------------------------------------------- browse


def list_releases(org: str | None = None, api=None) -> list[dict]:
    """Released checkpoints of an org, from the Hub's model list (tag mla-zoo) and card metadata."""
    org = org or default_org()
    api = make_api(api)
    rows = []
    with hub_call(f"listing the models of {org}", browse=True):
        models = list(api.list_models(author=org, filter=ZOO_TAG, cardData=True))
    for model in models:
        card = model.card_data.to_dict() if model.card_data is not None else {}
        meta = card.get("mla_zoo") or {}
        base = card.get("base_model")
        rows.append({
            "repo_id": model.id,
            "name": meta.get("name") or model.id.split("/")[-1],
            "base_model": ", ".join(base) if isinstance(base, list) else base,
            "d_kv": meta.get("d_kv"),
            "kv_reduction": meta.get("kv_reduction"),
            "perplexity_delta": meta.get("perplexity_delta"),
            "version": meta.get("version"),
        })
    return sorted(rows, key=lambda r: r["repo_id"])


def repo_details(repo_id: str, api=None) -> dict:
    """Card metadata, zoo metadata and every released version of one repo."""
    api = make_api(api)
    with hub_call(f"reading {repo_id}", browse=True):
        info = api.model_info(repo_id)
        versions = released_versions(api, repo_id)
    card = info.card_data.to_dict() if info.card_data is not None else {}
    return {"repo_id": repo_id, "sha": info.sha, "tags": list(info.tags or []), "card": card,
            "mla_zoo": card.get("mla_zoo") or {}, "versions": versions,
            "latest": versions[-1]["tag"] if versions else None}


def parse_ref(spec: str) -> tuple[str, str | None]:
    """`ORG/NAME[@REVISION]`; a bare semver revision gets its `v` (0.1.0 -> v0.1.0)."""
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"expected ORG/NAME[@vX.Y.Z], got {spec!r}")
    if not revision:
        return repo_id, None
    return repo_id, f"v{revision}" if re.fullmatch(SEMVER, revision) else revision


def pull(spec: str, api=None, local_dir: str | Path | None = None, cache_dir: str | Path | None = None,
         overwrite: bool = False) -> dict:
    """Download a release (default: the latest version) and check its files against its release.json.
    Into `local_dir`: all or nothing, replacing only a directory that pull wrote (`check_output_dir`)."""
    if local_dir is not None:
        check_output_dir(local_dir, marker=PULL_MARKERS, overwrite=overwrite, field="local_dir")
    api = make_api(api)
    repo_id, revision = parse_ref(spec)
    with hub_call(f"downloading {repo_id}@{revision or 'its latest version'}"):
        if revision is None:
            versions = released_versions(api, repo_id)
            revision = versions[-1]["tag"] if versions else "main"
        if local_dir is None:
            path = Path(api.snapshot_download(repo_id, revision=revision, cache_dir=cache_dir))
            verified = _verify(path, repo_id, revision)
        else:
            with atomic_directory(local_dir) as tmp:
                downloaded = Path(api.snapshot_download(repo_id, revision=revision, local_dir=tmp))
                verified = _verify(downloaded, repo_id, revision)
            path = Path(local_dir)
    return {"repo_id": repo_id, "revision": revision, "path": str(path), "verified_files": verified}


def _verify(path: Path, repo_id: str, revision: str) -> int | None:
    """How many files of a downloaded release match its release.json (None: it has none)."""
    if not (path / ReleaseManifest.FILE).is_file():
        return None
    files = {k: asdict(v) for k, v in ReleaseManifest.read(path).files.items()}
    changed = changed_files(path, files)
    if changed:
        raise HubError(f"{repo_id}@{revision}: {changed[0]} does not match the release's release.json")
    return len(files)
