"""Pairwise evaluation (supplementary Table 5): blind A / B / tie judgements of two systems' answers.

* :mod:`.sample`    draw the items from two evaluation runs, randomise sides, write the sample folder;
* :mod:`.records`   the judgement file format (one JSON line per click, append-only, validated);
* :mod:`.session`   an annotation session's logic (resume, choose, skip, back);
* :mod:`.annotator` the JupyterLab form over a session (ipywidgets);
* :mod:`.judges`    automatic judges writing the same records (reference answer; local model);
* :mod:`.tally`     win rates with bootstrap intervals, and agreement between judges.
"""

from .judges import ModelJudge, ReferenceJudge, run_judge
from .records import Judgement, JudgementError, read_judgements
from .sample import PairwiseSample, draw_sample, find_sample_folder, load_sample, write_sample
from .session import AnnotationSession
from .tally import agreement, read_folder, tally, tally_folder, tally_judges


def __getattr__(name: str):
    if name == "Annotator":  # ipywidgets only when the form is wanted
        from .annotator import Annotator

        return Annotator
    raise AttributeError(name)


__all__ = [
    "AnnotationSession",
    "Annotator",
    "Judgement",
    "JudgementError",
    "ModelJudge",
    "PairwiseSample",
    "ReferenceJudge",
    "agreement",
    "draw_sample",
    "find_sample_folder",
    "load_sample",
    "read_folder",
    "read_judgements",
    "run_judge",
    "tally",
    "tally_folder",
    "tally_judges",
    "write_sample",
]
