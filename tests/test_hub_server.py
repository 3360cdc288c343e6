"""The test Hub, driven only through huggingface_hub's public API (one raw HTTP check of headers).

Clients get ``endpoint=hub.endpoint`` explicitly; one test runs a subprocess configured through
``HF_ENDPOINT`` and friends, one patches the already-imported client in-process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder  # not exported at top level before 1.x

try:  # `tests` may become a package later; both layouts import the same module.
    from tests.hub_server import HubServer
except ImportError:
    from hub_server import HubServer

TOKEN = "hf_test_token_not_secret"
ORG = "mla-zoo"

README = """---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
base_model: HuggingFaceTB/SmolLM2-135M
tags:
  - mla
  - mha2mla
---
# SmolLM2-135M-MLA

Partial RoPE plus a joint low-rank KV latent.
"""
CONFIG_V1 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "kv_lora_rank": 32}
CONFIG_V2 = {**CONFIG_V1, "kv_lora_rank": 16}
WEIGHTS = bytes(range(256)) * 4  # small binary file, not valid UTF-8


@pytest.fixture(scope="module")
def hub() -> Iterator[HubServer]:
    """One server per module; crashes inside the server fail the run at teardown."""
    with HubServer() as server:
        yield server
        assert not server.errors, "\n".join(server.errors)


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


@pytest.fixture(autouse=True)
def _xet_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """What HF_HUB_DISABLE_XET=1 does at import time; a test may turn it back on."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def _model_folder(root: Path, config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "README.md").write_text(README)
    (root / "weights").mkdir(exist_ok=True)
    (root / "weights" / "model.bin").write_bytes(WEIGHTS)
    return root


def _publish(api: HfApi, tmp_path: Path, name: str) -> tuple[str, str]:
    """Create ``ORG/name``, upload the model folder in one commit and tag it v0.1.0."""
    repo_id = f"{ORG}/{name}"
    api.create_repo(repo_id, repo_type="model", exist_ok=True, private=False)
    folder = _model_folder(tmp_path / name, CONFIG_V1)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="v0.1.0")
    api.create_tag(repo_id, tag="v0.1.0", revision=info.oid)
    return repo_id, info.oid


def _download(hub: HubServer, repo_id: str, filename: str, revision: str, cache: Path) -> bytes:
    path = hf_hub_download(repo_id, filename, revision=revision, endpoint=hub.endpoint, token=TOKEN, cache_dir=cache)
    return Path(path).read_bytes()


def test_create_repo_starts_with_initial_commit_and_conflicts(api: HfApi) -> None:
    url = api.create_repo(f"{ORG}/fresh", exist_ok=True)
    assert url.repo_id == f"{ORG}/fresh"
    assert api.create_repo(f"{ORG}/fresh", exist_ok=True).repo_id == f"{ORG}/fresh"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(f"{ORG}/fresh", exist_ok=False)
    assert conflict.value.response.status_code == 409
    assert api.list_repo_files(f"{ORG}/fresh") == [".gitattributes"]
    assert [c.title for c in api.list_repo_commits(f"{ORG}/fresh")] == ["initial commit"]
    # No namespace: the repo goes to the token's user, as on the Hub.
    assert api.create_repo("personal").repo_id == "mla-zoo-ci/personal"


@pytest.mark.parametrize("xet_disabled", [True, False], ids=["create_commit", "pipelined"])
def test_upload_folder_is_one_commit(
    api: HfApi, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xet_disabled: bool
) -> None:
    # With hf_xet installed and Xet not disabled, upload_folder takes the multi-commit pipeline.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", xet_disabled)
    repo_id, sha = _publish(api, tmp_path, f"upload-{xet_disabled}")
    commits = api.list_repo_commits(repo_id)
    assert [c.commit_id for c in commits][0] == sha
    assert [c.title for c in commits] == ["v0.1.0", "initial commit"]
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "README.md", "config.json", "weights/model.bin"]
    assert _download(hub, repo_id, "weights/model.bin", "main", tmp_path / "cache") == WEIGHTS
    # Unchanged files are skipped client-side (preupload returns their oid): no empty commit.
    again = api.upload_folder(repo_id=repo_id, folder_path=tmp_path / f"upload-{xet_disabled}")
    assert again.oid == sha


def test_tag_model_info_and_list_models(api: HfApi, tmp_path: Path) -> None:
    repo_id, sha = _publish(api, tmp_path, "listed")
    refs = api.list_repo_refs(repo_id)
    assert {t.name: t.target_commit for t in refs.tags} == {"v0.1.0": sha}
    assert [b.name for b in refs.branches] == ["main"]

    info = api.model_info(repo_id, revision="v0.1.0", files_metadata=True)
    assert info.sha == sha
    assert {s.rfilename: s.size for s in info.siblings}["weights/model.bin"] == len(WEIGHTS)
    assert info.card_data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert info.pipeline_tag == "text-generation" and info.library_name == "transformers"
    assert api.repo_info(repo_id, revision=sha[:7]).sha == sha

    found = {m.id: m for m in api.list_models(author=ORG, filter="mla", cardData=True)}
    assert repo_id in found
    tags = set(found[repo_id].tags)
    assert {"mla", "mha2mla", "transformers", "text-generation", "llama", "license:apache-2.0"} <= tags
    assert "base_model:HuggingFaceTB/SmolLM2-135M" in tags
    assert found[repo_id].card_data.license == "apache-2.0"
    assert not list(api.list_models(author=ORG, filter=["mla", "not-a-tag"]))
    assert [m.id for m in api.list_models(search="listed", full=True)] == [repo_id]
    assert all(m.id.startswith(f"{ORG}/") for m in api.list_models(author=ORG))


def test_tag_pins_old_contents_after_new_commit(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    repo_id, sha = _publish(api, tmp_path, "pinned")
    new = api.upload_file(path_or_fileobj=json.dumps(CONFIG_V2).encode(), path_in_repo="config.json", repo_id=repo_id)
    assert new.oid != sha
    cache = tmp_path / "cache"
    assert json.loads(_download(hub, repo_id, "config.json", "v0.1.0", cache)) == CONFIG_V1
    assert json.loads(_download(hub, repo_id, "config.json", "main", cache)) == CONFIG_V2
    assert json.loads(_download(hub, repo_id, "config.json", sha, cache)) == CONFIG_V1

    snapshot = Path(snapshot_download(repo_id, revision="v0.1.0", endpoint=hub.endpoint, token=TOKEN, cache_dir=cache))
    assert snapshot.name == sha
    assert json.loads((snapshot / "config.json").read_text()) == CONFIG_V1
    assert (snapshot / "weights" / "model.bin").read_bytes() == WEIGHTS
    assert (snapshot / "README.md").read_text() == README


def test_tags_conflict_and_delete(api: HfApi, tmp_path: Path) -> None:
    repo_id, _ = _publish(api, tmp_path, "tagged")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_tag(repo_id, tag="v0.1.0", revision="main")
    assert conflict.value.response.status_code == 409
    api.create_tag(repo_id, tag="v0.1.0", exist_ok=True)
    api.delete_tag(repo_id, tag="v0.1.0")
    assert not api.revision_exists(repo_id, "v0.1.0")
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag(repo_id, tag="v0.1.0")


def test_missing_repo_file_and_revision(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    repo_id, _ = _publish(api, tmp_path, "present")
    cache = tmp_path / "cache"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{ORG}/absent")
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, f"{ORG}/absent", "config.json", "main", cache)
    with pytest.raises(EntryNotFoundError):
        _download(hub, repo_id, "nope.json", "main", cache)
    with pytest.raises(RevisionNotFoundError):
        _download(hub, repo_id, "config.json", "v9.9.9", cache)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="v9.9.9")
    assert api.file_exists(repo_id, "config.json") and not api.file_exists(repo_id, "nope.json")
    assert api.revision_exists(repo_id, "v0.1.0") and not api.revision_exists(repo_id, "v9.9.9")
    assert api.repo_exists(repo_id) and not api.repo_exists(f"{ORG}/absent")


def test_error_headers_on_the_wire(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    """The one raw request: what huggingface_hub keys its exceptions and cache on."""
    repo_id, sha = _publish(api, tmp_path, "wire")
    request = urllib.request.Request(f"{hub.endpoint}/{repo_id}/resolve/main/nope.json", method="HEAD")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(request, timeout=5)
    missing.value.close()
    assert missing.value.code == 404
    assert missing.value.headers["X-Error-Code"] == "EntryNotFound"
    assert missing.value.headers["X-Repo-Commit"] == sha
    with urllib.request.urlopen(f"{hub.endpoint}/{repo_id}/resolve/v0.1.0/weights/model.bin", timeout=5) as ok:
        assert ok.headers["X-Repo-Commit"] == sha
        assert ok.headers["Content-Length"] == str(len(WEIGHTS))
        assert ok.headers["ETag"].strip('"') and ok.read() == WEIGHTS


def test_commit_operations_parent_commit_and_tree(api: HfApi, tmp_path: Path) -> None:
    repo_id, sha = _publish(api, tmp_path, "ops")
    ops = [
        CommitOperationDelete("weights/"),
        CommitOperationAdd("onnx/model.onnx", b"onnx-bytes"),
        CommitOperationAdd("onnx/extra/data.txt", b"data"),
    ]
    info = api.create_commit(repo_id, operations=ops, commit_message="onnx", parent_commit=sha)
    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(repo_id, [CommitOperationDelete("README.md")], commit_message="x", parent_commit=sha)
    assert stale.value.response.status_code == 412
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo_id, operations=[CommitOperationDelete("missing.txt")], commit_message="x")

    top = {e.path: type(e) for e in api.list_repo_tree(repo_id)}
    assert top == {".gitattributes": RepoFile, "README.md": RepoFile, "config.json": RepoFile, "onnx": RepoFolder}
    nested = {e.path for e in api.list_repo_tree(repo_id, "onnx", recursive=True, expand=True)}
    assert nested == {"onnx/model.onnx", "onnx/extra", "onnx/extra/data.txt"}
    paths = api.get_paths_info(repo_id, ["config.json", "onnx", "absent"], expand=True)
    assert {p.path: p.last_commit.oid for p in paths} == {"config.json": sha, "onnx": info.oid}
    assert "onnx" in api.model_info(repo_id).tags
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_id, "weights"))


def test_collections(api: HfApi, tmp_path: Path) -> None:
    repo_id, _ = _publish(api, tmp_path, "collected")
    first = api.create_collection("MLA conversions", namespace=ORG, exists_ok=True)
    again = api.create_collection("MLA conversions", namespace=ORG, exists_ok=True)
    assert again.slug == first.slug and first.slug.startswith(f"{ORG}/mla-conversions-")
    api.add_collection_item(first.slug, item_id=repo_id, item_type="model", note="d_kv=32", exists_ok=True)
    api.add_collection_item(first.slug, item_id=repo_id, item_type="model", exists_ok=True)
    collection = api.get_collection(first.slug)
    assert [(i.item_id, i.item_type, i.note) for i in collection.items] == [(repo_id, "model", "d_kv=32")]
    assert collection.title == "MLA conversions" and collection.owner["name"] == ORG
    assert [c.slug for c in api.list_collections(owner=ORG)] == [first.slug]
    with pytest.raises(RepositoryNotFoundError):
        api.add_collection_item(first.slug, item_id=f"{ORG}/absent", item_type="model")


def test_whoami_and_private_repos(api: HfApi, hub: HubServer) -> None:
    me = api.whoami()
    assert me["name"] == "mla-zoo-ci" and [o["name"] for o in me["orgs"]] == [ORG]
    api.create_repo(f"{ORG}/secret", private=True, exist_ok=True)
    assert api.model_info(f"{ORG}/secret").private
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(f"{ORG}/secret")
    assert f"{ORG}/secret" not in {m.id for m in anonymous.list_models(author=ORG)}


def test_subprocess_configured_by_environment(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    """Code that uses the module-level functions, configured only by HF_ENDPOINT & co."""
    repo_id, sha = _publish(api, tmp_path, "via-env")
    script = textwrap.dedent(
        f"""
        import json, huggingface_hub
        path = huggingface_hub.hf_hub_download({repo_id!r}, "config.json", revision="v0.1.0")
        info = huggingface_hub.model_info({repo_id!r})
        huggingface_hub.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id={repo_id!r})
        print(json.dumps([json.load(open(path)), info.sha, huggingface_hub.whoami()["name"]]))
        """
    )
    env = hub.client_env(tmp_path / "hf_home", token=TOKEN)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [CONFIG_V1, sha, "mla-zoo-ci"]
    assert api.file_exists(repo_id, "x.txt")


def test_patch_client_in_process(api: HfApi, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    repo_id, _ = _publish(api, tmp_path, "patched")
    hub.patch_client(monkeypatch, tmp_path / "hf_home", token=TOKEN)
    path = huggingface_hub.hf_hub_download(repo_id, "config.json")
    assert path.startswith(str(tmp_path / "hf_home"))
    assert json.loads(Path(path).read_text()) == CONFIG_V1
    assert huggingface_hub.list_repo_files(repo_id)
