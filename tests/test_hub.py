"""The classroom hub for real: JupyterHub + configurable-http-proxy on 127.0.0.1, from the module the
compose `hub` service uses (infra/hub/jupyterhub_config.py), with local-process servers.

A learner logs in with a password, gets a server, fetches the kv_cache assignment through
nbgrader's exchange, answers KV1, runs its self-check and submits. The instructor logs in,
collects, runs `inferlab autograde` into the course gradebook, and formgrader shows the grade.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from grader import notebook
from grader.hub import HubConfigError, hash_password, read_accounts, settings, write_account
import browser
from jupyter_api import HubSession, UserServer

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "infra" / "hub" / "jupyterhub_config.py"
BIN = Path(sys.executable).parent
PASSWORDS = {"ada": "instructor-pass-1", "lin": "learner-pass-1", "mei": "learner-pass-2"}

needs_proxy = pytest.mark.skipif(shutil.which("configurable-http-proxy") is None,
                                 reason="configurable-http-proxy is not installed (npm install -g configurable-http-proxy)")


def free_port_block(n: int = 3) -> int:
    """A port P such that P .. P+n-1 are all free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n < 65535 and all(_free(port + i) for i in range(n)):
            return port
    raise RuntimeError("no block of free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def course_copy(root: Path) -> Path:
    """What an instructor's course directory holds: the nbgrader config and the releases."""
    course = root / "course"
    (course / "labs").mkdir(parents=True)
    shutil.copy(REPO / "nbgrader_config.py", course)
    shutil.copytree(REPO / "labs" / "kv_cache", course / "labs" / "kv_cache")
    return course


def hub_env(root: Path, port: int, accounts: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "INFERLAB_HUB_ACCOUNTS": str(accounts), "INFERLAB_HUB_IP": "127.0.0.1", "INFERLAB_HUB_PORT": str(port),
            "INFERLAB_HUB_STATE": str(root / "state"), "INFERLAB_HUB_HOME": str(root / "home"),
            "INFERLAB_EXCHANGE": str(root / "exchange"), "INFERLAB_COURSE_ROOT": str(root / "course"),
            "INFERLAB_HUB_SPAWNER": "local"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    course_copy(root)
    accounts = root / "accounts.txt"
    write_account(accounts, "ada", "instructor", PASSWORDS["ada"])
    write_account(accounts, "lin", "learner", PASSWORDS["lin"])
    write_account(accounts, "mei", "learner", PASSWORDS["mei"])
    port = free_port_block()
    log = open(root / "hub.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(BIN / "jupyterhub"), "-f", str(CONFIG)], cwd=root, env=hub_env(root, port, accounts),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"jupyterhub exited: {(root / 'hub.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/hub/api", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"jupyterhub did not answer within 90 s: {(root / 'hub.log').read_text()[-3000:]}")
        yield base, root
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the hub, the proxy and every user's server
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def released(hub):
    """The instructor logs in, starts a server and releases kv_cache to nbgrader's exchange from it."""
    base, root = hub
    ada = HubSession(base).login("ada", PASSWORDS["ada"])
    ada.start_server()
    server = UserServer(base, "ada", ada.token())
    kernel = server.start_kernel()
    release = server.run(kernel, shell(root / "course") + (
        "r = subprocess.run([sys.executable, '-m', 'nbgrader', 'release_assignment', 'kv_cache'], cwd=COURSE, "
        "capture_output=True, text=True)\nprint('exit', r.returncode, r.stderr[-800:])"))
    assert "exit 0" in release.text, release
    return server, kernel


def shell(course: Path) -> str:
    return f"import subprocess, sys\nCOURSE = {str(course)!r}\n"


@needs_proxy
def test_learner_fetches_self_checks_submits_and_instructor_grades(hub, released):
    base, root = hub
    course = root / "course"
    ada_server, ada_kernel = released
    shell_code = shell(course)

    # The learner: log in, start a server, fetch through the assignment list (the Assignments tab's API).
    lin = HubSession(base).login("lin", PASSWORDS["lin"])
    with pytest.raises(AssertionError):
        HubSession(base).login("lin", "wrong-password")
    lin.start_server()
    lin_server = UserServer(base, "lin", lin.token())
    listed = lin_server.get("/assignments", params={"course_id": "inferlab"}).json()
    assert any(a["assignment_id"] == "kv_cache" and a["status"] == "released" for a in listed["value"]), listed
    fetched = lin_server.post("/assignments/fetch", data={"course_id": "inferlab", "assignment_id": "kv_cache"})
    assert fetched.status_code == 200, fetched.text
    model = lin_server.get("/api/contents/kv_cache/kv_cache.ipynb").json()
    nb = model["content"]
    assert any("kv1-solution" == c["metadata"].get("nbgrader", {}).get("grade_id") for c in nb["cells"])
    assert lin_server.get("/formgrader").status_code == 404  # a learner's server has no instructor tools

    # The learner answers KV1 (the reference answer, without nbgrader's markers) and saves the notebook.
    answer = notebook.cell(notebook.read(REPO / "solutions" / "kv_cache" / "kv_cache.ipynb"), "kv1-solution").source
    answer = "\n".join(line for line in answer.splitlines() if "### " not in line)
    for c in nb["cells"]:
        if c["metadata"].get("nbgrader", {}).get("grade_id") == "kv1-solution":
            c["source"] = answer
    saved = lin_server.put("/api/contents/kv_cache/kv_cache.ipynb", json={"type": "notebook", "content": nb})
    assert saved.status_code == 200, saved.text

    # ... then runs the setup cell, the answer and the KV1 self-check in a kernel of their server.
    kernel = lin_server.start_kernel("kv_cache")
    by_id = {c["metadata"].get("nbgrader", {}).get("grade_id"): c["source"] for c in nb["cells"]}
    for cell_id in ("setup", "kv1-solution"):
        out = lin_server.run(kernel, by_id[cell_id])
        assert not out.errors, (cell_id, out)
    check = lin_server.run(kernel, by_id["kv1-self-check"])
    assert "[KV1] passed" in check.text, check

    submitted = lin_server.post("/assignments/submit", data={"course_id": "inferlab", "assignment_id": "kv_cache"})
    assert submitted.status_code == 200 and "submitted" in submitted.text, submitted.text

    # The instructor collects and autogrades the course (its autograded/, feedback/ and gradebook.db),
    # which formgrader reads.
    collect = ada_server.run(ada_kernel, shell_code + (
        "r = subprocess.run([sys.executable, '-m', 'nbgrader', 'collect', 'kv_cache'], cwd=COURSE, "
        "capture_output=True, text=True)\nprint('exit', r.returncode, r.stderr[-800:])"))
    assert "exit 0" in collect.text, collect
    assert (course / "submitted" / "lin" / "kv_cache" / "kv_cache.ipynb").is_file()
    grade = ada_server.run(ada_kernel, shell_code + (
        "import os\ninferlab = os.path.join(os.path.dirname(sys.executable), 'inferlab')\n"
        "r = subprocess.run([inferlab, 'autograde', 'kv_cache', '--course', '.', '--timeout', '300'], cwd=COURSE, "
        "capture_output=True, text=True)\nprint('exit', r.returncode, r.stdout[-1500:], r.stderr[-1500:])"),
        timeout=600)
    assert "exit 0" in grade.text, grade
    listing = ada_server.get("/formgrader/api/submissions/kv_cache")
    assert listing.status_code == 200 and listing.text.startswith("["), (listing.status_code, listing.url, listing.text[:600])
    rows = listing.json()
    lin_row = next(r for r in rows if r["student"] == "lin")
    assert (course / "feedback" / "lin" / "kv_cache" / "kv_cache.html").is_file()  # for `nbgrader release_feedback`
    assert lin_row["score"] == 3 and lin_row["max_score"] == 10, lin_row  # KV1's 3 points, nothing else done


@needs_proxy
@pytest.mark.skipif(browser.skip_reason() is not None, reason=browser.skip_reason() or "")
def test_learner_on_the_hub_in_a_real_browser(hub, released):
    """Log in through the hub's form in Chromium, land in JupyterLab, open the fetched assignment,
    run its first cells and a self-check; the screenshot is kept as a test artifact."""
    from playwright.sync_api import sync_playwright

    base, root = hub
    mei = HubSession(base).login("mei", PASSWORDS["mei"])  # fetch through the API: the browser part is the lab
    mei.start_server()
    server = UserServer(base, "mei", mei.token())
    assert server.post("/assignments/fetch", data={"course_id": "inferlab", "assignment_id": "kv_cache"}).ok
    artifact = "hub-kv_cache"
    browser.clear_artifacts(artifact)
    with sync_playwright() as pw:
        chromium = browser.launch_chromium(pw)
        try:
            page = browser.new_page(chromium)
            console = browser.capture_console(page)
            with browser.artifacts_on_failure(page, artifact, logs=[root / "hub.log"], console=console):
                page.goto(f"{base}/hub/login")
                page.fill("#username_input", "mei")
                page.fill("#password_input", PASSWORDS["mei"])
                page.click("#login_submit")
                page.wait_for_url(re.compile(r".*/user/mei/lab.*"), timeout=120_000)
                page.goto(f"{base}/user/mei/lab/tree/kv_cache/kv_cache.ipynb")
                browser.wait_for_notebook(page, timeout=90)
                browser.wait_for_kernel_idle(page, timeout=90)
                setup = browser.run_cell_containing(page, 'tokenizer = load_tokenizer("tiny")', timeout=120)
                assert setup.lstrip().startswith("tiny: 5,278,976 parameters"), setup
                browser.run_cell_containing(page, "class ContiguousKVCache", timeout=30)
                k1 = browser.run_cell_containing(page, 'self_check("KV1"', timeout=60)
                assert "[KV1] not attempted" in k1 and "Task KV1" in k1, k1  # the untouched release
                shot = browser.save_screenshot(page, artifact)
        finally:
            chromium.close()
    assert shot.is_file() and shot.stat().st_size > 20_000


# ------------------------------------------------------------------------------------- bad input


def test_missing_accounts_file_stops_the_hub_with_its_name(tmp_path):
    course_copy(tmp_path)
    env = hub_env(tmp_path, free_port_block(), tmp_path / "no-such-accounts.txt")
    r = subprocess.run([str(BIN / "jupyterhub"), "-f", str(CONFIG)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "no-such-accounts.txt does not exist" in r.stderr + r.stdout and "inferlab hub-account" in r.stderr + r.stdout


def test_port_in_use_is_named(tmp_path):
    course_copy(tmp_path)
    accounts = tmp_path / "accounts.txt"
    write_account(accounts, "ada", "instructor", PASSWORDS["ada"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(HubConfigError, match=rf"127.0.0.1:{port} is already in use.*INFERLAB_HUB_PORT"):
            settings(hub_env(tmp_path, port, accounts))


@pytest.mark.parametrize("line, message", [
    ("ada instructor", "expected `name role password-hash`"),
    ("ada teacher pbkdf2_sha256$1$00$00", "role 'teacher' is not one of"),
    ("ada instructor hunter2", "never plain text"),
    ("Ada! instructor pbkdf2_sha256$1$00$00", "not a valid user name"),
])
def test_bad_accounts_lines_are_named(tmp_path, line, message):
    path = tmp_path / "accounts.txt"
    path.write_text(f"# a comment\n{line}\n")
    with pytest.raises(HubConfigError) as err:
        read_accounts(path)
    assert "line 2" in str(err.value) and message in str(err.value)


def test_hub_account_command_keeps_other_entries(tmp_path):
    exe = str(BIN / "inferlab")
    for name, role, pw in (("ada", "instructor", "first-pass-1"), ("lin", "learner", "second-pass"),
                           ("ada", "instructor", "changed-pass")):
        r = subprocess.run([exe, "hub-account", name, "--role", role, "--out", str(tmp_path), "--password-stdin"],
                           input=pw + "\n", capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and str(tmp_path / "accounts.txt") in r.stdout, r.stderr
    accounts = read_accounts(tmp_path / "accounts.txt")
    assert set(accounts) == {"ada", "lin"} and accounts["ada"].role == "instructor"
    from grader.hub import check_password

    assert check_password("changed-pass", accounts["ada"].password_hash)
    assert not check_password("first-pass-1", accounts["ada"].password_hash)
    assert "changed-pass" not in (tmp_path / "accounts.txt").read_text()
    r = subprocess.run([exe, "hub-account", "lin", "--out", str(tmp_path), "--password-stdin"], input="short\n",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "at least 8 characters" in r.stderr
    assert hash_password("x") != hash_password("x")  # salted
