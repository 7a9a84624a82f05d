"""The random-weight models the benchmarks time, built in one place (throughput does not depend on weight values).

Full size is the reference: ViT-B/16 at 224 px, and GPT-2 small (124M) as the captioner's decoder. ``small`` gives
tiny versions of the same architectures, for the CPU modes that tests/ runs.
"""

from __future__ import annotations

import torch


def vit_config(small: bool):
    from transformers import ViTConfig

    if not small:
        return ViTConfig()  # the defaults are ViT-B/16 at 224 px
    return ViTConfig(
        image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )


def random_captioner(small: bool, max_new_tokens: int, vocab_size: int | None = None):
    """A random ViT + GPT-2 VisionEncoderDecoder whose last token id is BOS, EOS and pad.

    Random weights may pick EOS early and flatter any decoder timed on them, so generation is set to always produce
    ``max_new_tokens``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTModel

    vit = vit_config(small)
    gpt = (
        GPT2Config(vocab_size=vocab_size or 5000, n_positions=64, n_embd=64, n_layer=2, n_head=4)
        if small
        else (GPT2Config())
    )
    eos = gpt.vocab_size - 1
    gpt.bos_token_id = gpt.eos_token_id = eos
    gpt.add_cross_attention = gpt.is_decoder = True
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(encoder=ViTModel(vit, add_pooling_layer=False), decoder=GPT2LMHeadModel(gpt))
    model.config.decoder_start_token_id = model.config.pad_token_id = eos
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.eos_token_id = eos
    gen.min_new_tokens = max_new_tokens
    return model.eval()
