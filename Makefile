# inferlab: `make demo` and `make test` work on a fresh clone; both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench bench-grader bench-throughput train clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel here; an unpinned torch would pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Autogrades the quick track's bundled sample class (six learners x four labs, about 10 minutes on 2 cores;
# a re-run skips graded ones), writes demo-output/report.html (the track), reports/<lab>/ and grades.csv,
# and prints awarded against expected points.
demo: install
	$(VENV)/bin/inferlab demo --out demo-output

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/run.py --out bench

# The grader's perf check under load: reference must pass 20/20, 'slow' fail 20/20 (about 10 minutes).
bench-grader: install
	$(PY) bench/perf_robustness.py --runs 20 --out bench

# Autograde throughput: submissions per minute against workers, local and Ray, and the sizing of a
# class of 500 (about 8 minutes on 2 cores).
bench-throughput: install
	$(PY) bench/grading_throughput.py --out bench

# Retrains the bundled models (78 min on 2 CPU cores here); checkpoints in .train-work/ make it resumable.
train: install
	cd labs && ../$(PY) -m inferlab.train --work ../.train-work

clean:
	rm -rf $(VENV) .pytest_cache demo-output
