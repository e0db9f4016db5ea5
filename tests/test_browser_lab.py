"""A learner's first minutes in a real browser: JupyterLab serving the kv_cache release.

A real `jupyter lab` server serves a temp copy of labs/kv_cache/kv_cache.ipynb whose KV1 answer
cell holds the solution (as a learner would type it, without nbgrader's markers). Headless
Debian Chromium opens the notebook and runs the setup cell, the KV1 answer, the KV1 self-check,
the unanswered KV2 stub and the KV2 self-check by selecting each cell and pressing Shift+Enter. A
screenshot goes to test-artifacts/browser/jupyterlab-kv_cache.png (or $INFERLAB_TEST_ARTIFACTS);
on failure, a screenshot, the server log and the browser console land there too.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import nbformat
import pytest

import browser
from grader import notebook as gnb

REPO = Path(__file__).resolve().parent.parent
RELEASE = REPO / "labs" / "kv_cache" / "kv_cache.ipynb"
SOLUTION = REPO / "solutions" / "kv_cache" / "kv_cache.ipynb"
ARTIFACT = "jupyterlab-kv_cache"  # <artifacts>/jupyterlab-kv_cache.png; -failure* on failure

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(browser.skip_reason() is not None, reason=browser.skip_reason() or ""),
]


def learner_answer(cell_id: str) -> str:
    """The solution of a cell, without the `### BEGIN/END SOLUTION` marker lines."""
    source = gnb.cell(gnb.read(SOLUTION), cell_id).source
    markers = {gnb.SOLUTION_BEGIN, gnb.SOLUTION_END}
    return "\n".join(line for line in source.splitlines() if line.strip() not in markers)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server (stopped when the module's tests end) serving a copy of the release
    with KV1 answered."""
    tmp = tmp_path_factory.mktemp("browser-lab")
    root = tmp / "root"
    root.mkdir()
    nb = gnb.read(RELEASE)
    gnb.cell(nb, "kv1-solution").source = learner_answer("kv1-solution")
    nbformat.write(nb, str(root / RELEASE.name))
    browser.clear_artifacts(ARTIFACT)  # what is left afterwards is from this run
    log = tmp / "jupyter-server.log"
    with ExitStack() as stack:
        with browser.artifacts_on_failure(None, ARTIFACT, logs=[log]):  # if the server fails to start
            server = stack.enter_context(browser.jupyter_lab(root, home=tmp / "home", log_path=log))
        yield server


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = browser.launch_chromium(pw)
        try:
            yield instance
        finally:
            instance.close()


def test_learner_runs_setup_and_self_checks_in_jupyterlab(lab, chromium):
    page = browser.new_page(chromium)
    console = browser.capture_console(page)
    with browser.artifacts_on_failure(page, ARTIFACT, logs=[lab.log_path], console=console):
        page.goto(lab.url("lab/tree/kv_cache.ipynb"))
        browser.wait_for_notebook(page, timeout=90)
        browser.wait_for_kernel_idle(page, timeout=90)

        setup = browser.run_cell_containing(page, 'tokenizer = load_tokenizer("tiny")', timeout=120)
        assert setup.lstrip().startswith("tiny: 5,278,976 parameters"), setup

        assert browser.run_cell_containing(page, "class ContiguousKVCache", timeout=30) == ""
        k1 = browser.run_cell_containing(page, 'self_check("KV1"', timeout=60)
        assert "[KV1] passed" in k1, k1

        # KV2 left as released: its stub defines cached_generate, which raises NotImplementedError.
        assert browser.run_cell_containing(page, "def cached_generate(", timeout=30) == ""
        k2 = browser.run_cell_containing(page, 'self_check("KV2"', timeout=60)
        assert "[KV2] not attempted" in k2 and "Task KV2" in k2, k2

        browser.scroll_to_cell(browser.find_cell(page, 'self_check("KV1"'))  # both self-checks in view
        shot = browser.save_screenshot(page, ARTIFACT)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000, f"{shot} is only {shot.stat().st_size} bytes"
