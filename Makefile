# Quick start: `make demo` runs qnix on this host, `make test` runs every test.
# Both install what they need: apt-get on Debian 12 (as root); on NixOS they run inside shell.nix.
# `make install` / `make uninstall` put qnix on a Debian (or other systemd) host for real
# (docs/install.md); NixOS installs it with the flake instead.

VENV      := .venv
PY        := $(VENV)/bin/python
QNIX      := $(VENV)/bin/qnix
STAMP     := $(VENV)/.installed
SYSTEM_PACKAGES := bubblewrap nftables libnftables1 nix-bin age graphviz iproute2 systemd-container python3-venv \
                   gnupg openssh-client pass rsyslog rsyslog-gnutls rsyslog-relp aide btrfs-progs busybox-static cpio \
                   openssl e2fsprogs git
# Remote access per compartment: nebula and nebula-cert (docs/fleet.md).
SYSTEM_PACKAGES += nebula
# GUI compartments: the Wayland filter reads the protocol files (libwayland-dev ships
# wayland.xml); its tests run sway headless and attack it with grim, wtype and wl-clipboard,
# and open GTK4 windows (GTK4's introspection for the system's python3); a VM compartment shows
# its apps through waypipe (its server in the guest, from the host's /usr).
SYSTEM_PACKAGES += wayland-protocols libwayland-dev sway grim wtype wl-clipboard foot \
                   python3-gi gir1.2-gtk-4.0 waypipe
# VM compartments: QEMU and a kernel for the guests, for this machine's architecture.
ifeq ($(shell dpkg --print-architecture 2>/dev/null),arm64)
SYSTEM_PACKAGES += qemu-system-arm linux-image-arm64
else
SYSTEM_PACKAGES += qemu-system-x86 linux-image-amd64
endif
PYTHON    ?= python3
# make install: qnix's own virtual environment, from the system's interpreter (python3-venv).
PREFIX         := /opt/qnix
INSTALL_PYTHON ?= /usr/bin/python3

.PHONY: demo fleet-demo test lint deps system-deps bench clean install uninstall

# On NixOS (no apt-get, but nix-shell) every target runs inside shell.nix, which brings the tools.
NIX_REEXEC := $(and $(if $(IN_NIX_SHELL),,1),$(if $(shell command -v apt-get 2>/dev/null),,1),$(shell command -v nix-shell 2>/dev/null))

ifneq ($(NIX_REEXEC),)
demo fleet-demo test bench clean:
	nix-shell shell.nix --run '$(MAKE) $@'
else

demo: $(STAMP)
	$(QNIX) check examples/smb-office.toml
	$(QNIX) build examples/smb-office.toml -o build/smb-office
	@echo
	@echo "Built the flake in build/smb-office:"
	@cd build/smb-office && find . -type f | sort
	$(QNIX) graph examples/smb-office.toml -o build/smb-office.svg
	@echo "Drew build/smb-office.svg"
	@echo
	bash examples/live-demo.sh $(QNIX)

fleet-demo: $(STAMP)
	bash examples/fleet-demo.sh $(QNIX)

test: $(STAMP)
	$(VENV)/bin/ruff check qnix tests bench
	$(VENV)/bin/ruff format --check qnix tests bench
	$(VENV)/bin/mypy qnix
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -p no:cacheprovider tests

bench: $(STAMP)
	@# The nearest peer bench/runtime.py measures qnix beside (apt-get on Debian, shell.nix on NixOS).
	@if [ -z "$(IN_NIX_SHELL)" ] && ! command -v firejail >/dev/null && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends firejail; fi
	$(PY) bench/build_scaling.py
	$(PY) bench/runtime.py
	$(PY) bench/broker.py
	$(PY) bench/audit.py
	$(PY) bench/gui.py

system-deps:
	@if [ -n "$(IN_NIX_SHELL)" ]; then exit 0; fi; \
	missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "please install:$$missing" >&2; exit 1; fi; \
	fi

$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .hypothesis .import_linter_cache .grimp_cache
endif

# SPEC=path/to/spec.toml configures its audit forwarding and AIDE; PURGE=1 also removes the state.
# NixOS installs qnix with the flake (its /etc is not the admin's to write units into).
install:
	@if [ -e /etc/NIXOS ]; then echo "on NixOS qnix is installed with the flake: see docs/install.md" >&2; exit 1; fi
	@$(MAKE) --no-print-directory system-deps
	@test ! -e $(PREFIX) || { echo "$(PREFIX) exists: make uninstall first" >&2; exit 1; }
	$(INSTALL_PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q .
	$(PREFIX)/bin/qnix install $(if $(SPEC),--spec $(SPEC))

uninstall:
	$(PREFIX)/bin/qnix uninstall $(if $(PURGE),--purge)
