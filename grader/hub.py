"""grader.hub: the classroom JupyterHub, configured from environment variables by one module.

`infra/hub/jupyterhub_config.py` calls `configure(c)`; the compose `hub` service, the
Kubernetes notes and the end-to-end test all start the hub through it. Environment:

  INFERLAB_HUB_ACCOUNTS     accounts file (required): one `name role pbkdf2-hash` per line,
                            role `learner` or `instructor`; `inferlab hub-account` writes it
  INFERLAB_HUB_IP / _PORT   where learners connect (default 0.0.0.0:8000); the proxy's API
                            uses PORT+1 and the hub itself PORT+2, all on 127.0.0.1
  INFERLAB_HUB_STATE        the hub's database, cookie secret and generated config
  INFERLAB_HUB_HOME         one home folder per learner
  INFERLAB_COURSE_ROOT      the course (this repository): instructors' servers start there
  INFERLAB_EXCHANGE         nbgrader's exchange, shared by every server
  INFERLAB_HUB_SPAWNER      `local` (servers as local processes: compose, tests) or `kubernetes`
                            (Zero to JupyterHub sets up its own spawner; see infra/k8s)

Every problem is reported before the hub starts, naming the variable or file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import hmac
import os
import re
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

ROLES = ("learner", "instructor")
COURSE_ID = "inferlab"
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
ITERATIONS = 200_000


class HubConfigError(SystemExit):
    """A configuration problem: the hub must not start, and the message says what to fix."""

    def __init__(self, message: str):
        super().__init__(f"inferlab hub: {message}")


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    password_hash: str


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "pbkdf2_sha256":
        return False
    got = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations))
    return hmac.compare_digest(got.hex(), digest)


def read_accounts(path: Path) -> dict[str, Account]:
    """Parse an accounts file; every malformed line is an error naming the line."""
    if not path.is_file():
        raise HubConfigError(
            f"the accounts file {path} does not exist: create it with `inferlab hub-account NAME --role learner "
            f"--out {path.parent}` (one call per person), or point INFERLAB_HUB_ACCOUNTS at yours")
    accounts: dict[str, Account] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise HubConfigError(f"{path}, line {number}: expected `name role password-hash`, got {len(parts)} "
                                 "fields; write entries with `inferlab hub-account`")
        name, role, stored = parts
        if not NAME.match(name):
            raise HubConfigError(f"{path}, line {number}: {name!r} is not a valid user name "
                                 "(lower-case letters, digits, '.', '_', '-'; at most 32 characters)")
        if role not in ROLES:
            raise HubConfigError(f"{path}, line {number}: role {role!r} is not one of {', '.join(ROLES)}")
        if not stored.startswith("pbkdf2_sha256$"):
            raise HubConfigError(f"{path}, line {number}: the password must be a pbkdf2_sha256 hash, never plain "
                                 "text; write entries with `inferlab hub-account`")
        if name in accounts:
            raise HubConfigError(f"{path}, line {number}: {name!r} is listed twice")
        accounts[name] = Account(name, role, stored)
    if not accounts:
        raise HubConfigError(f"the accounts file {path} lists nobody: add people with `inferlab hub-account`")
    if not any(a.role == "instructor" for a in accounts.values()):
        raise HubConfigError(f"the accounts file {path} has no instructor: add one with "
                             f"`inferlab hub-account NAME --role instructor --out {path.parent}`")
    return accounts


def write_account(accounts_file: Path, name: str, role: str, password: str) -> bool:
    """Add or update one entry, keeping every other line as it was; True if the name was new."""
    if not NAME.match(name):
        raise ValueError(f"{name!r} is not a valid user name (lower-case letters, digits, '.', '_', '-')")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if len(password) < 8:
        raise ValueError("the password must have at least 8 characters")
    entry = f"{name} {role} {hash_password(password)}"
    lines = accounts_file.read_text().splitlines() if accounts_file.is_file() else [
        "# inferlab hub accounts: name role pbkdf2-hash (written by `inferlab hub-account`)"]
    new = True
    for i, line in enumerate(lines):
        fields = line.split("#", 1)[0].split()
        if fields and fields[0] == name:
            lines[i], new = entry, False
    if new:
        lines.append(entry)
    accounts_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = accounts_file.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.chmod(tmp, 0o600)
    tmp.replace(accounts_file)
    return new


def port_in_use(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return True
    return False


def _env_path(env: dict, key: str, default: str) -> Path:
    return Path(env.get(key) or default).resolve()


def settings(env: dict | None = None) -> dict:
    """Read and check the environment; raises HubConfigError naming the first problem."""
    env = dict(os.environ if env is None else env)
    accounts_path = _env_path(env, "INFERLAB_HUB_ACCOUNTS", "/srv/inferlab/accounts.txt")
    accounts = read_accounts(accounts_path)
    ip = env.get("INFERLAB_HUB_IP") or "0.0.0.0"
    try:
        port = int(env.get("INFERLAB_HUB_PORT") or 8000)
    except ValueError:
        raise HubConfigError(f"INFERLAB_HUB_PORT={env['INFERLAB_HUB_PORT']!r} is not a port number") from None
    for what, host, p in (("the hub's public port", ip, port), ("the proxy's API port", "127.0.0.1", port + 1),
                          ("the hub's internal port", "127.0.0.1", port + 2)):
        if port_in_use(host, p):
            raise HubConfigError(f"{what} {host}:{p} is already in use: stop whatever listens there, or set "
                                 "INFERLAB_HUB_PORT to another port (the hub uses PORT, PORT+1 and PORT+2)")
    spawner = env.get("INFERLAB_HUB_SPAWNER") or "local"
    if spawner not in ("local", "kubernetes"):
        raise HubConfigError(f"INFERLAB_HUB_SPAWNER={spawner!r}: choose local or kubernetes")
    course_root = _env_path(env, "INFERLAB_COURSE_ROOT", "/opt/inferlab")
    if not (course_root / "nbgrader_config.py").is_file():
        raise HubConfigError(f"INFERLAB_COURSE_ROOT={course_root} is not the course: it has no nbgrader_config.py "
                             "(point it at a checkout of this repository)")
    return {"accounts_path": accounts_path, "accounts": accounts, "ip": ip, "port": port, "spawner": spawner,
            "state": _env_path(env, "INFERLAB_HUB_STATE", "/srv/inferlab/hub-state"),
            "home": _env_path(env, "INFERLAB_HUB_HOME", "/srv/inferlab/home"),
            "exchange": _env_path(env, "INFERLAB_EXCHANGE", "/srv/nbgrader/exchange"),
            "course_root": course_root}


def nbgrader_user_config(exchange: Path, role: str, course_root: Path) -> str:
    """nbgrader settings every single-user server reads (through JUPYTER_CONFIG_PATH)."""
    text = (f"c = get_config()  # noqa: F821\n"
            f"c.CourseDirectory.course_id = {COURSE_ID!r}\n"
            f"c.Exchange.root = {str(exchange)!r}\n")
    if role == "instructor":  # formgrader and the nbgrader commands work on the course
        text += f"c.CourseDirectory.root = {str(course_root)!r}\n"
    if role == "learner":
        # nbgrader names a submission after the Unix user, and local servers share one: use the hub's name.
        text += "import os\nc.CourseDirectory.student_id = os.environ.get('JUPYTERHUB_USER', '*')\n"
    return text


def configure(c, env: dict | None = None) -> dict:
    """Fill a JupyterHub config object `c`; returns the checked settings."""
    from jupyterhub.auth import Authenticator

    s = settings(env)
    for folder in (s["state"], s["home"], s["exchange"]):
        folder.mkdir(parents=True, exist_ok=True)
    os.chmod(s["exchange"], 0o777)  # nbgrader's exchange is shared by every learner's server
    # Jupyter config every single-user server reads (JUPYTER_CONFIG_PATH): nbgrader's exchange for
    # all; learners' servers also leave out the instructor's formgrader.
    configs = {}
    for role in ROLES:
        folder = s["state"] / f"jupyter-config-{role}"
        folder.mkdir(exist_ok=True)
        (folder / "nbgrader_config.py").write_text(nbgrader_user_config(s["exchange"], role, s["course_root"]))
        server = {"ServerApp": {"jpserver_extensions": {"nbgrader.server_extensions.formgrader": role == "instructor"}}}
        (folder / "jupyter_server_config.json").write_text(json.dumps(server, indent=1))
        configs[role] = str(folder)

    accounts = s["accounts"]

    class AccountsAuthenticator(Authenticator):
        """Users and pbkdf2 password hashes from the accounts file."""

        async def authenticate(self, handler, data):
            account = accounts.get((data or {}).get("username", ""))
            if account and check_password(data.get("password", ""), account.password_hash):
                return {"name": account.name, "admin": account.role == "instructor"}
            return None

    c.JupyterHub.authenticator_class = AccountsAuthenticator
    c.Authenticator.allowed_users = set(accounts)
    c.Authenticator.admin_users = {a.name for a in accounts.values() if a.role == "instructor"}
    c.JupyterHub.ip, c.JupyterHub.port = s["ip"], s["port"]
    c.JupyterHub.hub_ip, c.JupyterHub.hub_port = "127.0.0.1", s["port"] + 2
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{s['port'] + 1}"
    c.ConfigurableHTTPProxy.pid_file = str(s["state"] / "proxy.pid")
    c.JupyterHub.db_url = f"sqlite:///{s['state'] / 'jupyterhub.sqlite'}"
    c.JupyterHub.cookie_secret_file = str(s["state"] / "cookie_secret")
    c.Spawner.default_url = "/lab"
    c.Spawner.http_timeout = 120  # a cold server imports torch on first use, not at start; 2 min is ample
    c.Spawner.environment = {"HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if s["spawner"] == "local":
        from jupyterhub.spawner import SimpleLocalProcessSpawner

        home, course_root = s["home"], s["course_root"]

        class CourseSpawner(SimpleLocalProcessSpawner):
            """Servers as local processes: learners in their own home folder, instructors in the course."""

            home_dir_template = str(home / "{username}")

            def get_env(self):
                env = super().get_env()
                env["JUPYTER_CONFIG_PATH"] = configs[accounts[self.user.name].role]
                return env

            def get_args(self):
                args = super().get_args()
                if os.getuid() == 0:  # a container's root, or CI: Jupyter refuses root otherwise
                    args.append("--allow-root")
                if accounts[self.user.name].role == "instructor":
                    args.append(f"--ServerApp.root_dir={course_root}")
                return args

        c.JupyterHub.spawner_class = CourseSpawner
        c.Spawner.cmd = [str(Path(sys.executable).parent / "jupyterhub-singleuser")]
    return s
