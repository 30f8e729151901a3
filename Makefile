# Two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-loaded venv sysdeps lint bench clean install

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

# Install on a vehicle Linux box (docs/install.md): a virtual environment in $(PREFIX)/.venv with
# vota from SOURCE (this checkout, or a wheel), the systemd units, their user and directories,
# and the example configuration in /etc/vota; everything under $(DESTDIR) when staging a package
# or an image. PIP_ARGS: extra pip options (an offline wheelhouse: --no-index --find-links DIR).
PREFIX  ?= /opt/vota
DESTDIR ?=
SOURCE  ?= .
PIP_ARGS ?=
UNITDIR ?= /usr/lib/systemd/system
install:
	$(PYTHON) -m venv $(DESTDIR)$(PREFIX)/.venv
	$(DESTDIR)$(PREFIX)/.venv/bin/python -m pip install --quiet $(PIP_ARGS) '$(SOURCE)'
	@# a venv made under DESTDIR names DESTDIR in its scripts: they must name where it will run
	@if [ -n "$(DESTDIR)" ]; then \
		grep -rlI -- '$(DESTDIR)$(PREFIX)' $(DESTDIR)$(PREFIX)/.venv/bin $(DESTDIR)$(PREFIX)/.venv/pyvenv.cfg \
		| xargs -r sed -i 's|$(DESTDIR)$(PREFIX)|$(PREFIX)|g'; fi
	for unit in vota-gateway.service vota-tbox.service; do \
		sed 's|/opt/vota|$(PREFIX)|g' configs/systemd/$$unit > $$unit.tmp && \
		install -D -m 0644 $$unit.tmp $(DESTDIR)$(UNITDIR)/$$unit && rm -f $$unit.tmp; done
	install -D -m 0644 configs/systemd/sysusers.d/vota.conf $(DESTDIR)/usr/lib/sysusers.d/vota.conf
	install -D -m 0644 configs/systemd/tmpfiles.d/vota.conf $(DESTDIR)/usr/lib/tmpfiles.d/vota.conf
	install -d -m 0750 $(DESTDIR)/etc/vota
	install -m 0640 configs/vcan.yaml $(DESTDIR)/etc/vota/vehicle.yaml.example
	[ -e $(DESTDIR)/etc/vota/vota.env ] || install -m 0640 configs/systemd/vota.env $(DESTDIR)/etc/vota/vota.env
	install -D -m 0644 configs/mosquitto/vota.conf $(DESTDIR)/etc/mosquitto/conf.d/vota.conf.example
	install -D -m 0644 configs/mosquitto/vota.acl $(DESTDIR)/etc/mosquitto/vota.acl.example
	@if [ -z "$(DESTDIR)" ]; then systemd-sysusers && systemd-tmpfiles --create /usr/lib/tmpfiles.d/vota.conf \
		&& systemctl daemon-reload 2>/dev/null || true; \
		echo "installed: put the vehicle's configuration in /etc/vota/vehicle.yaml (see vehicle.yaml.example), then systemctl enable --now vota-gateway vota-tbox"; \
	else echo "staged in $(DESTDIR): on the target run systemd-sysusers, systemd-tmpfiles --create, systemctl daemon-reload"; fi

clean:
	rm -rf $(VENV) out var .pytest_cache
