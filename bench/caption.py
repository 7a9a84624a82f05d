"""Captioning throughput: Hugging Face ``generate`` against mmfuse's greedy decoder, in the same run.

ViT-B/16 (224 px) + GPT-2 (124M) as a VisionEncoderDecoder with random weights (throughput does not depend on
weight values), greedy, 20 new tokens for every image, from synthetic pixel tensors already on the device.

    python bench/caption.py              # GPU: full size in bf16; HF generate at batch 64 and 1,024 vs mmfuse
    python bench/caption.py --small      # CPU: tiny sizes in fp32, under a minute; what tests/ runs

Every variant's tokens are first checked against ``generate`` in fp32; the table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from reference_models import random_captioner  # noqa: E402


def build(small: bool, max_new_tokens: int):
    model = random_captioner(small, max_new_tokens)
    return model, model.config.encoder.image_size


def hf_generate(model):
    def run(pixels, max_new_tokens):
        return model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False)[:, 1:]

    return run


def images_per_s(fn, pixels: torch.Tensor, max_new_tokens: int, iters: int, warmup: int = 1) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn(pixels, max_new_tokens)
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            fn(pixels, max_new_tokens)
        if pixels.device.type == "cuda":
            torch.cuda.synchronize()
    return iters * len(pixels) / (time.perf_counter() - start)


def check(model, decoder_kwargs: dict, pixels: torch.Tensor, max_new_tokens: int) -> str:
    """Fraction of images whose tokens equal ``generate``'s, in fp32 (bf16 near-ties could flip either side)."""
    from mmfuse.captioning.decoder import GreedyGPT2Decoder

    model32 = model.float()
    pixels = pixels.float()
    with torch.inference_mode():
        ref = model32.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False)[:, 1:]
        fast = GreedyGPT2Decoder(model32, **decoder_kwargs).generate(pixels, max_new_tokens)
    same = (ref == fast).all(1).float().mean().item()
    return f"{same:.0%} of {len(pixels)} images token-identical to generate (fp32)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny model and batches (CPU, < 1 minute)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=None, help="timed calls per variant (default: 3 small, 5 full)")
    args = p.parse_args(argv)

    import transformers

    from mmfuse.captioning.decoder import GreedyGPT2Decoder

    transformers.utils.logging.set_verbosity_error()
    device = torch.device(args.device)
    if args.small and device.type == "cpu":
        # Tiny ops gain nothing from threads, and their barriers stall badly when other jobs share the cores.
        torch.set_num_threads(1)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    small_batch, big_batch = (16, 128) if args.small else (64, 1024)
    iters = args.iters or (3 if args.small else 5)
    n = args.max_new_tokens
    t0 = time.perf_counter()
    model, size = build(args.small, n)
    model.to(device)
    pixels = {
        b: torch.randn(b, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(b))
        for b in (small_batch, big_batch)
    }

    checks = [("mmfuse greedy, eager", check(model, {"cuda_graphs": False}, pixels[small_batch][:8], n))]
    model.to(dtype)
    if cuda:
        x = pixels[small_batch].to(dtype)
        decoder = GreedyGPT2Decoder(model, cuda_graphs=True)
        graphed = decoder.generate(x, n)
        with torch.inference_mode():  # the same kernels, launched one by one: a replay must match them exactly
            eager = decoder.generate_eager(decoder.cross_kv(decoder.encode(x)), n, static=True)
        # The decoder also checks its first replay itself, and turns graphs off on a mismatch.
        state = "graphs on" if decoder.cuda_graphs else "graphs OFF (capture failed or differed: see the log)"
        same = (eager == graphed).all(1).float().mean().item()
        checks.append(
            (
                "mmfuse greedy, CUDA graph",
                f"{state}; {same:.0%} of {small_batch} images token-identical to the same step without graphs",
            )
        )

    eager = GreedyGPT2Decoder(model, cuda_graphs=False).generate
    variants = [
        ("HF generate", small_batch, hf_generate(model)),
        ("HF generate", big_batch, hf_generate(model)),
        ("mmfuse greedy, eager", small_batch, eager),
        ("mmfuse greedy, eager", big_batch, eager),
    ]
    if cuda:
        variants.append(("mmfuse greedy, CUDA graph", big_batch, GreedyGPT2Decoder(model, cuda_graphs=True).generate))
    results = []
    for name, batch, fn in variants:
        x = pixels[batch].to(dtype)
        try:
            rate = images_per_s(fn, x, n, iters)
            results.append((name, batch, f"{rate:,.0f}", rate))
        except Exception as e:  # one failing variant (e.g. out of memory) should not hide the others
            results.append((name, batch, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}", None))

    base = results[0][3]
    card = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(
        f"captioning benchmark: {'small' if args.small else 'ViT-B/16 + GPT-2 124M'}, greedy, {n} new tokens, "
        f"{str(dtype).removeprefix('torch.')}, random weights"
    )
    print(
        f"device: {card}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{datetime.date.today()}; {time.perf_counter() - t0:.0f} s"
    )
    for name, result in checks:
        print(f"check {name}: {result}")
    print()
    print(f"| {'variant':<26} | {'batch':>5} | {'images/s':>10} | {'vs HF b' + str(small_batch):>9} |")
    print(f"|{'-' * 28}|{'-' * 7}|{'-' * 12}|{'-' * 11}|")
    for name, batch, shown, rate in results:
        ratio = f"{rate / base:.2f}x" if rate and base else "-"
        print(f"| {name:<26} | {batch:>5} | {shown:>10} | {ratio:>9} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
