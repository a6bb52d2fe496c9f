"""The model cards' offline APIs: the queue worker `offline_generate` and `offline_batch_generate`.

Spec moss-video-preview §6.2-6.3 and moss-vl §8.1-8.2 (the remote code is unpublished; this follows the spec's
reconstruction). Query dicts are described in `generation.queries`.

Queue protocol of `offline_generate` (one worker, one conversation):

* every content query answers with text pieces (UTF-8-safe, streamed as tokens are chosen, special tokens
  skipped) and then "<|round_end|>"; a failing query answers "[ERROR] <ExceptionName>: <message>" then
  "<|round_end|>", and the worker keeps serving. No "<|round_start|>" is sent (the spec makes it optional).
* answered turns are kept as the conversation history (multi-turn) unless the query says reset_session /
  clear_history (start over) or persist_session=False (leave the history as it was). A cancelled turn is kept
  with the partial answer the consumer saw.
* {"stop_offline_generate": True} ends the worker once the queries queued before it are answered (it is taken in
  queue order; a content query carrying it is answered first). `stop_offline_generate(model)`, from any thread,
  cancels the generation in progress and ends the worker at once; queries it had already taken off the queue
  but not started are answered with an [ERROR] line and "<|round_end|>" so no consumer waits forever.
* {"cancel_current_generate": True} or {"stop_generation": True} cancels the generation in progress: the round
  ends early with "<|round_end|>". Generation runs in the worker's own thread and polls the input queue between
  tokens; content queries arriving meanwhile are buffered in order, never lost. A cancel when nothing runs is
  ignored (it produces no output).

The worker starts no thread and every queue read has a timeout, so it returns promptly once stopped.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections import deque
from typing import Any

import torch

from .queries import (CANCEL_KEYS, CONTENT_KEYS, Query, QueryError, answered, build_turn, check_context, is_cancel,
                      is_stop, parse_query, positions_used, render_turn)
from .sampling import control_token_ids

logger = logging.getLogger(__name__)

ROUND_END = "<|round_end|>"
ROUND_START = "<|round_start|>"
ERROR_PREFIX = "[ERROR] "
POLL_SECONDS = 0.05  # how often an idle worker re-checks the stop flag

_running: "weakref.WeakKeyDictionary[Any, set[threading.Event]]" = weakref.WeakKeyDictionary()
_running_lock = threading.Lock()


def stop_offline_generate(model: Any) -> bool:
    """Stop every `offline_generate` worker running on `model` (safe from any thread): the generation in progress
    is cancelled and the worker returns. Returns False when no worker was running (nothing is remembered for a
    later worker)."""
    with _running_lock:
        events = list(_running.get(model, ()))
    for event in events:
        event.set()
    return bool(events)


def _error_line(err: BaseException) -> str:
    return f"{ERROR_PREFIX}{type(err).__name__}: {err}"


def _has_content(raw: Any) -> bool:
    return isinstance(raw, dict) and any(raw.get(k) is not None for k in CONTENT_KEYS)


def _sampling_kwargs(query: Query) -> dict[str, Any]:
    g = query.generate
    return dict(do_sample=g["do_sample"], temperature=g["temperature"], top_k=g["top_k"], top_p=g["top_p"],
                repetition_penalty=g["repetition_penalty"])


def _room(model: Any, positions: int, max_new_tokens: int) -> int:
    """max_new_tokens, capped so prompt (`positions` used) + answer stay inside the model's context."""
    room = model.config.text.max_position_embeddings - positions
    if room < max_new_tokens:
        logger.info("max_new_tokens %d capped to %d by the model's context", max_new_tokens, room)
    return max(1, min(max_new_tokens, room))


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for k, token in enumerate(ids):
        if token in eos:
            return ids[:k]
    return ids


# ----------------------------------------------------------------------------- the queue worker

class _Worker:
    def __init__(self, model: Any, processor: Any, q_in: Any, q_out: Any, chunk: int | None,
                 stop: threading.Event) -> None:
        self.model, self.processor, self.q_in, self.q_out = model, processor, q_in, q_out
        self.chunk, self.stop = chunk, stop
        self.pending: deque[Any] = deque()   # queries taken off q_in while generating, in arrival order
        self.history: list[dict[str, Any]] = []
        self.exempt = control_token_ids(model.config, processor)
        self.eos = set(model.config.tokens.eos_token_ids)

    def run(self) -> None:
        while not self.stop.is_set():
            if self.pending:
                raw = self.pending.popleft()
            else:
                try:
                    raw = self.q_in.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
            if _has_content(raw) or not (is_stop(raw) or is_cancel(raw)):
                self.serve(raw)  # also answers malformed items ([ERROR] + round end)
            if is_stop(raw):
                break
        for raw in self.pending:  # taken off the queue but never started (stopped from another thread)
            if _has_content(raw):
                self.q_out.put(ERROR_PREFIX + "offline_generate was stopped before this query was served")
                self.q_out.put(ROUND_END)
        self.pending.clear()

    def poll(self) -> bool:
        """Between tokens: True to cancel. Drains the input queue, buffering everything but cancel requests."""
        if self.stop.is_set():
            return True
        cancel = False
        while True:
            try:
                raw = self.q_in.get_nowait()
            except queue.Empty:
                return cancel
            if is_cancel(raw):
                cancel = True
                rest = {k: v for k, v in raw.items() if k not in CANCEL_KEYS}
                if rest:
                    self.pending.append(rest)
            else:
                self.pending.append(raw)

    def serve(self, raw: Any) -> None:
        try:
            query = parse_query(raw, self.processor.family)
            messages, inputs = build_turn(self.processor, query, self.history,
                                          max_context=self.model.config.text.max_position_embeddings)
            decoder = self.processor.incremental_decoder(skip_special_tokens=True)
            new_ids: list[int] = []

            def on_token(next_ids: torch.Tensor) -> None:
                token = int(next_ids[0])
                new_ids.append(token)
                piece = decoder.push(token)
                if piece:
                    self.q_out.put(piece)

            g = query.generate
            self.model.generate(**inputs, max_new_tokens=_room(self.model, positions_used(self.processor, inputs)[0],
                                                               g["max_new_tokens"]),
                                exempt_token_ids=self.exempt, stopping=self.poll, on_token=on_token,
                                vision_chunked_length=g["vision_chunked_length"] or self.chunk,
                                **_sampling_kwargs(query))
            tail = decoder.flush()
            if tail:
                self.q_out.put(tail)
            text = self.processor.decode(_until_eos(new_ids, self.eos), skip_special_tokens=True)
            if query.persist_session:
                self.history = answered(messages, text)
        except Exception as err:  # noqa: BLE001 - the worker reports every failure and keeps serving
            logger.debug("offline_generate query failed", exc_info=True)
            self.q_out.put(_error_line(err))
        finally:
            self.q_out.put(ROUND_END)


def offline_generate(model: Any, processor: Any, new_queries: Any, output_text_queue: Any,
                     vision_chunked_length: int | None = 64) -> None:
    """Blocking worker: query dicts from `new_queries`, text pieces and "<|round_end|>" to `output_text_queue`
    (protocol in the module docstring). Returns after {"stop_offline_generate": True} or stop_offline_generate."""
    stop = threading.Event()
    with _running_lock:
        _running.setdefault(model, set()).add(stop)
    try:
        _Worker(model, processor, new_queries, output_text_queue, vision_chunked_length, stop).run()
    finally:
        with _running_lock:
            events = _running.get(model)
            if events is not None:
                events.discard(stop)


# ----------------------------------------------------------------------------- batched

def _check_batch(queries: list[Query]) -> None:
    for k, q in enumerate(queries):
        if q.stop_offline_generate or q.cancel:
            raise QueryError(f"queries[{k}] carries a stop/cancel key; offline_batch_generate has no streaming, "
                             f"cancel or stop protocol (use offline_generate for those)")
    first = queries[0]
    for name in ("generate_kwargs", "media_kwargs"):
        for k, q in enumerate(queries[1:], start=1):
            if getattr(q, name) != getattr(first, name):
                raise QueryError(f"queries in one offline_batch_generate call must share the same {name}: queries[0] "
                                 f"has {getattr(first, name)!r} but queries[{k}] has {getattr(q, name)!r}; split "
                                 f"the call by {name}")


def offline_batch_generate(model: Any, processor: Any, queries: list[dict], session_states: list | None = None,
                           vision_chunked_length: int | None = 64) -> dict[str, Any]:
    """Answer `queries` together (left-padded batch). Returns {"results": [{"index", "text", "input_text",
    "messages"}], "session_states": [...]}: feed session_states back with follow-up queries (one per query, in
    order; None = new conversation). reset_session drops an item's history; persist_session=False returns its
    state unchanged. All queries must share generate_kwargs and media_kwargs (QueryError otherwise)."""
    if not isinstance(queries, (list, tuple)) or not queries:
        raise QueryError(f"queries must be a non-empty list of query dicts, got {queries!r}")
    if session_states is None:
        session_states = [None] * len(queries)
    if not isinstance(session_states, (list, tuple)) or len(session_states) != len(queries):
        raise QueryError(f"session_states must be a list with one entry per query ({len(queries)}), got "
                         f"{session_states!r}")
    for k, state in enumerate(session_states):
        if state is not None and not isinstance(state, list):
            raise QueryError(f"session_states[{k}] must be a list of messages (as returned) or None, got "
                             f"{type(state).__name__}")
    parsed = []
    for k, raw in enumerate(queries):
        try:
            parsed.append(parse_query(raw, processor.family))
        except QueryError as err:
            raise QueryError(f"queries[{k}]: {err}") from err
    _check_batch(parsed)
    turns = [render_turn(processor, q, state) for q, state in zip(parsed, session_states)]
    # one processor call takes one set of media keywords; conversations without media do not care which
    with_media = [t.media_kwargs for t in turns if t.images or t.videos]
    media = with_media[0] if with_media else {}
    if any(m != media for m in with_media):
        raise QueryError("the conversations in this batch were built with different media_kwargs "
                         f"({with_media}); pass the same media_kwargs explicitly or split the call")
    inputs = processor(text=[t.text for t in turns], images=[t.images for t in turns],
                       videos=[t.videos for t in turns], padding_side="left", **media)
    used = positions_used(processor, inputs)
    for k, length in enumerate(used):
        check_context(length, model.config.text.max_position_embeddings, what=f"queries[{k}]'s input")
    g = parsed[0].generate
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=_room(model, max(used), g["max_new_tokens"]),
                         exempt_token_ids=control_token_ids(model.config, processor),
                         vision_chunked_length=g["vision_chunked_length"] or vision_chunked_length,
                         **_sampling_kwargs(parsed[0]))
    eos = set(model.config.tokens.eos_token_ids)
    results, states = [], []
    for k, (query, turn) in enumerate(zip(parsed, turns)):
        ids = _until_eos(out[k, prompt_len:].tolist(), eos)
        text = processor.decode(ids, skip_special_tokens=True)
        conversation = answered(turn.messages, text)
        results.append({"index": k, "text": text, "input_text": turn.text, "messages": conversation})
        previous = session_states[k]
        states.append(conversation if query.persist_session else (list(previous) if previous is not None else []))
    return {"results": results, "session_states": states}


__all__ = ["offline_generate", "stop_offline_generate", "offline_batch_generate", "ROUND_END", "ROUND_START",
           "ERROR_PREFIX"]
