# Two commands: `make run` and `make test` (README "Quick start").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export OPENIMIS_USERNAME ?= Admin
export OPENIMIS_PASSWORD ?= admin123

.PHONY: run test install certs redis promtool check lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

certs/server.crt: | $(BIN)/.installed
	$(BIN)/openimis-mediator certs --out certs --client vendor-a --client vendor-b

certs: certs/server.crt

check: install certs
	$(BIN)/openimis-mediator check --config . --files

run: install certs check
	@echo ""
	@echo "openIMIS Mediator on https://localhost:8443/fhir/ in front of the embedded openIMIS stand-in (127.0.0.1:8000)."
	@echo "Try:  curl --cacert certs/ca.crt https://localhost:8443/fhir/metadata"
	@echo "      curl --cacert certs/ca.crt --cert certs/vendor-a.crt --key certs/vendor-a.key https://localhost:8443/fhir/Medication/"
	@echo "      curl --cacert certs/ca.crt --cert certs/vendor-b.crt --key certs/vendor-b.key -H X-User-Name:RHOS0011 'https://localhost:8443/fhir/Patient?identifier=123456789'"
	@echo "      curl --cacert certs/ca.crt --cert certs/vendor-b.crt --key certs/vendor-b.key -H X-User-Name:RHOS0011 https://localhost:8443/fhir/ClaimResponse/9a1b2c3d-0000-4000-8000-00000000a001   # 403: another facility"
	@echo "      (README Quick start: SMART tokens with .venv/bin/openimis-mediator token)"
	@echo ""
	$(BIN)/openimis-mediator dev --config .

redis:
	@bash deploy/dev/ensure-redis.sh

promtool:
	@bash deploy/dev/ensure-promtool.sh

test: install redis promtool
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check mediator tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache

# Mediator vs nginx vs bare aiohttp on loopback (README "Benchmarks"); installs nginx and wrk from Debian if missing.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
bench: install
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v h2load >/dev/null || \
		{ $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q nginx wrk nghttp2-client; }
	$(BIN)/pip install -q -e '.[speed]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)
