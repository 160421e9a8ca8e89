"""The pairwise annotator in a real browser: JupyterLab on localhost, headless Chromium driven by Playwright.

It opens ``annotations/annotate.ipynb`` (on a small sample in a temporary folder), runs it, judges three
items with the mouse and the keyboard, reloads the page, runs it again, and checks the judgement file
and the resume point.

Needs a Chromium (Debian: ``apt-get install chromium``; or set ``ATP_REPRO_CHROMIUM`` to its path) and
the ``playwright`` package (the ``dev`` extra); without them the test is skipped, unless
``ATP_REPRO_REQUIRE_BROWSER=1`` (CI) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from atp_repro import paths
from atp_repro.pairwise import draw_sample, read_judgements, write_sample
from atp_repro.pairwise.records import judgement_path

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000


def _chromium() -> str | None:
    for candidate in (os.environ.get("ATP_REPRO_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                      shutil.which("google-chrome")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _requirements() -> str | None:
    """Why the test cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if _chromium() is None:
        return "no Chromium found (apt-get install chromium, or set ATP_REPRO_CHROMIUM)"
    return None


@pytest.fixture(scope="module")
def browser_ready():
    why = _requirements()
    if why:
        if os.environ.get("ATP_REPRO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"ATP_REPRO_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(folder: Path):
    n = 10
    idx = pd.Index(range(n), name="index")
    base = pd.DataFrame({"question": [f"what colour is shape {i} ?" for i in range(n)],
                         "answer": ["red"] * n}, index=idx)
    runs = {"atp": base.assign(prediction=["red", "blue"] * 5), "upper_bound": base.assign(prediction=["red"] * n)}
    return write_sample(draw_sample(runs, 6, seed=1), folder,
                        lambda it: np.tile(np.arange(48, dtype=np.uint8)[:, None, None] * 5, (1, 48, 3)))


@pytest.fixture
def lab(tmp_path, browser_ready):
    """JupyterLab serving ``tmp_path`` (the annotator notebook and a sample), stopped afterwards."""
    sample = _sample(tmp_path / "sample")
    nb = nbformat.read(paths.repo_root() / "annotations" / "annotate.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = f'sample_folder = "{tmp_path / "sample"}"\njudge = "browser"'
    nbformat.write(nb, tmp_path / "annotate.ipynb")
    settings = tmp_path / "lab-settings" / "@jupyterlab"
    for extension, name, values in [
            ("apputils-extension", "notification", {"fetchNews": "false", "checkForUpdates": False})]:
        (settings / extension).mkdir(parents=True)
        (settings / extension / f"{name}.jupyterlab-settings").write_text(json.dumps(values))
    port, token = _free_port(), "atp-browser-test"
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "ATP_REPRO_ROOT": str(paths.repo_root())}
    log = open(tmp_path / "jupyter.log", "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp_path}", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("JupyterLab exited:\n" + (tmp_path / "jupyter.log").read_text()) from None
                time.sleep(0.1)
        else:
            raise RuntimeError("JupyterLab did not start in 60 s:\n" + (tmp_path / "jupyter.log").read_text())
        yield {"url": f"{url}/lab/tree/annotate.ipynb?token={token}", "folder": tmp_path / "sample", "sample": sample}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


_IDLE = ".jp-Notebook-ExecutionIndicator[data-status='idle']"
_LAST_PROMPT = ("() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt')]"
                ".pop()?.textContent")


def _select_kernel(page) -> None:
    """Accept JupyterLab's "Select Kernel" dialog (its default is the notebook's Python 3 kernel).

    On a loaded machine the notebook can open before the kernel specs are known; JupyterLab then asks
    which kernel to start, and the dialog blocks every click until it is answered.
    """
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and "Select Kernel" in dialog.inner_text():
        print("answering JupyterLab's dialog:", dialog.inner_text().replace("\n", " | "))
        dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
        dialog.wait_for(state="detached", timeout=10_000)


def _run_all(page) -> None:
    """Run every cell through JupyterLab's menu and wait for the annotator to appear.

    A run requested while the new kernel's connection is still being set up can be dropped, wholly
    (every cell stays "[ ]", seen about once in six runs) or after the first cell (seen once in CI);
    a loaded machine can also ask which kernel to start (``_select_kernel``). So the request is
    repeated when the kernel has stayed idle for 5 s and the last cell has not run since the request.
    Once the last cell has run, the annotator has the whole timeout to render, unless JupyterLab
    reports "Error displaying widget" (a view requested before the widget manager was ready).
    """
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=TIMEOUT_MS)
    page.wait_for_selector(f"{_IDLE}, .jp-Dialog", timeout=TIMEOUT_MS)
    for _ in range(6):
        _select_kernel(page)
        before = page.evaluate(_LAST_PROMPT)
        try:
            page.get_by_role("menuitem", name="Run", exact=True).click(timeout=10_000)
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click(timeout=10_000)
        except Exception:  # a dialog opened in between: answer it and ask again
            continue
        requested, idle_since = time.monotonic(), None
        while time.monotonic() - requested < TIMEOUT_MS / 1000:
            if page.locator(".atp-annotator .atp-progress").count():
                page.wait_for_selector(_IDLE, timeout=TIMEOUT_MS)  # nothing still queued
                return
            _select_kernel(page)
            if page.get_by_text("Error displaying widget").count():
                break  # the view was created before the kernel's widget manager was ready: run again
            if page.locator(_IDLE).count() and page.evaluate(_LAST_PROMPT) in (before, "[ ]:"):
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 5:
                    break  # the request was dropped: ask again
            else:
                idle_since = None
            page.wait_for_timeout(250)
        else:
            break  # the last cell ran but the annotator did not render
    shot = Path(os.environ.get("TMPDIR", "/tmp")) / "atp-annotator-browser-test.png"
    page.screenshot(path=str(shot))
    text = page.locator(".jp-NotebookPanel").inner_text()[-3000:]
    raise AssertionError(f"the annotator did not appear; screenshot {shot}; notebook text:\n{text}")


def _progress(page) -> str:
    return page.locator(".atp-annotator .atp-progress").inner_text()


def _wait_progress(page, text: str) -> None:
    page.wait_for_function("t => document.querySelector('.atp-annotator .atp-progress')?.innerText.includes(t)",
                           arg=text, timeout=TIMEOUT_MS)


def test_annotator_clicks_keys_reload_and_resume(lab):
    from playwright.sync_api import sync_playwright

    t0 = time.monotonic()
    ids = [it.id for it in lab["sample"].items]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(lab["url"])
            _run_all(page)
            assert "item 1 / 6 · 0 / 6 judged" in _progress(page)
            page.click(".atp-annotator-A")
            _wait_progress(page, "item 2 / 6 · 1 / 6 judged")
            page.click(".atp-annotator-B")
            _wait_progress(page, "item 3 / 6 · 2 / 6 judged")
            page.hover(".atp-annotator .atp-progress")  # keys reach the form under the mouse
            page.keyboard.press("t")
            _wait_progress(page, "item 4 / 6 · 3 / 6 judged")
            page.click(".atp-annotator-skip")
            _wait_progress(page, "item 5 / 6 · 3 / 6 judged")
            assert "atp" not in page.locator(".atp-annotator").inner_text().lower()  # blind: no system names

            page.reload()
            _run_all(page)
            _wait_progress(page, "item 4 / 6 · 3 / 6 judged")  # resumes at the first unjudged item
            page.click(".atp-annotator-back")
            _wait_progress(page, "item 3 / 6 · 3 / 6 judged")
            assert "Tie" in page.locator(".atp-annotator").inner_text()  # the recorded choice is shown
        finally:
            browser.close()
    judged = read_judgements(judgement_path(lab["folder"], "browser"), lab["sample"])
    assert [(j.item, j.choice, j.revision) for j in judged] == [(ids[0], "A", 0), (ids[1], "B", 0), (ids[2], "tie", 0)]
    print(f"browser test: JupyterLab + Chromium, 3 judgements, reload and resume in {time.monotonic() - t0:.1f} s")
