"""tests.browser: helpers for real-browser tests of JupyterLab and JupyterHub.

A test starts a server with `serve` (any command) or `jupyter_lab` (a JupyterLab or other
Jupyter server app), drives Debian's Chromium through Playwright's sync API, and leaves a
screenshot (and, on failure, the server's log) under `artifacts_dir()`:

    from playwright.sync_api import sync_playwright
    import browser  # tests/ is on sys.path under pytest, as for `from conftest import ...`

    pytestmark = pytest.mark.skipif(browser.skip_reason() is not None, reason=browser.skip_reason() or "")

    with browser.jupyter_lab(tmp_path / "root", home=tmp_path / "home") as server, \\
            sync_playwright() as pw:
        chromium = browser.launch_chromium(pw)
        page = browser.new_page(chromium)
        with browser.artifacts_on_failure(page, "my-test", logs=[server.log_path]):
            page.goto(server.url("lab/tree/x.ipynb"))
            browser.wait_for_notebook(page)
            browser.wait_for_kernel_idle(page)
            out = browser.run_cell_containing(page, "print(1 + 1)", timeout=30)
            assert out.strip() == "2"
            browser.save_screenshot(page, "my-test.png")

The notebook helpers only use JupyterLab's DOM (the same UI whatever the URL prefix), so they
work for a notebook opened on a JupyterHub user server (`/user/<name>/lab/tree/...`) too.
Cells are found by their visible source text, never by index. Timeouts are in seconds.

Rules the helpers follow: Chromium is /usr/bin/chromium (Debian's `chromium` package, never
`playwright install`); servers listen on 127.0.0.1 only, on a free port, and die by
themselves: they are terminated when their context exits, get SIGTERM (Linux) when the test
process dies, and run under coreutils `timeout`, so none outlives `hard_timeout` seconds.
Jupyter servers run with HOME and the Jupyter dirs in a temp dir (`isolated_jupyter_env`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # playwright is optional: import it only where a browser is driven
    from playwright.sync_api import Browser, Locator, Page, Playwright

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_PATH = "/usr/bin/chromium"
# --disable-dev-shm-usage: containers often have a 64 MB /dev/shm, which crashes Chromium's renderer;
# Debian's launcher adds it only when /dev/shm is small, and its check misfires on some mounts.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-dev-shm-usage",
)
ARTIFACTS_ENV = "INFERLAB_TEST_ARTIFACTS"

# JupyterLab user settings for tests: no news/update toasts (which also make network requests).
LAB_TEST_SETTINGS: dict[str, dict[str, Any]] = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}
# Server-side config for tests, read by every Jupyter server app from JUPYTER_CONFIG_DIR.
SERVER_TEST_CONFIG: dict[str, dict[str, Any]] = {
    "LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"},
}


# ---------------------------------------------------------------------------------------------
# Availability, ports, artifacts


def skip_reason() -> str | None:
    """Why browser tests cannot run here, or None when they can (for `pytest.mark.skipif`)."""
    if not os.access(CHROMIUM_PATH, os.X_OK):
        return f"{CHROMIUM_PATH} is missing: install Debian's chromium (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing (pip install playwright; no `playwright install` needed)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the server should refuse to fall back to another)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def artifacts_dir() -> Path:
    """Where browser tests leave screenshots and logs: $INFERLAB_TEST_ARTIFACTS, or
    <repo>/test-artifacts/browser. Created if missing."""
    path = Path(os.environ.get(ARTIFACTS_ENV) or REPO_ROOT / "test-artifacts" / "browser")
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_artifacts(name: str) -> None:
    """Remove `name`.png and `name`-failure* from `artifacts_dir()`: call it when a test starts, so
    that what is left afterwards is from this run only."""
    out = artifacts_dir()
    for path in [out / f"{name}.png", *out.glob(f"{name}-failure*")]:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    """A server process started by `serve`; `base_url` ends with '/'."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    def url(self, path: str = "") -> str:
        return self.base_url + path.lstrip("/")

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to the server; SIGKILL to its process group if it is still there after `grace`
        seconds. Idempotent."""
        if self.process.poll() is not None:
            return
        self.process.terminate()  # coreutils `timeout` passes it on to the server
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(self.process, signal.SIGKILL)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _die_with_parent() -> None:
    """preexec_fn: on Linux, SIGTERM this process when the thread that started it dies (e.g. a
    killed pytest), so a server never outlives its test run by more than its shutdown."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # not Linux, or no libc: the `timeout` wrapper still bounds its life
        pass


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # started with start_new_session: its pid is its group id
    except ProcessLookupError:
        pass


def _http_ok(url: str, headers: Mapping[str, str]) -> bool:
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


class ServerStartError(RuntimeError):
    """A server did not get ready; `exited` tells whether its process had exited (else: timeout)."""

    def __init__(self, message: str, *, exited: bool, log: str):
        super().__init__(message)
        self.exited, self.log = exited, log


@contextmanager
def serve(
    argv: Sequence[str],
    *,
    base_url: str,
    ready_url: str,
    log_path: Path,
    ready_headers: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    ready_timeout: float = 90.0,
    hard_timeout: float = 900.0,
) -> Iterator[Server]:
    """Run `argv` until the context exits, once `ready_url` answers 2xx.

    stdout and stderr go to `log_path`. The process gets its own session and is wrapped in
    coreutils `timeout`, so it dies after `hard_timeout` seconds whatever happens; on Linux it also
    gets SIGTERM when the thread that called `serve` dies (so call it from a thread that lives as
    long as the server: pytest's main thread). On exit it gets SIGTERM, then SIGKILL. Raises
    ServerStartError (with the log's tail) if the process exits or `ready_url` does not answer
    within `ready_timeout` seconds.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = list(argv)
    if shutil.which("timeout"):
        command = ["timeout", "--kill-after=10", str(int(hard_timeout)), *command]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=None if env is None else dict(env), cwd=cwd, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    server = Server(process=process, base_url=base_url, log_path=log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while not _http_ok(ready_url, ready_headers or {}):
            if process.poll() is not None:
                raise ServerStartError(f"server exited with {process.returncode} before it was ready: "
                                       f"{command}\n--- log tail ---\n{server.log()[-4000:]}",
                                       exited=True, log=server.log())
            if time.monotonic() > deadline:
                raise ServerStartError(f"server not ready at {ready_url} after {ready_timeout:.0f} s: "
                                       f"{command}\n--- log tail ---\n{server.log()[-4000:]}",
                                       exited=False, log=server.log())
            time.sleep(0.25)
        yield server
    finally:
        server.stop()


@dataclass
class JupyterServer(Server):
    """A Jupyter server started by `jupyter_lab`; `url()` adds the token, so the browser logs in."""

    token: str = ""
    root_dir: Path = field(default_factory=Path)
    port: int = 0

    def url(self, path: str = "") -> str:
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}{path.lstrip('/')}{sep}token={self.token}"


def write_lab_settings(settings_dir: str | Path, settings: Mapping[str, Mapping[str, Any]]) -> None:
    """Write JupyterLab user settings, {"@scope/ext:plugin": {key: value}}, into a settings dir
    (JUPYTERLAB_SETTINGS_DIR; by default <JUPYTER_CONFIG_DIR>/lab/user-settings)."""
    for plugin_id, values in settings.items():
        extension, plugin = plugin_id.split(":", 1)
        path = Path(settings_dir, extension, f"{plugin}.jupyterlab-settings")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(values), indent=2))


def isolated_jupyter_env(
    home: str | Path,
    *,
    lab_settings: Mapping[str, Mapping[str, Any]] = LAB_TEST_SETTINGS,
    server_config: Mapping[str, Mapping[str, Any]] = SERVER_TEST_CONFIG,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """An environment in which Jupyter reads and writes nothing of the user's: HOME and the
    JUPYTER_CONFIG_DIR / JUPYTER_DATA_DIR / JUPYTER_RUNTIME_DIR / IPYTHONDIR / MPLCONFIGDIR
    dirs under `home`, with `lab_settings` as JupyterLab user settings and `server_config` in
    <config>/jupyter_server_config.json. Kernel specs installed in sys.prefix are still found."""
    home = Path(home).resolve()
    dirs = {
        "HOME": home,
        "JUPYTER_CONFIG_DIR": home / ".jupyter",
        "JUPYTER_DATA_DIR": home / ".local" / "share" / "jupyter",
        "JUPYTER_RUNTIME_DIR": home / ".local" / "share" / "jupyter" / "runtime",
        "IPYTHONDIR": home / ".ipython",
        "MPLCONFIGDIR": home / ".config" / "matplotlib",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if base is None else base)
    env.update({name: str(path) for name, path in dirs.items()})
    for name in ("JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH",
                 "JUPYTER_TOKEN", "JUPYTERHUB_API_TOKEN", "JPY_PARENT_PID"):
        env.pop(name, None)
    env["JUPYTER_PLATFORM_DIRS"] = "1"  # silence jupyter_core's deprecation notice; dirs are explicit above
    write_lab_settings(dirs["JUPYTER_CONFIG_DIR"] / "lab" / "user-settings", lab_settings)
    (dirs["JUPYTER_CONFIG_DIR"] / "jupyter_server_config.json").write_text(json.dumps(dict(server_config), indent=2))
    return env


def jupyter_executable() -> str:
    """The `jupyter` next to the running Python (the venv's), else the one on PATH."""
    candidate = Path(sys.executable).parent / "jupyter"
    return str(candidate) if candidate.exists() else (shutil.which("jupyter") or "jupyter")


@contextmanager
def jupyter_lab(
    root_dir: str | Path,
    *,
    home: str | Path,
    app: Sequence[str] = ("lab",),
    extra_args: Sequence[str] = (),
    log_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 90.0,
    hard_timeout: float = 900.0,
) -> Iterator[JupyterServer]:
    """Start `jupyter <app...>` (default `jupyter lab`) serving `root_dir` on 127.0.0.1 at a free
    port with a random token, in `isolated_jupyter_env(home)` (or `env`), and stop it on exit.

    `app` may be e.g. ("server",) or ("notebook",). Ready once /api/status answers. The log
    goes to `log_path` (default <home>/jupyter-server.log).
    """
    root_dir, home = Path(root_dir).resolve(), Path(home).resolve()
    env = dict(env) if env is not None else isolated_jupyter_env(home)
    log_path = Path(log_path) if log_path else home / "jupyter-server.log"
    token = secrets.token_hex(24)
    for attempt in range(3):  # another process may take the free port before the server binds it
        port = free_port()
        argv = [
            jupyter_executable(), *app,
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",  # fail rather than silently serve on another port
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root_dir}",
            *extra_args,
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            argv.append("--allow-root")
        base_url = f"http://127.0.0.1:{port}/"
        stack = ExitStack()
        try:
            server = stack.enter_context(serve(
                argv, base_url=base_url, ready_url=base_url + "api/status",
                ready_headers={"Authorization": f"token {token}"}, log_path=log_path, env=env, cwd=root_dir,
                ready_timeout=ready_timeout, hard_timeout=hard_timeout))
        except ServerStartError as error:
            if attempt < 2 and error.exited and "already in use" in error.log:
                continue
            raise
        break
    with stack:
        yield JupyterServer(process=server.process, base_url=base_url, log_path=log_path,
                            token=token, root_dir=root_dir, port=port)


# ---------------------------------------------------------------------------------------------
# Browser


def launch_chromium(playwright: "Playwright", *, extra_args: Sequence[str] = (), **kwargs: Any) -> "Browser":
    """Headless Debian Chromium (CHROMIUM_PATH) with CHROMIUM_ARGS plus `extra_args`."""
    return playwright.chromium.launch(executable_path=CHROMIUM_PATH, headless=True,
                                      args=[*CHROMIUM_ARGS, *extra_args], **kwargs)


def new_page(browser: "Browser", *, width: int = 1280, height: int = 1400, timeout: float = 30.0) -> "Page":
    """A page in a fresh context, a tall viewport (JupyterLab scrolls inside its own panels, so a
    full-page screenshot shows only the viewport), and `timeout` as its default action timeout."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(timeout * 1000)
    return page


# ---------------------------------------------------------------------------------------------
# JupyterLab notebook UI

# The notebook a learner looks at: the visible notebook panel (JupyterLab hides background tabs
# with display:none or scale(0)); with notebooks side by side, the first one.
NOTEBOOK_PANEL = ".jp-NotebookPanel:visible"
_PROMPT_DONE = re.compile(r"^\[(\d+)\]:$")


def notebook_panel(page: "Page") -> "Locator":
    """The active notebook's panel (toolbar and cells)."""
    return page.locator(NOTEBOOK_PANEL).first


def wait_for_notebook(page: "Page", timeout: float = 60.0) -> "Locator":
    """Wait until JupyterLab shows a notebook with rendered cells; return its panel."""
    panel = notebook_panel(page)
    panel.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=timeout * 1000)
    return panel


_KERNEL_STATE_JS = """panel => {
  const name = panel.querySelector('.jp-Toolbar-kernelName');
  const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  return {name: name ? name.textContent.trim() : null,
          status: indicator ? indicator.getAttribute('data-status') : null};
}"""


def kernel_status(page: "Page") -> str | None:
    """The active notebook's kernel status as its toolbar shows it ('idle', 'busy', 'starting',
    'connecting', ...), or None when the notebook has no kernel (yet)."""
    panel = notebook_panel(page)
    if panel.count() == 0:
        return None
    state = panel.evaluate(_KERNEL_STATE_JS)
    if not state["name"] or state["name"] == "No Kernel":
        return None  # the indicator says 'idle' while no kernel is attached: don't believe it
    return state["status"]


def wait_for_kernel_idle(page: "Page", timeout: float = 60.0, settle: float = 0.6) -> None:
    """Wait until the active notebook has a kernel and it has been idle for `settle` seconds
    (a kernel that has just connected flips idle/busy while it answers kernel_info)."""
    deadline = time.monotonic() + timeout
    idle_since = None
    while True:
        status = kernel_status(page)
        now = time.monotonic()
        if status == "idle":
            idle_since = idle_since or now
            if now - idle_since >= settle:
                return
        else:
            idle_since = None
        if now > deadline:
            raise TimeoutError(f"kernel not idle after {timeout:.0f} s (status {status!r})")
        time.sleep(0.1)


def find_cell(page: "Page", text: str, timeout: float = 10.0) -> "Locator":
    """The one cell of the active notebook whose source contains `text` (case-sensitive, within
    one source line: the editor shows lines as separate elements). Waits up to `timeout`
    seconds for it to render; raises AssertionError if there is none or more than one."""
    cells = notebook_panel(page).locator(".jp-Notebook .jp-Cell").filter(
        has=page.locator(".jp-InputArea-editor", has_text=re.compile(re.escape(text))))
    deadline = time.monotonic() + timeout
    while (count := cells.count()) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    if count != 1:
        raise AssertionError(f"expected one cell whose source contains {text!r}, found {count}")
    return cells.first


def scroll_to_cell(cell: "Locator") -> None:
    """Scroll the notebook so that `cell` is at the top of the view (e.g. before a screenshot)."""
    cell.evaluate("element => element.scrollIntoView({block: 'start'})")
    cell.page.wait_for_timeout(300)  # let JupyterLab render what came into view


def cell_output_text(cell: "Locator") -> str:
    """The text of a cell's outputs (stdout, results, errors), as displayed."""
    outputs = cell.locator(".jp-OutputArea-output")
    return "\n".join(outputs.all_inner_texts())


def run_cell(cell: "Locator", timeout: float = 60.0) -> str:
    """Select `cell` (command mode), press Shift+Enter as a learner would, wait for the run to
    finish (its prompt shows a new execution count) and return its output text: stdout, results
    and tracebacks as displayed. (Shift+Enter on a notebook's last cell also adds a new cell.)"""
    prompt = cell.locator(".jp-InputArea-prompt").first
    before = prompt.inner_text().strip()
    cell.scroll_into_view_if_needed()
    prompt.click()  # selects the cell in command mode without editing it
    cell.page.keyboard.press("Shift+Enter")
    deadline = time.monotonic() + timeout
    while True:
        now = prompt.inner_text().strip()
        if _PROMPT_DONE.match(now) and now != before:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"cell still running or not started after {timeout:.0f} s (prompt {now!r}); "
                               f"output so far: {cell_output_text(cell)!r}")
        time.sleep(0.2)
    # The count is set once the kernel's reply and all outputs have arrived; give the renderers
    # a moment and read the outputs until two reads agree.
    text = cell_output_text(cell)
    while time.monotonic() < deadline + 5:
        time.sleep(0.2)
        again = cell_output_text(cell)
        if again == text:
            break
        text = again
    return text


def run_cell_containing(page: "Page", text: str, timeout: float = 60.0) -> str:
    """Run the cell whose source contains `text` (see `run_cell`); return its output text."""
    return run_cell(find_cell(page, text), timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Screenshots and failure artifacts


def save_screenshot(page: "Page", name: str, *, full_page: bool = True) -> Path:
    """Save a PNG screenshot as `artifacts_dir()/name` (".png" added if missing); return its path."""
    path = artifacts_dir() / (name if name.endswith(".png") else f"{name}.png")
    page.screenshot(path=str(path), full_page=full_page)
    return path


def capture_console(page: "Page") -> list[str]:
    """A list that fills with the page's console messages and uncaught errors, one line each."""
    lines: list[str] = []
    page.on("console", lambda msg: lines.append(f"[{msg.type}] {msg.text}"))
    page.on("pageerror", lambda error: lines.append(f"[pageerror] {error}"))
    return lines


@contextmanager
def artifacts_on_failure(
    page: "Page | None", name: str, logs: Sequence[str | Path] = (), console: Sequence[str] | None = None,
) -> Iterator[None]:
    """On an exception inside the block, save `name`-failure.png, copy each log file to
    `name`-failure-<log name> and write `console` (see `capture_console`) to
    `name`-failure-console.log in `artifacts_dir()`, then re-raise. Best effort: a failure to
    save never hides the original error."""
    try:
        yield
    except BaseException:
        out = artifacts_dir()
        if page is not None:
            try:
                save_screenshot(page, f"{name}-failure.png")
            except Exception as exc:  # the page may be gone
                print(f"[browser] could not save a failure screenshot: {exc}", file=sys.stderr)
        for log in logs:
            try:
                shutil.copyfile(log, out / f"{name}-failure-{Path(log).name}")
            except OSError as exc:
                print(f"[browser] could not copy {log}: {exc}", file=sys.stderr)
        if console is not None:
            (out / f"{name}-failure-console.log").write_text("\n".join(console) + "\n")
        print(f"[browser] failure artifacts in {out}", file=sys.stderr)
        raise
