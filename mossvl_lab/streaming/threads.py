"""Threaded real-time APIs of the model cards, as thin consumers of one `RealtimeSession`'s event stream.

* `ThreadedSession` (MOSS-VL's session API, spec moss-vl §8.3): ONE worker thread runs `session.events()` and
  turns each event into output chunks; pushes come from any thread. `create_realtime_session` builds one.
* `online_generate` (MOSS-VL's queue API) and `real_time_generate` (MOSS-Video-Preview's card API, spec
  moss-video-preview §6.4, also MOSS-VL's older API) block the caller's thread, moving input-queue items into a
  `ThreadedSession` (every queue read has a short timeout, so a stop is seen within `POLL_SECONDS`).
  `stop_real_time_generate(model)` stops every such loop on `model` from any thread, parked or not.

Output protocol (strings on the output queue; `OutputProtocol` is the one place these rules live):

* text pieces of an answer (UTF-8-safe; `<|response|>`, `<|assistant|>`, `<go>` hidden);
* "<|silence|>" for every decision to stay silent (consumers print one banner per run of them);
* "<|round_start|>": MOSS-Video-Preview (`round_start_on="prompt"`) sends it when a user prompt is consumed (the
  card's consumer discards one held-back token on it), followed by "<|silence|>" when a frame arrived in the same
  step (the trained opener the session inserted, §6.4 f); MOSS-VL (`"answer"`, any model with a `<|response|>`
  token) sends it when the model starts an answer (`<|response|>`);
* "[ERROR] <ExceptionName>: <message>" for a failure: a bad input (the loop keeps serving) or a failure of the
  loop itself (the loop ends);
* "<|round_end|>" exactly once, last, when the loop ends (stop, close, or failure).

Frame timestamps are seconds from the stream start and must be finite, >= 0 and non-decreasing
(`FrameTimestampError`). `real_time_generate` takes them from `(image, timestamp)` items when given, else
`index / fps` with `fps=`, else `time.monotonic()` minus the loop's start when the frame is taken off the queue.

`max_tokens_per_turn` is, as in MOSS-VL, a tokens-per-second pacing cap for answers (frames and prompts are
never delayed by it); 86400 (the cards' default) or None means no pacing; `max_new_tokens` is accepted as the
MOSS-Video-Preview demo's name for the same value.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import numbers
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal

from .events import Event
from .inputs import check_timestamp
from .protocol import (POLL_SECONDS, ROUND_END, OutputProtocol, QueueMessageError, deadline, error_line, offer,
                       session_options)
from .session import RealtimeSession, SessionClosedError, SessionView

logger = logging.getLogger(__name__)

EVENT_QUEUE_SIZE = 4096    # raw events kept for widgets; the oldest is dropped when nobody reads them
THREAD_NAME = "mossvl-realtime"
CONFIG_KEYS = ("initial_prompt", "system_prompt", "frame_queue_size", "max_tokens_per_turn")
FRAME_KEYS = ("frame", "timestamp", "prompt", "drop_oldest")


def _release_memory(collect: bool = True) -> None:
    """Free what a finished loop held: a full gc.collect (only when asked: in a big heap, a long notebook or test
    run, it takes ~seconds, and a stop waits for it), then the CUDA cache."""
    if collect:
        gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # releasing memory is best effort; never fail a stop over it
        logger.debug("torch.cuda.empty_cache failed", exc_info=True)


class ThreadedSession:
    """A `RealtimeSession` stepped by ONE worker thread (`start()`), fed from any thread.

    `output` is the queue of chunks (module docstring; read it with `poll_output`), `events` a bounded queue of
    the raw session events for widgets (the oldest is dropped when full; `events_dropped` counts them),
    `session` the engine (`session.state` for counters and caches). `close()` stops and joins the worker.
    """

    def __init__(self, model: Any, processor: Any, initial_prompt: str | None = None,
                 system_prompt: str | None = None, frame_queue_size: int = 256,
                 max_tokens_per_turn: float | None = None, *, output: Any = None,
                 round_start_on: Literal["prompt", "answer"] | None = None, **generate_kwargs: Any) -> None:
        if isinstance(frame_queue_size, bool) or not isinstance(frame_queue_size, int) or frame_queue_size < 1:
            raise ValueError(f"frame_queue_size must be an integer >= 1, got {frame_queue_size!r}")
        options = session_options(max_tokens_per_turn=max_tokens_per_turn, **generate_kwargs)
        self.session = RealtimeSession(model, processor, system_prompt=system_prompt, prompt=initial_prompt,
                                       max_frames_queued=frame_queue_size, **options)
        self.frame_queue_size = frame_queue_size
        self.protocol = OutputProtocol.for_session(self.session, round_start_on)
        self.output = queue.Queue() if output is None else output
        self.events: queue.Queue = queue.Queue(maxsize=EVENT_QUEUE_SIZE)
        self.events_dropped = 0
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    # ------------------------------------------------------------------ control

    def start(self) -> "ThreadedSession":
        with self._guard:
            if self.session.closed:
                raise SessionClosedError("this session is closed; create a new one to continue")
            if self._thread is not None:
                raise RuntimeError("this ThreadedSession was already started")
            self._thread = threading.Thread(target=self._run, name=f"{THREAD_NAME}-{id(self):x}", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float | None = 1.0) -> bool:
        """Stop the worker (from any state, any thread) and join it; True when it has ended. The worker stops
        after the step in progress (with the tiny models, milliseconds); None waits for it however long."""
        self.session.close()
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def __enter__(self) -> "ThreadedSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def active(self) -> bool:
        """The worker is running (started, not closed, not failed)."""
        return self._thread is not None and self._thread.is_alive() and not self.session.closed

    @property
    def pending_frames(self) -> int:
        return self.session.state.pending_frames

    @property
    def state(self) -> SessionView:
        return self.session.state

    # ------------------------------------------------------------------ input (any thread)

    def push_frame(self, image: Any, timestamp: float) -> bool:
        """Queue a frame at `timestamp` s; True when the queue was full and its oldest frame was dropped."""
        return self.session.push_frame(image, check_timestamp(timestamp))

    def push_prompt(self, text: str) -> None:
        self.session.push_prompt(text)

    def push_prompt_frame(self, prompt: str, image: Any, timestamp: float) -> bool:
        """A prompt and a frame that land in the same step (the prompt first, then the frame: the new assistant
        turn opens with the trained `<|silence|>` and sees the frame). Nothing is queued if either is invalid."""
        if not isinstance(prompt, str):
            raise TypeError(f"push_prompt_frame expects a str prompt, got {type(prompt).__name__}")
        return self.session.push_prompt_frame(prompt, image, timestamp)

    # ------------------------------------------------------------------ output (any thread)

    def poll_output(self, timeout: float | None = 0.1) -> str | None:
        """The next chunk, or None after `timeout` s. timeout=None waits until a chunk arrives or the worker has
        ended with nothing left to read."""
        while True:
            ended = self._thread is None or not self._thread.is_alive()  # before reading: no last chunk is missed
            try:
                if timeout == 0:
                    return self.output.get_nowait()
                return self.output.get(timeout=POLL_SECONDS if timeout is None else timeout)
            except queue.Empty:
                if timeout is not None or ended:
                    return None

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        try:
            for event in self.session.events(poll=POLL_SECONDS):
                self._record(event)
                for chunk in self.protocol.render(event):
                    offer(self.output, chunk, lambda: self.session.closed)
        except Exception as err:  # the loop itself failed: report it and end (the caches may be half-updated)
            self.error = err
            logger.exception("real-time loop failed")
            offer(self.output, error_line(err), deadline(1.0))
        finally:
            self.session.close()
            give_up = deadline(1.0)  # one deadline for all closing chunks: each must not add its own second
            for chunk in self.protocol.end():
                offer(self.output, chunk, give_up)

    def _record(self, event: Event) -> None:
        while True:  # only this thread puts, so at most one retry
            try:
                return self.events.put_nowait(event)
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.events.get_nowait()
                    self.events_dropped += 1


def create_realtime_session(model: Any, processor: Any, initial_prompt: str | None = None,
                            system_prompt: str | None = None, frame_queue_size: int = 256,
                            max_tokens_per_turn: float | None = None, **generate_kwargs: Any) -> ThreadedSession:
    """MOSS-VL's session API: a `ThreadedSession`, not yet started (call `.start()`)."""
    return ThreadedSession(model, processor, initial_prompt, system_prompt, frame_queue_size, max_tokens_per_turn,
                           **generate_kwargs)


# ---------------------------------------------------------------------- blocking loops and their stop flag

_running: "weakref.WeakKeyDictionary[Any, set[threading.Event]]" = weakref.WeakKeyDictionary()
_running_lock = threading.Lock()
_NOTHING = object()  # "no message yet" from a queue read that timed out


def stop_real_time_generate(model: Any) -> bool:
    """Stop every `real_time_generate` / `online_generate` loop running on `model` (from any thread, also while
    parked waiting for input). Each loop closes its session, sends "<|round_end|>", drops the session (freed at
    once by reference counting; a full gc.collect runs only if a reference cycle keeps it), empties the CUDA cache
    and returns. Returns False when no loop was running (nothing is remembered for later; gc and the CUDA cache
    are then released here)."""
    with _running_lock:
        flags = list(_running.get(model, ()))
    for flag in flags:
        flag.set()
    if not flags:
        # with loops running their sessions are still alive: a collection here would free nothing and, in a large
        # heap, cost the stop ~seconds (benchmarks/stop_latency.py)
        _release_memory()
    return bool(flags)


def _serve(model: Any, out: Any, make: Callable[[threading.Event], ThreadedSession | None],
           pump: Callable[[ThreadedSession, threading.Event], None]) -> None:
    """One blocking loop: build the session (`make` returns None when stopped first), start it, let `pump` feed
    it until it returns, close it. The stop flag is registered for the whole call."""
    stop = threading.Event()
    with _running_lock:
        _running.setdefault(model, set()).add(stop)
    threaded = None
    try:
        try:
            threaded = make(stop)
            if threaded is not None:
                threaded.start()
        except Exception as err:  # bad options: the consumer must still see the end of the loop
            offer(out, error_line(err), deadline(1.0))
            threaded = None
        if threaded is None:
            offer(out, ROUND_END, deadline(1.0))
            return
        pump(threaded, stop)
    finally:
        session = None
        if threaded is not None:
            threaded.close(timeout=None)  # the worker ends after its current step and sends "<|round_end|>"
            session = weakref.ref(threaded.session)
        with _running_lock:
            _running.get(model, set()).discard(stop)
        del threaded
        # refcounting has freed the session unless a cycle keeps it (a failure's traceback): only then collect
        _release_memory(collect=session is not None and session() is not None)


def _feed(threaded: ThreadedSession, out: Any, stop: threading.Event, push: Callable[[], Any]) -> bool:
    """Run one push; a bad input becomes an [ERROR] line. False once the session is closed."""
    try:
        push()
    except SessionClosedError:
        return False
    except Exception as err:
        offer(out, error_line(err), lambda: stop.is_set() or not threaded.active)
    return True


def _get(source: Any, timeout: float) -> Any:
    try:
        return source.get(timeout=timeout) if timeout > 0 else source.get_nowait()
    except queue.Empty:
        return _NOTHING


def real_time_generate(model: Any, image_queue: Any, prompt_queue: Any, token_queue: Any, processor: Any, *,
                       fps: float | None = None, max_new_tokens: float | None = None,
                       max_tokens_per_turn: float | None = None, do_sample: bool = False,
                       temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                       system_prompt: str | None = None, prompt: str | None = None, policy: Any = None,
                       cache_policy: Any = None, max_frames_queued: int = 256) -> None:
    """The cards' real-time loop, blocking until `stop_real_time_generate(model)` (or a failure).

    image_queue: PIL images (or HxWx3 arrays, encoded bytes), or `(image, timestamp)` pairs (MOSS-VL's form);
    timestamps as in the module docstring. prompt_queue: user texts (barge-in). token_queue: output chunks.
    prompt: the initial user turn ("" by default, as the card); system_prompt: None = the
    checkpoint's (processor's) real-time prompt.
    """
    def make(stop: threading.Event) -> ThreadedSession:
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not fps > 0):
            raise ValueError(f"fps must be a number > 0 (or None: timestamps from the monotonic clock), got {fps!r}")
        return ThreadedSession(model, processor, prompt, system_prompt, max_frames_queued, max_tokens_per_turn,
                               output=token_queue, max_new_tokens=max_new_tokens, do_sample=do_sample,
                               temperature=temperature, top_k=top_k, top_p=top_p, policy=policy,
                               cache_policy=cache_policy)

    def pump(threaded: ThreadedSession, stop: threading.Event) -> None:
        start, taken = time.monotonic(), 0

        def push_image(item: Any) -> bool:
            nonlocal taken
            index, taken = taken, taken + 1
            if isinstance(item, tuple) and len(item) == 2:
                return threaded.push_frame(*item)
            return threaded.push_frame(item, index / fps if fps is not None else time.monotonic() - start)

        while not stop.is_set() and threaded.active:
            took = False
            for source, push in ((prompt_queue, threaded.push_prompt), (image_queue, push_image)):
                for _ in range(max_frames_queued):  # bounded, so a flooding feeder never hides the stop flag
                    if (item := _get(source, 0)) is _NOTHING:
                        break
                    took = True
                    if not _feed(threaded, token_queue, stop, lambda: push(item)):
                        return
            # nothing waiting: wait briefly for a frame, then look at the prompts and the stop flag again
            if not took and (item := _get(image_queue, POLL_SECONDS)) is not _NOTHING:
                if not _feed(threaded, token_queue, stop, lambda: push_image(item)):
                    return

    _serve(model, token_queue, make, pump)


def online_generate(model: Any, processor: Any, input_queue: Any, output_queue: Any, frame_queue_size: int = 256,
                    max_tokens_per_turn: float | None = None, **generate_kwargs: Any) -> None:
    """MOSS-VL's queue API, blocking until {"stop_online_generate": True} or `stop_real_time_generate(model)`.

    Messages (dicts): the first may carry {"initial_prompt", "system_prompt", "frame_queue_size",
    "max_tokens_per_turn"} (they override the arguments; later ones are an error); frames {"frame", "timestamp"
    [, "prompt", "drop_oldest"]} (with "prompt": both land in one step; "drop_oldest": False waits for room in
    the frame queue instead of dropping its oldest frame); prompts {"prompt"[, "drop_oldest"]} (never dropped).
    A malformed message or bad input answers an "[ERROR] ..." line and the loop keeps serving; the stop message
    ends it at once (frames still queued are not ingested). generate_kwargs: as `session_options`.
    """
    pending: list[Any] = []  # what the first message carried besides the session's options

    def make(stop: threading.Event) -> ThreadedSession | None:
        message = _NOTHING
        while message is _NOTHING:  # the options may come with the first message: read it before building
            if stop.is_set():
                return None
            message = _get(input_queue, POLL_SECONDS)
        if _is_stop(message):
            return None
        options = {"initial_prompt": None, "system_prompt": None, "frame_queue_size": frame_queue_size,
                   "max_tokens_per_turn": max_tokens_per_turn}
        if isinstance(message, dict) and any(k in message for k in CONFIG_KEYS):
            options.update({k: message[k] for k in CONFIG_KEYS if k in message})
            message = {k: v for k, v in message.items() if k not in CONFIG_KEYS}
        if not (isinstance(message, dict) and not message):
            pending.append(message)
        return ThreadedSession(model, processor, options["initial_prompt"], options["system_prompt"],
                               options["frame_queue_size"], options["max_tokens_per_turn"], output=output_queue,
                               **generate_kwargs)

    def pump(threaded: ThreadedSession, stop: threading.Event) -> None:
        while not stop.is_set() and threaded.active:
            message = pending.pop(0) if pending else _get(input_queue, POLL_SECONDS)
            if _is_stop(message):
                return
            if message is not _NOTHING and not _feed(threaded, output_queue, stop,
                                                      lambda: _handle(threaded, message, stop)):
                return

    _serve(model, output_queue, make, pump)


def _is_stop(message: Any) -> bool:
    return isinstance(message, dict) and bool(message.get("stop_online_generate"))


def _handle(threaded: ThreadedSession, message: Any, stop: threading.Event) -> None:
    """One `online_generate` message (not the stop message) -> pushes; QueueMessageError when malformed."""
    if not isinstance(message, dict):
        raise QueueMessageError(f"online_generate messages are dicts ({{'frame', 'timestamp'}}, {{'prompt'}} or "
                                f"{{'stop_online_generate': True}}), got {type(message).__name__}")
    late = [k for k in CONFIG_KEYS if k in message]
    if late:
        raise QueueMessageError(f"{', '.join(late)} can only be set by the first message (the session is running)")
    unknown = sorted(set(message) - set(FRAME_KEYS) - {"stop_online_generate"})
    if unknown:
        raise QueueMessageError(f"unknown message keys {unknown}; frames take {list(FRAME_KEYS)}, prompts "
                                f"{{'prompt'}}, stop {{'stop_online_generate': True}}")
    if "frame" not in message:
        if "prompt" not in message:
            raise QueueMessageError("a message needs 'frame' (with 'timestamp') or 'prompt'")
        threaded.push_prompt(message["prompt"])
        return
    if "timestamp" not in message:
        raise QueueMessageError("a frame message needs 'timestamp' (seconds from the stream start)")
    if message.get("drop_oldest", True) is False:  # wait for room rather than drop the oldest queued frame
        while threaded.pending_frames >= threaded.frame_queue_size and threaded.active and not stop.is_set():
            time.sleep(POLL_SECONDS)
    if message.get("prompt") is not None:
        threaded.push_prompt_frame(message["prompt"], message["frame"], message["timestamp"])
    else:
        threaded.push_frame(message["frame"], message["timestamp"])
