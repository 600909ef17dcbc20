#!/usr/bin/env bash
# Installs the real WebRTC clients that sluice's end-to-end tests (tests/e2e/) drive:
#
#   apt   chromium                 headless browser, driven by playwright-core (/usr/bin/chromium)
#   apt   coturn                   turnutils_stunclient / turnutils_uclient / turnutils_peer
#   apt   iproute2                 ip and tc, for the simulcast test's network namespace and tbf link
#   npm   playwright-core          into tests/e2e/node_modules, pinned by tests/e2e/package-lock.json
#   PyPI  aiortc (binary wheels)   into the venv tests/e2e/.venv, pinned by tests/e2e/requirements.txt
#
# Idempotent: every step is skipped when what it installs is already there, so a second run takes
# a few seconds and touches no registry. Needs root (or sudo) only for the apt step.
# If something cannot be installed, it prints exactly what is missing and exits 1.
#
# Fresh install, measured on the 2-core dev VM (Debian 12, node 20, Python 3.11) with none of the
# clients present: 50 s wall in all (apt-get update + chromium 156 + coturn: 30 s; npm: 2 s;
# venv + aiortc 1.16 wheels: 15 s). A re-run with everything present: 2-7 s, no registry touched.
#
# Environment:
#   PYTHON=python3     interpreter used to create the venv (>= 3.10)
#   SKIP_APT=1         do not try apt (just report what is missing)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
E2E="$HERE/e2e"
PYTHON="${PYTHON:-python3}"
START=$(date +%s)

missing=()
log() { printf '[install-clients] %s\n' "$*"; }

# ---------------------------------------------------------------- apt: chromium, coturn
apt_pkgs=()
[ -x /usr/bin/chromium ] || apt_pkgs+=(chromium)
command -v turnutils_uclient >/dev/null 2>&1 || apt_pkgs+=(coturn)
{ command -v tc >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; } || apt_pkgs+=(iproute2)

if [ "${#apt_pkgs[@]}" -gt 0 ]; then
    if [ "${SKIP_APT:-0}" = 1 ]; then
        log "SKIP_APT=1: not installing ${apt_pkgs[*]}"
    else
        SUDO=()
        if [ "$(id -u)" -ne 0 ]; then
            if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else log "not root and no sudo"; fi
        fi
        if [ "$(id -u)" -eq 0 ] || [ "${#SUDO[@]}" -gt 0 ]; then
            t0=$(date +%s)
            log "apt-get update"
            if "${SUDO[@]}" apt-get update -qq; then
                log "apt-get install ${apt_pkgs[*]}"
                # coturn's package must not start a TURN server on 3478 (sluice's TURN port):
                # Debian ships it disabled (TURNSERVER_ENABLED unset in /etc/default/coturn) and a
                # policy-rc.d that denies starts covers images where that default differs.
                policy_created=0
                if [ ! -e /usr/sbin/policy-rc.d ] && [ "$(id -u)" -eq 0 ]; then
                    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
                    chmod +x /usr/sbin/policy-rc.d
                    policy_created=1
                    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
                fi
                DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq \
                    --no-install-recommends "${apt_pkgs[@]}" || log "apt-get install failed"
                if [ "$policy_created" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
                # On a systemd host the package enables and starts coturn.service, which would hold
                # 3478 (sluice's TURN port): the tests only want the turnutils_* clients.
                if [[ " ${apt_pkgs[*]} " == *" coturn "* ]] && [ -d /run/systemd/system ] &&
                    command -v systemctl >/dev/null 2>&1; then
                    "${SUDO[@]}" systemctl disable --now coturn.service >/dev/null 2>&1 || true
                fi
            else
                log "apt-get update failed"
            fi
            log "apt step took $(( $(date +%s) - t0 )) s"
        fi
    fi
else
    log "apt: chromium and coturn already installed"
fi
[ -x /usr/bin/chromium ] || missing+=("apt package 'chromium' (/usr/bin/chromium)")
command -v turnutils_uclient >/dev/null 2>&1 || missing+=("apt package 'coturn' (turnutils_uclient)")

# ---------------------------------------------------------------- npm: playwright-core
node_ok=0
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    node_major=$(node -p 'process.versions.node.split(".")[0]')
    if [ "$node_major" -ge 20 ]; then
        node_ok=1
    else
        missing+=("node >= 20 (found $(node --version)); playwright-core 1.65 needs it")
    fi
else
    missing+=("node and npm (>= 20) on PATH")
fi
if [ "$node_ok" = 1 ]; then
    cd "$E2E"
    if npm ls --no-audit playwright-core >/dev/null 2>&1 &&
        node -e 'require("playwright-core")' >/dev/null 2>&1; then
        log "npm: playwright-core $(node -p 'require("playwright-core/package.json").version') already installed"
    else
        t0=$(date +%s)
        if [ -f package-lock.json ]; then
            log "npm ci (tests/e2e)"
            npm ci --no-audit --no-fund --loglevel=error || log "npm ci failed"
        else
            # Only when the lock is missing: resolve once and write package-lock.json (commit it).
            log "npm install (tests/e2e, writing package-lock.json)"
            npm install --no-audit --no-fund --loglevel=error || log "npm install failed"
        fi
        log "npm step took $(( $(date +%s) - t0 )) s"
    fi
    node -e 'require("playwright-core")' >/dev/null 2>&1 ||
        missing+=("npm package 'playwright-core' in tests/e2e/node_modules")
    cd - >/dev/null
fi

# ---------------------------------------------------------------- PyPI: aiortc in a venv
VENV="$E2E/.venv"
REQ="$E2E/requirements.txt"
py_ok() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" -c 'import aiortc, aioice, av' >/dev/null 2>&1 || return 1
    if [ -f "$REQ" ]; then
        # every pin in requirements.txt must be what is installed
        diff <(grep -Ev '^\s*(#|$)' "$REQ" | tr 'A-Z_' 'a-z-' | sort) \
             <("$VENV/bin/python" -m pip freeze --all 2>/dev/null | tr 'A-Z_' 'a-z-' | sort) |
            grep -q '^<' && return 1
    fi
    return 0
}
if py_ok; then
    log "venv: aiortc $("$VENV/bin/python" -c 'import aiortc; print(aiortc.__version__)') already installed"
else
    t0=$(date +%s)
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        missing+=("python interpreter '$PYTHON' (>= 3.10, with venv)")
    else
        if [ ! -x "$VENV/bin/python" ]; then
            log "creating venv tests/e2e/.venv with $("$PYTHON" --version 2>&1)"
            "$PYTHON" -m venv "$VENV" || log "python -m venv failed"
        fi
        if [ -x "$VENV/bin/python" ]; then
            if [ -f "$REQ" ]; then
                log "pip install -r tests/e2e/requirements.txt (binary wheels only)"
                "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
                    --only-binary=:all: -r "$REQ" || log "pip install failed"
            else
                # Only when the pins are missing: resolve once and write requirements.txt (commit it).
                log "pip install aiortc (binary wheels only, writing requirements.txt)"
                if "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
                    --only-binary=:all: aiortc; then
                    {
                        echo "# Pinned by tests/install-clients.sh from 'pip install aiortc' (binary wheels)."
                        "$VENV/bin/python" -m pip freeze
                    } >"$REQ"
                else
                    log "pip install failed"
                fi
            fi
        fi
    fi
    log "venv step took $(( $(date +%s) - t0 )) s"
fi
py_ok || missing+=("PyPI package 'aiortc' (and its pins in tests/e2e/requirements.txt) in tests/e2e/.venv")

# ---------------------------------------------------------------- report
if [ "${#missing[@]}" -gt 0 ]; then
    log "MISSING:"
    for m in "${missing[@]}"; do printf '  - %s\n' "$m"; done
    exit 1
fi
log "ok: $(/usr/bin/chromium --version 2>/dev/null | head -1); playwright-core $(cd "$E2E" && node -p 'require("playwright-core/package.json").version'); aiortc $("$VENV/bin/python" -c 'import aiortc; print(aiortc.__version__)'); coturn $(dpkg-query -W -f='${Version}' coturn 2>/dev/null || echo '?')"
log "done in $(( $(date +%s) - START )) s"
