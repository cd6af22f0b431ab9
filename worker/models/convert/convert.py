"""SafeTensors folder → F16 GGUF, one tensor in memory at a time.

The tensor plan (names, shapes, dtypes) is made from the headers alone; the GGUF header and tensor infos are
written first, then each tensor is read, transformed, cast and written before the next one is touched.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from worker.models.convert.errors import ConvertError, read_json
from worker.models.convert.families import family_for
from worker.models.convert.family import Family, Hparams, Part
from worker.models.convert.safetensors import Checkpoint
from worker.models.convert.tokenizer import read_tokenizer, write_tokenizer

# HF tensors llama.cpp has no use for: precomputed rotary tables.
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
_F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]
    dtype: type
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class ConvertStats:
    architecture: str
    n_tensors: int
    source_bytes: int
    output_bytes: int
    seconds: float


def read_config(folder: Path) -> dict:
    config = read_json(folder / "config.json", "no config.json, so not a SafeTensors checkpoint folder")
    if not isinstance(config, dict):
        raise ConvertError(f"{folder / 'config.json'}: must be a JSON object, not {type(config).__name__}")
    check_numbers(config)
    return config


def check_numbers(config: dict, where: str = "config.json") -> None:
    """Refuses what llama.cpp would refuse at load, so that no unservable GGUF is written and cached: a number
    that is not finite (NaN, Infinity: Python's json reads them), a rope scaling factor that is not positive."""
    for key, value in config.items():
        if isinstance(value, dict):
            check_numbers(value, f"{where}: {key}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConvertError(f"{where}: {key} is {value}")
    factor = config.get("factor")
    if isinstance(config.get("rope_type", config.get("type")), str) and isinstance(factor, (int, float)) \
            and factor <= 0:
        raise ConvertError(f"{where}: factor is {factor}; a rope scaling factor must be positive")


def convert_checkpoint(folder: Path, out: Path, name: str | None = None) -> ConvertStats:
    """Write the checkpoint in `folder` as an F16 GGUF at `out` (1-D tensors in F32); `name` → general.name."""
    t0 = time.perf_counter()
    config = read_config(folder)
    family = family_for(config)
    hp = Hparams.from_config({**family.defaults, **config})
    check_requirements(family, hp)
    vocab = read_tokenizer(folder, hp.n_vocab)
    checkpoint = Checkpoint(folder)
    plan = plan_tensors(family, hp, checkpoint)

    writer = gguf.GGUFWriter(out, family.name)
    try:
        write_hparams(writer, family, hp, name=name or config.get("_name_or_path") or folder.name)
        write_tokenizer(writer, vocab, folder)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), t.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(t.produce())
    finally:
        writer.close()
    return ConvertStats(
        architecture=family.name,
        n_tensors=len(plan),
        source_bytes=sum(f.stat().st_size for f in checkpoint.files),
        output_bytes=out.stat().st_size,
        seconds=time.perf_counter() - t0,
    )


def check_requirements(family: Family, hp: Hparams) -> None:
    for key, want in family.requires.items():
        if (value := hp.get(key, want)) != want:
            raise ConvertError(f"config.json: {key} is {value!r}; llama.cpp's {family.name} implements only {want!r}")


def write_hparams(writer: gguf.GGUFWriter, family: Family, hp: Hparams, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_block_count(hp.n_layer)
    writer.add_context_length(hp.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    attention = {"add_head_count_kv": hp.n_head_kv, "add_key_length": hp.head_dim, "add_value_length": hp.head_dim,
                 "add_rope_dimension_count": hp.n_rot}
    for method, value in {**attention, **(family.attention(hp) if family.attention else {})}.items():
        getattr(writer, method)(value)
    writer.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    if hp.rope_theta is not None:
        writer.add_rope_freq_base(hp.rope_theta)
    if hp.n_expert:
        writer.add_expert_count(hp.n_expert)
        writer.add_expert_used_count(hp.get("num_experts_per_tok", 0))
    _write_rope_scaling(writer, family, hp)
    for key, method in family.config_keys.items():
        if (value := hp.get(key)) is not None:
            getattr(writer, method)(value)
    if family.extra_kv is not None:
        family.extra_kv(hp, writer)


def _write_rope_scaling(writer: gguf.GGUFWriter, family: Family, hp: Hparams) -> None:
    rope, kind = hp.rope, hp.rope_type
    if kind == "default" or kind in family.rope_types:
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        orig = rope.get("original_max_position_embeddings") or hp.get("max_position_embeddings")
        if orig:
            writer.add_rope_scaling_orig_ctx_len(orig)
        _write_yarn(writer, rope)
    else:
        raise ConvertError(f"config.json: rope scaling {kind!r} is not supported for {family.name}")


def _write_yarn(writer: gguf.GGUFWriter, rope: Mapping[str, Any]) -> None:
    """YaRN's optional parameters, under the keys llama.cpp's converter writes them to.

    llama.cpp (0.3.36) replaces yarn_attn_factor with its own mscale whenever extrapolation is on, then
    multiplies by rope.scaling.attn_factor: HF's attention_factor (which replaces 0.1 ln(factor) + 1) goes
    there, divided by the mscale llama.cpp applies anyway.
    """
    for key, method in (("beta_fast", "add_rope_scaling_yarn_beta_fast"),
                        ("beta_slow", "add_rope_scaling_yarn_beta_slow"),
                        ("extrapolation_factor", "add_rope_scaling_yarn_ext_factor")):
        if (value := rope.get(key)) is not None:
            getattr(writer, method)(float(value))
    attention = rope.get("attention_factor", rope.get("attn_factor"))
    if attention is not None:
        factor = float(rope["factor"])
        extrapolating = rope.get("extrapolation_factor", 1.0) != 0 and factor > 1
        mscale = 0.1 * math.log(factor) + 1.0 if extrapolating else 1.0
        writer.add_rope_scaling_attn_factors(float(attention) / mscale)


def expected_shapes(family: Family, hp: Hparams) -> dict[str, tuple[int, ...]]:
    """GGUF tensor kind (name without blk.N. and .weight) → the HF shape config.json implies (experts stacked)."""
    q, kv, d = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_embd
    e, ff_exp, ff_sh = hp.n_expert, hp.n_ff_exp, hp.n_ff_shexp
    return {
        "ffn_gate_inp": (e, d), "ffn_gate_exps": (e, ff_exp, d), "ffn_up_exps": (e, ff_exp, d),
        "ffn_down_exps": (e, d, ff_exp), "exp_probs_b": (e,), "ffn_gate_inp_shexp": (1, d),
        "ffn_gate_shexp": (ff_sh, d), "ffn_up_shexp": (ff_sh, d), "ffn_down_shexp": (d, ff_sh),
        "token_embd": (hp.n_vocab, d), "output": (hp.n_vocab, d), "output_norm": (d,),
        "attn_norm": (d,), "ffn_norm": (d,), "post_attention_norm": (d,), "post_ffw_norm": (d,),
        "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q), "attn_qkv": (q + 2 * kv, d),
        "attn_q_norm": (hp.head_dim,), "attn_k_norm": (hp.head_dim,),
        "ffn_gate": (hp.n_ff, d), "ffn_up": ((2 if family.fused_gate_up else 1) * hp.n_ff, d), "ffn_down": (d, hp.n_ff),
        **(family.shapes(hp) if family.shapes else {}),
    }


def plan_tensors(family: Family, hp: Hparams, checkpoint: Checkpoint) -> list[PlannedTensor]:
    names = gguf.get_tensor_name_map(family.arch, hp.n_layer)
    shapes = expected_shapes(family, hp)
    tied = family.always_tied or bool(hp.get("tie_word_embeddings", False))
    plan: list[PlannedTensor] = []
    stacks = _expert_stacks(checkpoint, hp)
    experts = {n for parts in stacks.values() for n in parts}
    sources = [(n, ref.shape) for n, ref in checkpoint.tensors.items() if n not in experts]
    sources += [(n, (len(parts), *checkpoint.tensors[parts[0]].shape)) for n, parts in stacks.items()]
    splits: dict[str, tuple[str, Part]] = {}  # the name a part maps from → (its HF tensor, the part)
    for hf_name, _ in list(sources):
        for end, parts in family.splits.items():
            if hf_name.endswith(end):
                shape = checkpoint.tensors[hf_name].shape
                sources.remove((hf_name, shape))
                if parts[0].source is not None and shape != (want := parts[0].source(hp)):
                    raise ConvertError(f"tensor {hf_name} has shape {list(shape)}, but config.json implies "
                                       f"{list(want)}")
                for part in parts:
                    split_name = hf_name.removesuffix(end) + part.hf_name
                    splits[split_name] = hf_name, part
                    sources.append((split_name, part.shape(hp)))
    for hf_name, shape in sources:
        if hf_name.endswith(_SKIPPED_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        if family.skip is not None and family.skip(hf_name, hp):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            origin = stacks[hf_name][0] if hf_name in stacks else splits[hf_name][0] if hf_name in splits else hf_name
            raise ConvertError(f"tensor {hf_name} ({checkpoint.tensors[origin].file.name}) has no place in "
                               f"llama.cpp's {family.name}")
        kind, suffix = re.sub(r"^blk\.\d+\.", "", name).rsplit(".", 1)
        if (full := shapes.get(kind)) is not None:
            want = full[:1] if suffix == "bias" and kind != "exp_probs_b" else full
            if shape != want:
                raise ConvertError(f"tensor {hf_name} has shape {list(shape)}, but config.json implies "
                                   f"{list(want)}")
        # as llama.cpp's converter: vectors, norms, biases and the (small, precision-sensitive) routers stay F32
        f32 = (len(shape) == 1 or suffix != "weight" or kind.endswith("_norm") or kind.startswith("ffn_gate_inp")
               or kind in family.f32_kinds)
        dtype = np.float32 if f32 else np.float16
        if hf_name in stacks:
            plan.append(PlannedTensor(name, shape, dtype, _stacked_producer(checkpoint, stacks[hf_name], shape, dtype)))
            continue
        if hf_name in splits:
            source, part = splits[hf_name]
            plan.append(PlannedTensor(name, shape, dtype, _producer(checkpoint, source, hp, part.extract, 0.0, dtype)))
            continue
        transform = next((f for end, f in family.transforms.items() if hf_name.endswith(end)), None)
        shift = family.norm_shift if hf_name.endswith("norm.weight") else 0.0
        plan.append(PlannedTensor(name, shape, dtype, _producer(checkpoint, hf_name, hp, transform, shift, dtype)))
    if family.extra_tensors is not None:
        for name, data in family.extra_tensors(hp).items():
            plan.append(PlannedTensor(name, data.shape, np.float32, partial(_constant, data)))
    _check_complete(plan, hp, tied)
    return sorted(plan, key=_gguf_order)


_EXPERT = re.compile(r"^(?P<stack>.+\.experts)\.(?P<expert>\d+)\.(?P<weight>[^.]+)\.weight$")


def _expert_stacks(checkpoint: Checkpoint, hp: Hparams) -> dict[str, list[str]]:
    """One HF tensor per expert → llama.cpp's one 3-D tensor per layer and projection, under the stacked name
    (model.layers.N.mlp.experts.gate_proj.weight) that gguf's TensorNameMap knows."""
    stacks: dict[str, dict[int, str]] = {}
    for name in checkpoint.tensors:
        if m := _EXPERT.match(name):
            stacks.setdefault(f"{m['stack']}.{m['weight']}.weight", {})[int(m["expert"])] = name
    out: dict[str, list[str]] = {}
    for stacked, parts in stacks.items():
        if sorted(parts) != list(range(hp.n_expert)):
            missing = sorted(set(range(hp.n_expert)) - set(parts)) or sorted(set(parts) - set(range(hp.n_expert)))
            raise ConvertError(f"{stacked.removesuffix('.weight')}: config.json says {hp.n_expert} experts, "
                               f"the checkpoint has {len(parts)} (expert ids {missing[:5]} differ)")
        shapes = {checkpoint.tensors[n].shape for n in parts.values()}
        if len(shapes) != 1:
            raise ConvertError(f"{stacked.removesuffix('.weight')}: experts of different shapes {sorted(shapes)}")
        out[stacked] = [parts[e] for e in range(hp.n_expert)]
    return out


def _stacked_producer(checkpoint: Checkpoint, parts: list[str], shape: tuple[int, ...],
                      dtype: type) -> Callable[[], np.ndarray]:
    """Fills the stacked tensor one expert at a time: memory is this tensor (as F16) plus one expert (as F32)."""
    def produce() -> np.ndarray:
        out: np.ndarray = np.empty(shape, dtype=dtype)
        for e, hf_name in enumerate(parts):
            data = checkpoint.load(hf_name)
            _check_range(hf_name, data, dtype)
            out[e] = data
        return out

    return produce


def _check_range(hf_name: str, data: np.ndarray, dtype: type) -> None:
    if dtype is np.float16 and data.size and max(float(data.max()), -float(data.min())) > _F16_MAX:  # no |data| copy
        raise ConvertError(f"tensor {hf_name} holds values beyond float16's range")


def _producer(checkpoint, hf_name, hp, transform, shift, dtype) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        data = checkpoint.load(hf_name)
        if transform is not None:
            data = transform(data, hp)
        if shift:
            data = data + np.float32(shift)
        _check_range(hf_name, data, dtype)
        return np.ascontiguousarray(data, dtype=dtype)

    return produce


def _check_complete(plan: list[PlannedTensor], hp: Hparams, tied: bool) -> None:
    """Every block has the same tensors, and the model has its ends (llama.cpp would refuse it later)."""
    have = {t.name for t in plan}
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in have]
    if not tied and "output.weight" not in have:
        missing.append("output.weight (lm_head.weight; tie_word_embeddings is false)")
    blocks: dict[int, set[str]] = {}
    for n in have:
        if n.startswith("blk."):
            blocks.setdefault(int(n.split(".")[1]), set()).add(n.split(".", 2)[2])
    # Each block is compared with the first of its kind: DeepSeek's leading dense blocks differ from its MoE ones
    first: dict[bool, set[str]] = {}
    for i in range(hp.n_layer):
        kinds = blocks.get(i, set())
        want = first.setdefault(i < hp.get("first_k_dense_replace", 0), kinds)
        missing += sorted(f"blk.{i}.{k}" for k in want - kinds)
    if not blocks.get(0):
        missing.append("blk.0.*")
    if missing:
        raise ConvertError(f"the checkpoint lacks weights for {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def _gguf_order(t: PlannedTensor) -> tuple[int, str]:
    if t.name.startswith("blk."):
        return int(t.name.split(".")[1]), t.name
    return (-1 if t.name.startswith(("token_embd", "rope")) else 1 << 30), t.name


def _constant(data: np.ndarray) -> np.ndarray:
    return data
