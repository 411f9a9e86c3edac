"""DriftCheck: measure how far a fine-tune moved a model's refusal behaviour, with bootstrap intervals."""

from .judges import DEFAULT_JUDGES, Judge, MarginJudge, PatternJudge, builtin_judges, select_judges
from .margin import COMPLIANCE_OPENINGS, REFUSAL_OPENINGS, refusal_margins
from .metrics import compute_tables
from .patterns import COMPLIANCE_PATTERNS, REFUSAL_PATTERNS, refusal_score
from .promptsets import DEFAULT_PROMPTS, load_eval_prompts, overrefusal_v1
from .report import SCHEMA_VERSION, build_report, report_from_folder, write_reports
from .runner import DriftOptions, judge_batch, judge_model, run_drift
from .stats import Bootstrap
from .trainer_report import trainer_report

__all__ = [
    "COMPLIANCE_OPENINGS",
    "COMPLIANCE_PATTERNS",
    "DEFAULT_JUDGES",
    "DEFAULT_PROMPTS",
    "Bootstrap",
    "DriftOptions",
    "Judge",
    "MarginJudge",
    "PatternJudge",
    "REFUSAL_OPENINGS",
    "REFUSAL_PATTERNS",
    "SCHEMA_VERSION",
    "build_report",
    "builtin_judges",
    "compute_tables",
    "judge_batch",
    "judge_model",
    "load_eval_prompts",
    "overrefusal_v1",
    "refusal_margins",
    "refusal_score",
    "report_from_folder",
    "run_drift",
    "select_judges",
    "trainer_report",
    "write_reports",
]
