"""``mmfuse caption``: images captioned into a CSV usable as --captions; resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmfuse.cli.checks import continue_command, no_empty_folders, refuse_existing
from mmfuse.cli.flags import HelpFormatter
from mmfuse.config import DEFAULT_CAPTIONER, PACKAGED_CAPTIONERS
from mmfuse.distributed import leave_launch, main_process
from mmfuse.errors import MmfuseError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images into a CSV usable as --captions (resumable)",
        formatter_class=HelpFormatter,
        description="Caption every image of a folder (searched recursively) or "
        "manifest. Rows are flushed after every batch; --resume skips images already captioned. The "
        "default "
        f"captioner, {DEFAULT_CAPTIONER}, needs the Hugging Face hub or a local copy of it (--model DIR); "
        "--model imagenet-tags works offline (ImageNet class names of the packaged EfficientNet-Lite0 as text).",
    )
    p.add_argument("data", help="folder of images (searched recursively) or a .csv/.jsonl/.parquet manifest")
    p.add_argument("--out", required=True, help="captions CSV (image,text,...) to write or resume")
    p.add_argument(
        "--model",
        default=DEFAULT_CAPTIONER,
        help="Hugging Face image-to-text model (hub id or local directory: ViT-GPT2, BLIP; needs the hub or a local "
        f"copy), or an offline captioner: {', '.join(sorted(PACKAGED_CAPTIONERS))}",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--max-new-tokens", type=int, default=20, help="longest caption, in tokens")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy, the fast path)")
    p.add_argument("--device", help="torch device, e.g. cuda:1 or cpu (default: cuda when available)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad images and images the model gives no text (listed in OUT.skipped.csv) instead of stopping",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the captions in --out: caption only the images it lacks (with nothing there, start)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the captions in --out, captioning every image")
    p.set_defaults(fn=cmd_caption)


def cmd_caption(args) -> int:
    from mmfuse.captioning.pipeline import caption_file, part_files  # deferred: imports torch

    for flag in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, flag) < 1:  # 0 failed inside range(), a negative batch size captioned nothing
            raise MmfuseError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.device:
        from mmfuse.inference.predictor import check_device  # deferred: imports torch

        check_device(args.device, "--device")
    out = Path(args.out)
    parts = part_files(out)  # what a stopped launch left
    if args.overwrite:
        for part in parts:
            part.unlink()
        parts = []
    elif not args.resume and (parts or captioned(out)):
        held = f"{captioned(out)} caption(s)" + (f" and {len(parts)} part file(s) of a stopped launch" if parts else "")
        refuse_existing(out, held, False, f"continue it with: {continue_command(args)} (only the images it lacks)")
    try:
        with no_empty_folders(out.parent):
            if args.overwrite and out.is_file() and out.suffix.lower() == ".csv":  # never an image given by mistake
                out.unlink()
            path = caption_file(
                args.data,
                args.out,
                model=args.model,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                num_beams=args.num_beams,
                skip_bad=args.skip_bad,
                device=args.device,
            )
    except KeyboardInterrupt:
        if main_process():
            print(
                f"interrupted; {captioned(out)} image(s) are captioned in {out}. Continue with: "
                f"{continue_command(args)}",
                file=sys.stderr,
            )
        return 130
    finally:
        leave_launch()
    if main_process():  # under accelerate launch, once
        print(f"wrote {path}")
    return 0


def captioned(out: Path) -> int:
    """The rows of captions ``out`` holds (0 when absent): a file of only a header keeps nothing worth refusing for.
    A file that is no CSV counts its lines, so it is refused rather than written into."""
    if not out.is_file():
        return 0
    with open(out, "rb") as f:
        return sum(1 for _ in f) if f.readline() else 0
