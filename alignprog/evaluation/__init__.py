"""Evaluators: embed each video once, compute metrics, return a serialisable report."""

from alignprog.evaluation.progress import (CONVENTION, ActionFrames, DurationPrior, action_frames,
                                           constant_progress, duration_prior,
                                           duration_prior_progress, embed_videos,
                                           evaluate_progress, online_progress, parse_baseline,
                                           progress_metrics, random_progress)
from alignprog.evaluation.alignment import (enclosed_area_error, evaluate_alignment,
                                            kendall_tau, kendall_tau_wild, phase_classification,
                                            phase_progression)

__all__ = ["CONVENTION", "ActionFrames", "enclosed_area_error", "evaluate_alignment",
           "kendall_tau", "kendall_tau_wild", "phase_classification", "phase_progression", "DurationPrior", "action_frames", "constant_progress",
           "duration_prior", "duration_prior_progress", "embed_videos", "evaluate_progress",
           "online_progress", "parse_baseline", "progress_metrics", "random_progress"]
