# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-loaded venv sysdeps lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

venv: $(STAMP)

# System packages the tests need: Mosquitto, the real MQTT broker the tests start; its command-line
# clients (an independent MQTT client in the tests); systemd's analyzer for the unit files; OpenSSL's
# command line (an independent Ed25519 verifier of the signed envelopes).
SYSDEPS := mosquitto:mosquitto mosquitto_pub:mosquitto-clients systemd-analyze:systemd openssl:openssl
sysdeps:
	@missing=""; for dep in $(SYSDEPS); do \
		cmd=$${dep%%:*}; pkg=$${dep##*:}; \
		command -v $$cmd >/dev/null 2>&1 || [ -x /usr/sbin/$$cmd ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@if [ "$$(id -u)" = 0 ]; then sysctl -q -w net.core.rmem_max=4194304 2>/dev/null || true; fi

demo: venv
	$(PY) -m vota bench --config configs/bench.yaml --out out/demo --image-size 256K --image-kind firmware

test: venv sysdeps lint
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The whole suite with every core kept busy by a spinning process: what must hold on a shared CI machine.
test-loaded: venv sysdeps lint
	$(PY) tests/loaded.py tests

# The inner loop: the in-process tests only (no daemons, no broker), seconds.
test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

lint: venv
	$(PY) -m ruff check vota agent gateway ecu_sim tbox cloud_sim tests benchmarks
	$(PY) -m mypy vota agent gateway ecu_sim tbox cloud_sim
	$(VENV)/bin/lint-imports --no-cache

bench: venv
	$(PY) benchmarks/flash_throughput.py

clean:
	rm -rf $(VENV) out var .pytest_cache
