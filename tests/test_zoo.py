"""The zoo end to end: recipe -> build (resumable, gated) -> publish to the test Hub on 127.0.0.1 ->
list / info -> pull @v0.1.0 -> load with trust_remote_code -> the same logits.

Everything Hub-side goes through the real huggingface_hub client against tests/hub_server.py.
The model is a tiny random Llama (GQA) with a real BPE tokenizer (conftest), so a build takes seconds.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from mla_zoo.modeling.common import BuildError, GateFailed, StageUnavailable, sha256_file
from mla_zoo.zoo import cli
from mla_zoo.zoo.release import hub as zoo_hub
from mla_zoo.zoo.release.build import build
from mla_zoo.zoo.release.recipe import load_recipe
from workspace import ORG, RECIPE, REPO_ID, write_recipe

TOKEN = "hf_zoo_test_token_not_secret"


@pytest.fixture(scope="module")
def workspace(recipe_workspace) -> Path:
    """This module's own copy of the tiny recipe workspace (conftest): the tests write recipes and builds into it."""
    return recipe_workspace("zoo")


class Log(list):
    def __call__(self, message: str) -> None:
        self.append(message)


@pytest.fixture(scope="module")
def release(tiny_release) -> tuple[Path, dict]:
    """The v0.1.0 release of the tiny recipe, built once per session (conftest); tests copy it to build into it."""
    out, summary = tiny_release
    return out, copy.deepcopy(summary)


@pytest.fixture(autouse=True)
def _xet_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """What HF_HUB_DISABLE_XET=1 does at import time: every file goes inline in the commit."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


@pytest.fixture(scope="module")
def published(release, hub: HubServer) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        return zoo_hub.publish(release[0], api=HfApi(endpoint=hub.endpoint, token=TOKEN), log=Log())


def logits_of(path: str | Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.arange(3, 3 + 2 * 24).view(2, 24) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


def snapshot(api: HfApi, repo_id: str) -> tuple:
    refs = api.list_repo_refs(repo_id)
    return (sorted((b.name, b.target_commit) for b in refs.branches),
            sorted((t.name, t.target_commit) for t in refs.tags), sorted(api.list_repo_files(repo_id)))


# ----------------------------------------------------------------------------- build


def test_build_writes_a_complete_release(release):
    out, summary = release
    assert summary["stages"] == {"convert": "ran", "finetune": "disabled", "eval": "ran", "export": "disabled",
                                 "card": "ran"}
    rel = json.loads((out / "release.json").read_text())
    assert rel == json.loads((out / "hub" / "release.json").read_text())
    assert (rel["repo_id"], rel["version"], rel["tag"]) == (REPO_ID, "0.1.0", "v0.1.0")
    # release.json as the first version wrote it (no schema_version, "format": 1, the rank twice) still loads
    from mla_zoo.zoo.release.manifest import ReleaseManifest

    first = {k: v for k, v in rel.items() if k != "schema_version"} | {"format": 1}
    first["settings"] = {**rel["settings"], "kv_rank": rel["settings"]["kv_lora_rank"]}
    assert ReleaseManifest.from_dict(first) == ReleaseManifest.from_dict(rel)
    assert rel["license"] == "mit"  # inherited from the source's card
    assert rel["recipe"]["data"]["conversion"]["kv_rank_per_head"] == 8
    assert "kv_rank_per_head = 8" in rel["recipe"]["text"]
    assert {"mla-zoo", "torch", "transformers", "huggingface_hub", "python"} <= set(rel["versions"])
    files = {p.relative_to(out / "hub").as_posix() for p in (out / "hub").rglob("*") if p.is_file()}
    assert files == set(rel["files"]) | {"release.json"}
    for name in ("model.safetensors", "config.json", "modeling_llama_mla.py", "configuration_llama_mla.py",
                 "tokenizer.json", "conversion.json", "README.md", "kv_cache.png", "eval_results.json"):
        assert rel["files"][name]["sha256"] == sha256_file(out / "hub" / name)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    metrics = rel["metrics"]
    assert metrics["base"]["tokens"] == metrics["mla"]["tokens"] == 2 * 127  # two windows of 128
    assert metrics["mla"]["kv_cache_bytes_per_token"] < metrics["base"]["kv_cache_bytes_per_token"]
    assert [g["gate"] for g in rel["gates"]] == ["max_perplexity_increase", "min_kv_reduction"]
    assert all(g["passed"] for g in rel["gates"])
    assert rel["kv_cache"]["reduction"] == pytest.approx(1 - (16 + 2 * 4) / 64)  # latent + 2 heads x 2R, of 2x2x16
    # Published files carry the recipe's paths, not this machine's.
    conversion = (out / "hub" / "conversion.json").read_text()
    assert str(out.parent) not in conversion and json.loads(conversion)["source"]["path"] == "src"


def test_model_card(release):
    from huggingface_hub import ModelCard

    out, _ = release
    card = ModelCard.load(out / "hub" / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["base_model"] == "mla-zoo-tests/tiny-llama-gqa"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"mla", "mha2mla", "kv-cache-compression", "custom_code", "mla-zoo"} <= set(data["tags"])
    zoo = data["mla_zoo"]
    assert (zoo["version"], zoo["d_kv"], zoo["kv_lora_rank"], zoo["rope_pairs"]) == ("0.1.0", 8, 16, 2)
    metrics = json.loads((out / "release.json").read_text())["metrics"]
    assert zoo["kv_reduction"] == pytest.approx(0.625)
    assert zoo["perplexity_mla"] == pytest.approx(metrics["mla"]["perplexity"], abs=1e-4)  # what eval measured
    assert zoo["perplexity_base"] == pytest.approx(metrics["base"]["perplexity"], abs=1e-4)
    assert card.data.eval_results[0].metric_type == "perplexity"
    assert card.data.eval_results[0].metric_value == pytest.approx(zoo["perplexity_mla"])
    text = card.text
    for needle in ("## KV-cache savings", "![KV cache vs context length, base vs MLA](kv_cache.png)",
                   "| base |", "| MLA (this model) |", 'repo, revision = "mla-zoo/Tiny-Llama-MLA", "v0.1.0"',
                   "trust_remote_code=True", "### onnxruntime", "## Recipe", 'repo_id = "mla-zoo/Tiny-Llama-MLA"',
                   "## Limitations", "## Citation", "arXiv:2502.14837"):
        assert needle in text, needle
    assert (out / "hub" / "kv_cache.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_names_its_data_states_kv_in_bf16_and_the_transformers_range(workspace: Path, tmp_path: Path):
    """Data by name and what it is (from the SOURCES.md beside it), never a path of the build machine; KV
    figures in the dtype people serve in; the transformers versions the release was tested on."""
    import importlib.metadata

    from huggingface_hub import ModelCard

    (tmp_path / "data").mkdir()
    (tmp_path / "recipes").mkdir()
    for name in ("calib.txt", "heldout.txt"):
        shutil.copy(workspace / name, tmp_path / "data" / name)
    (tmp_path / "data" / "SOURCES.md").write_text(
        "| file | contents |\n| --- | --- |\n| `calib.txt` | *Persuasion* (1818), Chapters 1-5 |\n"
        "| `heldout.txt` | *Northanger Abbey* (1818), Chapters 1-10 |\n")
    text = RECIPE.format(version="0.1.0", gate=1.0, max_tokens=256, extra="", repo_id=REPO_ID,
                         release_name="Tiny-Llama-MLA")
    text = text.replace('model = "src"', f'model = "{workspace / "src"}"').replace('"calib.txt"', '"../data/calib.txt"')
    (tmp_path / "recipes" / "paths.toml").write_text(text.replace('"heldout.txt"', '"../data/heldout.txt"'))
    out = tmp_path / "out"
    build(load_recipe(tmp_path / "recipes" / "paths.toml"), out, progress=False, log=Log())
    card = ModelCard.load(out / "hub" / "README.md").text
    before_recipe = card.split("## Recipe")[0]
    assert "tokens of `calib.txt` (*Persuasion* (1818), Chapters 1-5)" in before_recipe
    assert "Perplexity on `heldout.txt` (*Northanger Abbey* (1818), Chapters 1-10)" in before_recipe
    assert "../" not in before_recipe and str(tmp_path) not in card
    assert json.loads((out / "hub" / "conversion.json").read_text())["calibration"]["file"] == "calib.txt"
    assert "In bfloat16 (the dtype models are served in)" in card  # the checkpoint itself is float32 here
    zoo = ModelCard.load(out / "hub" / "README.md").data.to_dict()["mla_zoo"]
    conversion = json.loads((out / "hub" / "conversion.json").read_text())
    assert conversion["settings"]["dtype"] == "float32" and zoo["kv_dtype"] == "bfloat16"
    assert zoo["kv_bytes_per_token_mla"] * 2 == conversion["kv_cache"]["bytes_per_token_after"]
    installed = importlib.metadata.version("transformers")
    assert f"Tested on transformers >= 5.17 (the lowest mla-zoo supports) up to {installed}" in card


def test_rebuild_skips_unchanged_stages_and_reruns_what_changed(release, workspace: Path):
    out = workspace / "rebuild"
    shutil.copytree(release[0], out)
    log = Log()
    again = build(write_recipe(workspace, "again"), out, progress=False, log=log)  # same content, other file name
    assert set(again["stages"].values()) == {"up to date", "disabled"}
    assert not any("running" in line for line in log)
    assert again["release"]["files"] == release[1]["release"]["files"]

    # A damaged output is noticed; converting again gives the same bytes, so eval is not re-run.
    weights = out / "convert" / "model.safetensors"
    weights.unlink()
    weights.write_bytes(b"x")
    again = build(write_recipe(workspace, "again"), out, progress=False, log=Log())
    assert again["stages"]["convert"] == "ran" and again["stages"]["eval"] == "up to date"
    assert sha256_file(weights) == release[1]["release"]["files"]["model.safetensors"]["sha256"]

    # More evaluation tokens: eval and card re-run, convert does not.
    changed = build(write_recipe(workspace, "again", max_tokens=384), out, progress=False, log=Log())
    assert changed["stages"]["convert"] == "up to date"
    assert changed["stages"]["eval"] == changed["stages"]["card"] == "ran"
    assert changed["release"]["metrics"]["mla"]["tokens"] == 3 * 127


def test_failed_gate_stops_the_release_without_remeasuring(release, workspace: Path):
    out = workspace / "gated"
    shutil.copytree(release[0], out)
    log = Log()
    with pytest.raises(GateFailed, match=r"gate eval.gates.max_perplexity_increase failed: perplexity increase"):
        build(write_recipe(workspace, "strict", gate=0.0), out, progress=False, log=log)
    assert not (out / "release.json").exists() and not (out / "hub").exists()
    assert not any("running" in line for line in log), log  # a gate is checked on the recorded metrics
    assert any("FAILED" in line for line in log)


def test_enabled_stage_this_installation_lacks_stops_before_any_work(workspace: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "mla_zoo.export", None)  # an installation without the export stage
    recipe = write_recipe(workspace, "with-export", extra="\n[export]\nenabled = true\n")
    with pytest.raises(StageUnavailable, match="the export stage is not available in this installation"):
        build(recipe, tmp_path / "out", progress=False, log=Log())
    assert not (tmp_path / "out").exists()


FINETUNE = """
[finetune]
enabled = true
data = "calib.txt"
max_steps = 3
seq_len = 32
batch_size = 2
learning_rate = 1e-3
warmup_ratio = 0.0
save_steps = 100
logging_steps = 1
"""


def test_finetune_stage(release, workspace: Path):
    out = workspace / "finetuned"
    shutil.copytree(release[0], out)
    summary = build(write_recipe(workspace, "finetuned", extra=FINETUNE), out, progress=False, log=Log())
    assert summary["stages"] == {"convert": "up to date", "finetune": "ran", "eval": "ran", "export": "disabled",
                                 "card": "ran"}
    rel = summary["release"]
    assert (out / "finetune" / "checkpoints").is_dir()  # the trainer's state stays in RELEASE_DIR ...
    assert not any("/" in name for name in rel["files"])  # ... and is not published
    assert rel["files"]["model.safetensors"] == json.loads((out / "stages" / "finetune.json").read_text())[
        "outputs"]["model.safetensors"]
    assert "training.json" in rel["files"] and rel["metrics"]["mla"]["perplexity"] != \
        release[1]["release"]["metrics"]["mla"]["perplexity"]
    card = (out / "hub" / "README.md").read_text()
    assert "finetuned: true" in card and "fine-tuned after conversion" in card
    # the same inputs again: nothing runs, the fine-tuned release is the same
    log = Log()
    again = build(write_recipe(workspace, "finetuned", extra=FINETUNE), out, progress=False, log=log)
    assert set(again["stages"].values()) == {"up to date", "disabled"} and again["release"]["files"] == rel["files"]


def test_selected_stages_need_their_upstream(workspace: Path, tmp_path: Path):
    with pytest.raises(BuildError, match="stage eval needs an up-to-date convert stage"):
        build(write_recipe(workspace), tmp_path / "out", ["eval"], progress=False, log=Log())


# ----------------------------------------------------------------------------- publish and browse


def test_publish_list_pull_and_load(release, published, api: HfApi, hub: HubServer, tmp_path: Path):
    out, summary = release
    assert (published["repo_id"], published["tag"]) == (REPO_ID, "v0.1.0")
    assert hub.commit_titles(REPO_ID) == ["Release v0.1.0: Tiny-Llama-MLA", "initial commit"]  # ONE commit
    assert {t.name: t.target_commit for t in api.list_repo_refs(REPO_ID).tags} == {"v0.1.0": published["commit"]}
    assert sorted(api.list_repo_files(REPO_ID, revision="v0.1.0")) == sorted(
        [".gitattributes", "release.json", *summary["release"]["files"]])
    assert published["collection"].startswith(f"{ORG}/mla-zoo") and hub.collection_items(published["collection"]) == [
        REPO_ID]

    rows = zoo_hub.list_releases(ORG, api=api)
    metrics = summary["release"]["metrics"]
    delta = metrics["mla"]["perplexity"] / metrics["base"]["perplexity"] - 1  # what eval measured: lossy, not 0
    assert abs(delta) > 1e-4
    assert rows == [{"repo_id": REPO_ID, "name": "Tiny-Llama-MLA", "base_model": "mla-zoo-tests/tiny-llama-gqa",
                     "d_kv": 8, "kv_reduction": 0.625, "perplexity_delta": pytest.approx(delta, abs=1e-6),
                     "version": "0.1.0"}]
    from mla_zoo.zoo.cli.release import LIST_COLUMNS, format_table

    table = format_table(rows, LIST_COLUMNS)
    assert "D_KV" in table and "-62.5%" in table and "v0.1.0" in table

    cache = tmp_path / "cache"
    config = hf_hub_download(REPO_ID, "config.json", revision="v0.1.0", endpoint=hub.endpoint, token=TOKEN,
                             cache_dir=cache)
    assert json.loads(Path(config).read_text())["model_type"] == "llama_mla"
    path = snapshot_download(REPO_ID, revision="v0.1.0", endpoint=hub.endpoint, token=TOKEN, cache_dir=cache)
    assert Path(path).name == published["commit"]
    assert torch.equal(logits_of(path), logits_of(out / "hub"))

    pulled = zoo_hub.pull(f"{REPO_ID}@v0.1.0", api=api, cache_dir=cache)
    assert pulled["revision"] == "v0.1.0" and pulled["verified_files"] == len(summary["release"]["files"])


def test_same_version_is_refused_and_nothing_changes(release, published, api: HfApi):
    before = snapshot(api, REPO_ID)
    refused = "already has version v0.1.0; a released version is never overwritten"
    with pytest.raises(zoo_hub.VersionExists, match=refused):
        zoo_hub.publish(release[0], api=api, log=Log())
    assert snapshot(api, REPO_ID) == before


def test_failed_upload_leaves_no_tag_then_a_new_version(release, published, workspace: Path, api: HfApi,
                                                        hub: HubServer, tmp_path: Path):
    out = workspace / "release-v0.2.0"
    shutil.copytree(release[0], out)
    summary = build(write_recipe(workspace, "tiny-0.2", version="0.2.0"), out, progress=False, log=Log())
    assert summary["stages"]["card"] == "ran" and summary["stages"]["convert"] == "up to date"
    plan = zoo_hub.plan_publish(out)
    head = zoo_hub.prepare_repo(api, plan)
    # Another writer pushes to main between our read of its head and our commit: the commit is refused.
    api.upload_file(path_or_fileobj=b"notes", path_in_repo="NOTES.md", repo_id=REPO_ID)
    with pytest.raises(zoo_hub.HubError, match="nothing was tagged"):
        zoo_hub.commit_release(api, plan, head, log=Log())
    assert "v0.2.0" not in {t.name for t in api.list_repo_refs(REPO_ID).tags}
    assert hub.commit_titles(REPO_ID)[0].startswith("Upload")  # no commit of ours landed

    result = zoo_hub.execute_publish(plan, api=api, log=Log())
    files = set(api.list_repo_files(REPO_ID, revision="v0.2.0"))
    assert "NOTES.md" not in files and "README.md" in files  # the release is exactly its files
    versions = zoo_hub.released_versions(api, REPO_ID)
    assert [v["tag"] for v in versions] == ["v0.1.0", "v0.2.0"] and versions[1]["commit"] == result["commit"]
    assert versions[0]["commit"] == published["commit"]  # v0.1.0 still pins the old release
    latest = zoo_hub.pull(REPO_ID, api=api, cache_dir=tmp_path / "cache")
    assert latest["revision"] == "v0.2.0"
    assert zoo_hub.list_releases(ORG, api=api)[0]["version"] == "0.2.0"


def test_cli_publish_list_info_pull(release, published, hub: HubServer, api: HfApi, monkeypatch, tmp_path: Path,
                                    capsys):
    hub.patch_client(monkeypatch, tmp_path / "hf_home", token=TOKEN)
    before = snapshot(api, REPO_ID)
    assert cli.main(["publish", str(release[0]), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "v0.1.0 ALREADY EXISTS" in out and "model.safetensors" in out and "one commit of" in out
    assert cli.main(["publish", str(release[0]), "--repo", REPO_ID]) == 2
    err = capsys.readouterr().err
    assert "mla-zoo publish: error:" in err and "already has version v0.1.0" in err
    assert cli.main(["publish", str(release[0]), "--repo", f"{ORG}/elsewhere"]) == 2
    assert "was built for mla-zoo/Tiny-Llama-MLA" in capsys.readouterr().err
    assert snapshot(api, REPO_ID) == before and f"{ORG}/elsewhere" not in hub.app.repos

    assert cli.main(["list", "--org", ORG]) == 0
    listing = capsys.readouterr().out
    assert listing.splitlines()[0].split() == ["REPO", "BASE", "D_KV", "KV", "REDUCTION", "PPL", "DELTA", "LATEST"]
    assert REPO_ID in listing and "-62.5%" in listing

    assert cli.main(["info", REPO_ID]) == 0
    info = capsys.readouterr().out
    assert "v0.1.0" in info and published["commit"] in info and "d_kv" in info and "license" in info

    target = tmp_path / "pulled"
    assert cli.main(["pull", f"{REPO_ID}@0.1.0", "-o", str(target)]) == 0
    pulled = capsys.readouterr()
    assert pulled.out.strip() == str(target) and "match release.json" in pulled.err
    assert torch.equal(logits_of(target), logits_of(release[0] / "hub"))

    # The card's usage snippet exactly as written, in a fresh process whose stdin is closed: a prompt for
    # remote code (y/N) would fail it.
    snippet = re.search(r"## Usage.*?```python\n(.*?)```", (release[0] / "hub" / "README.md").read_text(), re.S)[1]
    env = {**hub.client_env(tmp_path / "hf_snippet", token=TOKEN), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", snippet], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "[y/N]" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.startswith("The key-value cache of this model")

    # transformers straight from the Hub, pinned to the release tag, as the card says.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(REPO_ID, revision="v0.1.0", trust_remote_code=True)
    assert type(model).__name__ == "LlamaMLAForCausalLM"
    everything = capsys.readouterr()
    assert TOKEN not in everything.out + everything.err + listing + info + out + err
