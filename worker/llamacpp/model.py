"""A loaded llama.cpp model: its metadata (the contract's model object) and its vocabulary."""

from __future__ import annotations

import ctypes
import threading
import warnings
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as lc

from worker.llamacpp.backend import clear_errors, init_backend, last_errors
from worker.llamacpp.hparams import HParamError, check_hparams
from worker.llamacpp.special_split import LINE_CUT_PRE_TOKENIZERS, SpecialSplitter

# Texts longer than two pieces are tokenized a piece at a time, cut after special tokens (special_split.py). Short
# pieces keep llama.cpp's quadratic special-token pass cheap; each call costs a few microseconds more.
_PIECE_CHARS = 512
PIECE_CACHE_CHARS = 8 * 1024 * 1024  # the pieces' text (~20 MB with their tokens, at most)
# llama.cpp's token attributes (llama_token_attr) and the vocabularies whose tokenizing the cuts leave unchanged:
# SentencePiece and byte-level BPE add BOS / EOS only at the ends and tokenize each plain fragment alone.
_UNKNOWN, _CONTROL, _USER_DEFINED, _RSTRIP = 1 << 0, 1 << 3, 1 << 4, 1 << 8
_SPLITTABLE_VOCABS = (lc.LLAMA_VOCAB_TYPE_SPM, lc.LLAMA_VOCAB_TYPE_BPE)


class ModelLoadError(Exception):
    """The model could not be loaded; the message names the file and llama.cpp's reason."""


@dataclass(frozen=True)
class ModelInfo:
    """The contract's model object, plus what the engine needs from the GGUF metadata."""

    ref: str
    path: str
    architecture: str
    quantization: str
    n_params: int
    n_ctx_train: int
    n_vocab: int
    n_layers: int
    size_bytes: int
    format: str
    name: str | None
    chat_template: str | None
    bos: str | None
    eos: str | None
    unk: str | None

    def public(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "architecture": self.architecture,
            "quantization": self.quantization,
            "n_params": self.n_params,
            "n_ctx_train": self.n_ctx_train,
            "n_vocab": self.n_vocab,
            "size_bytes": self.size_bytes,
            "format": self.format,
        }


class PieceCache:
    """The tokens of the pieces long texts were cut into, most recently used kept, up to a number of characters.
    Chat clients and agents send the whole conversation every turn: its pieces (the system prompt, the earlier
    messages) are cut at the same places each time, and only the new ones are tokenized (a 5.2k-token chat prompt
    took 6-11 ms to tokenize on an H200's host with eight at once, the whole of it every turn)."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self._tokens: OrderedDict[tuple[str, bool], array[int]] = OrderedDict()  # 4 bytes a token
        self._chars = 0
        self._lock = threading.Lock()

    def get_or_tokenize(self, piece: str, parse_special: bool,
                        tokenize: Callable[[str], list[int]]) -> Sequence[int]:
        key = (piece, parse_special)
        with self._lock:
            if (cached := self._tokens.get(key)) is not None:
                self._tokens.move_to_end(key)
                return cached
        tokens = array("i", tokenize(piece))
        if len(piece) <= self.max_chars:
            with self._lock:
                if key not in self._tokens:
                    self._tokens[key] = tokens
                    self._chars += len(piece)
                while self._chars > self.max_chars:
                    (old, _), _ = self._tokens.popitem(last=False)
                    self._chars -= len(old)
        return tokens


class Model:
    """A loaded llama.cpp model and its vocabulary. Tokenization is safe from any thread."""

    def __init__(self, ptr: Any, info: ModelInfo, offloaded: bool) -> None:
        self.ptr = ptr
        self.vocab = lc.llama_model_get_vocab(ptr)
        self.info = info
        self.offloaded = offloaded
        self.n_vocab = info.n_vocab
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab))
        # Memory that cannot be cut at a position (recurrent, hybrid), and a sliding attention window (0: none).
        self.recurrent = bool(lc.llama_model_is_recurrent(ptr) or lc.llama_model_is_hybrid(ptr))
        self.n_swa = int(lc.llama_model_n_swa(ptr))
        self._piece_cache: dict[int, bytes] = {}
        self.add_eos = bool(lc.llama_vocab_get_add_eos(self.vocab))
        self._vocab_type = int(lc.llama_vocab_type(self.vocab))
        self._splitters: dict[bool, SpecialSplitter] = {}
        self._splitter_lock = threading.Lock()
        self._pieces = PieceCache(PIECE_CACHE_CHARS)
        self._special_piece_cache: dict[int, bytes] = {}
        self._eog_cache: dict[int, bool] = {}
        self._guidance_tokenizer: Any = None
        self._guidance_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        ref: str,
        fmt: str,
        gpu_layers: int,
        main_gpu: int = 0,
        tensor_split: list[float] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> Model:
        init_backend()
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        try:
            check_hparams(path)  # values that would make llama.cpp abort the process, not fail the load
        except HParamError as exc:
            raise ModelLoadError(f"{path} has an invalid hyper-parameter: {exc}") from None
        params = lc.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        params.main_gpu = main_gpu
        keep: list[Any] = []  # ctypes objects that must outlive the load call
        if tensor_split:
            n = lc.llama_max_devices()
            arr = (ctypes.c_float * n)(*(tensor_split + [0.0] * n)[:n])
            params.tensor_split = ctypes.cast(arr, ctypes.POINTER(ctypes.c_float))
            params.split_mode = lc.LLAMA_SPLIT_MODE_LAYER
            keep.append(arr)
        if progress is not None:

            def _on_progress(value: float, _user: ctypes.c_void_p) -> bool:
                progress(float(value))
                return True

            cb = lc.llama_progress_callback(_on_progress)
            params.progress_callback = cb
            keep.append(cb)
        clear_errors()
        ptr = lc.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise ModelLoadError(f"llama.cpp could not load {path}: {last_errors()}")
        info = _read_info(ptr, path, ref, fmt)
        return cls(ptr, info, offloaded=gpu_layers != 0 and lc.llama_supports_gpu_offload())

    def close(self) -> None:
        if self.ptr:
            lc.llama_model_free(self.ptr)
            self.ptr = None

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False,
                 limit: int | None = None, gone: Callable[[], bool] | None = None) -> list[int]:
        """The text's tokens, in time linear in its length (special_split.py says how). With `limit`, tokenizing
        stops as soon as more than `limit` tokens are known: a list longer than `limit` is then not all of them.
        `gone()`, asked between pieces of a long text: true when nobody wants the result any more (it is then
        cut short)."""
        if len(text) <= 2 * _PIECE_CHARS or self._vocab_type not in _SPLITTABLE_VOCABS:
            return self._tokenize(text, add_special=add_special, parse_special=parse_special)
        cuts = self._splitter(parse_special).cut_points(text, _PIECE_CHARS)
        if not cuts:
            return self._tokenize(text, add_special=add_special, parse_special=parse_special)
        tokens: list[int] = [self.bos_token] if add_special and self.add_bos else []
        start = 0
        for end in [*cuts, len(text)]:
            tokens += self._pieces.get_or_tokenize(
                text[start:end], parse_special,
                lambda piece: self._tokenize(piece, add_special=False, parse_special=parse_special))
            start = end
            if (limit is not None and len(tokens) > limit) or (gone is not None and gone()):
                return tokens
        if add_special and self.add_eos:
            tokens.append(int(lc.llama_vocab_eos(self.vocab)))
        return tokens

    def _splitter(self, parse_special: bool) -> SpecialSplitter:
        with self._splitter_lock:
            if not self._splitters:
                self._splitters.update(self._special_splitters())
            return self._splitters[parse_special]

    def prepare_tokenizer(self) -> None:
        """Read what long texts are cut by now (a pass over the vocabulary: 0.5 s for 262k tokens), not in the
        first long request."""
        self._splitter(True)

    def _special_splitters(self) -> dict[bool, SpecialSplitter]:
        """llama.cpp cuts out tokens that are CONTROL, USER_DEFINED or UNKNOWN, the USER_DEFINED ones even without
        parse_special: a splitter for each setting of parse_special."""
        cut_always: list[str] = []
        cut_if_special: list[str] = []
        strips_right: list[str] = []
        for token in range(self.n_vocab):
            attr = int(lc.llama_vocab_get_attr(self.vocab, token))
            if not attr & (_USER_DEFINED | _CONTROL | _UNKNOWN):
                continue
            raw = lc.llama_vocab_get_text(self.vocab, token) or b""
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # it could match inside a character: no cut can be known safe
                return {True: SpecialSplitter([], []), False: SpecialSplitter([], [])}
            (cut_always if attr & _USER_DEFINED else cut_if_special).append(text)
            if attr & _RSTRIP:
                strips_right.append(text)
        line_cuts = (self._vocab_type == lc.LLAMA_VOCAB_TYPE_BPE
                     and self.meta("tokenizer.ggml.pre") in LINE_CUT_PRE_TOKENIZERS)
        return {True: SpecialSplitter(cut_always + cut_if_special, strips_right, line_cuts=line_cuts),
                False: SpecialSplitter(cut_always, strips_right, line_cuts=line_cuts)}

    def _tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: llama.cpp says how many it needs
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a token stands for; control tokens render as nothing unless `special`."""
        cache = self._special_piece_cache if special else self._piece_cache
        cached = cache.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            cached = cache[token] = buf.raw[:n]
        return cached

    def eog_tokens(self) -> list[int]:
        """Every token that ends a generation (EOS, end of turn, ...)."""
        return [t for t in range(self.n_vocab) if lc.llama_vocab_is_eog(self.vocab, t)]

    def guidance_tokenizer(self) -> Any:
        """The vocabulary as llguidance's tokenizer (for constrained decoding); built once, on first use (about a
        second for a large vocabulary). Any end-of-generation token may end a grammar."""
        with self._guidance_lock:
            if self._guidance_tokenizer is None:
                from llguidance.llamacpp import lltokenizer_from_vocab

                with warnings.catch_warnings():  # it calls llama_token_get_attr, deprecated, once per token
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._guidance_tokenizer = lltokenizer_from_vocab(self.vocab, eos_token=self.eog_tokens())
            return self._guidance_tokenizer

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (None when the key is absent)."""
        return _meta(self.ptr, key)

    def is_eog(self, token: int) -> bool:
        # asked of every sampled token: a dict, not a foreign call (each lets go of the GIL; see gil_held)
        eog = self._eog_cache.get(token)
        if eog is None:
            eog = self._eog_cache[token] = bool(lc.llama_vocab_is_eog(self.vocab, token))
        return eog

    @property
    def bos_token(self) -> int:
        return int(lc.llama_vocab_bos(self.vocab))

    def prompt_tokens(self, text: str, limit: int | None = None,
                      gone: Callable[[], bool] | None = None) -> list[int]:
        """Special tokens in the text are special; BOS is added only where the model wants one and the text has
        none (so a chat template that writes it never leads to two). `limit`, `gone`: as for tokenize()."""
        bos = self.info.bos
        add_bos = self.add_bos and not (bos and text.startswith(bos))
        return self.tokenize(text, add_special=add_bos, parse_special=True, limit=limit, gone=gone)


def _meta(ptr: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = lc.llama_model_meta_val_str(ptr, key.encode(), buf, 256)
    if n < 0:
        return None
    if n >= 256:
        buf = ctypes.create_string_buffer(n + 1)
        lc.llama_model_meta_val_str(ptr, key.encode(), buf, n + 1)
    return buf.value.decode("utf-8", errors="replace")


def _token_text(vocab: Any, token: int) -> str | None:
    if token < 0:
        return None
    text = lc.llama_vocab_get_text(vocab, token)
    return text.decode("utf-8", errors="replace") if text else None


def _read_info(ptr: Any, path: Path, ref: str, fmt: str) -> ModelInfo:
    vocab = lc.llama_model_get_vocab(ptr)
    ftype = (lc.llama_ftype_name(lc.llama_model_ftype(ptr)) or b"unknown").decode()
    template = lc.llama_model_chat_template(ptr, None)
    return ModelInfo(
        ref=ref,
        path=str(path),
        architecture=_meta(ptr, "general.architecture") or "unknown",
        quantization=ftype,
        n_params=int(lc.llama_model_n_params(ptr)),
        n_ctx_train=int(lc.llama_model_n_ctx_train(ptr)),
        n_vocab=int(lc.llama_vocab_n_tokens(vocab)),
        n_layers=int(lc.llama_model_n_layer(ptr)),
        size_bytes=path.stat().st_size,
        format=fmt,
        name=_meta(ptr, "general.name"),
        chat_template=template.decode("utf-8", errors="replace") if template else None,
        bos=_token_text(vocab, lc.llama_vocab_bos(vocab)),
        eos=_token_text(vocab, lc.llama_vocab_eos(vocab)),
        unk=_token_text(vocab, int(_meta(ptr, "tokenizer.ggml.unknown_token_id") or -1)),
    )
