"""`mla-zoo build`, `publish`, `list`, `info` and `pull`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
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

    summary = build(load_recipe(c.recipe), c.output, c.stages, force=c.force, progress=sys.stderr.isatty())
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
    from mla_zoo.zoo.release import hub

    if c.dry_run:
        plan = hub.plan_publish(c.release_dir, c.repo, c.private)
        existing = hub.dry_run_check(hub.make_api(), plan)
        if out.json:
            print(json.dumps({"dry_run": True, "repo_id": plan.repo_id, "tag": plan.tag, "existing": existing,
                              "files": [p for p, _, _ in plan.files]}, indent=2))
        else:
            print(format_plan(plan))
            print(f"existing    {existing}")
        return 0
    result = hub.publish(c.release_dir, c.repo, private=c.private)
    if out.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['repo_id']} {result['tag']} at commit {result['commit']}"
              + (f"; collection {result['collection']}" if result["collection"] else ""))
    return 0


def format_plan(plan) -> str:
    """What `publish --dry-run` shows: the repo, the tag, every file of the one commit."""
    from mla_zoo.zoo.release.hub import COLLECTION_TITLE

    total = sum(size for _, _, size in plan.files)
    lines = [f"repo        {plan.repo_id}{' (private)' if plan.private else ''}",
             f"version     {plan.version} -> tag {plan.tag}",
             f"commit      one commit of {len(plan.files)} files, {total:,} bytes:"]
    lines += [f"  {size:>14,}  {path}" for path, _, size in plan.files]
    lines.append(f"collection  {plan.owner}: \"{COLLECTION_TITLE}\" (created if missing)")
    return "\n".join(lines)


@dataclass
class ListSettings(Settings):
    org: str | None = setting(None, help="Hub user or org (default: $MLA_ZOO_ORG or mla-zoo)")


def list_(c: ListSettings, out: Output) -> int:
    from mla_zoo.zoo.release.hub import default_org, list_releases

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


def format_table(rows: list[dict], columns: list[tuple[str, str, Callable]]) -> str:
    """Plain-text table: columns are (key, header, formatter)."""
    cells = [[header for _, header, _ in columns]]
    cells += [[fmt(row.get(key)) for key, _, fmt in columns] for row in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells)


def _opt(fmt: Callable) -> Callable:
    return lambda v: "-" if v is None else fmt(v)


LIST_COLUMNS = [
    ("repo_id", "REPO", str),
    ("base_model", "BASE", _opt(str)),
    ("d_kv", "D_KV", _opt(str)),
    ("kv_reduction", "KV REDUCTION", _opt(lambda v: f"-{100 * v:.1f}%")),
    ("perplexity_delta", "PPL DELTA", _opt(lambda v: f"{100 * v:+.2f}%")),
    ("version", "LATEST", _opt(lambda v: f"v{v}")),
]


def info(c: InfoSettings, out: Output) -> int:
    from mla_zoo.zoo.release.hub import repo_details

    details = repo_details(c.repo)
    print(json.dumps(details, indent=2) if out.json else format_details(details))
    return 0


def format_details(d: dict) -> str:
    card, meta = d["card"], d["mla_zoo"]
    lines = [f"{d['repo_id']}  (main at {d['sha'][:12]})"]
    for key in ("base_model", "license", "library_name", "pipeline_tag"):
        if card.get(key) is not None:
            lines.append(f"  {key:<16}{card[key]}")
    lines.append(f"  {'tags':<16}{', '.join(d['tags'])}")
    if meta:
        lines.append("zoo metadata:")
        lines += [f"  {k:<26}{v}" for k, v in meta.items()]
    for entry in card.get("model-index") or []:
        for result in entry.get("results", []):
            for metric in result.get("metrics", []):
                lines.append(f"result: {metric.get('name') or metric.get('type')} = {metric.get('value')} "
                             f"on {result.get('dataset', {}).get('name')}")
    lines.append("versions:" if d["versions"] else "versions: none released (no vX.Y.Z tags)")
    for v in reversed(d["versions"]):
        latest = "  (latest)" if v["tag"] == d["latest"] else ""
        lines.append(f"  {v['tag']:<12}{v['commit']}{latest}")
    return "\n".join(lines)


@dataclass
class PullSettings(Settings):
    ref: str = setting(positional=True, metavar="REPO[@vX.Y.Z]",
                       help="ORG/NAME, optionally @version (tag), branch or commit")
    local_dir: str | None = setting(None, aliases=["-o"], help="download into this directory instead of the Hugging "
                                                               "Face cache")
    overwrite: bool = setting(False, help="replace an existing --local-dir (only one that pull wrote)")


def pull(c: PullSettings, out: Output) -> int:
    from mla_zoo.zoo.release.hub import pull

    result = pull(c.ref, local_dir=c.local_dir, overwrite=c.overwrite)
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
