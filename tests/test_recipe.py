"""Recipe schema: the shipped recipes validate, and every kind of mistake gets a message that names
the recipe, the key and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
from mla_zoo.modeling.common import RecipeError
from mla_zoo.modeling.convert_schema import ConvertSettings
from mla_zoo.zoo.release.recipe import load_recipe, parse_recipe, semver_key, shipped_recipes

REPO = Path(__file__).resolve().parents[1]

VALID = """\
[release]
name = "Example"
repo_id = "mla-zoo/example"
version = "1.2.3"

[source]
model = "smollm2-135m"

[conversion]
kv_rank_per_head = 32
rope_strategy = "2-norm"
calib_text = "texts/calib.txt"

[eval]
text = "texts/heldout.txt"

[eval.gates]
max_perplexity_increase = 0.5
"""


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Path:
    (tmp_path / "texts").mkdir()
    for name in ("calib.txt", "heldout.txt"):
        (tmp_path / "texts" / name).write_text("It is a truth universally acknowledged.\n")
    return tmp_path


def parse(recipe_dir: Path, text: str, name: str = "example"):
    return parse_recipe(text, recipe_dir / f"{name}.toml")


def test_shipped_recipes_validate():
    shipped = shipped_recipes()
    assert {"smollm2-135m-dkv32", "smollm2-135m-dkv16"} <= set(shipped)
    families = set()
    for name in shipped:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.release.tag == f"v{recipe.release.version}"
        assert recipe.eval.text == str(REPO / "data" / "heldout.txt")  # ../../data relative to zoo/recipes/
        families.add(recipe.source.model.split("/")[0])
    assert {"smollm2-135m", "meta-llama", "Qwen", "mistralai"} <= families
    small = load_recipe("smollm2-135m-dkv16")
    assert small.source.kind == "bundled" and small.enabled == ()
    assert small.conversion.calib_text == str(REPO / "data" / "calib.txt")
    assert small.finetune.max_steps == 1500  # a budget is recorded even while the stage is off
    assert small.finetune.data == "teacher:chat=0.4+bos=0.2+text=0.4"  # data-free: the teacher's own samples
    assert (small.finetune.layerwise_steps, small.finetune.learning_rate) == (300, 1e-3)
    assert small.eval.suite and small.eval.suite_dir == str(REPO / "data" / "eval")
    assert small.gates.suite_gates() == ["max_domain_perplexity_increase"]
    big = load_recipe("llama-2-7b-dkv16")
    assert big.enabled == ("finetune",)
    assert big.finetune.data == "hf:HuggingFaceTB/smollm-corpus:fineweb-edu-dedup:train"


def test_paths_are_relative_to_the_recipe_file(recipe_dir: Path, monkeypatch: pytest.MonkeyPatch):
    path = recipe_dir / "example.toml"
    path.write_text(VALID)
    monkeypatch.chdir(REPO)  # the current directory plays no part
    recipe = load_recipe(path)
    assert recipe.eval.text == str(recipe_dir / "texts" / "heldout.txt")
    assert recipe.conversion.calib_text == str(recipe_dir / "texts" / "calib.txt")
    assert recipe.conversion.kv_rank_per_head == 32
    assert recipe.conversion.svd == ConvertSettings().svd == "output-aware"  # the converter's own default: one schema
    assert recipe.finetune is None and recipe.enabled == ()  # optional, off by default
    assert recipe.gates.max_perplexity_increase == 0.5 and recipe.gates.max_perplexity is None


def test_source_kinds(recipe_dir: Path):
    (recipe_dir / "ckpt").mkdir()
    (recipe_dir / "ckpt" / "config.json").write_text("{}")
    local = parse(recipe_dir, VALID.replace('"smollm2-135m"', '"ckpt"'))
    assert local.source.kind == "local" and local.source.path == recipe_dir / "ckpt"
    hub = parse(recipe_dir, VALID.replace('model = "smollm2-135m"', 'model = "Org/Model"\nrevision = "abc123"'))
    assert (hub.source.kind, hub.source.revision) == ("hub", "abc123")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("kv_rank_per_head = 32", "kv_rank_per_head = 0",
         "recipe example: conversion.kv_rank_per_head must be an int >= 1 (got 0)"),
        ("kv_rank_per_head = 32", 'kv_rank_per_head = "32"',
         "recipe example: conversion.kv_rank_per_head must be an int >= 1 (got '32')"),
        ('rope_strategy = "2-norm"', 'rope_strategy = "middle"',
         "conversion.rope_strategy must be one of high, low, uniform, 2-norm (got 'middle')"),
        ("kv_rank_per_head = 32", "kv_rnk_per_head = 32", "unknown key conversion.kv_rnk_per_head"),
        ("kv_rank_per_head = 32", "kv_rank = 96", "unknown key conversion.kv_rank (renamed: kv_lora_rank)"),
        ('version = "1.2.3"\n', "", "recipe example: release.version is required"),
        ('version = "1.2.3"', 'version = "v1.2"', "release.version must be a semver version"),
        ('repo_id = "mla-zoo/example"', 'repo_id = "example"', 'release.repo_id must be a Hub repo id "ORG/NAME"'),
        ('text = "texts/heldout.txt"', 'text = "texts/missing.txt"', "eval.text names a file that does not exist"),
        ('text = "texts/heldout.txt"', 'text = "texts/heldout.txt"\nseq_len = 1', "eval.seq_len must be an int >= 2"),
        ('text = "texts/heldout.txt"', 'seq_len = 64', "recipe example: eval.text is required"),
        ('model = "smollm2-135m"', 'model = "smollm2-135m"\nrevision = "main"',
         "source.revision applies to Hub sources only"),
        ('model = "smollm2-135m"', 'model = "./nowhere"',
         "source.model names a local checkpoint dir without config.json"),
        ("max_perplexity_increase = 0.5", "max_perplexity_increase = -1",
         "eval.gates.max_perplexity_increase must be a number >= 0 (got -1)"),
        ("max_perplexity_increase = 0.5", "min_kv_reduction = 2",
         "eval.gates.min_kv_reduction must be a number in [0, 1] (got 2)"),
        ("[eval.gates]", "[deploy]\n[eval.gates]", "unknown section [deploy]"),
        ("[source]", "[source", "recipe example: not valid TOML"),
        ("[conversion]", "[finetune]\nenabled = true\nmax_steps = 10\n\n[conversion]", "finetune.data is required"),
        ("[conversion]", '[finetune]\nenabled = true\ndata = "texts/calib.txt"\n\n[conversion]', "needs a budget"),
        ("[conversion]", '[finetune]\ndata = "texts/*.jsonl"\n\n[conversion]', "texts/*.jsonl matches no files"),
        ("[conversion]", '[finetune]\ndata = "texts/calib.txt"\nsteps = 3\n\n[conversion]',
         "unknown key finetune.steps (renamed: max_steps)"),
        ("[conversion]", '[finetune]\ndata = "texts/calib.txt"\nlearning_rate = 0\n\n[conversion]',
         "finetune.learning_rate must be a number > 0 (got 0)"),
        ("[conversion]", "[export]\nenabled = 1\n\n[conversion]", "export.enabled must be true or false (got 1)"),
    ],
)
def test_errors_name_the_key_and_the_valid_values(recipe_dir: Path, old: str, new: str, message: str):
    assert old in VALID
    with pytest.raises(RecipeError) as error:
        parse(recipe_dir, VALID.replace(old, new, 1))
    assert message in str(error.value)


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(RecipeError, match="smollm2-135m-dkv32"):
        load_recipe("no-such-recipe")


def test_semver_order():
    versions = ["1.0.0", "0.10.0", "0.2.0", "1.0.0-rc.1", "1.0.0-alpha", "0.2.1"]
    assert sorted(versions, key=semver_key) == ["0.2.0", "0.2.1", "0.10.0", "1.0.0-alpha", "1.0.0-rc.1", "1.0.0"]
