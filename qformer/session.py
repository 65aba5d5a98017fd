"""One conversation about an image or a clip: what the terminal chat and the web page each hold per user.

A `ChatSession` keeps the current image or clip (decoded once, at the size the bridge reads) and the
(question, answer) turns about it. Every answer comes from `Bridge.answer`, streamed through transformers'
`TextIteratorStreamer`; the earlier turns go back in as `history`, which the LLM sees in its own chat
template. Nothing here knows about models beyond that call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from adapters.video import MAX_PIXELS, Clip, decode_side, read_clip

from .bridge import Bridge
from .config import MAX_NEW_TOKENS


class ChatError(ValueError):
    """Something the user asked for that cannot be done now; the message says why."""


class ChatSession:
    """One conversation: the current image or clip and the turns about it."""

    def __init__(self, bridge: Bridge, max_new_tokens: int = MAX_NEW_TOKENS, num_beams: int = 1):
        if num_beams < 1:
            raise ValueError(f"num_beams must be 1 (greedy) or more, not {num_beams}")
        self.bridge = bridge
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.clip: Clip | None = None
        self.history: list[tuple[str, str]] = []
        # A caption-first bridge's opening turn (its caption) with the clip it is about: the bridge would
        # caption the clip again for every turn, and greedy decoding gives the same caption each time.
        self.opening: tuple[Clip | None, list[tuple[str, str]]] = (None, [])

    def load(self, path: str | Path, max_duration_s: float | None = None, max_pixels: int = MAX_PIXELS) -> Clip:
        """Make the image or clip at `path` the subject of a new conversation.

        Decoded once here (the frames the bridge samples), at twice the vision encoder's input side:
        the session keeps only what the bridge reads, not a photo's full resolution, and a bad file
        is reported when it is named rather than at the next question. A clip longer than
        `max_duration_s` (from its header, before decoding) or frames larger than `max_pixels` are
        refused (ClipError). On an error the session is unchanged.
        """
        clip = read_clip(
            path,
            num_frames=self.bridge.config.num_frames,
            sampling=self.bridge.config.frame_sampling,
            max_pixels=max_pixels,
            max_side=decode_side(self.bridge.vision),
            max_duration_s=max_duration_s,
        )
        # Earlier turns were about another picture; carrying them over would mislead the LLM.
        self.clip, self.history = clip, []
        return clip

    def reset(self) -> None:
        # A new list rather than clear(): an answer still streaming belongs to the old conversation.
        self.history = []

    def close(self) -> None:
        """Drop the image or clip and the turns, so their memory is freed now (a page that was closed)."""
        self.clip, self.history, self.opening = None, [], (None, [])

    def stream(self, question: str, idle_s: float | None = None) -> Iterator[str]:
        """Answer `question` with the turns so far, yielding the text as it is generated.

        When the answer is complete it is appended to `history`, exactly as `Bridge.answer`
        returned it. Closing the iterator early (Ctrl-C, a closed page) stops generation. Under beam
        search the answer is yielded in one piece when it is complete. With `idle_s`, an empty
        string is yielded after each `idle_s` seconds without new text (beam search, the opening
        caption), so a caller that acts only between items, as a web server does, can close the
        stream then.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        question = question.strip()
        if not question:
            raise ChatError("empty question")
        if self.clip is None:
            raise ChatError("no image or clip yet: load one first")
        clip, history = self.clip, self.history
        stop = threading.Event()

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        streamer = TextIteratorStreamer(self.bridge.llm.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=idle_s)
        until_stopped = StoppingCriteriaList([StopWhenAsked()])
        outcome: dict[str, object] = {}

        def generate() -> None:
            try:
                turns = list(history)
                if self.bridge.captions_before(question, turns):
                    if self.opening[0] is not clip:  # keyed by the clip: another may have been loaded meanwhile
                        prompt = self.bridge.config.caption_prompt
                        caption = self.bridge.answer(
                            clip,
                            prompt,
                            max_new_tokens=MAX_NEW_TOKENS,
                            num_beams=self.num_beams,
                            stopping_criteria=until_stopped,
                        )
                        if stop.is_set():  # a caption cut short must not open later answers; nobody waits for this one
                            return
                        self.opening = (clip, [(prompt, caption)])
                    turns = self.opening[1] + turns
                # generate() refuses a streamer with beams; then the finished answer goes through it whole.
                decode = {"streamer": streamer} if self.num_beams == 1 else {"num_beams": self.num_beams}
                outcome["answer"] = self.bridge.answer(
                    clip,
                    question,
                    turns,
                    max_new_tokens=self.max_new_tokens,
                    stopping_criteria=until_stopped,
                    **decode,
                )
                if self.num_beams > 1:
                    streamer.on_finalized_text(outcome["answer"], stream_end=True)
            except BaseException as e:  # handed to the caller's thread below
                outcome["error"] = e
                streamer.end()  # generate() never will now; without it the loop below waits forever

        worker = threading.Thread(target=generate, name="chat-generate", daemon=True)
        worker.start()
        try:
            started = False
            while True:
                try:
                    text = next(streamer)
                except StopIteration:
                    break
                except queue.Empty:  # nothing new for idle_s seconds
                    yield ""
                    continue
                if not started:
                    # Bridge.answer strips the answer; strip the stream's start the same way.
                    text = text.lstrip()
                    started = bool(text)
                if text:
                    yield text
        finally:
            stop.set()  # a no-op after a complete answer; ends generation early otherwise
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        # Loading another clip or /reset during generation started a new conversation.
        if self.history is history:
            history.append((question, outcome["answer"]))


def describe(clip: Clip, name: str) -> str:
    if clip.duration_s == 0:
        return f"{name}: an image"
    return f"{name}: {len(clip.frames)} frames sampled from {clip.duration_s:.1f} s"
