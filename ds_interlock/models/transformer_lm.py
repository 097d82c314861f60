"""A decoder-only Transformer LM as a flat list of DeepSpeed pipeline layers.

Layout of `build_lm(...).layers` (N = number of decoder layers):

    0       TokenEmbedding          input_ids [B, T] -> hidden [B, T, d]
    (1)     GPT2Positions           GPT-2 only: + learned positions, dropout
    ...     <Arch>DecoderPipe x N   hidden -> hidden
    -2      FinalNorm               hidden -> normed hidden
    -1      VocabProjection         -> logits [B, T, V]
            (or, with tie_embeddings, the TiedLayerSpec 'embed' again, projecting
            with the embedding matrix through `forward_fn`)

`partition_method='type:<Arch>DecoderPipe'` gives every stage the same number of
decoder layers; the embedding layers stay on stage 0 and the head on the last stage.

Labels are aligned with the logits: labels[:, t] is the token that should follow
input_ids[:, t] (the data pipeline shifts; this loss does not).
"""

import copy
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .lm_layers import (AuxLMHead, FinalNorm, GPT2DecoderPipe, GPT2Positions, LlamaDecoderPipe,
                        TokenEmbedding, VocabProjection, project_with_embedding)
from .lm_presets import arch_of, make_config, resolve_size, set_attn_implementation

IGNORE_INDEX = -100
TIED_EMBEDDING_KEY = "embed"
DECODER_CLASSES = {"gpt2": GPT2DecoderPipe, "llama": LlamaDecoderPipe}


def lm_loss(logits, labels):
    """Token-mean cross entropy over labels != -100 (in fp32 for bf16 logits).
    A micro-batch with no counted token gives 0, not NaN."""
    total = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


class AuxHeadFactory:
    """`aux_head(stage_id)` -> a fresh `AuxLMHead` for that stage boundary.

    With tie_embeddings the aux heads still have their own projection: the
    embedding lives on stage 0 and the last stage only, and DeepSpeed ties weights
    only between pipeline layers, not modules the engine adds to a stage.
    """

    def __init__(self, config, init_seed=0, pretrained=None, rank=None):
        self.config = config
        self.init_seed = init_seed
        self.pretrained = pretrained
        self.rank = rank            # None: a full d x V projection; r: low-rank d -> r -> V

    def __call__(self, stage_id):
        if not isinstance(stage_id, int) or stage_id < 0:
            raise ValueError(f"stage_id must be a non-negative int, got {stage_id!r}")
        return AuxLMHead(self.config, stage_id, init_seed=self.init_seed,
                         pretrained=self.pretrained, rank=self.rank)


@dataclass
class LMParts:
    layers: list                 # PipelineModule(layers=...)
    loss_fn: Callable            # loss_fn(logits, labels); also the aux loss
    aux_head: AuxHeadFactory     # aux_head(stage_id) -> nn.Module, hidden -> logits
    config: PretrainedConfig     # the HF config every layer was built from
    num_decoder_layers: int
    partition_method: str        # 'type:<Arch>DecoderPipe'
    arch: str                    # 'gpt2' | 'llama'
    tie_embeddings: bool


def _resolve_config(preset_or_config, arch, vocab_size, seq_len, num_layers, dropout,
                    attn_implementation, pretrained):
    if pretrained is not None:
        if preset_or_config is not None:
            raise ValueError("give either preset_or_config or pretrained, not both")
        config = AutoConfig.from_pretrained(pretrained, local_files_only=True)
        arch_of(config)
        if vocab_size not in (None, config.vocab_size):
            raise ValueError(f"vocab_size {vocab_size} differs from the checkpoint's "
                             f"{config.vocab_size}")
        if seq_len is not None and seq_len > config.max_position_embeddings:
            raise ValueError(f"seq_len {seq_len} exceeds the checkpoint's "
                             f"max_position_embeddings {config.max_position_embeddings}")
        if num_layers is not None and num_layers > config.num_hidden_layers:
            raise ValueError(f"num_layers {num_layers} exceeds the checkpoint's "
                             f"{config.num_hidden_layers} layers")
        seq_len = vocab_size = None  # the checkpoint's shapes must stay
    elif preset_or_config is None or isinstance(preset_or_config, str):
        size = resolve_size(preset_or_config or "tiny", num_layers, vocab_size, seq_len)
        return make_config(size, arch or "gpt2", dropout, attn_implementation)
    elif isinstance(preset_or_config, PretrainedConfig):
        config = copy.deepcopy(preset_or_config)  # never edit the caller's config
    else:
        raise ValueError("preset_or_config must be a preset name or a GPT2Config/LlamaConfig, "
                         f"got {type(preset_or_config).__name__}")
    if arch is not None and arch != arch_of(config):
        raise ValueError(f"arch {arch!r} does not match config type {type(config).__name__}")
    # attribute_map makes these names work for GPT2Config too.
    for name, value in (("vocab_size", vocab_size), ("max_position_embeddings", seq_len),
                        ("num_hidden_layers", num_layers)):
        if value is not None:
            setattr(config, name, value)
    set_attn_implementation(config, attn_implementation)
    return config


def build_lm(preset_or_config=None, arch=None, vocab_size=None, seq_len=None,
             tie_embeddings=None, num_layers=None, *, attn_implementation="sdpa",
             dropout=0.0, init_seed=0, pretrained=None, aux_head_rank=None):
    """Build the pipeline layers, loss and aux-head factory of a decoder-only LM.

    preset_or_config: 'tiny' (CPU tests), 'small' (CPU experiments), 'paper'
        (d_model 1024, 16 heads, 12 layers: the paper did not publish its size,
        this is a guess at its scale), or a GPT2Config / LlamaConfig (copied, random
        init). None means 'tiny', or the checkpoint when `pretrained` is given.
    arch: 'gpt2' or 'llama' for presets (default 'gpt2'); inferred from a config.
    vocab_size, seq_len, num_layers: override the preset / config. seq_len is the
        maximum sequence length (GPT-2's position table).
    tie_embeddings: tie the output projection to the token embedding via
        TiedLayerSpec(TIED_EMBEDDING_KEY); None follows config.tie_word_embeddings
        (False for presets). Aux heads keep their own projection either way.
    attn_implementation: 'sdpa' (causal kernel) or 'eager' (explicit mask).
    dropout: presets only (resid/embd/attn dropout); a given config keeps its own.
    init_seed: per-layer seeded init, identical for any partition; None = global RNG.
    pretrained: local directory from `save_pretrained` (GPT-2 or Llama causal LM);
        weights are copied into the layers and the aux heads start from its head.
    aux_head_rank: None for aux heads with a full d x V projection, or r for a cheaper
        low-rank d -> r -> V one (AuxLMHead).
    """
    config = _resolve_config(preset_or_config, arch, vocab_size, seq_len, num_layers,
                             dropout, attn_implementation, pretrained)
    arch = arch_of(config)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden size {config.hidden_size} is not divisible by "
                         f"{config.num_attention_heads} heads")
    n_layers = config.num_hidden_layers
    if tie_embeddings is None:
        tie_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    config.tie_word_embeddings = tie_embeddings

    common = dict(init_seed=init_seed, pretrained=pretrained)
    if tie_embeddings:
        layers = [TiedLayerSpec(TIED_EMBEDDING_KEY, TokenEmbedding, config, **common)]
    else:
        layers = [LayerSpec(TokenEmbedding, config, **common)]
    if arch == "gpt2":
        layers.append(LayerSpec(GPT2Positions, config, **common))
    decoder_cls = DECODER_CLASSES[arch]
    layers += [LayerSpec(decoder_cls, config, i, **common) for i in range(n_layers)]
    layers.append(LayerSpec(FinalNorm, config, **common))
    if tie_embeddings:
        layers.append(TiedLayerSpec(TIED_EMBEDDING_KEY, TokenEmbedding, config,
                                    forward_fn=project_with_embedding, **common))
    else:
        layers.append(LayerSpec(VocabProjection, config, **common))

    return LMParts(layers=layers, loss_fn=lm_loss,
                   aux_head=AuxHeadFactory(config, init_seed, pretrained, rank=aux_head_rank),
                   config=config, num_decoder_layers=n_layers,
                   partition_method=f"type:{decoder_cls.__name__}", arch=arch,
                   tie_embeddings=tie_embeddings)


class SequentialLM(nn.Module):
    """All `layers` built in one process, run in order: what a one-stage
    PipelineModule does (tied specs share one module), for tests, evaluation and
    single-process baselines. `forward(x, start, stop)` runs layers[start:stop]."""

    def __init__(self, layers):
        super().__init__()
        self.built = nn.ModuleList()
        self.tied = nn.ModuleDict()
        self._funcs = []
        for spec in layers:
            if isinstance(spec, TiedLayerSpec):
                if spec.key not in self.tied:
                    self.tied[spec.key] = spec.build()
                module = self.tied[spec.key]
                func = partial(spec.forward_fn, module) if spec.forward_fn else module
            elif isinstance(spec, LayerSpec):
                module = spec.build()
                self.built.append(module)
                func = module
            elif isinstance(spec, nn.Module):
                self.built.append(spec)
                func = spec
            else:
                func = spec
            self._funcs.append(func)

    def __len__(self):
        return len(self._funcs)

    def forward(self, x, start=0, stop=None):
        for func in self._funcs[start:stop]:
            x = func(x)
        return x
