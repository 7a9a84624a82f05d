"""What the feature cache costs: storing and reading N pooled vectors, the files they take, and a full verify.

    python bench/cache.py                        # 4,000 x 1280-d float32 (EfficientNet-Lite0's), 64 a batch
    python bench/cache.py --rows 1000000 --dim 384

Runs the real cache (``mmfuse.features.cache.FeatureCache``) in a temporary ``$MMFUSE_HOME``: ``put_many`` in batches as
``sources.embed`` stores them, then in a fresh process-level store (as a second run reads) ``get_many`` per batch,
as ``embed`` asks, and ``get`` one key at a time, then ``verify_cache``. Prints seconds and microseconds per item,
the files and bytes on disk, and rows per file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4000, help="items stored and read")
    p.add_argument("--dim", type=int, default=1280, help="floats per item")
    p.add_argument("--batch", type=int, default=64, help="items per put_many / get_many")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as home:
        os.environ["MMFUSE_HOME"] = home
        import numpy as np

        from mmfuse.features.cache import FeatureCache, close_stores
        from mmfuse.features.cache_admin import cache_info, verify_cache

        rng = np.random.default_rng(0)
        keys = [f"{i:064x}" for i in range(args.rows)]
        vec = rng.standard_normal(args.dim).astype(np.float32)
        batches = [keys[i : i + args.batch] for i in range(0, args.rows, args.batch)]

        def timed(label: str, fn) -> None:
            t = time.perf_counter()
            fn()
            s = time.perf_counter() - t
            print(f"{label:<34} {s:8.3f} s  {s / args.rows * 1e6:8.1f} us/item")

        cache = FeatureCache()
        put = [[(k, vec) for k in b] for b in batches]
        timed(f"put_many ({args.batch} a batch)", lambda: [cache.put_many("fp", items) for items in put])
        close_stores()
        timed(f"get_many ({args.batch} a batch)", lambda: [FeatureCache().get_many("fp", b) for b in batches])
        close_stores()
        timed("get (one at a time)", lambda: [cache.get("fp", k) for k in keys])
        close_stores()
        timed("verify_cache", verify_cache)
        info = cache_info()
        files = sum(1 for _ in Path(home).rglob("*") if _.is_file())
        print(f"{files} files, {info['bytes'] / 1e6:.1f} MB on disk; {args.rows / max(files, 1):.0f} rows per file")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
