"""The zoo's subcommands of `mla-zoo`: build, publish, list, info, pull (registered by zoo/cli.py)."""

from __future__ import annotations

import json
import sys

from .build import STAGES


def cmd_build(args) -> int:
    from .build import GateFailed, build
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    try:
        summary = build(recipe, args.output, args.stages, force=args.force)
    except GateFailed as e:
        print(f"mla-zoo build: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for stage, status in summary["stages"].items():
        print(f"{stage:<10}{status}")
    for gate in summary["gates"] or []:
        print(f"gate      {gate['gate']}: {'passed' if gate['passed'] else 'FAILED'} ({gate['text']})")
    release = summary["release"]
    if release:
        m = release["metrics"]
        print(f"release   {release['repo_id']} {release['tag']}: {len(release['files'])} files; KV cache "
              f"-{100 * release['kv_cache']['reduction']:.2f}%, perplexity {m['base']['perplexity']:.3f} -> "
              f"{m['mla']['perplexity']:.3f} ({100 * m['perplexity_delta']:+.2f}%)")
        print(f"wrote     {summary['out']}/release.json")
    return 0


def cmd_publish(args) -> int:
    from .hub import publish

    result = publish(args.release_dir, args.repo, dry_run=args.dry_run, private=args.private)
    if args.json:
        print(json.dumps(result, indent=2))
    elif not args.dry_run:
        print(f"{result['repo_id']} {result['tag']} at commit {result['commit']}"
              + (f"; collection {result['collection']}" if result["collection"] else ""))
    return 0


def cmd_list(args) -> int:
    from .hub import LIST_COLUMNS, default_org, format_table, list_releases

    rows = list_releases(args.org)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no mla-zoo releases by {args.org or default_org()}")
    else:
        print(format_table(rows, LIST_COLUMNS))
    return 0


def cmd_info(args) -> int:
    from .hub import format_details, repo_details

    details = repo_details(args.repo)
    print(json.dumps(details, indent=2) if args.json else format_details(details))
    return 0


def cmd_pull(args) -> int:
    from .hub import pull

    result = pull(args.ref, local_dir=args.local_dir)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    checked = f", {result['verified_files']} files match release.json" if result["verified_files"] else ""
    print(f"{result['repo_id']}@{result['revision']}{checked}", file=sys.stderr)
    print(result["path"])
    return 0


def register(sub) -> None:
    b = sub.add_parser("build", help="build a release from a recipe: convert, finetune, eval, export, card")
    b.add_argument("recipe", help="recipe .toml file, or the name of a shipped recipe (zoo/recipes/NAME.toml)")
    b.add_argument("-o", "--output", required=True, help="release directory (stages are resumed from it)")
    b.add_argument("--stages", nargs="+", choices=STAGES, metavar="STAGE",
                   help=f"run only these stages ({', '.join(STAGES)}); their upstream stages must be up to date")
    b.add_argument("--force", action="store_true", help="re-run the selected stages even if their inputs are unchanged")
    b.add_argument("--json", action="store_true", help="print the build summary as JSON")
    b.set_defaults(func=cmd_build)

    p = sub.add_parser("publish", help="upload a built release to the Hub in one commit and tag it vX.Y.Z")
    p.add_argument("release_dir", help="directory written by `mla-zoo build`")
    p.add_argument("--repo", help="ORG/NAME (default: release.repo_id of the recipe; must match it)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the files and tag that would be published; write nothing")
    p.add_argument("--private", action="store_true", help="create the repo private if it does not exist")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_publish)

    ls = sub.add_parser("list", help="released checkpoints of an org, read from Hub metadata")
    ls.add_argument("--org", help="Hub user or org (default: $MLA_ZOO_ORG or mla-zoo)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    i = sub.add_parser("info", help="card metadata and all released versions of a repo")
    i.add_argument("repo", help="ORG/NAME")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    u = sub.add_parser("pull", help="download a release (default: the latest version) and verify its files")
    u.add_argument("ref", metavar="REPO[@vX.Y.Z]", help="ORG/NAME, optionally @version (tag), branch or commit")
    u.add_argument("-o", "--local-dir", help="download into this directory instead of the Hugging Face cache")
    u.add_argument("--json", action="store_true")
    u.set_defaults(func=cmd_pull)
