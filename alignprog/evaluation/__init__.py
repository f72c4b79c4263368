"""Evaluators: embed each video once, compute metrics, return a serialisable report.

Progress: `report.evaluate_progress` assembles `embed` (the encoder pass), `online` (the head's
online protocol), `baselines`, `cumulative` (path-length progress of the embeddings), `metrics`
(action-level errors) and `video_level` (video-level OGPE). Alignment: `alignment`.
"""

from alignprog.evaluation.alignment import (enclosed_area_error, evaluate_alignment,
                                            kendall_tau, kendall_tau_wild, phase_classification,
                                            phase_progression)
from alignprog.evaluation.baselines import (DurationPrior, constant_progress, duration_prior,
                                            duration_prior_progress, parse_baseline,
                                            random_progress)
from alignprog.evaluation.embed import embed_videos
from alignprog.evaluation.metrics import ActionFrames, action_frames, progress_metrics
from alignprog.evaluation.online import online_progress
from alignprog.evaluation.report import CONVENTION, evaluate_progress

__all__ = ["CONVENTION", "ActionFrames", "enclosed_area_error", "evaluate_alignment",
           "kendall_tau", "kendall_tau_wild", "phase_classification", "phase_progression",
           "DurationPrior", "action_frames", "constant_progress", "duration_prior",
           "duration_prior_progress", "embed_videos", "evaluate_progress", "online_progress",
           "parse_baseline", "progress_metrics", "random_progress"]
