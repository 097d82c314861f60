"""Export a checkpoint of examples/train_lm.py to a Hugging Face causal LM directory.

    python -m ds_interlock.export --checkpoint runs/ckpt --out runs/hf_model \\
        [--tag global_step500] [--tokenizer ~/.cache/ds_interlock/tokenizer/spm-....model] [--head S] \\
        [--model tiny --arch gpt2 --num_layers 4 --vocab_size 32000 --seq_len 64 --tie_embeddings --num_stages 4]

The result (GPT2LMHeadModel or LlamaForCausalLM: config.json + model.safetensors, and with
--tokenizer a tokenizer.json) loads with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``; nothing of ds_interlock is needed to use it.

Both checkpoint layouts of train_lm are read:
- a multi-process pipeline launch: ``<tag>/layer_XX-model_states.pt``, one state dict per pipeline
  layer as DeepSpeed's PipelineModule writes it (a tied projection has no file of its own), and
  ``<tag>/aux_head_XX-model_states.pt`` per stage head (ds_interlock.module);
- ``--single_process``: ``<tag>/mp_rank_00_model_states.pt`` whose "module" holds
  ``stages.<s>.<layer index>.<param>``, ``stages.<s>.tied_modules.embed.<param>`` and
  ``aux_heads.<s>.<param>`` (ds_interlock.inprocess._Model).

Model flags: the checkpoint does not record its configuration. The flags are train_lm's and
must match the training run; a flag left out is taken from the checkpoint's tensors (vocabulary,
width and so the preset, architecture, decoder layers, tying, stages, GPT-2's sequence length),
and where the tensors cannot tell (Llama's sequence length) from the preset. A given flag that
contradicts the checkpoint is an error that names the file and the mismatch. --vocab_size is
train_lm's *requested* size: the checkpoint's vocabulary may be smaller (a small corpus).

--head S exports the shallower LM that aux head S ends: the decoder layers of stages 0..S (the
partition train_lm uses, ``partition_method='type:<Arch>DecoderPipe'``) followed by aux head S's
norm and projection, as a model of the same class with fewer layers (never tied: aux heads own
their projection).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import pickle
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

PathLike = Union[str, os.PathLike]
SINGLE_FILE = "mp_rank_00_model_states.pt"
LAYER_FILE = re.compile(r"^layer_(\d+)-(.*)model_states\.pt$")
AUX_FILE = re.compile(r"^aux_head_(\d+)-model_states\.pt$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_INFO = "ds_interlock_export.json"


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (missing files, flags that do not fit)."""


@dataclass
class ModelFlags:
    """train_lm's model flags; None = not given (taken from the checkpoint, else the preset)."""

    model: Optional[str] = None
    arch: Optional[str] = None
    num_layers: Optional[int] = None
    vocab_size: Optional[int] = None      # requested size: the checkpoint's may be smaller
    seq_len: Optional[int] = None
    tie_embeddings: Optional[bool] = None
    num_stages: Optional[int] = None


# ----------------------------------------------------------------------------- reading

@dataclass
class RawCheckpoint:
    """The tensors of one checkpoint tag, not yet matched to a model."""

    tag_dir: Path
    layout: str                                   # "pipeline" | "single_process"
    layers: dict = field(default_factory=dict)    # pipeline layer index -> state dict
    tied: dict = field(default_factory=dict)      # single_process: stage -> {tied key: state dict}
    stage_layers: dict = field(default_factory=dict)   # single_process: stage -> [layer indices]
    heads: dict = field(default_factory=dict)     # stage -> aux head state dict
    sources: dict = field(default_factory=dict)   # ("layer", i) / ("head", s) / ("tied", s, key) -> where

    @property
    def num_stages(self) -> int:
        if self.layout == "single_process":
            return len(self.stage_layers)
        return len(self.heads) + 1   # train_lm gives every stage but the last an aux head

    def where(self, *key: Any) -> str:
        return self.sources.get(key, str(self.tag_dir))


def resolve_tag_dir(checkpoint: PathLike, tag: Optional[str] = None) -> Path:
    """The directory of one saved step: ``checkpoint/tag``, ``checkpoint/<latest>``, or checkpoint itself."""
    root = Path(checkpoint).expanduser()
    if not root.is_dir():
        raise ExportError(f"checkpoint directory not found: {root}")
    if tag is None:
        latest = root / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
        elif _holds_model_files(root):
            return root
        else:
            tags = sorted(p.name for p in root.iterdir() if p.is_dir() and _holds_model_files(p))
            raise ExportError(f"{root} has no 'latest' file; pass --tag (saved tags: {', '.join(tags) or 'none'})")
    tag_dir = root / tag
    if not tag_dir.is_dir():
        raise ExportError(f"checkpoint tag {tag!r} not found: {tag_dir}")
    return tag_dir


def _holds_model_files(d: Path) -> bool:
    return (d / SINGLE_FILE).is_file() or any(LAYER_FILE.match(p.name) for p in d.iterdir())


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Unpickling arbitrary objects can run code: a file we did not write is refused, not trusted.
        raise ExportError(f"{path} holds objects other than tensors and plain containers; refusing to "
                          f"unpickle it (torch.load weights_only=True said: {str(exc).splitlines()[0]})") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None


def read_checkpoint(checkpoint: PathLike, tag: Optional[str] = None) -> RawCheckpoint:
    """Read the model tensors of either train_lm layout (the pipeline one when layer files exist)."""
    tag_dir = resolve_tag_dir(checkpoint, tag)
    if any(LAYER_FILE.match(p.name) for p in tag_dir.iterdir()):
        return _read_pipeline(tag_dir)
    if (tag_dir / SINGLE_FILE).is_file():
        return _read_single(tag_dir)
    raise ExportError(f"{tag_dir} holds neither layer_XX-model_states.pt files (a pipeline launch) "
                      f"nor {SINGLE_FILE} (--single_process)")


def _read_pipeline(tag_dir: Path) -> RawCheckpoint:
    raw = RawCheckpoint(tag_dir, "pipeline")
    for path in sorted(tag_dir.iterdir()):
        m, a = LAYER_FILE.match(path.name), AUX_FILE.match(path.name)
        if m:
            idx = int(m.group(1))
            if m.group(2) or idx in raw.layers:
                raise ExportError(f"{path}: a tensor- or model-parallel pipeline checkpoint (several files per "
                                  "layer) is not supported; train_lm writes one file per layer")
            raw.layers[idx] = _state_dict(_torch_load(path), path)
            raw.sources[("layer", idx)] = str(path)
        elif a:
            s = int(a.group(1))
            raw.heads[s] = _state_dict(_torch_load(path), path)
            raw.sources[("head", s)] = str(path)
    if sorted(raw.heads) != list(range(len(raw.heads))):
        raise ExportError(f"{tag_dir}: aux head files for stages {sorted(raw.heads)}; expected 0..S-2 "
                          "(one per stage but the last)")
    return raw


def _state_dict(obj: Any, path: Path) -> dict:
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ExportError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return obj


_SINGLE_KEY = re.compile(r"^stages\.(\d+)\.(?:(\d+)|tied_modules\.([^.]+))\.(.+)$")
_HEAD_KEY = re.compile(r"^aux_heads\.(\d+)\.(.+)$")


def _read_single(tag_dir: Path) -> RawCheckpoint:
    path = tag_dir / SINGLE_FILE
    state = _torch_load(path)
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict):
        raise ExportError(f"{path}: no 'module' state dict (a pipeline launch keeps its layers in "
                          "layer_XX-model_states.pt files, which are missing here)")
    raw = RawCheckpoint(tag_dir, "single_process")
    stage_layers: dict = {}
    for key, value in module.items():
        m, h = _SINGLE_KEY.match(key), _HEAD_KEY.match(key)
        if m:
            s, idx, tied_key, param = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            stage_layers.setdefault(s, set())
            if idx is not None:
                stage_layers[s].add(int(idx))
                raw.layers.setdefault(int(idx), {})[param] = value
                raw.sources[("layer", int(idx))] = f"{path} [stages.{s}.{idx}.*]"
            else:
                raw.tied.setdefault(s, {}).setdefault(tied_key, {})[param] = value
                raw.sources[("tied", s, tied_key)] = f"{path} [stages.{s}.tied_modules.{tied_key}.*]"
        elif h:
            raw.heads.setdefault(int(h.group(1)), {})[h.group(2)] = value
            raw.sources[("head", int(h.group(1)))] = f"{path} [aux_heads.{h.group(1)}.*]"
        else:
            raise ExportError(f"{path}: unexpected key {key!r} in 'module' (expected stages.<s>.<layer>.* or "
                              "aux_heads.<s>.*)")
    if sorted(stage_layers) != list(range(len(stage_layers))) or not stage_layers:
        raise ExportError(f"{path}: stages {sorted(stage_layers)} in 'module'; expected 0..S-1")
    raw.stage_layers = {s: sorted(v) for s, v in stage_layers.items()}
    return raw


# ----------------------------------------------------------------------------- model flags

@dataclass
class Found:
    """What the checkpoint's tensors say about the model."""

    arch: str
    d_model: int
    vocab_size: int
    num_layers: int
    tie_embeddings: bool
    num_stages: int
    seq_len: Optional[int]     # GPT-2's position table; None for Llama (rotary)


def _embedding_state(raw: RawCheckpoint) -> tuple[dict, str]:
    if raw.layout == "single_process" and "embed" in raw.tied.get(0, {}):
        return raw.tied[0]["embed"], raw.where("tied", 0, "embed")
    if 0 not in raw.layers:
        raise ExportError(f"{raw.tag_dir}: no state for pipeline layer 0 (the token embedding)")
    return raw.layers[0], raw.where("layer", 0)


def inspect_checkpoint(raw: RawCheckpoint) -> Found:
    """Architecture and sizes from the tensors (see ModelFlags for what cannot be read)."""
    emb, where = _embedding_state(raw)
    if set(emb) != {"weight"} or emb["weight"].dim() != 2:
        raise ExportError(f"{where}: expected the token embedding (one 2-d 'weight'), got {sorted(emb)}")
    vocab, d_model = emb["weight"].shape
    layer_states = [raw.layers[i] for i in sorted(raw.layers)]
    gpt2 = sum(1 for sd in layer_states if any(k.startswith("block.") for k in sd))
    llama = sum(1 for sd in layer_states if any(k.startswith("layer.") for k in sd))
    if bool(gpt2) == bool(llama):
        raise ExportError(f"{raw.tag_dir}: cannot tell the architecture (GPT-2 blocks: {gpt2}, Llama layers: {llama})")
    arch = "gpt2" if gpt2 else "llama"
    seq_len = None
    if arch == "gpt2":
        pos = raw.layers.get(1, {})
        if "wpe.weight" not in pos:
            raise ExportError(f"{raw.where('layer', 1)}: expected GPT-2's position table 'wpe.weight', got {sorted(pos)}")
        seq_len = pos["wpe.weight"].shape[0]
    # An untied model has a VocabProjection layer ('proj.weight' alone); a tied one projects with the embedding.
    untied = any(set(sd) == {"proj.weight"} for sd in layer_states)
    return Found(arch=arch, d_model=d_model, vocab_size=vocab, num_layers=gpt2 or llama, tie_embeddings=not untied,
                 num_stages=raw.num_stages, seq_len=seq_len)


def resolve_flags(flags: ModelFlags, found: Found, where: str) -> ModelFlags:
    """All flags set: the given ones checked against the checkpoint, the others filled from it."""
    from .models import PRESETS

    problems = []

    def check(name: str, given: Any, actual: Any, what: str) -> Any:
        if given is not None and given != actual:
            problems.append(f"--{name} {given}, but the checkpoint has {what}")
        return actual

    arch = check("arch", flags.arch, found.arch, f"a {found.arch} model")
    num_layers = check("num_layers", flags.num_layers, found.num_layers, f"{found.num_layers} decoder layers")
    num_stages = check("num_stages", flags.num_stages, found.num_stages, f"{found.num_stages} stages")
    if flags.tie_embeddings is not None and flags.tie_embeddings != found.tie_embeddings:
        problems.append(f"--tie_embeddings is {'on' if flags.tie_embeddings else 'off'}, but the checkpoint's "
                        f"output projection is {'tied' if found.tie_embeddings else 'a separate layer'}")
    if flags.vocab_size is not None and found.vocab_size > flags.vocab_size:
        problems.append(f"--vocab_size {flags.vocab_size}, but the checkpoint's vocabulary has {found.vocab_size} "
                        "entries (train_lm's vocabulary is at most the requested size)")
    seq_len = flags.seq_len
    if found.seq_len is not None:
        seq_len = check("seq_len", flags.seq_len, found.seq_len, f"{found.seq_len} positions")
    model = flags.model
    if model is not None:
        if model not in PRESETS:
            problems.append(f"--model {model}: not a preset ({', '.join(PRESETS)})")
        elif PRESETS[model].d_model != found.d_model:
            problems.append(f"--model {model} has d_model {PRESETS[model].d_model}, but the checkpoint's is {found.d_model}")
    else:
        matches = [name for name, size in PRESETS.items() if size.d_model == found.d_model]
        if len(matches) != 1:
            problems.append(f"d_model {found.d_model} matches presets {matches or 'none'}; pass --model")
        else:
            model = matches[0]
    if problems:
        raise ExportError(f"{where} does not match the model flags:\n  - " + "\n  - ".join(problems)
                          + "\nPass the flags of the training run (examples/train_lm.py), or leave them out to "
                          "take them from the checkpoint.")
    if seq_len is None:
        seq_len = PRESETS[model].seq_len
    return ModelFlags(model=model, arch=arch, num_layers=num_layers, vocab_size=found.vocab_size, seq_len=seq_len,
                      tie_embeddings=found.tie_embeddings, num_stages=num_stages)


# ----------------------------------------------------------------------------- the model

@dataclass
class LMCheckpoint:
    """A train_lm checkpoint matched to its model: ``hf_model(head)`` builds any head's causal LM."""

    raw: RawCheckpoint
    flags: ModelFlags               # resolved: every field set
    layers: list                    # build_lm(...).layers: LayerSpec / TiedLayerSpec per pipeline layer
    parts: list                     # stage s owns layers parts[s]:parts[s+1] (train_lm's partition)
    config: Any                     # the HF config the layers were built from

    @property
    def num_stages(self) -> int:
        return len(self.parts) - 1

    @property
    def final_head(self) -> int:
        return self.num_stages - 1

    def decoder_layers(self, head: Optional[int] = None) -> int:
        """Decoder layers in front of `head` (None / the last stage: the whole model)."""
        stop = self.parts[self._stage(head) + 1]
        return sum(1 for spec in self.layers[:stop] if _role(spec) == "decoder")

    def describe(self) -> str:
        f = self.flags
        stages = ", ".join(f"{self.decoder_layers(s) - (self.decoder_layers(s - 1) if s else 0)}"
                           for s in range(self.num_stages))
        return (f"{self.raw.tag_dir} ({self.raw.layout.replace('_', '-')} layout): {f.arch} '{f.model}', "
                f"{f.num_layers} decoder layers, d_model {self.config.hidden_size}, vocab {f.vocab_size}, "
                f"seq_len {f.seq_len}, {'tied' if f.tie_embeddings else 'untied'} embeddings; "
                f"{self.num_stages} stages of [{stages}] decoder layers")

    def _stage(self, head: Optional[int]) -> int:
        if head is None:
            return self.final_head
        if not isinstance(head, int) or not 0 <= head <= self.final_head:
            raise ExportError(f"head {head!r} out of range: this checkpoint has heads 0..{self.final_head} "
                              f"({self.final_head} = the final head)")
        return head

    def state_of(self, idx: int) -> tuple[dict, str]:
        """Layer idx's state dict and where it came from (tied layers: the first owner's copy,
        as DeepSpeed's pipeline synchronises them on load)."""
        spec = self.layers[idx]
        key = getattr(spec, "key", None)
        if key is not None:
            first = next(i for i, sp in enumerate(self.layers) if getattr(sp, "key", None) == key)
            if self.raw.layout == "single_process":
                s = _stage_of(self.parts, first)
                state = self.raw.tied.get(s, {}).get(key)
                if state is None:
                    raise ExportError(f"{self.raw.tag_dir / SINGLE_FILE}: no stages.{s}.tied_modules.{key}.* for "
                                      f"tied layer {idx}")
                return state, self.raw.where("tied", s, key)
            idx = first
        if idx not in self.raw.layers:
            raise ExportError(f"{self.raw.tag_dir}: no state for pipeline layer {idx} ({_role(spec)}); "
                              f"the layer files present are {sorted(self.raw.layers)}")
        return self.raw.layers[idx], self.raw.where("layer", idx)

    def hf_model(self, head: Optional[int] = None, dtype: torch.dtype = torch.float32) -> nn.Module:
        """GPT2LMHeadModel / LlamaForCausalLM of the layers up to `head` (None: the final head)."""
        stage = self._stage(head)
        final = stage == self.final_head
        config = hf_config(self.config, self.decoder_layers(stage), tie=self.flags.tie_embeddings and final)
        model = _hf_class(self.flags.arch)(config)
        for idx in range(self.parts[stage + 1]):
            self._copy_layer(model, idx, final)
        if not final:
            where = self.raw.where("head", stage)
            if stage not in self.raw.heads:
                raise ExportError(f"{self.raw.tag_dir}: no aux head for stage {stage}")
            state = dict(self.raw.heads[stage])
            if "proj.0.weight" in state:      # a low-rank head (--aux_head_rank): one d x V matrix for HF
                state["proj.weight"] = state.pop("proj.1.weight").float() @ state.pop("proj.0.weight").float()
            _load_into(_hf_final_norm(model), state, "norm.", where, f"aux head {stage} norm")
            _load_into(model.get_output_embeddings(), state, "proj.", where, f"aux head {stage} projection")
            _no_leftovers(state, ("norm.", "proj."), where, f"aux head {stage}")
        if config.tie_word_embeddings:
            model.tie_weights()
        return model.to(dtype).eval()

    def _copy_layer(self, model: nn.Module, idx: int, final: bool) -> None:
        spec, role = self.layers[idx], _role(self.layers[idx])
        if role == "tied_projection":   # HF ties lm_head to the embedding; check the copy agrees
            self._check_tied_copy(idx)
            return
        if role in ("final_norm", "projection") and not final:
            return
        state, where = self.state_of(idx)
        base = model.base_model
        targets = {
            "embedding": (model.get_input_embeddings(), "", "token embedding"),
            "positions": (getattr(base, "wpe", None), "wpe.", "position table"),
            "final_norm": (_hf_final_norm(model), "norm.", "final norm"),
            "projection": (model.get_output_embeddings(), "proj.", "output projection"),
        }
        if role == "decoder":
            i = spec.module_args[1]
            blocks, prefix = (base.h, "block.") if self.flags.arch == "gpt2" else (base.layers, "layer.")
            targets["decoder"] = (blocks[i], prefix, f"decoder layer {i}")
        if role not in targets:
            raise ExportError(f"{where}: pipeline layer {idx} is a {role}, which the exporter does not know")
        module, prefix, what = targets[role]
        _load_into(module, state, prefix, where, f"pipeline layer {idx} ({what})")
        _no_leftovers(state, (prefix,), where, f"pipeline layer {idx} ({what})")

    def _check_tied_copy(self, idx: int) -> None:
        if self.raw.layout != "single_process":
            return   # DeepSpeed saves a tied module once, from its first owner
        s = _stage_of(self.parts, idx)
        key = self.layers[idx].key
        first, _ = self.state_of(idx)
        copy = self.raw.tied.get(s, {}).get(key)
        if copy is not None and copy is not first:
            diff = max((copy[k].float() - first[k].float()).abs().max().item() for k in first)
            if diff > 0:
                warnings.warn(f"{self.raw.where('tied', s, key)}: the last stage's copy of the tied embedding differs "
                              f"from stage 0's by up to {diff:.3g}; exporting stage 0's (what a reload synchronises to)")


def _role(spec: Any) -> str:
    from .models.lm_layers import (FinalNorm, GPT2DecoderPipe, GPT2Positions, LlamaDecoderPipe, TokenEmbedding,
                                   VocabProjection)

    typename = getattr(spec, "typename", None)
    if typename is TokenEmbedding:
        return "tied_projection" if getattr(spec, "forward_fn", None) is not None else "embedding"
    return {GPT2Positions: "positions", GPT2DecoderPipe: "decoder", LlamaDecoderPipe: "decoder",
            FinalNorm: "final_norm", VocabProjection: "projection"}.get(typename, getattr(typename, "__name__", "?"))


def _stage_of(parts: list, idx: int) -> int:
    return next(s for s in range(len(parts) - 1) if parts[s] <= idx < parts[s + 1])


def _hf_class(arch: str) -> type:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM
    return {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}[arch]


def _hf_final_norm(model: nn.Module) -> nn.Module:
    base = model.base_model
    return base.ln_f if hasattr(base, "ln_f") else base.norm


def hf_config(config: Any, num_layers: int, tie: bool) -> Any:
    """A copy of the layers' HF config for a model of `num_layers` decoder layers."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = num_layers     # attribute_map: n_layer for GPT-2
    config.tie_word_embeddings = tie
    return config


def _load_into(module: nn.Module, state: dict, prefix: str, where: str, what: str) -> None:
    """module.load_state_dict(state[prefix*]) with a message naming the file and the mismatch."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sub))
    extra = sorted(set(sub) - set(expected))
    shapes = [f"{prefix}{k}: checkpoint {tuple(sub[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if k in sub and sub[k].shape != v.shape]
    if missing or extra or shapes:
        lines = ([f"missing {', '.join(prefix + k for k in missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(prefix + k for k in extra)}"] if extra else []) + shapes
        raise ExportError(f"{where}: {what} does not fit the model built from the flags:\n  - " + "\n  - ".join(lines)
                          + "\nThe model flags (--model, --arch, --num_layers, --vocab_size, --seq_len, "
                          "--tie_embeddings, --num_stages) must be those of the training run.")
    with torch.no_grad():
        module.load_state_dict({k: v.to(expected[k].dtype) for k, v in sub.items()})


def _no_leftovers(state: dict, prefixes: Sequence[str], where: str, what: str) -> None:
    left = sorted(k for k in state if not k.startswith(tuple(prefixes)))
    if left:
        raise ExportError(f"{where}: {what} has tensors the model has no place for: {', '.join(left)}")


def load_checkpoint(checkpoint: PathLike, tag: Optional[str] = None,
                    flags: Optional[ModelFlags] = None) -> LMCheckpoint:
    """Read a train_lm checkpoint (either layout) and match it to its model (see ModelFlags)."""
    from .models import build_lm
    from .partition import partition

    raw = read_checkpoint(checkpoint, tag)
    resolved = resolve_flags(flags or ModelFlags(), inspect_checkpoint(raw), str(raw.tag_dir))
    parts_ = build_lm(resolved.model, arch=resolved.arch, vocab_size=resolved.vocab_size, seq_len=resolved.seq_len,
                      tie_embeddings=resolved.tie_embeddings, num_layers=resolved.num_layers)
    try:
        bounds = [int(b) for b in partition(parts_.layers, resolved.num_stages, parts_.partition_method)]
    except ValueError as exc:
        raise ExportError(f"{raw.tag_dir}: cannot split the model into {resolved.num_stages} stages: {exc}") from None
    ckpt = LMCheckpoint(raw=raw, flags=resolved, layers=parts_.layers, parts=bounds, config=parts_.config)
    _check_layout(ckpt)
    return ckpt


def _check_layout(ckpt: LMCheckpoint) -> None:
    """Every layer where the partition puts it, none missing or extra, one head per stage but the last."""
    raw, parts = ckpt.raw, ckpt.parts
    with_state = {i for i, spec in enumerate(ckpt.layers) if getattr(spec, "key", None) is None}
    if raw.layout == "single_process":
        for s, idxs in raw.stage_layers.items():
            wrong = [i for i in idxs if not parts[s] <= i < parts[s + 1]]
            if wrong:
                raise ExportError(f"{raw.tag_dir / SINGLE_FILE}: stage {s} holds layers {idxs}, but the partition of "
                                  f"the flags' model into {ckpt.num_stages} stages gives it {parts[s]}..{parts[s + 1] - 1}")
    else:   # a tied module is saved by the first layer that owns it, if that layer runs it plainly
        owners: dict = {}
        for i, spec in enumerate(ckpt.layers):
            key = getattr(spec, "key", None)
            if key is not None and key not in owners and getattr(spec, "forward_fn", None) is None:
                owners[key] = i
        with_state |= set(owners.values())
    present = set(raw.layers)
    missing, extra = sorted(with_state - present), sorted(present - with_state)
    if missing or extra:
        raise ExportError(f"{raw.tag_dir}: pipeline layers {missing} missing, {extra} unexpected, for the flags' model "
                          f"({len(ckpt.layers)} pipeline layers)")
    if sorted(raw.heads) != list(range(ckpt.num_stages - 1)):
        raise ExportError(f"{raw.tag_dir}: aux heads for stages {sorted(raw.heads)}; a {ckpt.num_stages}-stage "
                          f"train_lm run has one for each of stages 0..{ckpt.num_stages - 2}")


# ----------------------------------------------------------------------------- tokenizer

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _proto_fields(buf: bytes) -> dict:
    """Field number -> last value of a protobuf message (wire format; no protobuf package needed)."""
    out, i = {}, 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out[num] = value
    return out


def build_hf_tokenizer(spm_model: PathLike, model_max_length: Optional[int] = None) -> Any:
    """A `tokenizers`-backed HF tokenizer equal to a sentencepiece unigram model (train_lm's).

    Built from the model's pieces and scores and its normalizer (the precompiled charsmap read
    from the .model file), as transformers' SpmConverter does, so that ``AutoTokenizer`` loads it
    from tokenizer.json alone. Control pieces (<s>, </s>) are special tokens; nothing is added
    around a text (train_lm separates sentences with </s> and uses no <s>)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    path = Path(spm_model).expanduser()
    if not path.is_file():
        raise ExportError(f"sentencepiece model not found: {path}")
    data = path.read_bytes()
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
        proto = _proto_fields(data)
        trainer, norm = _proto_fields(proto.get(2, b"")), _proto_fields(proto.get(3, b""))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ExportError(f"{path}: not a sentencepiece model ({exc})") from None
    # TrainerSpec: model_type = 3 (1 unigram), byte_fallback = 35; NormalizerSpec: precompiled_charsmap = 2,
    # add_dummy_prefix = 3, remove_extra_whitespaces = 4 (both default true)
    if trainer.get(3, 1) != 1 or trainer.get(35, 0):
        raise ExportError(f"{path}: only unigram sentencepiece models without byte fallback are exported "
                          "(what train_lm trains)")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    steps = [normalizers.Precompiled(norm[2])] if norm.get(2) else []
    if norm.get(4, 1):
        steps += [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    scheme = "always" if norm.get(3, 1) else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), normalized=False, special=True)
                            for i in range(sp.get_piece_size()) if sp.is_control(i)])

    def piece(i: int) -> Optional[str]:
        return sp.id_to_piece(i) if i >= 0 else None

    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=piece(sp.unk_id()), bos_token=piece(sp.bos_id()),
                                   eos_token=piece(sp.eos_id()), **kwargs)


# ----------------------------------------------------------------------------- export

@dataclass
class ExportResult:
    out_dir: Path
    model_class: str
    head: int                 # the head exported (num_stages - 1 = the final one)
    num_stages: int
    num_layers: int           # decoder layers in the exported model
    tied: bool
    tokenizer: bool           # a tokenizer was saved too


def export_checkpoint(checkpoint: PathLike, out_dir: PathLike, *, tag: Optional[str] = None,
                      flags: Optional[ModelFlags] = None, tokenizer: Optional[PathLike] = None,
                      head: Optional[int] = None, dtype: Union[str, torch.dtype] = torch.float32) -> ExportResult:
    """Write a train_lm checkpoint (one head of it) as a transformers model directory.

    checkpoint: train_lm's --save_dir (or one tag directory in it); tag: default its 'latest'.
    flags: train_lm's model flags (see ModelFlags); None = all from the checkpoint.
    tokenizer: train_lm's sentencepiece .model, saved as tokenizer.json (its vocabulary must be the model's).
    head: None or num_stages-1 = the whole model; S < num_stages-1 = stages 0..S with aux head S.
    dtype: torch.float32 (default), bfloat16 or float16 (or their names).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"dtype {dtype!r} not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    ckpt = load_checkpoint(checkpoint, tag, flags)
    stage = ckpt._stage(head)
    tok = None
    if tokenizer is not None:
        tok = build_hf_tokenizer(tokenizer, model_max_length=ckpt.flags.seq_len)
        if len(tok) != ckpt.flags.vocab_size:
            raise ExportError(f"{tokenizer}: {len(tok)} pieces, but the checkpoint's vocabulary has "
                              f"{ckpt.flags.vocab_size}: not the tokenizer of this training run")
    model = ckpt.hf_model(stage, dtype=dtype)
    if tok is not None:
        # generation stops at the end of a sentence, train_lm's separator
        model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.eos_token_id
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tok is not None:
        tok.save_pretrained(out)
    result = ExportResult(out_dir=out, model_class=type(model).__name__, head=stage, num_stages=ckpt.num_stages,
                          num_layers=model.config.num_hidden_layers, tied=bool(model.config.tie_word_embeddings),
                          tokenizer=tok is not None)
    info = {"source": str(ckpt.raw.tag_dir), "layout": ckpt.raw.layout, "flags": asdict(ckpt.flags),
            "partition": ckpt.parts, **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}}
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return result


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """train_lm's model flags, all optional (None = from the checkpoint)."""
    from .models import PRESETS
    from .models.lm_presets import ARCHS

    m = parser.add_argument_group("model flags (those of the training run; left out = read from the checkpoint)")
    m.add_argument("--model", default=None, choices=sorted(PRESETS), help="size preset")
    m.add_argument("--arch", default=None, choices=ARCHS)
    m.add_argument("--num_layers", type=int, default=None, help="decoder layers")
    m.add_argument("--vocab_size", type=int, default=None,
                   help="requested sentencepiece vocabulary (the checkpoint's may be smaller)")
    m.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (Llama: default the preset's)")
    m.add_argument("--tie_embeddings", action="store_true", default=None,
                   help="the output projection was tied to the token embedding")
    m.add_argument("--num_stages", type=int, default=None, help="pipeline stages")


def flags_from_args(args: argparse.Namespace) -> ModelFlags:
    return ModelFlags(**{k: getattr(args, k) for k in asdict(ModelFlags())})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ds_interlock.export",
                                description="Export a train_lm checkpoint to a Hugging Face causal LM directory.")
    p.add_argument("--checkpoint", required=True, help="train_lm's --save_dir (or one tag directory in it)")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. global_step500; default: the 'latest' file")
    p.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--tokenizer", default=None,
                   help="train_lm's sentencepiece .model (train_lm prints its path; in <cache_dir>/tokenizer/)")
    p.add_argument("--head", type=int, default=None,
                   help="export aux head S (stages 0..S and its norm + projection); default: the final head")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype in the export")
    add_model_flags(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> ExportResult:
    args = build_parser().parse_args(argv)
    for name in ("num_layers", "vocab_size", "seq_len", "num_stages"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1")
    try:
        result = export_checkpoint(args.checkpoint, args.out, tag=args.tag, flags=flags_from_args(args),
                                   tokenizer=args.tokenizer, head=args.head, dtype=args.dtype)
    except ExportError as exc:
        raise SystemExit(f"error: {exc}") from None
    which = "final head" if result.head == result.num_stages - 1 else f"aux head {result.head}"
    print(f"exported {which} of {result.num_stages} as {result.model_class} ({result.num_layers} decoder layers, "
          f"{'tied' if result.tied else 'untied'} embeddings{', with tokenizer' if result.tokenizer else ''}) "
          f"to {result.out_dir}", flush=True)
    return result


__all__ = ["ExportError", "ExportResult", "LMCheckpoint", "ModelFlags", "RawCheckpoint", "build_hf_tokenizer",
           "export_checkpoint", "inspect_checkpoint", "load_checkpoint", "read_checkpoint", "resolve_flags",
           "resolve_tag_dir"]

if __name__ == "__main__":
    main(sys.argv[1:])
