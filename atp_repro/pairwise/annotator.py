"""The JupyterLab annotator: a blind A / B / tie form over an :class:`AnnotationSession`.

    from atp_repro.pairwise import Annotator
    Annotator("annotations/supp_table5-<sample id>", judge="H1")   # last expression of a cell

Buttons: "A is better", "B is better", "Tie", "Skip", "Back". Keyboard (with the mouse over the
form): ``a``, ``b``, ``t``, ``s``, and ``Backspace`` or ``←`` for back. Every click is on disk
before the next item appears; closing the notebook and opening it again resumes at the first item
this judge has not judged.
"""

from __future__ import annotations

import html
import os

import ipywidgets as widgets

from .session import AnnotationSession, View

__all__ = ["Annotator", "KEYS"]

KEYS = {"a": "A", "b": "B", "t": "tie", "s": "skip", "Backspace": "back", "ArrowLeft": "back"}
_CHOICE_LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie"}


class Annotator(widgets.VBox):
    """An ipywidgets form; ``act(name)`` is what every button and key calls (tests call it too)."""

    def __init__(self, sample_folder: str | os.PathLike[str], judge: str, *, image_width: int = 288,
                 session: AnnotationSession | None = None) -> None:
        self.session = session or AnnotationSession(sample_folder, judge)
        self.progress = widgets.HTML(layout=widgets.Layout(margin="0 0 6px 0"))
        self.image = widgets.Image(format="png", width=image_width, height=image_width)
        self.question = widgets.HTML()
        self.answers = widgets.HTML()
        self.status = widgets.HTML()
        self.buttons = {}
        for name, label, style in (("A", _CHOICE_LABELS["A"], "primary"), ("B", _CHOICE_LABELS["B"], "primary"),
                                   ("tie", _CHOICE_LABELS["tie"], "info"), ("skip", "Skip", ""), ("back", "Back", "")):
            button = widgets.Button(description=label, button_style=style, tooltip=f"{label} (key: "
                                    f"{next(k for k, v in KEYS.items() if v == name)})")
            button.add_class(f"atp-annotator-{name}")
            button.on_click(lambda _b, n=name: self.act(n))
            self.buttons[name] = button
        super().__init__([self.progress, widgets.HBox([self.image, widgets.VBox([self.question, self.answers])]),
                          widgets.HBox(list(self.buttons.values())), self.status])
        self.add_class("atp-annotator")
        self._keyboard = self._listen_to_keys()
        self.render(self.session.view())

    def _listen_to_keys(self):
        from ipyevents import Event

        event = Event(source=self, watched_events=["keydown"], prevent_default_action=True)
        event.on_dom_event(lambda e: self.act(KEYS[e["key"]]) if e.get("key") in KEYS else None)
        return event

    def act(self, name: str) -> View:
        """"A", "B", "tie", "skip" or "back"."""
        s = self.session
        if name in ("A", "B", "tie"):
            if s.current is None:
                self.status.value = "Every item is judged. Use Back to change a judgement."
                return s.view()
            view = s.choose(name)
        elif name == "skip":
            view = s.skip()
        elif name == "back":
            view = s.back()
        else:
            raise ValueError(f"name must be one of A, B, tie, skip, back; got {name!r}")
        self.render(view)
        return view

    def render(self, view: View) -> None:
        self.progress.value = f"<b class='atp-progress'>{html.escape(view.progress)}</b>"
        for name in ("A", "B", "tie", "skip"):
            self.buttons[name].disabled = view.done
        if view.done:
            self.question.value = "<h3>All items are judged. Thank you.</h3>"
            self.answers.value = ""
            self.image.value = b""
            return
        self.image.value = view.image_path.read_bytes()
        self.question.value = f"<p><b>Question:</b> {html.escape(view.question)}</p>"
        rows = "".join(f"<p style='font-size:1.2em'><b>{k}:</b> {html.escape(v)}</p>"
                       for k, v in (("A", view.answer_a), ("B", view.answer_b)))
        self.answers.value = rows
        self.status.value = (f"Your judgement of this item: <b>{_CHOICE_LABELS[view.current_choice]}</b> "
                             "(a new choice replaces it)" if view.current_choice else "")
