"""Shots: a video cut at its scene changes, so that each shot is captioned on its own.

Video training sets are made of shots, not files (Open-Sora, Open-Sora-Plan and Panda-70M cut at scene
changes before captioning). The cuts come from PySceneDetect's AdaptiveDetector on its PyAV backend:
it scores each frame's change from the previous one (mean HSV difference, 0-255) and calls a cut where
that score is `threshold` times the average of its neighbours' (two frames each side). A fixed
threshold (ContentDetector, HistogramDetector) cannot find a cut between two generated-world clips with
the same background: the objects that change cover a few percent of the frame, so such a cut scores
about 4, below what motion inside a clip scores (up to about 5.5). Measured by `python -m bench.shots`.
"""

from __future__ import annotations

# A frame's change over its neighbours' average that makes a cut (AdaptiveDetector's adaptive_threshold).
SHOT_THRESHOLD = 3.0
# The shortest shot, seconds: a cut closer than this to the previous one is not taken.
MIN_SHOT_S = 0.5
# The least change that may be a cut at all. PySceneDetect's default, 15, misses the world's cuts with
# the same background on both sides (about 4); below 3 the compression noise of a still shot could count.
MIN_CUT_CHANGE = 3.0


def detect_cuts(
    path: str, threshold: float = SHOT_THRESHOLD, min_shot_s: float = MIN_SHOT_S, start_s: float = 0.0, end_s: float | None = None
) -> list[float]:
    """Seconds from the start of the stream at which a new shot begins, inside (start_s, end_s).

    Decodes every frame of the span (PySceneDetect's PyAV backend seeks to start_s). A file PyAV cannot
    open or decode raises; a still image has no cut.
    """
    from scenedetect import AdaptiveDetector, SceneManager
    from scenedetect.backends.pyav import VideoStreamAv

    video = VideoStreamAv(path)
    if start_s > 0:
        video.seek(start_s)
    manager = SceneManager()
    manager.add_detector(AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=min_shot_s, min_content_val=MIN_CUT_CHANGE))
    manager.detect_scenes(video, end_time=end_s)
    return [start.seconds for start, _ in manager.get_scene_list()[1:]]


def shot_spans(cuts: list[float], start_s: float, end_s: float) -> list[tuple[float, float]]:
    """The shots [start, end) between the cuts of a span [start_s, end_s); no cut: the span is one shot."""
    bounds = [start_s, *(c for c in cuts if start_s < c < end_s), end_s]
    return list(zip(bounds[:-1], bounds[1:]))
