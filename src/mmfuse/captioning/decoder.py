"""Greedy decoding of a VisionEncoderDecoder with a GPT-2 decoder (ViT-GPT2), token for token what ``generate`` gives.

A static KV cache, cross-attention keys/values computed once per image, no host syncs on GPU, and a CUDA graph per
batch size (``_StepGraph``), checked against the eager loop on its first replay.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from mmfuse.errors import MmfuseError

log = logging.getLogger(__name__)


# Generation settings that change greedy tokens: GreedyGPT2Decoder applies only suppress_tokens and the minimum
# lengths, so a checkpoint that sets any of these others goes through `generate` instead.
_GREEDY_NEUTRAL = {
    "do_sample": (None, False),
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "penalty_alpha": (None,),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
}


class GreedyGPT2Decoder:
    """Greedy decoding for a VisionEncoderDecoder whose decoder is GPT-2, token for token what ``generate`` gives.

    The encoder runs once per image and each layer's cross-attention keys/values are computed once. The self-attention
    cache is preallocated for all steps, and each step writes its slot by an on-device position, so a step has
    fixed shapes and no host syncs: on CUDA it is captured once as a CUDA graph per batch size and replayed.
    """

    def __init__(self, model, cuda_graphs: bool = True):
        if not self.supports(model):
            raise MmfuseError(f"{type(model).__name__} is not a VisionEncoderDecoder with a GPT-2 decoder")
        self.model = model
        self.gpt, self.lm_head = model.decoder.transformer, model.decoder.lm_head
        cfg = model.decoder.config
        self.heads, self.width = cfg.n_head, cfg.n_embd
        gen = model.generation_config
        self.start = (
            gen.decoder_start_token_id
            if gen.decoder_start_token_id is not None
            else (model.config.decoder_start_token_id)
        )
        eos = gen.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad = gen.pad_token_id if gen.pad_token_id is not None else (self.eos[0] if self.eos else 0)
        # generate's min_length counts the decoder start token; min_new_tokens does not.
        self.min_new = max(gen.min_new_tokens or 0, (gen.min_length or 0) - 1)
        self.suppress = list(gen.suppress_tokens or [])
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, int], _StepGraph] = {}

    @staticmethod
    def supports(model) -> bool:
        """True for VisionEncoderDecoder + GPT-2 whose generation config greedy decoding here reproduces."""
        if getattr(model.config, "model_type", "") != "vision-encoder-decoder":
            return False
        if getattr(model.decoder.config, "model_type", "") != "gpt2":
            return False
        gen = model.generation_config
        return all(getattr(gen, key, None) in neutral for key, neutral in _GREEDY_NEUTRAL.items())

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model.encoder(pixel_values=pixel_values).last_hidden_state
        proj = getattr(self.model, "enc_to_dec_proj", None)
        if proj is not None and getattr(self.model.decoder.config, "cross_attention_hidden_size", None) is None:
            hidden = proj(hidden)
        return hidden

    def cross_kv(self, encoded: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the cross-attention keys and values stacked as (2, batch, heads, patches, head_dim)."""
        out = []
        for block in self.gpt.h:
            kv = block.crossattention.c_attn(encoded).unflatten(-1, (2, self.heads, -1))  # (B, S, 2, H, D)
            out.append(kv.permute(2, 0, 3, 1, 4))
        return out

    def new_state(self, cross: list[torch.Tensor], max_new_tokens: int) -> dict[str, torch.Tensor]:
        """Every tensor a step reads or writes, allocated once so that a CUDA graph can replay over them."""
        batch, device, dtype = cross[0].shape[1], cross[0].device, cross[0].dtype
        head_dim = self.width // self.heads
        slots = -(-max_new_tokens // 16) * 16  # masked attention kernels want the key length aligned
        vocab = self.lm_head.out_features
        banned_always = torch.zeros(vocab, dtype=torch.bool, device=device)
        banned_always[self.suppress] = True
        eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        eos_mask[self.eos] = True
        return {
            "cross": cross,
            "self_kv": [
                torch.zeros(2, batch, self.heads, slots, head_dim, device=device, dtype=dtype) for _ in self.gpt.h
            ],
            "token": torch.full((batch,), self.start, dtype=torch.long, device=device),
            "pos": torch.zeros((), dtype=torch.long, device=device),
            "slots": torch.arange(slots, device=device),
            "finished": torch.zeros(batch, dtype=torch.bool, device=device),
            "out": torch.full((batch, max_new_tokens), self.pad, dtype=torch.long, device=device),
            "banned_always": banned_always,
            "eos_mask": eos_mask,
        }

    def step(self, s: dict[str, torch.Tensor], t: int | None = None) -> None:
        """Decodes one token for every row, in place: reads s["token"] at s["pos"], writes the next one.

        Args:
            s: the state from ``new_state``.
            t: the position as a Python int, in eager decoding: attention then reads only the filled slots, and
                masks that no longer apply are skipped. None inside a CUDA graph, where all comes from s["pos"].
        """
        pos = s["pos"]
        x = (self.gpt.wte(s["token"]) + self.gpt.wpe(pos)).unsqueeze(1)  # (B, 1, E)
        visible = (s["slots"] <= pos).view(1, 1, 1, -1) if t is None else None  # slots past pos are stale
        for block, cache, cross in zip(self.gpt.h, s["self_kv"], s["cross"]):
            q, k, v = block.attn.c_attn(block.ln_1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
            cache.index_copy_(3, pos.view(1), torch.stack((k, v)))
            kv = cache if t is None else cache[..., : t + 1, :]
            a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=visible, scale=block.attn.scaling)
            x = x + block.attn.c_proj(a.transpose(1, 2).flatten(2))
            q = block.crossattention.q_attn(block.ln_cross_attn(x)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, cross[0], cross[1], scale=block.crossattention.scaling)
            x = x + block.crossattention.c_proj(a.transpose(1, 2).flatten(2))
            x = x + block.mlp(block.ln_2(x))
        logits = self.lm_head(self.gpt.ln_f(x[:, 0])).float()
        if t is None:
            logits.masked_fill_(s["banned_always"] | (s["eos_mask"] & (pos < self.min_new)), float("-inf"))
        else:
            if self.suppress:
                logits.masked_fill_(s["banned_always"], float("-inf"))
            if t < self.min_new:
                logits.masked_fill_(s["eos_mask"], float("-inf"))
        token = logits.argmax(-1)
        if self.eos:  # as generate does: a finished row emits padding; it finishes on emitting an EOS
            token = torch.where(s["finished"], self.pad, token)
            s["finished"] |= s["eos_mask"][token]
        s["out"].index_copy_(1, pos.view(1), token.unsqueeze(1))
        s["token"].copy_(token)
        pos.add_(1)

    @torch.inference_mode()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = 20) -> torch.Tensor:
        """New token ids, shape (batch, max_new_tokens), padded after EOS like ``generate``'s output[:, 1:]."""
        cross = self.cross_kv(self.encode(pixel_values))
        if pixel_values.device.type == "cuda" and self.cuda_graphs:
            return self._generate_graphed(cross, max_new_tokens)
        s = self.new_state(cross, max_new_tokens)
        for t in range(max_new_tokens):
            self.step(s, t)
            # On CPU a sync is free, so stop once every row has finished; on GPU that check would stall the queue.
            if self.eos and pixel_values.device.type != "cuda" and t % 4 == 3 and bool(s["finished"].all()):
                break
        return s["out"]

    def _generate_graphed(self, cross: list[torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        key = (cross[0].shape[1], max_new_tokens)
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = _StepGraph(self, cross, max_new_tokens)
            except RuntimeError as e:  # capture is an optimisation: never fail a run over it
                log.warning("CUDA graph capture failed (%s); decoding without graphs", str(e).splitlines()[0])
                self.cuda_graphs = False
                return self.generate_eager(cross, max_new_tokens)
            self._graphs[key] = graph
        return graph.run(cross, self.start, self.pad)

    def generate_eager(self, cross: list[torch.Tensor], max_new_tokens: int, static: bool = False) -> torch.Tensor:
        """Decodes without graphs; ``static`` runs the very kernels a graph captures (to check a replay by)."""
        s = self.new_state(cross, max_new_tokens)
        for t in range(max_new_tokens):
            self.step(s, None if static else t)
        return s["out"]


class _StepGraph:
    """One decode step captured as a CUDA graph over static buffers, replayed once per token."""

    def __init__(self, decoder: GreedyGPT2Decoder, cross: list[torch.Tensor], max_new_tokens: int):
        self.decoder, self.steps = decoder, max_new_tokens
        self.state = decoder.new_state([c.clone() for c in cross], max_new_tokens)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (kernel selection, workspaces) outside the capture
            for _ in range(2):
                self.reset(decoder.start, decoder.pad)
                decoder.step(self.state)
        torch.cuda.current_stream().wait_stream(stream)
        self.reset(decoder.start, decoder.pad)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            decoder.step(self.state)
        # The first replay is checked against the eager loop; a mismatch turns graphs off rather than miscaption.
        self.checked = False

    def reset(self, start: int, pad: int) -> None:
        s = self.state
        s["token"].fill_(start)
        s["pos"].zero_()
        s["finished"].zero_()
        s["out"].fill_(pad)

    def run(self, cross: list[torch.Tensor], start: int, pad: int) -> torch.Tensor:
        for static, new in zip(self.state["cross"], cross):
            static.copy_(new)
        self.reset(start, pad)
        for _ in range(self.steps):
            self.graph.replay()
        out = self.state["out"].clone()
        if not self.checked:
            self.checked = True
            eager = self.decoder.generate_eager(cross, self.steps, static=True)
            if not torch.equal(out, eager):
                log.warning("CUDA graph decoding differs from eager decoding; decoding without graphs")
                self.decoder.cuda_graphs = False
                return eager
        return out
