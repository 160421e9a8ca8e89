"""Root conftest: unit tests and nbval kernels run with the pinned CPU numerics of ``atp-repro``.

Loaded by pytest before any test module imports torch; kernels started by nbval inherit the
environment (``ATP_REPRO_NUMERICS=native`` opts out, as for the command line).
"""

from atp_repro import numerics

numerics.apply()


# -- what the executed smoke notebooks show ----------------------------------------------------
# `make test` ends with pytest over build/notebooks/smoke (nbval); there, each executed notebook
# also gets the items below: it shows a figure and every claim of its claims file in full.

import pytest  # noqa: E402

from atp_repro import notebook_checks  # noqa: E402


class _OutputCheck(pytest.Item):
    def __init__(self, *, check: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.check = check

    def runtest(self) -> None:
        problems = notebook_checks.output_problems(self.path)
        mine = [p for p in problems if ("image/png" in p) == (self.check == "shows_a_figure")]
        assert not mine, "\n".join(mine)

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::{self.check}"


class _ExecutedNotebookOutputs(pytest.File):
    def collect(self):
        for check in ("shows_a_figure", "shows_every_claim_in_full"):
            yield _OutputCheck.from_parent(self, name=f"outputs::{check}", check=check)


def pytest_collect_file(file_path, parent):
    if notebook_checks.is_executed_smoke_notebook(file_path):
        return _ExecutedNotebookOutputs.from_parent(parent, path=file_path)
    return None
