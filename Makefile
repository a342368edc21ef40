# luotrace: every target sets up what it needs on a fresh Debian 12 host (as root).
#   make demo   trace the reference model on real guest_memfds (stand-ins where KVM makes none), print the report
#   make check  lint (ruff), types (mypy) and the unit tier: no root needed, under a minute
#   make test   check, then the whole suite with the kernel tier (what .ci/run runs)
#   make bench  overhead benchmarks, printed as ratios against an untraced baseline
#   make bench-fleet  the fleet dataset at 10,000 recordings: export rate, size, query time and memory
#   make soak   serve as a service for 30 minutes (memory and scrape time flat)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
MODEL := workloads/model/luo_model
KREL := $(shell uname -r)
APT_PACKAGES := python3-bpfcc bpfcc-tools bpftrace bpftool linux-headers-amd64 build-essential dwarves \
                python3-venv prometheus prometheus-pushgateway prometheus-node-exporter util-linux \
                rsync openjdk-17-jre-headless

.PHONY: setup apt headers mounts venv model demo check test bench bench-fleet soak install-service docs clean vm-deps vm-kernel vmtest vmtest-ab vmbench-retrieve

setup: apt headers mounts venv model

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "setup: installing$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	fi

# BCC compiles against /lib/modules/$(uname -r)/build.  Without a headers
# package for the running kernel, link Debian's generic tree (build = the
# arch-specific part, source = -common); BPF programs take every struct
# offset from BTF, never from these headers.
headers:
	@if [ ! -e /lib/modules/$(KREL)/build ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then \
	  hdr=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1); \
	  [ -n "$$hdr" ] || { echo "setup: no linux-headers-*-amd64 under /usr/src"; exit 1; }; \
	  mkdir -p /lib/modules/$(KREL); \
	  ln -sfn $$hdr /lib/modules/$(KREL)/build; \
	  ln -sfn $${hdr%-amd64}-common /lib/modules/$(KREL)/source; \
	  echo "setup: linked $$hdr as the headers of $(KREL)"; \
	fi

mounts:
	@mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -c "import bcc" || { echo "setup: bcc not importable from $(PY)"; exit 1; }
	@$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

model: $(MODEL) $(MODEL)-latest

# The core and every file handler under handlers/ (each registers itself).
MODEL_SRCS := workloads/model/luo_model.c $(sort $(wildcard workloads/model/handlers/*.c))
$(MODEL): $(MODEL_SRCS) workloads/model/model.h workloads/model/kvm_abi.h
	gcc -O2 -g -Wall -Wextra -fno-ipa-icf -o $@ $(MODEL_SRCS)

# The guest_memfd handler as the series' later revisions have it (no freeze op).
$(MODEL)-latest: $(MODEL_SRCS) workloads/model/model.h workloads/model/kvm_abi.h
	gcc -O2 -g -Wall -Wextra -fno-ipa-icf -DLUO_REVISION_LATEST -o $@ $(MODEL_SRCS)

demo: setup
	$(VENV)/bin/luotrace demo

# Lint, types and the unit tier (no root, no BPF): fast, before the full suite.
# Run as root, the unit tier runs as nobody, as a developer without
# privileges would run it: what it needs of root would fail here.
LINT_PATHS := tracer exporters workloads dashboards tests
UNIT := $(VENV)/bin/pytest -q -m "not kernel and not spark" -p no:cacheprovider
check: venv
	$(VENV)/bin/ruff check --select E,F,W --line-length 130 $(LINT_PATHS)
	$(VENV)/bin/mypy
	@if [ "$$(id -u)" = 0 ] && command -v setpriv >/dev/null; then \
	  d=$$(mktemp -d /tmp/luotrace-nobody-XXXXXX) && chown 65534:65534 "$$d" && \
	  echo "check: the unit tier as nobody (it needs no root)" && \
	  setpriv --reuid=65534 --regid=65534 --clear-groups env HOME="$$d" TMPDIR="$$d" \
	    $(UNIT) --basetemp "$$d/t" tests; rc=$$?; rm -rf "$$d"; exit $$rc; \
	else $(UNIT) tests; fi

# check ran the unit tier (as nobody); this runs the rest (kernel and spark), once.
# -rs: every skip, and why, at the end (a skip is a host's reason, e.g. its
# KVM makes no guest_memfd; never a set-up step); --durations: the slowest,
# to keep the suite well inside its 20 minutes.
test: setup check
	LUOTRACE_CHECKED_AS_NOBODY=1 $(VENV)/bin/pytest -q -rs --durations=12 -m "kernel or spark" tests

bench: setup
	$(PY) -m tests.bench

# the fleet view at scale: 1,000 hosts x 10 updates exported and queried (no root)
bench-fleet: venv
	$(PY) -m tests.bench_fleet

# luotrace serve as a systemd service (exporters/systemd/luotrace.service, this
# checkout's venv); `systemctl enable --now luotrace` starts it.
SYSTEMD_DIR ?= /etc/systemd/system
install-service: venv
	@mkdir -p $(SYSTEMD_DIR) /var/lib/prometheus/node-exporter
	@sed 's#@LUOTRACE_HOME@#$(CURDIR)#g' exporters/systemd/luotrace.service > $(SYSTEMD_DIR)/luotrace.service
	@systemd-analyze verify $(SYSTEMD_DIR)/luotrace.service
	@if [ -d /run/systemd/system ] && [ "$(SYSTEMD_DIR)" = /etc/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed $(SYSTEMD_DIR)/luotrace.service; start it with: systemctl enable --now luotrace"

# serve as a service for 30 minutes: RSS and scrape time flat, concurrent scrapers, a burst
soak: setup
	$(PY) -m tests.bench_soak 30

# Real-kernel lane (Linux 7.2 with LUO under QEMU TCG); not part of `make test`.
VM_PACKAGES := flex bison bc libelf-dev libssl-dev dwarves cpio rsync qemu-system-x86 kmod

vm-deps: setup
	@missing=""; for p in $(VM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; fi
	@$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[vm]'

# SERIES names workloads/vm/series/<name> (seed, latest, racy); each series'
# kernel is cached, and switching rebuilds only what its patches touch.
SERIES ?= seed
vm-kernel: vm-deps
	SERIES=$(SERIES) bash workloads/vm/build-kernel.sh

vmtest: vm-kernel
	SERIES=$(SERIES) bash workloads/vm/vmtest.sh

# The guest's downtime path: retrieves across kexecs, untraced and traced (several boots, ~30 min)
vmbench-retrieve: vm-kernel
	SERIES=$(SERIES) bash workloads/vm/vmbench-retrieve.sh

# The same workload on two series' kernels, compared: make vmtest-ab A=seed B=latest
A ?= seed
BOOTS ?= 3
B ?= latest
vmtest-ab: vm-deps
	A=$(A) B=$(B) BOOTS=$(BOOTS) bash workloads/vm/vmtest-ab.sh

docs: venv
	$(PY) -m tracer.cli.docs

clean:
	rm -rf $(VENV) $(MODEL) *.egg-info
