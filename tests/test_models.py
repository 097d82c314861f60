"""The LM laid out as pipeline layers: shapes, equivalence with the HF models,
causality, aux heads, weight tying, partitioning, presets. Single process."""

import copy
import math
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.utils import partition_balanced
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from ds_interlock.models import (PRESETS, TIED_EMBEDDING_KEY, SequentialLM, build_lm, clear_pretrained_cache, lm_loss)

ARCHS = ["gpt2", "llama"]
HF_CLASSES = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}
B, T = 2, 24


def random_ids(vocab, seed=0, shape=(B, T)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def hf_reference(parts, attn_implementation):
    """A HF *ForCausalLM from the same config (its own random init)."""
    config = copy.deepcopy(parts.config)
    config._attn_implementation = attn_implementation
    torch.manual_seed(123)
    return HF_CLASSES[parts.arch](config).eval()


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    parts = build_lm("tiny", arch=request.param)
    return parts, SequentialLM(parts.layers).eval()


def test_shapes_through_every_layer(tiny):
    parts, model = tiny
    V, d = parts.config.vocab_size, parts.config.hidden_size
    x = random_ids(V)
    assert x.dtype == torch.long
    for i in range(len(model)):
        x = model(x, start=i, stop=i + 1)
        if i < len(model) - 1:
            assert x.shape == (B, T, d) and x.dtype == torch.float32, i
    assert x.shape == (B, T, V)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("ours, theirs", [("sdpa", "eager"), ("eager", "sdpa"), ("sdpa", "sdpa")])
def test_matches_hf_model(arch, ours, theirs):
    parts = build_lm("tiny", arch=arch, attn_implementation=ours)
    model = SequentialLM(parts.layers).eval()
    ref = hf_reference(parts, theirs)
    ids = random_ids(parts.config.vocab_size, seed=1)
    with torch.no_grad():
        expected = ref(ids).logits
        before = model(ids)
        for layer in model.built:
            layer.load_hf(ref)
        got = model(ids)
    assert (before - expected).abs().max() > 1e-2  # the comparison can fail
    err = (got - expected).abs().max().item()
    print(f"{arch} ours={ours} hf={theirs}: max |logit diff| = {err:.2e}")
    assert err < 1e-5
    labels = random_ids(parts.config.vocab_size, seed=2)
    assert lm_loss(got, labels).item() == pytest.approx(
        F.cross_entropy(expected.flatten(0, 1), labels.flatten()).item(), abs=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_tied_model_matches_hf(arch):
    parts = build_lm("tiny", arch=arch, tie_embeddings=True)
    model = SequentialLM(parts.layers).eval()
    ref = hf_reference(parts, "eager")
    assert ref.get_output_embeddings().weight is ref.get_input_embeddings().weight
    ids = random_ids(parts.config.vocab_size, seed=3)
    with torch.no_grad():
        for layer in model.built:
            layer.load_hf(ref)
        model.tied[TIED_EMBEDDING_KEY].load_hf(ref)
        assert (model(ids) - ref(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal(tiny, attn):
    parts, _ = tiny
    parts = build_lm(parts.config, attn_implementation=attn)
    model = SequentialLM(parts.layers).eval()
    ids = random_ids(parts.config.vocab_size, seed=4)
    changed = ids.clone()
    t = 10
    changed[:, t] = (changed[:, t] + 1) % parts.config.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=(0, 2)).min() > 1e-4


def test_aux_heads(tiny):
    parts, model = tiny
    V = parts.config.vocab_size
    ids, labels = random_ids(V, seed=5), random_ids(V, seed=6)
    first_decoder = 2 if parts.arch == "gpt2" else 1
    with torch.no_grad():
        hidden = model(ids, stop=first_decoder + 2)  # a boundary after 2 decoder layers
    heads = [parts.aux_head(s) for s in range(3)]
    for head in heads:
        logits = head(hidden)
        assert logits.shape == (B, T, V)
        loss = parts.loss_fn(logits, labels)
        assert torch.isfinite(loss) and abs(loss.item() - math.log(V)) < 0.1
        loss.backward()
        assert all(p.grad is not None for p in head.parameters())
    # own seed per stage, reproducible on whichever rank builds it
    assert not torch.equal(heads[0].proj.weight, heads[1].proj.weight)
    assert torch.equal(heads[2].proj.weight, parts.aux_head(2).proj.weight)
    # initialised like the real head
    real = model.built[-1].proj.weight
    assert heads[0].proj.weight.std().item() == pytest.approx(real.std().item(), rel=0.05)
    with pytest.raises(ValueError):
        parts.aux_head(-1)


def test_real_loss_near_log_vocab_at_init(tiny):
    parts, model = tiny
    V = parts.config.vocab_size
    loss = parts.loss_fn(model(random_ids(V, seed=7)), random_ids(V, seed=8))
    assert abs(loss.item() - math.log(V)) < 0.1


def test_loss_ignores_minus_100():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert lm_loss(logits, labels).item() == pytest.approx(expected.item())
    assert lm_loss(logits, torch.full_like(labels, -100)).item() == 0.0
    assert lm_loss(logits.bfloat16(), labels).dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_gets_a_gradient(arch):
    parts = build_lm("tiny", arch=arch, tie_embeddings=True, num_layers=2)
    model = SequentialLM(parts.layers)
    V = parts.config.vocab_size
    parts.loss_fn(model(random_ids(V)), random_ids(V, seed=1)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_tie_shares_the_weight_in_one_process():
    parts = build_lm("tiny", arch="llama", tie_embeddings=True)
    first, last = parts.layers[0], parts.layers[-1]
    assert isinstance(first, TiedLayerSpec) and isinstance(last, TiedLayerSpec)
    assert first.key == last.key == TIED_EMBEDDING_KEY and last.forward_fn is not None
    model = SequentialLM(parts.layers)
    params = list(model.parameters())
    embedding = model.tied[TIED_EMBEDDING_KEY]
    assert sum(p is embedding.weight for p in params) == 1
    assert not any(p.shape == embedding.weight.shape and p is not embedding.weight
                   for p in params)
    # both uses feed the one weight: gradient = input-side part + output-side part
    V = parts.config.vocab_size
    ids = random_ids(V)
    parts.loss_fn(model(ids), random_ids(V, seed=1)).backward()
    unused_rows = torch.ones(V, dtype=torch.bool)
    unused_rows[ids.unique()] = False
    assert embedding.weight.grad[unused_rows].abs().sum() > 0  # from the projection
    untied = build_lm("tiny", arch="llama")
    assert all(type(s) is LayerSpec for s in untied.layers)
    assert not untied.tie_embeddings


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tie_inside_a_real_pipeline_module():
    """DeepSpeed's own PipelineModule (one stage, world size 1, gloo): one
    tied module, used by the first layer and, through forward_fn, the last."""
    script = textwrap.dedent("""
        import torch, deepspeed
        from deepspeed.pipe import PipelineModule
        from ds_interlock.models import build_lm, SequentialLM, TIED_EMBEDDING_KEY
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        parts = build_lm("tiny", arch="gpt2", tie_embeddings=True)
        module = PipelineModule(layers=parts.layers, num_stages=1, loss_fn=parts.loss_fn,
                                partition_method=parts.partition_method)
        tied = module.tied_modules[TIED_EMBEDDING_KEY]
        assert module.forward_funcs[0] is tied
        assert module.forward_funcs[-1].args[0] is tied
        ids = torch.randint(0, parts.config.vocab_size, (2, 16))
        reference = SequentialLM(parts.layers)
        assert torch.equal(module(ids), reference(ids))  # same seeded init
        print("OK", len(module.forward_funcs))
    """)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 8" in result.stdout  # embed, positions, 4 decoders, norm, tied head


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_stages", [1, 2, 4])
def test_partition_method_balances_decoder_layers(arch, num_stages):
    parts = build_lm("tiny", arch=arch, num_layers=8)
    method = parts.partition_method.lower()  # as PipelineModule reads it
    assert method.startswith("type:")
    # DeepSpeed's own layer-type matcher and balancer
    fake = SimpleNamespace(_layer_specs=parts.layers)
    decoder_idx = PipelineModule._find_layer_type(fake, method.split(":")[1])
    assert len(decoder_idx) == parts.num_decoder_layers == 8
    assert all(parts.layers[i].typename.__name__.endswith("DecoderPipe") for i in decoder_idx)
    weights = [int(i in decoder_idx) for i in range(len(parts.layers))]
    bounds = partition_balanced(weights, num_stages)
    per_stage = [sum(weights[bounds[s]:bounds[s + 1]]) for s in range(num_stages)]
    assert per_stage == [8 // num_stages] * num_stages
    assert bounds[0] == 0 and bounds[1] > decoder_idx[0]  # embeddings on stage 0
    assert bounds[-2] <= decoder_idx[-1] and bounds[-1] == len(parts.layers)


def test_presets():
    assert {"tiny", "small", "paper"} <= set(PRESETS)
    assert PRESETS["tiny"].d_model == 64 and PRESETS["tiny"].num_layers == 4
    for arch in ARCHS:  # specs only: nothing is built, so 'paper' is cheap here
        paper = build_lm("paper", arch=arch)
        assert paper.config.hidden_size == 1024 and paper.config.num_attention_heads == 16
        assert 8 <= paper.num_decoder_layers <= 16
        small = build_lm("small", arch=arch, vocab_size=1000, seq_len=96)
        assert 128 <= small.config.hidden_size <= 256
        assert small.config.vocab_size == 1000 and small.config.max_position_embeddings == 96
    assert "did not publish" in build_lm.__doc__
    with pytest.raises(ValueError, match="preset"):
        build_lm("huge")
    with pytest.raises(ValueError, match="arch"):
        build_lm("tiny", arch="bert")


def test_config_input_is_copied_and_arch_inferred():
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                         max_position_embeddings=32)
    parts = build_lm(config, num_layers=3)
    assert parts.arch == "llama" and parts.num_decoder_layers == 3
    assert config.num_hidden_layers == 2  # caller's config untouched
    model = SequentialLM(parts.layers)
    assert model(random_ids(100, shape=(1, 8))).shape == (1, 8, 100)  # grouped-query attention
    with pytest.raises(ValueError, match="arch"):
        build_lm(config, arch="gpt2")


def test_seeded_init_is_per_layer_and_like_hf():
    a = SequentialLM(build_lm("tiny", arch="gpt2").layers)
    b_parts = build_lm("tiny", arch="gpt2")
    decoder_3 = b_parts.layers[2 + 3].build()  # built alone, as on a later stage
    assert torch.equal(decoder_3.block.attn.c_attn.weight, a.built[5].block.attn.c_attn.weight)
    assert not torch.equal(a.built[2].block.attn.c_attn.weight, a.built[3].block.attn.c_attn.weight)
    block = a.built[2].block
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.ln_1.weight == 1)


def test_llama_runs_in_bf16():
    parts = build_lm("tiny", arch="llama")
    model = SequentialLM(parts.layers).eval()
    ids = random_ids(parts.config.vocab_size)
    with torch.no_grad():
        full = model(ids)
        model.to(torch.bfloat16)
        half = model(ids)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05


@pytest.mark.parametrize("arch, tie", [("gpt2", False), ("llama", True)])
def test_load_local_pretrained_dir(tmp_path, arch, tie):
    parts = build_lm("tiny", arch=arch, num_layers=2, tie_embeddings=tie)
    ref = hf_reference(parts, "sdpa")
    ref.save_pretrained(tmp_path)
    try:
        loaded = build_lm(pretrained=str(tmp_path))
        model = SequentialLM(loaded.layers).eval()
        head = loaded.aux_head(0)
    finally:
        clear_pretrained_cache()
    assert loaded.arch == arch and loaded.tie_embeddings == tie
    assert isinstance(loaded.layers[-1], TiedLayerSpec) == tie
    ids = random_ids(parts.config.vocab_size, seed=9)
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() < 1e-5
    # aux heads start as copies of the pretrained head (norm + projection)
    assert torch.equal(head.proj.weight, ref.get_output_embeddings().weight)
    with torch.no_grad():  # the trunk's output through the aux head = the real logits
        assert torch.allclose(head(model(ids, stop=-2)), model(ids), atol=1e-6)
    with pytest.raises(ValueError, match="vocab_size"):
        build_lm(pretrained=str(tmp_path), vocab_size=7)


def test_low_rank_aux_head_is_cheaper_and_starts_like_the_full_one(tmp_path):
    parts = build_lm("tiny", num_layers=2, aux_head_rank=8)
    full, cheap = build_lm("tiny", num_layers=2).aux_head(0), parts.aux_head(0)
    d, V = parts.config.hidden_size, parts.config.vocab_size
    assert sum(p.numel() for p in cheap.proj.parameters()) == 8 * (d + V) < d * V
    hidden = torch.randn(2, 5, d)
    with torch.no_grad():
        a, b = full(hidden), cheap(hidden)
    assert a.shape == b.shape == (2, 5, V)
    assert 0.3 < (b.std() / a.std()).item() < 3        # logits start at a comparable scale
    with pytest.raises(ValueError, match="aux head rank"):
        build_lm("tiny", aux_head_rank=0).aux_head(0)
    # from a pretrained head: the best rank-r approximation (truncated SVD)
    ref = hf_reference(build_lm("tiny", num_layers=2), "sdpa")
    ref.save_pretrained(tmp_path)
    try:
        head = build_lm(pretrained=str(tmp_path), aux_head_rank=8).aux_head(0)
    finally:
        clear_pretrained_cache()
    weight = ref.get_output_embeddings().weight.detach()
    approx = head.proj[1].weight @ head.proj[0].weight
    u, sv, vh = torch.linalg.svd(weight, full_matrices=False)
    best = (u[:, :8] * sv[:8]) @ vh[:8]
    assert torch.allclose(approx, best, atol=1e-5)
