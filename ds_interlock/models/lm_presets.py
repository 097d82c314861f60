"""Named model sizes and the `transformers` configs built from them."""

from dataclasses import dataclass, replace

from transformers import GPT2Config, LlamaConfig

ARCHS = ("gpt2", "llama")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class LMSize:
    d_model: int
    num_layers: int
    num_heads: int
    seq_len: int
    vocab_size: int


# 'paper': the interlocking paper trained a Transformer LM on One Billion Word with
# the d_model=1024 inverse-sqrt schedule, but did not publish the model size. 1024/16
# heads is the "Transformer big" width; 12 layers splits evenly into 2, 3, 4, 6 or 12
# stages. Vocabulary 32k is a typical sub-word vocabulary, not the paper's.
PRESETS = {
    "tiny": LMSize(d_model=64, num_layers=4, num_heads=4, seq_len=64, vocab_size=512),
    "small": LMSize(d_model=256, num_layers=8, num_heads=4, seq_len=128, vocab_size=8192),
    "paper": LMSize(d_model=1024, num_layers=12, num_heads=16, seq_len=256, vocab_size=32000),
}


def llama_ffn_size(d_model):
    # SwiGLU has three matrices: 8/3 * d keeps the MLP's parameter count equal to
    # GPT-2's 4 * d two-matrix MLP (rounded up to a multiple of 64).
    return -(-8 * d_model // 3 // 64) * 64


def resolve_size(preset, num_layers=None, vocab_size=None, seq_len=None):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    size = PRESETS[preset]
    changes = {k: v for k, v in
               dict(num_layers=num_layers, vocab_size=vocab_size, seq_len=seq_len).items()
               if v is not None}
    return replace(size, **changes)


def make_config(size, arch, dropout=0.0, attn_implementation="sdpa"):
    """A randomly initialisable HF config for `size` (dropout 0 by default: the
    pipeline engine may run a stage's forward more than once per micro-batch)."""
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=size.vocab_size, n_positions=size.seq_len, n_embd=size.d_model,
            n_layer=size.num_layers, n_head=size.num_heads,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=size.vocab_size, max_position_embeddings=size.seq_len,
            hidden_size=size.d_model, intermediate_size=llama_ffn_size(size.d_model),
            num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
            num_key_value_heads=size.num_heads, attention_dropout=dropout,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    set_attn_implementation(config, attn_implementation)
    return config


def set_attn_implementation(config, attn_implementation):
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                         f"got {attn_implementation!r}")
    config._attn_implementation = attn_implementation


def arch_of(config):
    if isinstance(config, GPT2Config):
        return "gpt2"
    if isinstance(config, LlamaConfig):
        return "llama"
    raise ValueError(f"unsupported config type {type(config).__name__}; "
                     "use GPT2Config or LlamaConfig")
