"""RLAIF: AI judges (``judges``) and the ``rlaif_label`` stage (``label``) that turns SFT samples into a
preference data set the ``rm`` stage trains on."""

from .judges import (
    Constitution,
    FunctionJudge,
    HFJudge,
    HTTPJudge,
    Judge,
    JudgeError,
    JudgeUnavailable,
    PairJudgment,
    PointJudgment,
    build_judge,
)

__all__ = [
    "Constitution", "FunctionJudge", "HFJudge", "HTTPJudge", "Judge", "JudgeError", "JudgeUnavailable",
    "PairJudgment", "PointJudgment", "build_judge",
]
