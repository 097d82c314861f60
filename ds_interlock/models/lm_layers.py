"""Pipeline layers of a decoder-only LM, wrapping `transformers` building blocks.

Between layers (and so across every pipeline boundary) travels ONE tensor: the
hidden states [B, T, d]; only the first layer takes input_ids [B, T]. Each
decoder wrapper rebuilds what its HF layer needs (causal mask, position ids,
rotary cos/sin) from that tensor, assuming unpadded sequences at positions 0..T-1.

Every layer takes `(config, ..., init_seed=0, pretrained=None)`:
- init_seed: the layer draws its initial weights from its own generator seeded by
  (init_seed, layer name), so the model is the same however it is partitioned.
  None draws from torch's global RNG instead.
- pretrained: a local directory saved by `save_pretrained`; the layer copies its
  weights from it (loaded once per process, never fetched from a hub).
"""

import functools
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block, GPT2MLP
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding)
from transformers.pytorch_utils import Conv1D

from .lm_presets import arch_of


@functools.lru_cache(maxsize=1)
def load_pretrained(local_dir):
    """The HF model saved in `local_dir` (cached: every layer of a stage reads it)."""
    return AutoModelForCausalLM.from_pretrained(local_dir, local_files_only=True,
                                                dtype=torch.float32)


def clear_pretrained_cache():
    """Drop the cached pretrained model once all layers are built."""
    load_pretrained.cache_clear()


def _generator(init_seed, name):
    if init_seed is None:
        return None
    # crc32, not hash(): Python salts str hashes per process, ranks must agree.
    return torch.Generator().manual_seed(init_seed * 1_000_003 + zlib.crc32(name.encode()))


@torch.no_grad()
def init_like_hf(module, config, generator=None):
    """The initialisation HF's `_init_weights` gives these modules: N(0, 0.02)
    matrices and embeddings, zero biases, unit norms, and GPT-2's residual
    projections scaled by 1/sqrt(2 * n_layer)."""
    std = config.initializer_range
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, Conv1D)):
            sub.weight.normal_(0.0, std, generator=generator)
            if sub.bias is not None:
                sub.bias.zero_()
        elif isinstance(sub, nn.Embedding):
            sub.weight.normal_(0.0, std, generator=generator)
        elif isinstance(sub, (nn.LayerNorm, LlamaRMSNorm)):
            sub.weight.fill_(1.0)
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()
    # After the loop, which would otherwise re-draw c_proj as a plain Conv1D.
    for sub in module.modules():
        if isinstance(sub, (GPT2Attention, GPT2MLP)):
            sub.c_proj.weight.normal_(0.0, std / math.sqrt(2 * config.n_layer),
                                      generator=generator)


class PipeLayer(nn.Module):
    """Shared set-up: random init from the layer's own seed, or pretrained copy."""

    seed_name = "layer"

    def _finish_init(self, config, init_seed, pretrained):
        if pretrained is not None:
            self.load_hf(load_pretrained(pretrained))
        else:
            self.init_weights(config, _generator(init_seed, self.seed_name))

    def init_weights(self, config, generator):
        init_like_hf(self, config, generator)

    @torch.no_grad()
    def load_hf(self, hf_model):
        """Copy this layer's weights from a HF GPT2LMHeadModel / LlamaForCausalLM."""
        self._load_hf(hf_model)

    def _load_hf(self, hf_model):
        raise NotImplementedError


def _final_norm(config):
    if arch_of(config) == "gpt2":
        return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


def _hf_final_norm(hf_model):
    base = hf_model.base_model
    return base.ln_f if hasattr(base, "ln_f") else base.norm


def _hidden_only(out):
    # Decoder layers return a tensor in transformers 5.x, a tuple in 4.x.
    return out[0] if isinstance(out, tuple) else out


def causal_mask(hidden, attn_implementation):
    """None for 'sdpa' (its kernel then runs with is_causal=True); for 'eager' the
    additive [1, 1, T, T] mask HF builds for an unpadded batch."""
    if attn_implementation == "sdpa":
        return None
    T = hidden.shape[1]
    blocked = torch.ones(T, T, dtype=torch.bool, device=hidden.device).triu(1)
    mask = torch.zeros(T, T, dtype=hidden.dtype, device=hidden.device)
    return mask.masked_fill(blocked, torch.finfo(hidden.dtype).min)[None, None]


class TokenEmbedding(PipeLayer):
    """input_ids [B, T] -> [B, T, d]. Its `.weight` is what `tie_embeddings` ties."""

    seed_name = "embed"

    def __init__(self, config, init_seed=0, pretrained=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self._finish_init(config, init_seed, pretrained)

    def init_weights(self, config, generator):
        with torch.no_grad():
            self.weight.normal_(0.0, config.initializer_range, generator=generator)

    def _load_hf(self, hf_model):
        self.weight.copy_(hf_model.get_input_embeddings().weight)

    def forward(self, input_ids):
        return F.embedding(input_ids, self.weight)


def project_with_embedding(embedding, hidden):
    """`forward_fn` of the tied last-stage spec: logits from the embedding matrix."""
    return F.linear(hidden, embedding.weight)


class GPT2Positions(PipeLayer):
    """Adds GPT-2's learned position embeddings (positions 0..T-1), then dropout."""

    seed_name = "positions"

    def __init__(self, config, init_seed=0, pretrained=None):
        super().__init__()
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self._finish_init(config, init_seed, pretrained)

    def _load_hf(self, hf_model):
        self.wpe.load_state_dict(hf_model.base_model.wpe.state_dict())

    def forward(self, hidden):
        T = hidden.shape[1]
        if T > self.wpe.num_embeddings:
            raise ValueError(f"sequence length {T} exceeds n_positions {self.wpe.num_embeddings}")
        positions = torch.arange(T, device=hidden.device)
        return self.drop(hidden + self.wpe(positions))


class GPT2DecoderPipe(PipeLayer):
    """One `GPT2Block` (pre-norm attention + MLP)."""

    def __init__(self, config, layer_idx, init_seed=0, pretrained=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.seed_name = f"decoder.{layer_idx}"
        self.config = config
        self.block = GPT2Block(config, layer_idx=layer_idx)
        self._finish_init(config, init_seed, pretrained)

    def _load_hf(self, hf_model):
        self.block.load_state_dict(hf_model.base_model.h[self.layer_idx].state_dict())

    def forward(self, hidden):
        mask = causal_mask(hidden, self.config._attn_implementation)
        return _hidden_only(self.block(hidden, attention_mask=mask))


class LlamaDecoderPipe(PipeLayer):
    """One `LlamaDecoderLayer` with rotary position embeddings for 0..T-1."""

    def __init__(self, config, layer_idx, init_seed=0, pretrained=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.seed_name = f"decoder.{layer_idx}"
        self.config = config
        self.layer = LlamaDecoderLayer(config, layer_idx)
        # Kept out of the module tree: engine.bfloat16() would round the inv_freq
        # buffer; HF computes cos/sin in fp32 and casts them to the hidden dtype.
        self._rotary = (LlamaRotaryEmbedding(config),)
        self._rotary_cache = None
        self._finish_init(config, init_seed, pretrained)

    def _load_hf(self, hf_model):
        self.layer.load_state_dict(hf_model.base_model.layers[self.layer_idx].state_dict())

    def _cos_sin(self, hidden):
        key = (hidden.shape[1], hidden.device, hidden.dtype)
        if self._rotary_cache is None or self._rotary_cache[0] != key:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
            self._rotary_cache = (key, positions, self._rotary[0](hidden, positions))
        return self._rotary_cache[1], self._rotary_cache[2]

    def forward(self, hidden):
        positions, cos_sin = self._cos_sin(hidden)
        mask = causal_mask(hidden, self.config._attn_implementation)
        out = self.layer(hidden, attention_mask=mask, position_ids=positions,
                         position_embeddings=cos_sin)
        return _hidden_only(out)


class FinalNorm(PipeLayer):
    """The model's last norm (LayerNorm for GPT-2, RMSNorm for Llama)."""

    seed_name = "final_norm"

    def __init__(self, config, init_seed=0, pretrained=None):
        super().__init__()
        self.norm = _final_norm(config)
        self._finish_init(config, init_seed, pretrained)

    def _load_hf(self, hf_model):
        self.norm.load_state_dict(_hf_final_norm(hf_model).state_dict())

    def forward(self, hidden):
        return self.norm(hidden)


class VocabProjection(PipeLayer):
    """Untied output projection [B, T, d] -> logits [B, T, V] (no bias, as HF)."""

    seed_name = "head"

    def __init__(self, config, init_seed=0, pretrained=None):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._finish_init(config, init_seed, pretrained)

    def _load_hf(self, hf_model):
        self.proj.weight.copy_(hf_model.get_output_embeddings().weight)

    def forward(self, hidden):
        return self.proj(hidden)


class AuxLMHead(PipeLayer):
    """Auxiliary head at a stage boundary: its own final norm + vocabulary
    projection, initialised like the real head (from the pretrained head when
    loading a checkpoint, a "logit lens" start).

    ``rank``: a low-rank projection d -> rank -> V (``proj`` is then a Sequential of two
    linear maps), about d / rank times cheaper than d x V when rank << d; from a pretrained
    head it starts at the best rank-``rank`` approximation (truncated SVD)."""

    def __init__(self, config, stage_id, init_seed=0, pretrained=None, rank=None):
        super().__init__()
        self.stage_id = stage_id
        self.seed_name = f"aux_head.{stage_id}"
        self.rank = rank
        self.norm = _final_norm(config)
        d, V = config.hidden_size, config.vocab_size
        if rank is None:
            self.proj = nn.Linear(d, V, bias=False)
        else:
            if not (isinstance(rank, int) and 1 <= rank < d):
                raise ValueError(f"aux head rank must be an integer in 1..{d - 1} (the hidden size), got {rank!r}")
            self.proj = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, V, bias=False))
        self._finish_init(config, init_seed, pretrained)

    def init_weights(self, config, generator):
        super().init_weights(config, generator)
        if self.rank is not None:   # keep the bottleneck at unit scale, so the logits start like the full head's
            with torch.no_grad():
                self.proj[0].weight.normal_(0.0, config.hidden_size ** -0.5, generator=generator)

    def _load_hf(self, hf_model):
        self.norm.load_state_dict(_hf_final_norm(hf_model).state_dict())
        weight = hf_model.get_output_embeddings().weight
        if self.rank is None:
            self.proj.weight.copy_(weight)
            return
        u, sv, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = sv[:self.rank].sqrt()
        self.proj[0].weight.copy_(root[:, None] * vh[:self.rank])
        self.proj[1].weight.copy_(u[:, :self.rank] * root[None, :])

    def forward(self, hidden):
        return self.proj(self.norm(hidden))
