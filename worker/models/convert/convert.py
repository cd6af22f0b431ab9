"""SafeTensors folder → F16 GGUF, one tensor in memory at a time.

The tensor plan (names, shapes, dtypes) is made from the headers alone; the GGUF header and tensor infos are
written first, then each tensor is read, transformed, cast and written before the next one is touched.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gguf
import numpy as np

from worker.models.convert.errors import ConvertError, read_json
from worker.models.convert.families import family_for
from worker.models.convert.family import Family, Hparams
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
    return read_json(folder / "config.json", "no config.json, so not a SafeTensors checkpoint folder")


def convert_checkpoint(folder: Path, out: Path, name: str | None = None) -> ConvertStats:
    """Write the checkpoint in `folder` as an F16 GGUF at `out` (1-D tensors in F32); `name` → general.name."""
    t0 = time.perf_counter()
    config = read_config(folder)
    family = family_for(config)
    hp = Hparams.from_config({**family.defaults, **config})
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


def write_hparams(writer: gguf.GGUFWriter, family: Family, hp: Hparams, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_block_count(hp.n_layer)
    writer.add_context_length(hp.get("max_position_embeddings", 4096))
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.n_rot)
    writer.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    if hp.rope_theta is not None:
        writer.add_rope_freq_base(hp.rope_theta)
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
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    else:
        raise ConvertError(f"config.json: rope scaling {kind!r} is not supported for {family.name}")


def expected_shapes(family: Family, hp: Hparams) -> dict[str, tuple[int, ...]]:
    """GGUF tensor kind (name without blk.N. and .weight) → the HF shape config.json implies."""
    q, kv, d = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_embd
    return {
        "token_embd": (hp.n_vocab, d), "output": (hp.n_vocab, d), "output_norm": (d,),
        "attn_norm": (d,), "ffn_norm": (d,), "post_attention_norm": (d,), "post_ffw_norm": (d,),
        "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q), "attn_qkv": (q + 2 * kv, d),
        "attn_q_norm": (hp.head_dim,), "attn_k_norm": (hp.head_dim,),
        "ffn_gate": (hp.n_ff, d), "ffn_up": ((2 if family.fused_gate_up else 1) * hp.n_ff, d), "ffn_down": (d, hp.n_ff),
    }


def plan_tensors(family: Family, hp: Hparams, checkpoint: Checkpoint) -> list[PlannedTensor]:
    names = gguf.get_tensor_name_map(family.arch, hp.n_layer)
    shapes = expected_shapes(family, hp)
    tied = family.always_tied or bool(hp.get("tie_word_embeddings", False))
    plan: list[PlannedTensor] = []
    for hf_name, ref in checkpoint.tensors.items():
        if hf_name.endswith(_SKIPPED_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConvertError(f"tensor {hf_name} ({ref.file.name}) has no place in llama.cpp's {family.name}")
        kind, suffix = re.sub(r"^blk\.\d+\.", "", name).rsplit(".", 1)
        if (want := shapes.get(kind)) is not None:
            want = want[:1] if suffix == "bias" else want
            if ref.shape != want:
                raise ConvertError(f"tensor {hf_name} has shape {list(ref.shape)}, but config.json implies "
                                   f"{list(want)}")
        transform = next((f for end, f in family.transforms.items() if hf_name.endswith(end)), None)
        shift = family.norm_shift if hf_name.endswith("norm.weight") else 0.0
        dtype = np.float32 if len(ref.shape) == 1 else np.float16
        plan.append(PlannedTensor(name, ref.shape, dtype, _producer(checkpoint, hf_name, hp, transform, shift, dtype)))
    if family.extra_tensors is not None:
        for name, data in family.extra_tensors(hp).items():
            plan.append(PlannedTensor(name, data.shape, np.float32, partial(_constant, data)))
    _check_complete(plan, hp, tied)
    return sorted(plan, key=_gguf_order)


def _producer(checkpoint, hf_name, hp, transform, shift, dtype) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        data = checkpoint.load(hf_name)
        if transform is not None:
            data = transform(data, hp)
        if shift:
            data = data + np.float32(shift)
        if dtype is np.float16 and data.size and float(np.abs(data).max()) > _F16_MAX:
            raise ConvertError(f"tensor {hf_name} holds values beyond float16's range")
        return np.ascontiguousarray(data, dtype=dtype)

    return produce


def _check_complete(plan: list[PlannedTensor], hp: Hparams, tied: bool) -> None:
    """Every block has the same tensors, and the model has its ends (llama.cpp would refuse it later)."""
    have = {t.name for t in plan}
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in have]
    if not tied and "output.weight" not in have:
        missing.append("output.weight (lm_head.weight; tie_word_embeddings is false)")
    block0 = {n.split(".", 2)[2] for n in have if n.startswith("blk.0.")}
    for i in range(hp.n_layer):
        missing += sorted(f"blk.{i}.{k}" for k in block0 if f"blk.{i}.{k}" not in have)
    if not block0:
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
