"""`mla-zoo build`, `publish`, `list`, `info` and `pull`."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from mla_zoo.modeling.schema import Settings, setting
from mla_zoo.zoo.release.stages import STAGES

from .command import Command, Output

STAGE_NAMES = tuple(s.name for s in STAGES)


@dataclass
class BuildSettings(Settings):
    recipe: str = setting(positional=True, help="recipe .toml file, or the name of a shipped recipe "
                                                "(zoo/recipes/NAME.toml)")
    output: str = setting(aliases=["-o"], help="release directory (stages are resumed from it)")
    stages: list[str] | None = setting(None, choices=STAGE_NAMES, metavar="STAGE",
                                       help=f"run only these stages ({', '.join(STAGE_NAMES)}); their upstream "
                                            "stages must be up to date")
    force: bool = setting(False, help="re-run the selected stages even if their inputs are unchanged")


def build(c: BuildSettings, out: Output) -> int:
    from mla_zoo.zoo.release.build import build
    from mla_zoo.zoo.release.recipe import load_recipe

    summary = build(load_recipe(c.recipe), c.output, c.stages, force=c.force)
    if out.json:
        print(json.dumps(summary, indent=2))
        return 0
    for stage, status in summary["stages"].items():
        print(f"{stage:<10}{status}")
    for gate in summary["gates"]:
        print(f"gate      {gate['gate']}: {'passed' if gate['passed'] else 'FAILED'} ({gate['text']})")
    release = summary["release"]
    if release:
        m = release["metrics"]
        print(f"release   {release['repo_id']} {release['tag']}: {len(release['files'])} files; KV cache "
              f"-{100 * release['kv_cache']['reduction']:.2f}%, perplexity {m['base']['perplexity']:.3f} -> "
              f"{m['mla']['perplexity']:.3f} ({100 * m['perplexity_delta']:+.2f}%)")
        print(f"wrote     {summary['out']}/release.json")
    return 0


@dataclass
class PublishSettings(Settings):
    release_dir: str = setting(positional=True, help="directory written by `mla-zoo build`")
    repo: str | None = setting(None, help="ORG/NAME (default: release.repo_id of the recipe; must match it)")
    dry_run: bool = setting(False, help="print the files and tag that would be published; write nothing")
    private: bool = setting(False, help="create the repo private if it does not exist")


def publish(c: PublishSettings, out: Output) -> int:
    from mla_zoo.zoo.release.hub import publish

    result = publish(c.release_dir, c.repo, dry_run=c.dry_run, private=c.private)
    if out.json:
        print(json.dumps(result, indent=2))
    elif not c.dry_run:
        print(f"{result['repo_id']} {result['tag']} at commit {result['commit']}"
              + (f"; collection {result['collection']}" if result["collection"] else ""))
    return 0


@dataclass
class ListSettings(Settings):
    org: str | None = setting(None, help="Hub user or org (default: $MLA_ZOO_ORG or mla-zoo)")


def list_(c: ListSettings, out: Output) -> int:
    from mla_zoo.zoo.release.hub import LIST_COLUMNS, default_org, format_table, list_releases

    rows = list_releases(c.org)
    if out.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no mla-zoo releases by {c.org or default_org()}")
    else:
        print(format_table(rows, LIST_COLUMNS))
    return 0


@dataclass
class InfoSettings(Settings):
    repo: str = setting(positional=True, help="ORG/NAME")


def info(c: InfoSettings, out: Output) -> int:
    from mla_zoo.zoo.release.hub import format_details, repo_details

    details = repo_details(c.repo)
    print(json.dumps(details, indent=2) if out.json else format_details(details))
    return 0


@dataclass
class PullSettings(Settings):
    ref: str = setting(positional=True, metavar="REPO[@vX.Y.Z]",
                       help="ORG/NAME, optionally @version (tag), branch or commit")
    local_dir: str | None = setting(None, aliases=["-o"], help="download into this directory instead of the Hugging "
                                                               "Face cache")


def pull(c: PullSettings, out: Output) -> int:
    from mla_zoo.zoo.release.hub import pull

    result = pull(c.ref, local_dir=c.local_dir)
    if out.json:
        print(json.dumps(result, indent=2))
        return 0
    checked = f", {result['verified_files']} files match release.json" if result["verified_files"] else ""
    print(f"{result['repo_id']}@{result['revision']}{checked}", file=sys.stderr)
    print(result["path"])
    return 0


COMMANDS = (
    Command("build", "build a release from a recipe: convert, finetune, eval, export, card",
            (BuildSettings, Output), build),
    Command("publish", "upload a built release to the Hub in one commit and tag it vX.Y.Z",
            (PublishSettings, Output), publish),
    Command("list", "released checkpoints of an org, read from Hub metadata", (ListSettings, Output), list_),
    Command("info", "card metadata and all released versions of a repo", (InfoSettings, Output), info),
    Command("pull", "download a release (default: the latest version) and verify its files",
            (PullSettings, Output), pull),
)
