"""``mmfuse cache info|prune|clear|verify``: the feature and image caches under $MMFUSE_HOME (``info`` also sizes the
home's other stores: unpacked models, datasets). The library part is in mmfuse.features.cache_admin (torch-free);
this only prints."""

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
    q = csub.add_parser(
        "info",
        help="every store under $MMFUSE_HOME with its size; the caches' entries per tower, oldest and newest use",
        formatter_class=HelpFormatter,
    )
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

        print(f"{info['home']}: {c.human(info['home_bytes'])} in {info['home_files']:,} files")
        for name, r in info["roots"].items():
            if not r["files"]:
                print(f"  {name}: empty")
            else:
                dead = f"; {c.human(r['dead_bytes'])} unindexed" if r["dead_bytes"] else ""
                print(
                    f"  {name}: {r['entries']:,} entries, {c.human(r['bytes'])} in {r['files']:,} files "
                    f"({r['shards']} shards + index{dead})"
                )
            width = max((len(t["name"] or "?") for t in r["towers"]), default=0)
            shapes = max((len(_shape(t)) for t in r["towers"]), default=0)
            for t in r["towers"]:
                print(
                    f"    {t['fingerprint']}  {t['name'] or '?':<{width}}  {_shape(t):<{shapes}}"
                    f"{t['entries']:>8,} entries"
                    f"{c.human(t['bytes']):>10}  used {when(t['oldest_use'])} .. {when(t['newest_use'])}"
                )
            if r["old_layout_files"]:
                print(
                    f"    old per-item layout (not read): {r['old_layout_files']:,} files, "
                    f"{c.human(r['old_layout_bytes'])}; mmfuse cache clear or prune removes it"
                )
        for name, r in info["stores"].items():
            if not r["items"]:  # a file (files.sqlite: the image files' content hashes), or an empty folder
                print(f"  {name}: {c.human(r['bytes'])}")
                continue
            print(f"  {name}: {c.human(r['bytes'])} in {r['files']:,} files")
            width = max(len(i["name"]) for i in r["items"])
            for i in r["items"]:
                print(f"    {i['name']:<{width}}  {c.human(i['bytes']):>10} in {i['files']:,} files")
        if info["stores"]:
            caches = c.human(info["bytes"])
            print(f"(prune and clear act on the caches only, {caches}; the other stores are remade when needed)")
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


def _shape(tower: dict) -> str:
    """One entry's shape and dtype: ``1280 float32``; token states ``tokens x 384 float16``; pixels ``3x128x128``."""
    shape = tower.get("shape") or []
    if len(shape) == 2:
        return f"tokens x {shape[1]} {tower['dtype']}"
    return f"{'x'.join(map(str, shape))} {tower['dtype']}" if shape else ""
