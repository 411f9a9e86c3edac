"""Forgetting scaling law: the alignment-loss probe used during training and the `agl forgetting` fit and report."""

from .analysis import FitOptions, analyse
from .fit import LawFit, fit_law, fit_many
from .probe import build_probe, log_schedule, measure, prompt_nll, summarize
from .recorder import FORGET_FILE, ForgettingOptions, ForgettingRecorder
from .report import build_report, write_report

__all__ = [
    "FORGET_FILE",
    "FitOptions",
    "ForgettingOptions",
    "ForgettingRecorder",
    "LawFit",
    "analyse",
    "build_probe",
    "build_report",
    "fit_law",
    "fit_many",
    "log_schedule",
    "measure",
    "prompt_nll",
    "summarize",
    "write_report",
]
