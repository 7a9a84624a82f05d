"""``mmfuse cache info|prune|clear|verify``: the feature and image caches under $MMFUSE_HOME. The library part is
in mmfuse.features.cache (torch-free); this only prints."""

from __future__ import annotations

import argparse
import json
import time

from mmfuse.cli.flags import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache",
        help="show, prune, verify or clear the feature and image caches ($MMFUSE_HOME)",
        formatter_class=HelpFormatter,
        description="The caches of frozen-tower features and decoded images under $MMFUSE_HOME (features, "
        "features-bf16, pixels): shard files and an index, every entry checked against its checksum when read.",
    )
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = csub.add_parser("info", help="size, entries per tower, oldest and newest use", formatter_class=HelpFormatter)
    q.add_argument("--json", action="store_true", help="print the figures as JSON")
    q = csub.add_parser("prune", help="drop least recently used entries down to a size", formatter_class=HelpFormatter)
    q.add_argument("--max-size", required=True, help="size to shrink to, e.g. 20GB, 500MB, 1.5GiB")
    csub.add_parser(
        "clear", help="remove every cache entry (and the old per-item layout)", formatter_class=HelpFormatter
    )
    csub.add_parser(
        "verify", help="check every entry's checksum; drop bad ones (exit code 1 if any)", formatter_class=HelpFormatter
    )
    p.set_defaults(fn=cmd_cache)


def cmd_cache(args) -> int:
    from mmfuse.features import cache_admin as c  # deferred: imports numpy, which --help never needs (torch-free)

    if args.action == "info":
        info = c.cache_info()
        if args.json:
            print(json.dumps(info, indent=2))
            return 0

        def when(t: float | None) -> str:
            return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

        print(f"{info['home']}: {c.human(info['bytes'])} in {info['files']:,} files")
        for name, r in info["roots"].items():
            if not r["files"]:
                print(f"  {name}: empty")
            else:
                dead = f"; {c.human(r['dead_bytes'])} unindexed" if r["dead_bytes"] else ""
                print(
                    f"  {name}: {r['entries']:,} entries, {c.human(r['bytes'])} in {r['files']:,} files "
                    f"({r['shards']} shards + index{dead})"
                )
            for t in r["towers"]:
                print(
                    f"    {t['fingerprint']}  {t['name'] or '?':<26}{t['entries']:>8,} entries{c.human(t['bytes']):>10}"
                    f"  used {when(t['oldest_use'])} .. {when(t['newest_use'])}"
                )
            if r["old_layout_files"]:
                print(
                    f"    old per-item layout (not read): {r['old_layout_files']:,} files, "
                    f"{c.human(r['old_layout_bytes'])}; mmfuse cache clear or prune removes it"
                )
        return 0
    if args.action == "prune":
        r = c.prune_cache(c.parse_size(args.max_size))
        print(
            f"pruned {c.human(r['before'])} to {c.human(r['after'])}: {r['dropped_entries']:,} least recently used "
            f"entries dropped, {r['removed_shards']} shards removed, {r['rewritten_shards']} rewritten"
            + (f", old layout {c.human(r['old_layout_bytes'])} removed" if r["old_layout_bytes"] else "")
            + (f"; {r['held_shards']} shards in use by running processes left alone" if r["held_shards"] else "")
        )
        return 0
    if args.action == "clear":
        for r in c.clear_cache().values():
            print(f"removed {r['path']}: {r['files']:,} files, {c.human(r['bytes'])}")
        return 0
    result = c.verify_cache()
    bad = 0
    for name, r in result.items():
        bad += len(r["bad"])
        print(f"{name}: {r['checked']:,} entries checked, {len(r['bad'])} bad")
        for fp, key, shard, why in r["bad"][:20]:
            print(f"  dropped {fp}/{key[:16]} in {shard}: {why}")
    if bad:
        print(f"{bad} bad entries dropped from the index: they are recomputed when next needed")
    return 1 if bad else 0
