"""The llama.cpp seam: the only module that imports ``llama_cpp``.

It uses llama-cpp-python's low-level bindings: one context with one KV sequence per slot, one
``llama_batch`` per step, and one sampler chain per slot that samples straight from llama.cpp's
logits buffer (no copy of the 262k-entry logits row into Python).

Sampling, per slot (``begin`` sets it up, ``release`` frees it):

- greedy with nothing else is an argmax over the logits row; plain sampling is llama.cpp's chain
  (top_k, top_p, temperature, dist) through ``llama_sampler_sample``;
- ``logit_bias`` and the presence/frequency penalties go first in a chain (a greedy one ends in
  ``llama_sampler_init_greedy``). llama.cpp's penalties sampler lowers a logit by
  ``frequency * count + presence * (count > 0)`` over the tokens accepted into it, which are the
  generated ones only: OpenAI's definition;
- a grammar has a sampler of its own, outside the chain. As llama-server does, the chain samples
  first and the grammar checks that one token; only if it refuses it does the grammar go over the
  whole vocabulary (262k pieces, slow) before the chain samples again. A token goes into the chain
  and the grammar only once the grammar allowed it, and an end-of-generation token never goes into
  the grammar: llama.cpp aborts the process, or throws through ctypes, on either.
- log-probabilities come from the raw logits row (before bias, penalties, temperature or grammar),
  and only for the slots that ask.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as lc
import llama_cpp.llama_grammar as lc_grammar
import numpy as np

from peerinfer.engine.base import EngineStats, Generation, ModelInfo, SamplingParams
from peerinfer.engine.batching import confirmed_pad_rows, fillers, outputs_in_batch_order, rows_to_pad
from peerinfer.engine.json_schema import WHERE, check_grammar_size, check_schema, refuse
from peerinfer.engine.model_files import ModelFile, open_model_file
from peerinfer.engine.output_head import CAPTURE, KERNEL_NAMES, OFF, SKIP, HeadUnavailable, OutputHead, open_head
from peerinfer.engine.prompt import ControlToken, PromptPart, markup_of, split_at_controls
from peerinfer.engine.scheduler import BatchScheduler, Sampled, SlotWork
from peerinfer.errors import EngineError, RequestError
from peerinfer.settings import WorkerSettings

log = logging.getLogger(__name__)
_GGML_TYPE_BF16 = 30  # ggml.h's enum ggml_type; llama-cpp-python does not export this one
_llama_log = logging.getLogger("peerinfer.llama_cpp")


@lc.llama_log_callback  # type: ignore[untyped-decorator]
def _forward_llama_log(level: int, text: bytes, user_data: Any) -> None:
    _llama_log.debug("%s", text.decode("utf-8", "replace").rstrip())


def _ggml_base_library() -> Path:
    # llama_cpp loads its libraries from one folder (LLAMA_CPP_LIB_PATH or its own lib/)
    folder = Path(getattr(lc.llama_cpp, "_base_path", Path(lc.__file__).parent / "lib"))
    return folder / "libggml-base.so"


def _row_exact_attention() -> bool:
    """Whether the loaded ggml has scripts/llama-cpp-patches/ggml-fa-row-exact.patch (and it is not turned off).

    With it, ``GGML_CPU_FA_ROW_EXACT=1`` sends every query row of an f16 cache through one flash-attention
    kernel, so an f16 cache is batch-invariant. A user's ``GGML_CPU_FA_ROW_EXACT=0`` keeps the bf16 cache.
    """
    if os.environ.get("GGML_CPU_FA_ROW_EXACT", "1") == "0":
        return False
    try:
        library = ctypes.CDLL(str(_ggml_base_library().with_name("libggml-cpu.so")))
    except OSError:
        return False
    return hasattr(library, "ggml_cpu_fa_row_exact")


def _kq_rows_kernel() -> str:
    """Which kernels the loaded ggml multiplies Q4_K/Q6_K and Q5_0/Q8_0 weights by.

    scripts/llama-cpp-patches/ggml-kq-rows.patch adds kernels that share each weight block's unpacking
    across several rows (8 for Q4_K/Q6_K; for Q5_0/Q8_0 16 with AVX-512 VNNI, 8 with AVX2), with every
    output bit for bit ggml's own kernels' (so batch invariance holds with them), and gives each thread a
    contiguous share of the weight rows. Its ``ggml_cpu_kq_rows()`` says 4 with the AVX-512 kernels and 5
    with the AVX2 ones; 3, 2 and 1 are older patches (3: Q5_0/Q8_0 left to tinyBLAS without VNNI).
    ``GGML_CPU_KQ_ROWS=0`` turns them off; ``avx2`` keeps the AVX2 kernels on an AVX-512 machine.
    """
    try:
        library = ctypes.CDLL(str(_ggml_base_library().with_name("libggml-cpu.so")))
    except OSError:
        return "unknown (libggml-cpu.so not found)"
    if not hasattr(library, "ggml_cpu_kq_rows"):
        return "ggml's one row at a time (this llama.cpp lacks peerinfer's K-quant patch)"
    library.ggml_cpu_kq_rows.restype = ctypes.c_int
    version = library.ggml_cpu_kq_rows()
    if version == 0:
        return "ggml's one row at a time (GGML_CPU_KQ_ROWS=0, or not an AVX2 build)"
    if version == 1:
        return "peerinfer's, 4 rows at a time (an older patch: rows handed to threads in turn)"
    if version == 2:
        return "peerinfer's, 4 rows at a time, each thread its own share of rows (an older patch: K-quants only)"
    if version == 3:
        return (
            "peerinfer's, each thread its own share of rows: Q4_K/Q6_K 8 rows at a time (Q5_0/Q8_0: tinyBLAS; "
            "an older patch)"
        )
    if version == 5:
        return "peerinfer's, each thread its own share of rows: Q4_K/Q6_K and Q5_0/Q8_0 8 rows at a time (AVX2)"
    return "peerinfer's, each thread its own share of rows: Q4_K/Q6_K 8 rows at a time, Q5_0/Q8_0 16 (AVX-512)"


# llama_token_data as numpy sees it: a whole vocabulary of candidates for the grammar's slow path
_GRAMMAR_FIRST = 512
CONFIRM_STEPS = 7  # turns of interleaved steps that confirm a row count to pad
_NEAR_TOP = 10.0  # logits below the best: where log_softmax_top looks for the top k first
_CANDIDATE = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _CANDIDATE.itemsize == ctypes.sizeof(lc.llama_token_data)


# A grammar's state is a function of its text and the tokens accepted into it. Where the grammar
# forces a literal (``{"topic": "`` at the start of a schema's answer), the model's likely tokens are
# all refused and the whole vocabulary is scanned (~35 ms): the tokens it allows there are kept, per
# state, for the states of an answer's first tokens, where every answer to a schema passes alike.
_STATE_CACHE_TOKENS = 32  # accepted tokens up to which a state is cached
_STATE_CACHE_ALLOWED = 4096  # a state that allows more tokens than this is not kept
_STATE_CACHE_SIZE = 1024


@dataclass
class _SlotSampler:
    """A slot's sampling state: ``chain`` None is a plain argmax; ``grammar`` None is unconstrained.

    ``grammar_text`` and ``accepted`` (the tokens accepted into the grammar) name its state."""

    chain: Any
    grammar: Any
    logprobs: int | None
    grammar_text: str = ""
    accepted: list[int] = field(default_factory=list)

    @property
    def state(self) -> tuple[str, tuple[int, ...]] | None:
        if len(self.accepted) > _STATE_CACHE_TOKENS:
            return None
        return self.grammar_text, tuple(self.accepted)

    def free(self) -> None:
        for sampler in (self.chain, self.grammar):
            if sampler is not None:
                lc.llama_sampler_free(sampler)
        self.chain = self.grammar = None


def log_softmax_top(
    row: np.ndarray[Any, np.dtype[np.float32]],
    token: int,
    k: int,
    scratch: np.ndarray[Any, np.dtype[np.float32]] | None = None,
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """``token``'s log-probability under the logits ``row``, and the ``k`` most likely tokens with theirs.

    Most likely first; equal logits by token id, as an argmax (the lowest id) picks them, so that at
    temperature 0 the chosen token is the first. ``scratch`` (the row's size) saves an allocation.
    """
    high = float(row.max())
    shifted = np.subtract(row, high, out=scratch)
    total = math.log(float(np.exp(shifted, out=shifted).sum(dtype=np.float64))) + high
    chosen = float(row[token]) - total
    if k <= 0:
        return chosen, ()
    k = min(k, row.shape[0])
    # The top k are nearly always within a few logits of the best: look there first (exact whenever
    # k tokens are found there, as every other one is less likely), else over the whole row.
    ids = np.flatnonzero(row >= high - _NEAR_TOP)
    if len(ids) < k:
        ids = np.arange(row.shape[0])
    values = row[ids]
    kth = np.partition(values, len(ids) - k)[len(ids) - k]
    keep = values >= kth  # every tie of the k-th too, so that ids decide among them
    ids, values = ids[keep], values[keep]
    order = np.lexsort((ids, -values))[:k]
    return chosen, tuple((int(ids[i]), float(values[i]) - total) for i in order)


def _token_text(vocab: Any, token: int) -> str:
    if token < 0:
        return ""
    return bytes(lc.llama_vocab_get_text(vocab, token) or b"").decode("utf-8", "replace")


class LlamaBackend:
    """One llama.cpp model and context, decoded by exactly one thread."""

    def __init__(self, model_file: ModelFile, settings: WorkerSettings) -> None:
        if settings.batch_invariant:
            # ggml's tiled K-quant matmul (calls of 8+ rows) rounds a row by where it falls in the call:
            # the same prompt read in other cuts, or tokens decoded one per call, gave logits up to 1.08
            # apart. Without it every row takes the one-row kernel, and they are equal; it was no faster
            # here. ggml reads this once per process, at its first matmul (a user's own value wins).
            os.environ.setdefault("GGML_CPU_TILED_MM", "0")
        lc.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        # Repacked weights (extra buffer types) switch from a one-row to a four-row matmul kernel once
        # a batch holds 4+ rows, with different rounding: batched text would differ from text alone.
        model_params.use_extra_bufts = not settings.batch_invariant
        model = lc.llama_model_load_from_file(str(model_file.path).encode(), model_params)
        if not model:
            raise EngineError(
                f"llama.cpp could not load {model_file.path}; the file may be corrupt or use an "
                "architecture this llama.cpp build does not know"
            )
        self.model = model
        self.vocab = lc.llama_model_get_vocab(model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        self.slots = settings.slots
        max_rows = max(settings.prefill_chunk, settings.slots)
        self._head: OutputHead | None = None
        self.head_status = "off (PEERINFER_OUTPUT_HEAD=false)"
        if settings.output_head:
            try:
                self._head = open_head(
                    model_file.path,
                    _ggml_base_library(),
                    self.n_vocab,
                    int(lc.llama_model_n_embd(model)),
                    max_rows,
                    settings.n_threads,
                )
            except HeadUnavailable as exc:
                self.head_status = f"llama.cpp's: {exc}"
        ctx_params = lc.llama_context_default_params()
        ctx_params.n_ctx = settings.n_ctx * settings.slots
        ctx_params.n_batch = max_rows
        ctx_params.n_ubatch = max_rows
        ctx_params.n_seq_max = settings.slots
        ctx_params.n_threads = settings.n_threads
        ctx_params.n_threads_batch = settings.n_threads
        ctx_params.kv_unified = False
        self.kv_cache = "f16"
        if settings.batch_invariant:
            # Stock ggml's CPU flash attention over an f16 (or f32) cache takes one kernel for calls of
            # 64+ rows of a sequence (tiled), another for fewer (one row at a time), and a third for a
            # sequence alone in its step with 512+ cells cached (split across threads, then merged):
            # logits differed by up to 0.75. Our patch sends every row through the tiled one; without
            # it a bf16 cache, which only the one-row kernel takes, is invariant but reads long prompts
            # 1.3-1.5x slower.
            if _row_exact_attention():
                os.environ["GGML_CPU_FA_ROW_EXACT"] = "1"  # read by ggml once, at its first attention
            else:
                ctx_params.type_k = ctx_params.type_v = _GGML_TYPE_BF16
                self.kv_cache = "bf16 (this llama.cpp lacks peerinfer's attention patch)"
        self.kq_matmul = _kq_rows_kernel()
        ctx_params.no_perf = True
        if self._head is not None:
            self._eval_callback = lc.ggml_backend_sched_eval_callback(self._head.eval_address)
            ctx_params.cb_eval = self._eval_callback
            ctx_params.cb_eval_user_data = ctypes.c_void_p(self._head.capture_address)
        ctx = lc.llama_init_from_model(model, ctx_params)
        if not ctx:
            if self._head is not None:
                self._head.close()
            lc.llama_model_free(model)
            raise EngineError(
                f"llama.cpp could not create a context of {settings.n_ctx} tokens x {settings.slots} slots; "
                "lower PEERINFER_N_CTX or PEERINFER_SLOTS"
            )
        self.ctx = ctx
        self.memory = lc.llama_get_memory(ctx)
        self.n_ctx_per_slot = int(lc.llama_n_ctx_seq(ctx))
        self.batch = lc.llama_batch_init(max_rows, 0, 1)
        self._samplers: dict[int, _SlotSampler] = {}  # one entry per slot in use
        self._candidates = np.zeros(self.n_vocab, dtype=_CANDIDATE)
        self._allowed_by_state: OrderedDict[tuple[str, tuple[int, ...]], np.ndarray[Any, Any]] = OrderedDict()
        self._token_ids = np.arange(self.n_vocab, dtype=np.int32)
        self._scratch = np.empty(self.n_vocab, dtype=np.float32)
        self._one = (lc.llama_token_data * 1)()
        self._pad_rows: frozenset[int] = frozenset()
        self.unconfirmed_pad_rows: frozenset[int] = frozenset()  # counts the first timing would have padded
        self._head_on = False  # set by calibrate once the head's logits match llama.cpp's
        self._pieces: dict[int, bytes] = {}
        template = lc.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8", "replace") if template else None
        self.bos_token = _token_text(self.vocab, lc.llama_vocab_bos(self.vocab))
        self.eos_token = _token_text(self.vocab, lc.llama_vocab_eos(self.vocab))
        self._pad_token = max(0, int(lc.llama_vocab_bos(self.vocab)))

    def tokenize(self, text: str, add_bos: bool, special: bool = False) -> list[int]:
        """``special``: parse control tokens (``<eos>``) in ``text``; without it they are plain characters."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buffer = (lc.llama_token * capacity)()
            count = lc.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_bos, special)
            if count >= 0:
                return list(buffer[:count])
            capacity = -count

    def tokenize_parts(self, parts: Sequence[PromptPart], add_bos: bool) -> list[int]:
        """Control tokens from the markup only; each run of text between them is read as text.

        llama.cpp reads the text between special tokens fragment by fragment in the same way, so
        ordinary messages give the same tokens as the whole prompt tokenised with special parsing.
        """
        runs, controls = split_at_controls(parts, self._controls_in(markup_of(parts)))
        tokens = self.tokenize(runs[0], add_bos)
        for control, run in zip(controls, runs[1:], strict=True):
            tokens.append(control)
            tokens += self.tokenize(run, False)
        return tokens

    def _controls_in(self, markup: str) -> list[ControlToken]:
        found: list[ControlToken] = []
        for token in dict.fromkeys(self.tokenize(markup, False, special=True)):
            attr = int(lc.llama_vocab_get_attr(self.vocab, token))
            # the tokens llama_tokenize makes only when told to parse special tokens
            if attr & (lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_UNKNOWN):
                lstrip = bool(attr & lc.LLAMA_TOKEN_ATTR_LSTRIP)
                rstrip = bool(attr & lc.LLAMA_TOKEN_ATTR_RSTRIP)
                found.append(ControlToken(token, _token_text(self.vocab, token), lstrip, rstrip))
        return found

    def _cut(self, slot: int, keep: int) -> int:
        """Forget a slot's cache past its first ``keep`` positions; all of it if llama.cpp cannot cut there."""
        if lc.llama_memory_seq_rm(self.memory, slot, keep, -1):
            return keep
        lc.llama_memory_seq_rm(self.memory, slot, -1, -1)
        return 0

    def begin(self, slot: int, params: SamplingParams, keep: int) -> int:
        keep = self._cut(slot, keep)
        old = self._samplers.pop(slot, None)
        if old is not None:
            old.free()
        sampler = _SlotSampler(self._chain(params), None, params.logprobs, params.grammar or "")
        if params.grammar is not None:
            sampler.grammar = lc.llama_sampler_init_grammar(self.vocab, params.grammar.encode(), b"root")
            if not sampler.grammar:
                sampler.free()
                raise EngineError("llama.cpp could not parse the grammar of this request's response_format")
        self._samplers[slot] = sampler
        return keep

    def _chain(self, params: SamplingParams) -> Any:
        """The slot's sampler chain; None for greedy with neither bias nor penalties (an argmax does it)."""
        penalties = params.presence_penalty != 0 or params.frequency_penalty != 0
        if params.temperature <= 0 and not params.logit_bias and not penalties:
            return None
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if params.logit_bias:
            biases = (lc.llama_logit_bias * len(params.logit_bias))(
                *(lc.llama_logit_bias(token, bias) for token, bias in params.logit_bias)
            )
            lc.llama_sampler_chain_add(
                chain, lc.llama_sampler_init_logit_bias(self.n_vocab, len(params.logit_bias), biases)
            )
        if penalties:
            # Its window holds the last n accepted tokens: the whole answer (it can never outgrow a slot).
            window = max(1, min(params.max_tokens, self.n_ctx_per_slot))
            lc.llama_sampler_chain_add(
                chain,
                lc.llama_sampler_init_penalties(
                    self.n_vocab, window, 1.0, params.frequency_penalty, params.presence_penalty
                ),
            )
        if params.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            # Gemma's vocabulary has 262k entries: cutting to the top k first makes the softmax
            # behind top_p and dist ~9x cheaper (3.1 ms -> 0.34 ms per token with k = 40, here).
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
        # llama.cpp takes 32 bits and reads 0xFFFFFFFF (LLAMA_DEFAULT_SEED) as "pick a random seed": a
        # request's seed (-1, 2**32 - 1, any size) maps into 0 .. 0xFFFFFFFE, so that it always repeats.
        seed = params.seed % 0xFFFFFFFF if params.seed is not None else secrets.randbelow(0xFFFFFFFF)
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain

    def _sample(self, slot: int, index: int) -> Sampled:
        sampler = self._samplers[slot]
        if sampler.grammar is not None:
            token = self._sample_constrained(sampler, index)
            if token is None:
                return Sampled(-1, error="the response_format grammar allows no token here; the output stops")
        elif sampler.chain is None:
            token = int(self.logits(index).argmax())
        else:
            token = int(lc.llama_sampler_sample(sampler.chain, self.ctx, index))
        if sampler.logprobs is None:
            return Sampled(token)
        logprob, top = log_softmax_top(self.logits(index), token, sampler.logprobs, self._scratch)
        return Sampled(token, logprob, top)

    def _sample_constrained(self, sampler: _SlotSampler, index: int) -> int | None:
        """Sample with the chain, checked by the grammar; None if the grammar allows nothing the chain picks."""
        if sampler.chain is None:
            token = self._greedy_constrained(sampler, index)
        else:
            token = self._apply_chain(sampler.chain, index, None)
            if token is None or not self._allowed(sampler.grammar, token):
                token = self._apply_chain(sampler.chain, index, sampler)
        if token is None or not self._allowed(sampler.grammar, token):
            return None
        if sampler.chain is not None:
            lc.llama_sampler_accept(sampler.chain, token)
        if not self.is_end(token):  # the slot ends on it; llama.cpp's grammar would abort on an unfinished one
            lc.llama_sampler_accept(sampler.grammar, token)
            sampler.accepted.append(token)
        return token

    def _allowed_ids(self, sampler: _SlotSampler) -> np.ndarray[Any, Any] | None:
        """The tokens the slot's grammar allows now, if its state was scanned before (see ``_STATE_CACHE_TOKENS``)."""
        state = sampler.state
        if state is None or state not in self._allowed_by_state:
            return None
        self._allowed_by_state.move_to_end(state)
        return self._allowed_by_state[state]

    def _remember_allowed(self, sampler: _SlotSampler, ids: np.ndarray[Any, Any]) -> None:
        state = sampler.state
        if state is None or len(ids) > _STATE_CACHE_ALLOWED:
            return
        self._allowed_by_state[state] = ids.copy()
        while len(self._allowed_by_state) > _STATE_CACHE_SIZE:
            self._allowed_by_state.popitem(last=False)

    def _greedy_constrained(self, sampler: _SlotSampler, index: int) -> int | None:
        """The most likely token that ``grammar`` allows (lowest id among equals), as a greedy chain would pick.

        The grammar sees the argmax alone first, then the ~``_GRAMMAR_FIRST`` most likely tokens: when
        one of them is allowed the best of them is the best of all (every other token is less likely),
        and the grammar never goes over the 262k others (~25 ms). Only if none is allowed does it.
        """
        grammar = sampler.grammar
        row = self.logits(index)
        token = int(row.argmax())
        if self._allowed(grammar, token):
            return token
        known = self._allowed_ids(sampler)
        if known is not None:
            return self._best_allowed(grammar, known, row[known])
        kth = np.partition(row, self.n_vocab - _GRAMMAR_FIRST)[self.n_vocab - _GRAMMAR_FIRST]
        ids = np.flatnonzero(row >= kth).astype(np.int32)  # the ties of the last one too
        best = self._best_allowed(grammar, ids, row[ids])
        if best is not None:
            return best
        best = self._best_allowed(grammar, self._token_ids, row)
        self._remember_allowed(sampler, self._candidates["id"][np.isfinite(self._candidates["logit"])])
        return best

    def _best_allowed(self, grammar: Any, ids: np.ndarray[Any, Any], logits: np.ndarray[Any, Any]) -> int | None:
        candidates = self._candidates[: len(ids)]
        candidates["id"] = ids
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = lc.llama_token_data_array(candidates.ctypes.data_as(lc.llama_token_data_p), len(ids), -1, False)
        lc.llama_sampler_apply(grammar, ctypes.byref(array))
        allowed = candidates["logit"]
        high = allowed.max()
        if not np.isfinite(high):
            return None
        return int(candidates["id"][allowed == high].min())

    def _apply_chain(self, chain: Any, index: int, constrained: _SlotSampler | None) -> int | None:
        """Apply (the ``constrained`` slot's grammar first, if given, then) ``chain`` to the logits row; the
        token it selects. Where the grammar's state was scanned before, only the tokens it allowed are offered
        (the same draw: the others would have had no probability).

        Nothing is accepted: the caller accepts the token once the grammar allowed it.
        """
        row = self.logits(index)
        known = self._allowed_ids(constrained) if constrained is not None else None
        ids = self._token_ids if known is None else known
        candidates = self._candidates[: len(ids)]
        candidates["id"] = ids
        candidates["logit"] = row if known is None else row[known]
        candidates["p"] = 0.0
        array = lc.llama_token_data_array(candidates.ctypes.data_as(lc.llama_token_data_p), len(ids), -1, False)
        if constrained is not None:
            lc.llama_sampler_apply(constrained.grammar, ctypes.byref(array))
            finite = np.isfinite(candidates["logit"])
            if not finite.any():
                return None
            if known is None:
                self._remember_allowed(constrained, candidates["id"][finite])
        lc.llama_sampler_apply(chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            return None
        # a sampler may point the array at its own copy of the data: read through the array
        return int(array.data[array.selected].id)

    def _allowed(self, grammar: Any, token: int) -> bool:
        """Whether ``grammar`` allows ``token`` next (an end token only once the grammar is complete)."""
        one = self._one
        one[0] = lc.llama_token_data(token, 0.0, 0.0)
        array = lc.llama_token_data_array(one, 1, -1, False)
        lc.llama_sampler_apply(grammar, ctypes.byref(array))
        return math.isfinite(one[0].logit)

    def decode(self, work: Sequence[SlotWork], spare: Mapping[int, int]) -> dict[int, Sampled]:
        """Adds throw-away rows in ``spare`` slots where they make the call cheaper, then removes their cells.

        A row without logits fills a gap between slots (one pass over the weights instead of two); a
        row with logits reaches a cheaper row count (see ``calibrate``).

        A failed call leaves every slot's cache as before it: llama.cpp keeps what an earlier part of
        the call wrote, so each row's cells are cut at its start.
        """
        for item in work:
            if not 0 <= item.start <= item.start + len(item.tokens) <= self.n_ctx_per_slot:
                raise EngineError(
                    f"slot {item.slot}: {len(item.tokens)} tokens from position {item.start} do not fit its "
                    f"{self.n_ctx_per_slot}-token context"
                )
        pad = sum(1 for item in work if item.want_output) in self._pad_rows
        # A row at n_ctx_per_slot or later has no cell to go to: the whole call would fail.
        spare = {slot: start for slot, start in spare.items() if 0 <= start < self.n_ctx_per_slot}
        extra = fillers([item.slot for item in work], spare, pad)
        added = [SlotWork(slot, [self._pad_token], spare[slot], False) for slot in extra.without_logits]
        if extra.with_logits is not None:
            added.append(SlotWork(extra.with_logits, [self._pad_token], spare[extra.with_logits], True))
        rows = sorted([*work, *added], key=lambda item: item.slot) if added else work
        try:
            outputs = self._decode(rows)
        except BaseException:
            for item in work:
                self._cut(item.slot, item.start)
            raise
        finally:
            for item in added:
                lc.llama_memory_seq_rm(self.memory, item.slot, item.start, -1)
        return {slot: self._sample(slot, index) for slot, index in outputs if slot != extra.with_logits}

    @property
    def pad_rows(self) -> frozenset[int]:
        return self._pad_rows

    def calibrate(self, pad_rows: frozenset[int] | None = None) -> dict[int, float]:
        """Time a step of 1 to ``slots`` rows once, at load, and pad the row counts that one more row speeds up.

        Returns the best of 3 times per row count, in ms. A count those would pad is padded only if
        ``CONFIRM_STEPS`` more turns of it and the count above agree (``confirmed_pad_rows``).
        Must run before any slot is in use.
        ``pad_rows`` overrides the choice (tests: throw-away rows on or off whatever the timings say).
        """
        self._decode([SlotWork(0, [self._pad_token], 0, True)])  # the first call allocates
        lc.llama_memory_seq_rm(self.memory, 0, -1, -1)
        if self._head is not None:
            self._head_on, self.head_status = self._choose_kernel(self._head)
        step_ms = {rows: min(self._step_ms(rows) for _ in range(3)) for rows in range(1, self.slots + 1)}
        if pad_rows is None:
            candidates = rows_to_pad(step_ms)
            samples: dict[int, list[float]] = {rows: [] for rows in candidates | {rows + 1 for rows in candidates}}
            for turn in range(CONFIRM_STEPS if candidates else 0):
                for rows in sorted(samples, reverse=turn % 2 == 1):
                    samples[rows].append(self._step_ms(rows))
            pad_rows = confirmed_pad_rows(candidates, samples)
            self.unconfirmed_pad_rows = candidates - pad_rows
        self._pad_rows = pad_rows
        return step_ms

    def _step_ms(self, rows: int) -> float:
        """One step of one row in each of slots 0 to ``rows - 1``, timed in ms; the cells are removed after."""
        work = [SlotWork(slot, [self._pad_token], 0, True) for slot in range(rows)]
        started = time.perf_counter()
        self._decode(work)
        elapsed = time.perf_counter() - started
        for slot in range(rows):
            lc.llama_memory_seq_rm(self.memory, slot, -1, -1)
        return 1000 * elapsed

    def _decode(self, work: Sequence[SlotWork], head_mode: int | None = None) -> list[tuple[int, int]]:
        """One ``llama_decode``; returns (slot, batch index) of each row that asked for logits.

        The output head computes the logits when it is on and the call's outputs come in batch order;
        ``head_mode`` overrides that choice (the load check).
        """
        batch = self.batch
        outputs: list[tuple[int, int]] = []
        count = 0
        for item in work:
            last = len(item.tokens) - 1
            for offset, token in enumerate(item.tokens):
                batch.token[count] = token
                batch.pos[count] = item.start + offset
                batch.n_seq_id[count] = 1
                batch.seq_id[count][0] = item.slot
                wants = item.want_output and offset == last
                batch.logits[count] = wants
                if wants:
                    outputs.append((item.slot, count))
                count += 1
        batch.n_tokens = count
        head = self._head
        if head_mode is None:
            in_order = self._head_on and outputs and outputs_in_batch_order([len(item.tokens) for item in work])
            head_mode = SKIP if in_order else OFF
        if head is not None:
            head.arm(head_mode)
        status = lc.llama_decode(self.ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status} on a batch of {count} tokens")
        if head is not None and head_mode == SKIP:
            # llama.cpp stopped before its output product; its logits rows are ours to fill
            head.write_logits([self._logits_address(index) for _, index in outputs])
        return outputs

    def logits(self, index: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The logits row of batch row ``index`` of the last call: a view into llama.cpp's buffer."""
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))

    def _logits_address(self, index: int) -> int:
        return ctypes.cast(lc.llama_get_logits_ith(self.ctx, index), ctypes.c_void_p).value or 0

    def _choose_kernel(self, head: OutputHead) -> tuple[bool, str]:
        """The fastest of the head's kernels whose logits match llama.cpp's; whether one did, and the status line."""
        problems: list[str] = []
        for kernel in sorted(head.kernels, reverse=True):
            head.kernel = kernel
            problem = self._check_head(head)
            if problem is None:
                checked = f"; {'; '.join(problems)}" if problems else ""
                return True, (
                    f"peerinfer's, {KERNEL_NAMES[kernel]} kernel (its logits matched llama.cpp's bit for bit "
                    f"at load{checked})"
                )
            problems.append(f"with the {KERNEL_NAMES[kernel]} kernel, {problem}")
        return False, f"llama.cpp's: peerinfer's was checked at load and {'; '.join(problems)}"

    def _check_head(self, head: OutputHead) -> str | None:
        """Decode 1 to ``slots`` rows of different tokens with llama.cpp's product, and compare the head's.

        Returns None when every logit is bit for bit the same, else what differed.
        """
        for rows in range(1, self.slots + 1):
            work = [SlotWork(slot, [7919 * (slot + 1) % self.n_vocab], 0, True) for slot in range(rows)]
            outputs = self._decode(work, head_mode=CAPTURE)
            theirs = np.stack([self.logits(index) for _, index in outputs])
            ours = np.zeros_like(theirs)
            head.write_logits([ours[row].ctypes.data for row in range(rows)])
            for slot in range(rows):
                lc.llama_memory_seq_rm(self.memory, slot, -1, -1)
            if not np.array_equal(ours, theirs):
                gap = float(np.abs(ours - theirs).max())
                return f"its logits differ from llama.cpp's by up to {gap:.3g} with {rows} rows"
        return None

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            count = lc.llama_token_to_piece(self.vocab, token, buffer, size, 0, False)
            if count >= 0:
                piece = buffer.raw[:count]
                self._pieces[token] = piece
                return piece
            size = -count

    def is_end(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self.vocab, token))

    def release(self, slot: int, keep: int) -> int:
        keep = self._cut(slot, keep)
        sampler = self._samplers.pop(slot, None)
        if sampler is not None:
            sampler.free()
        return keep

    def check_grammar(self, grammar: str) -> bool:
        """Whether llama.cpp parses ``grammar`` (rule ``root``); reads the vocabulary only."""
        sampler = lc.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        lc.llama_sampler_free(sampler)
        return True

    def copy(self, source: int, target: int) -> None:
        # Each slot has its own KV stream: llama.cpp copies the whole stream (its cells keep their
        # places, so attention reads them in the same order), ~38 MB for 2048 cells of this model.
        lc.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    def close(self) -> None:
        for slot in list(self._samplers):
            self.release(slot, 0)
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        if self._head is not None:
            self._head.close()
        lc.llama_model_free(self.model)


class LlamaEngine:
    """The production engine: a ``LlamaBackend`` driven by a ``BatchScheduler``.

    Construction touches no disk; ``load`` resolves, checks and loads the model. ``pad_rows``, for
    tests only, fixes the step sizes that get a throw-away row instead of the load-time measurement.
    """

    def __init__(self, settings: WorkerSettings, *, pad_rows: frozenset[int] | None = None) -> None:
        self._settings = settings
        self._pad_rows = pad_rows
        self._backend: LlamaBackend | None = None
        self._scheduler: BatchScheduler | None = None
        self._info: ModelInfo | None = None

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise EngineError("the model is not loaded yet")
        return self._info

    def load(self) -> None:
        if self._scheduler is not None:
            return
        settings = self._settings
        model_file = open_model_file(settings.model, settings.cache_dir)
        backend = LlamaBackend(model_file, settings)
        self._backend = backend
        self._info = ModelInfo(
            model_id=model_file.model_id,
            path=str(model_file.path),
            sha256=model_file.sha256,
            size_bytes=model_file.size_bytes,
            n_ctx=backend.n_ctx_per_slot,
            slots=settings.slots,
            n_threads=settings.n_threads,
            chat_template=backend.chat_template if settings.chat_template_text is None else settings.chat_template_text,
            bos_token=backend.bos_token,
            eos_token=backend.eos_token,
            n_vocab=backend.n_vocab,
            build=f"llama.cpp via llama-cpp-python {lc.__version__}",
        )
        scheduler = BatchScheduler(
            backend=backend,
            slots=settings.slots,
            max_queue=settings.max_queue,
            prefill_chunk=settings.prefill_chunk,
            reuse_prompts=settings.prefix_cache,
            cut_invariant=settings.batch_invariant,
            first_token_pause_s=settings.first_token_pause_ms / 1000,
            prompt_share=settings.prompt_share,
        )
        try:
            step_ms = scheduler.start(prepare=lambda: backend.calibrate(self._pad_rows)) or {}
        except BaseException:
            backend.close()
            self._backend = None
            self._info = None
            raise
        self._scheduler = scheduler
        padded, unconfirmed = sorted(backend.pad_rows), sorted(backend.unconfirmed_pad_rows)
        log.info(
            "decode step by rows: %s ms%s%s; output product: %s; KV cache: %s; Q4_K/Q6_K matmul of 2+ rows: %s",
            ", ".join(f"{rows}: {ms:.1f}" for rows, ms in step_ms.items()),
            f"; steps of {padded} rows get a throw-away row in a free slot (cheaper)" if padded else "",
            f"; {unconfirmed} rows looked dearer than one more, but not when timed again (not padded)"
            if unconfirmed
            else "",
            backend.head_status,
            backend.kv_cache,
            backend.kq_matmul,
        )

    def tokenize(self, prompt: str | Sequence[PromptPart], *, add_bos: bool) -> list[int]:
        if self._backend is None:
            raise EngineError("the model is not loaded yet")
        if isinstance(prompt, str):
            return self._backend.tokenize(prompt, add_bos)
        return self._backend.tokenize_parts(prompt, add_bos)

    def submit(self, generation: Generation) -> None:
        if self._scheduler is None:
            raise EngineError("the model is not loaded yet")
        self._scheduler.submit(generation)

    def submit_all(self, generations: Sequence[Generation]) -> None:
        if self._scheduler is None:
            raise EngineError("the model is not loaded yet")
        self._scheduler.submit_all(generations)

    def json_grammar(self, schema: Mapping[str, Any] | None) -> str:
        """GBNF for ``schema`` (any JSON object when None), checked to parse; see ``json_grammar``.

        CPU work of up to a few milliseconds for a big schema (its grammar is cached by schema text).
        """
        grammar = json_grammar(schema)
        if self._backend is not None and not self._backend.check_grammar(grammar):
            raise refuse(WHERE, "its grammar does not parse in llama.cpp; simplify the schema")
        return grammar

    def stats(self) -> EngineStats:
        if self._scheduler is None:
            return EngineStats(slots_total=self._settings.slots, slots_busy=0, queued=0)
        return self._scheduler.stats()

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
        if self._backend is not None:
            self._backend.close()
        self._scheduler = None
        self._backend = None


def json_grammar(schema: Mapping[str, Any] | None) -> str:
    """GBNF (rule ``root``) for JSON: any object when ``schema`` is None, else one that matches ``schema``.

    The schema is bounded first (``json_schema.check_schema``); llama-cpp-python's converter does the
    rest. Raises ``RequestError`` (param ``response_format``) naming the part it cannot express, and
    nothing else.
    """
    if schema is None:
        return str(lc_grammar.JSON_GBNF)
    check_schema(schema)
    try:
        text = json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise refuse(WHERE, f"is not plain JSON ({exc})") from exc
    return _convert_schema(text)


def _json_safe(grammar: str) -> str:
    """The converter's characters of a string include control characters, which JSON forbids there
    (``json.loads`` refuses a raw newline in a string): narrow them to what JSON allows."""
    lines = []
    for line in grammar.split("\n"):
        if line.startswith(("char ::= ", "dot ::= ")):
            name, rule = line.split(" ::= ", 1)
            rule = rule.replace('[^"\\\\]', '[^"\\\\\\x7F\\x00-\\x1F]', 1)
            rule = rule.replace("[^\\x0A\\x0D]", '[^"\\\\\\x7F\\x00-\\x1F]', 1)
            line = f"{name} ::= {rule}"
        lines.append(line)
    return "\n".join(lines)


@functools.lru_cache(maxsize=64)
def _convert_schema(text: str) -> str:
    try:
        # the converter writes resolved $refs back into the schema: it gets its own copy
        converter = lc_grammar.SchemaConverter(  # type: ignore[no-untyped-call]
            prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
        )
        schema = converter.resolve_refs(json.loads(text), "input")
        converter.visit(schema, "")  # type: ignore[no-untyped-call]
        grammar = _json_safe(str(converter.format_grammar()))  # type: ignore[no-untyped-call]
    except RequestError:
        raise
    except Exception as exc:  # the converter's own checks are asserts, KeyErrors, ValueErrors, ...
        detail = str(exc) or type(exc).__name__
        raise refuse(WHERE, f"cannot be turned into a grammar: {detail[:300]}") from exc
    check_grammar_size(grammar)
    return grammar
