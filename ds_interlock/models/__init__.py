"""Transformer LMs laid out as DeepSpeed pipeline layers (see transformer_lm)."""

from .lm_layers import (AuxLMHead, FinalNorm, GPT2DecoderPipe, GPT2Positions, LlamaDecoderPipe,
                        TokenEmbedding, VocabProjection, clear_pretrained_cache,
                        project_with_embedding)
from .lm_presets import PRESETS, LMSize
from .transformer_lm import (IGNORE_INDEX, TIED_EMBEDDING_KEY, AuxHeadFactory, LMParts,
                             SequentialLM, build_lm, lm_loss)

__all__ = [
    "AuxHeadFactory", "AuxLMHead", "FinalNorm", "GPT2DecoderPipe", "GPT2Positions",
    "IGNORE_INDEX", "LMParts", "LMSize", "LlamaDecoderPipe", "PRESETS", "SequentialLM",
    "TIED_EMBEDDING_KEY", "TokenEmbedding", "VocabProjection", "build_lm",
    "clear_pretrained_cache", "lm_loss", "project_with_embedding",
]
