#!/bin/sh
# inferlab-entrypoint: check what the command needs before it starts, then run it.
#
# The images start every command through this script (under tini). Each problem it finds is
# reported on one line that names the problem and the fix, and it exits 64 (a configuration
# problem) or 69 (something the container lacks) instead of letting the service fail later.
#   jupyter ...                 the work folder (./labs, mounted) must be writable
#   jupyterhub ...              the accounts file must exist, be a file, and be readable
#   inferlab autograde ...      submissions present, output (or --course) writable, the sandbox usable
#   inferlab-grade-shard ...    the same, for the shards of a Kubernetes indexed Job and their merge
set -eu

die() {
  code=$1
  shift
  printf 'inferlab: %s\n' "$*" >&2
  exit "$code"
}

if [ "$(id -u)" = 0 ]; then
  die 64 "refusing to run as root: start the container as a non-root user (compose sets user: 1000:1000; with docker run, leave out --user 0)"
fi

# A user other than the image's (INFERLAB_UID) has no writable home: give it one in /tmp.
if [ -z "${HOME:-}" ] || [ ! -d "$HOME" ] || [ ! -w "$HOME" ]; then
  HOME="/tmp/home-$(id -u)"
  mkdir -p "$HOME"
  export HOME
fi

check_workdir() {
  if [ ! -w "$PWD" ]; then
    die 64 "the work folder $PWD (your ./labs, mounted) is not writable by uid $(id -u): run as your own user with INFERLAB_UID=\$(id -u) INFERLAB_GID=\$(id -g) docker compose up lab, or make labs/ writable by uid $(id -u)"
  fi
}

check_hub() {
  accounts="${INFERLAB_HUB_ACCOUNTS:-/srv/inferlab/accounts.txt}"
  create="create it with: .venv/bin/inferlab hub-account NAME --role instructor --out infra/hub (one call per person; see infra/hub/accounts.example.txt)"
  if [ -d "$accounts" ]; then
    die 64 "the accounts file $accounts is a folder: Docker made it because infra/hub/accounts.txt did not exist on the host; remove that empty folder (rmdir infra/hub/accounts.txt), then $create"
  elif [ ! -e "$accounts" ]; then
    die 64 "no accounts file at $accounts: $create, or point INFERLAB_HUB_ACCOUNTS_FILE at yours"
  elif [ ! -r "$accounts" ]; then
    die 64 "the accounts file $accounts is not readable by uid $(id -u) (inferlab hub-account writes it with mode 600): on the host, sudo chown $(id -u) infra/hub/accounts.txt"
  fi
  if ! command -v configurable-http-proxy >/dev/null 2>&1; then
    die 69 "configurable-http-proxy is missing, and the hub needs it as its proxy: npm install --global configurable-http-proxy@5.3.0 (the image does this; rebuild it)"
  fi
}

check_grading() {
  submissions="" out="grading-output" course="" sandbox="bwrap" prev=""
  for arg in "$@"; do
    case "$prev" in
      --submissions) submissions=$arg ;;
      --out) out=$arg ;;
      --course) course=$arg ;;
      --sandbox) sandbox=$arg ;;
    esac
    case "$arg" in
      --submissions=*) submissions=${arg#*=} ;;
      --out=*) out=${arg#*=} ;;
      --course=*) course=${arg#*=} ;;
      --sandbox=*) sandbox=${arg#*=} ;;
    esac
    prev=$arg
  done
  if [ -n "$course" ]; then  # grading an nbgrader course in place: it is the output, submitted/ the input
    out=$course
    submissions=${submissions:-$course/submitted}
  fi
  if [ -n "$submissions" ]; then
    if [ ! -d "$submissions" ] || [ -z "$(ls -A "$submissions" 2>/dev/null)" ]; then
      die 64 "no submissions in $submissions: mount your class's folder there, e.g. INFERLAB_SUBMISSIONS=course/submitted docker compose --profile grading run --rm grader (nbgrader's submitted/ layout, or <student>.ipynb files)"
    fi
  fi
  mkdir -p "$out" 2>/dev/null || true
  if [ ! -d "$out" ] || [ ! -w "$out" ]; then
    die 64 "the output folder $out is not writable by uid $(id -u): on the host, create it yourself before the first run (mkdir -p grading-output; Docker would create it owned by root), or chown it to uid $(id -u)"
  fi
  if [ "$sandbox" = bwrap ]; then
    if ! command -v bwrap >/dev/null 2>&1; then
      die 69 "--sandbox bwrap needs bubblewrap, which is not in this image: apt-get install bubblewrap (the image does this; rebuild it)"
    fi
    # The same namespaces and mounts as grader/sandbox.py's bwrap command.
    if ! err=$(bwrap --unshare-all --die-with-parent --ro-bind / / --tmpfs /tmp --proc /proc --dev /dev true 2>&1); then
      die 69 "bubblewrap cannot build its sandbox in this container (${err:-no message}): it needs user namespaces and a new /proc; with compose, the grader services' security_opt (seccomp, apparmor and systempaths unconfined) must be in effect, and some hosts forbid user namespaces even so (Ubuntu 23.10+: kernel.apparmor_restrict_unprivileged_userns=1); on Kubernetes, the pod needs hostUsers: false and procMount: Unmasked (infra/k8s/README.md). Otherwise grade with --sandbox none (compose: INFERLAB_GRADER_SANDBOX=none), which makes the container the only sandbox and lets submissions read the course's hidden tests (docs/infra.md, 'Grading in a container')"
    fi
  fi
}

case "${1:-}" in
  jupyter | jupyter-lab) check_workdir ;;
  jupyterhub) check_hub ;;
  inferlab)
    if [ "${2:-}" = autograde ]; then check_grading "$@"; fi
    ;;
  inferlab-grade-shard) check_grading "$@" ;;
esac

exec "$@"
