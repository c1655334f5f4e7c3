# Entry points. Every target runs scripts/setup.sh first (idempotent: creates .venv on a fresh machine).
PY := .venv/bin/python
MODEL_REPOSITORY ?= model_repository
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
METRICS_PORT ?= 8002
# the listen address: loopback unless TRITON_HOST says otherwise (one name; README, docker and make agree)
TRITON_HOST ?= 127.0.0.1

OPENAI_PORT ?= 9000
TOKENIZER ?= data/tokenizer

.PHONY: setup test demo serve openai loadtest bench
setup:
	@scripts/setup.sh

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile tests  # two workers (a file stays on one): CI under 25 min on 2 cores

demo: setup
	$(PY) scripts/demo.py

serve: setup
	scripts/serve.sh --model-repository $(MODEL_REPOSITORY) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) --host $(TRITON_HOST)

# OpenAI-compatible /v1/completions and /v1/models in front of a running `make serve` (loopback by default)
openai: setup
	$(PY) -m lsgpt.serving.openai_api --url 127.0.0.1:$(GRPC_PORT) -p $(TOKENIZER) --port $(OPENAI_PORT) --host $(TRITON_HOST)

# perf_analyzer sweep over gRPC (LOADTEST_ARGS=--quick: seconds; --url HOST:PORT: a running server)
loadtest: setup
	$(PY) -m benchmarks.loadtest --model-repository $(MODEL_REPOSITORY) $(LOADTEST_ARGS)

# one run: generation HF vs ours fp/int8, Triton vs in process, training, into results/<device>/<benchmark>/
bench: setup
	$(PY) -m benchmarks.bench $(BENCH_ARGS)
