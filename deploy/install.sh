#!/usr/bin/env bash
# sluice bare-metal installer. Idempotent: running it again upgrades in place and gives the same
# files. See docs/operations.md (Install, Upgrade) and `deploy/install.sh --help`.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: deploy/install.sh [options]

Installs sluice on this host (or into DESTDIR for packaging and tests):
  PREFIX/bin/sluice                        the binary (built with cargo build --release, or --binary)
  /etc/sluice/sluice.toml                  config, from deploy/sluice.example.toml; an edited one is
                                           never overwritten: the new example goes to sluice.toml.new
  UNITDIR/sluice.service                   systemd unit (ExecStart points at PREFIX/bin/sluice)
  /etc/sysctl.d/90-sluice.conf             kernel socket-buffer and port settings
  PREFIX/lib/sysusers.d/sluice.conf        the sluice system user, for systemd-sysusers
  PREFIX/share/sluice/                     pristine example config, Prometheus and Grafana files
  PREFIX/share/doc/sluice/operations.md    the operations guide
Then, unless DESTDIR is set: creates the sluice user, applies the sysctls (sysctl --system),
and, where systemd runs, enables the service and starts it if it is not running (a running
one keeps its old binary until you `systemctl restart sluice`, which drains first).

Options:
  --binary PATH    install this binary instead of building one
  --prefix DIR     installation prefix (default: $PREFIX or /usr/local)
  --destdir DIR    stage everything under DIR (default: $DESTDIR or empty); skips the user,
                   sysctl and systemctl steps
  --unitdir DIR    where the unit goes (default: /usr/lib/systemd/system when PREFIX is /usr,
                   else /etc/systemd/system)
  --no-start       enable the service but do not start it
  --no-enable      neither enable nor start the service
  --uninstall      stop and disable the service and remove what this script installed; an
                   edited /etc/sluice/sluice.toml and the sluice user are kept
  --purge          with --uninstall: also remove the config (edited or not) and the user
  -h, --help       this help

Environment: DESTDIR, PREFIX (as the options), CARGO (default: cargo).
Examples:
  cargo build --release && sudo deploy/install.sh --binary target/release/sluice
  DESTDIR=/tmp/stage PREFIX=/usr deploy/install.sh --binary target/release/sluice
  sudo deploy/install.sh --uninstall
EOF
}

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }
warn() { echo "install.sh: warning: $*" >&2; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/usr/local}"
BINARY=""
UNITDIR=""
MODE=install
PURGE=0
ENABLE=1
START=1

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) [ $# -ge 2 ] || die "--binary needs a path"; BINARY="$2"; shift 2 ;;
        --binary=*) BINARY="${1#*=}"; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --destdir) [ $# -ge 2 ] || die "--destdir needs a directory"; DESTDIR="$2"; shift 2 ;;
        --destdir=*) DESTDIR="${1#*=}"; shift ;;
        --unitdir) [ $# -ge 2 ] || die "--unitdir needs a directory"; UNITDIR="$2"; shift 2 ;;
        --unitdir=*) UNITDIR="${1#*=}"; shift ;;
        --no-start) START=0; shift ;;
        --no-enable) ENABLE=0; START=0; shift ;;
        --uninstall) MODE=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

case "$PREFIX" in
    /*) ;;
    *) die "PREFIX must be an absolute path, got '$PREFIX'" ;;
esac
case "$PREFIX" in *[#\ \"\'\\]*) die "PREFIX must not contain spaces, quotes, backslashes or '#'" ;; esac
PREFIX="${PREFIX%/}"
[ -n "$PREFIX" ] || PREFIX=/usr  # "/" would put the binary in /bin
if [ -n "$DESTDIR" ]; then
    case "$DESTDIR" in /*) ;; *) DESTDIR="$PWD/$DESTDIR" ;; esac
    DESTDIR="${DESTDIR%/}"
fi
if [ -z "$UNITDIR" ]; then
    if [ "$PREFIX" = /usr ]; then UNITDIR=/usr/lib/systemd/system; else UNITDIR=/etc/systemd/system; fi
fi
[ "$PURGE" -eq 0 ] || [ "$MODE" = uninstall ] || die "--purge only goes with --uninstall"

# Installed paths (without DESTDIR).
BIN="$PREFIX/bin/sluice"
CONF_DIR=/etc/sluice
CONF="$CONF_DIR/sluice.toml"
UNIT="$UNITDIR/sluice.service"
SYSCTL=/etc/sysctl.d/90-sluice.conf
SYSUSERS="$PREFIX/lib/sysusers.d/sluice.conf"
SHARE="$PREFIX/share/sluice"
PRISTINE="$SHARE/sluice.example.toml"
DOC="$PREFIX/share/doc/sluice/operations.md"
# Read-only reference files copied as they are: repo path -> installed path.
SHARED_FILES=(
    "deploy/prometheus.yml:$SHARE/prometheus.yml"
    "deploy/prometheus/alerts.yml:$SHARE/prometheus/alerts.yml"
    "deploy/grafana/sluice.json:$SHARE/grafana/sluice.json"
    "docs/operations.md:$DOC"
)

D="$DESTDIR"
LIVE=0  # acting on this host (users, sysctl, systemctl), not on a staging tree
[ -n "$D" ] || LIVE=1
HAVE_SYSTEMD=0
if [ "$LIVE" -eq 1 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    HAVE_SYSTEMD=1
fi
if [ "$LIVE" -eq 1 ] && [ "$(id -u)" -ne 0 ]; then
    die "installing on this host needs root (or set DESTDIR to stage into a directory)"
fi

# Copy through a temporary file and rename, so a running binary or a reader never sees a
# half-written file, and modes do not depend on the umask.
# Create a directory and its missing parents, each 0755 whatever the umask.
mkdirs() {
    [ -d "$1" ] && return 0
    mkdirs "$(dirname "$1")"
    install -d -m 0755 "$1"
}

put() { # mode src dst
    local mode="$1" src="$2" dst="$3"
    mkdirs "$(dirname "$dst")"
    install -m "$mode" "$src" "$dst.tmp.$$"
    mv -f "$dst.tmp.$$" "$dst"
}

# Remove a file we installed and say so; quiet when it is already gone.
remove() {
    if [ -e "$1" ] || [ -L "$1" ]; then rm -f "$1"; say "removed $1"; fi
}

# Remove directories that are empty, deepest first.
prune_dirs() {
    local dir
    for dir in "$@"; do
        if [ -d "$dir" ] && rmdir "$dir" 2>/dev/null; then say "removed empty $dir/"; fi
    done
}

sysusers_line() {
    local shell=/usr/sbin/nologin
    [ -x "$shell" ] || shell=/sbin/nologin
    printf '# The unprivileged user sluice.service runs as (see systemd-sysusers(8)).\n'
    printf 'u sluice - "sluice WebRTC SFU" /nonexistent %s\n' "$shell"
}

config_loads() { # binary config -> 0 ok, 1 errors (printed), 2 binary cannot run here
    local bin="$1" conf="$2" out
    if ! "$bin" version >/dev/null 2>&1; then return 2; fi
    if out="$(env -i PATH="$PATH" "$bin" check-config --config "$conf" 2>&1 >/dev/null)"; then
        return 0
    fi
    printf '%s\n' "$out" | sed 's/^/    /' >&2
    return 1
}

uninstall() {
    if [ "$HAVE_SYSTEMD" -eq 1 ]; then
        if systemctl is-active --quiet sluice.service || systemctl is-enabled --quiet sluice.service 2>/dev/null; then
            say "stopping and disabling sluice.service (a stop drains live sessions first)"
            systemctl disable --now sluice.service || warn "systemctl disable --now failed"
        fi
    fi
    remove "$D$UNIT"
    if [ "$HAVE_SYSTEMD" -eq 1 ]; then systemctl daemon-reload; fi
    remove "$D$BIN"
    remove "$D$SYSCTL"
    if [ "$LIVE" -eq 1 ]; then say "the sysctl values stay in effect until reboot"; fi
    remove "$D$SYSUSERS"
    local entry
    for entry in "${SHARED_FILES[@]}"; do remove "$D${entry#*:}"; done
    remove "$D$CONF.new"
    if [ -f "$D$CONF" ]; then
        if [ "$PURGE" -eq 1 ]; then
            remove "$D$CONF"
        elif [ -f "$D$PRISTINE" ] && cmp -s "$D$CONF" "$D$PRISTINE"; then
            remove "$D$CONF"  # never edited: ours to remove
        else
            say "kept $D$CONF: it was edited (remove it yourself, or use --uninstall --purge)"
        fi
    fi
    remove "$D$PRISTINE"
    prune_dirs "$D$SHARE/prometheus" "$D$SHARE/grafana" "$D$SHARE" "$D$(dirname "$DOC")" \
        "$D$CONF_DIR"
    if [ "$LIVE" -eq 1 ] && getent passwd sluice >/dev/null; then
        if [ "$PURGE" -eq 1 ]; then
            userdel sluice
            say "removed the sluice user"
            if getent group sluice >/dev/null; then groupdel sluice 2>/dev/null || true; fi
        else
            say "kept the sluice user (files it owns may remain; --uninstall --purge removes it)"
        fi
    fi
    say "uninstalled"
}

install_all() {
    # 1. The binary: given, or built here.
    if [ -z "$BINARY" ]; then
        local cargo="${CARGO:-cargo}"
        command -v "$cargo" >/dev/null 2>&1 ||
            die "cargo not found (as root it is often not on PATH): build first, then pass --binary target/release/sluice"
        say "building the release binary (cargo build --release --bin sluice)"
        (cd "$REPO" && "$cargo" build --release --bin sluice)
        BINARY="$REPO/target/release/sluice"
    fi
    if [ ! -f "$BINARY" ] || [ ! -x "$BINARY" ]; then die "not an executable file: $BINARY"; fi
    for f in deploy/sluice.example.toml systemd/sluice.service deploy/sysctl/90-sluice.conf; do
        [ -f "$REPO/$f" ] || die "missing $REPO/$f (run this script from a sluice checkout)"
    done

    # 2. The user (only on this host; packages use the sysusers.d file below).
    if [ "$LIVE" -eq 1 ] && ! getent passwd sluice >/dev/null; then
        local shell=/usr/sbin/nologin
        [ -x "$shell" ] || shell=/sbin/nologin
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell "$shell" --comment "sluice WebRTC SFU" sluice
        say "created the system user sluice"
    fi

    put 0755 "$BINARY" "$D$BIN"
    say "installed $D$BIN"

    # 3. Config: an edited sluice.toml is kept; "edited" = it differs from the example this
    #    script installed last time (kept in SHARE) and from the new one.
    local example="$REPO/deploy/sluice.example.toml"
    mkdirs "$D$(dirname "$CONF_DIR")"
    install -d -m 0750 "$D$CONF_DIR"
    if [ ! -e "$D$CONF" ]; then
        put 0640 "$example" "$D$CONF"
        rm -f "$D$CONF.new"
        say "installed $D$CONF"
    elif cmp -s "$D$CONF" "$example" ||
        { [ -f "$D$PRISTINE" ] && cmp -s "$D$CONF" "$D$PRISTINE"; }; then
        put 0640 "$example" "$D$CONF"
        rm -f "$D$CONF.new"
        say "updated $D$CONF (it was not edited)"
    else
        put 0640 "$example" "$D$CONF.new"
        say "kept your edited $D$CONF; the new example is $D$CONF.new (diff them for new keys)"
    fi
    if [ "$LIVE" -eq 1 ]; then
        chown root:sluice "$D$CONF_DIR" "$D$CONF"
        if [ -e "$D$CONF.new" ]; then chown root:sluice "$D$CONF.new"; fi
    fi
    put 0644 "$example" "$D$PRISTINE"

    # 4. Unit, with the binary's real path.
    local tmp
    tmp="$(mktemp)"
    sed -e "s#/usr/local/bin/sluice#$PREFIX/bin/sluice#g" \
        -e "s#/usr/local/share/doc/sluice#$PREFIX/share/doc/sluice#g" \
        "$REPO/systemd/sluice.service" >"$tmp"
    put 0644 "$tmp" "$D$UNIT"
    rm -f "$tmp"
    say "installed $D$UNIT"

    # 5. sysctls, sysusers.d, reference files.
    put 0644 "$REPO/deploy/sysctl/90-sluice.conf" "$D$SYSCTL"
    say "installed $D$SYSCTL"
    tmp="$(mktemp)"
    sysusers_line >"$tmp"
    put 0644 "$tmp" "$D$SYSUSERS"
    rm -f "$tmp"
    local entry
    for entry in "${SHARED_FILES[@]}"; do
        if [ -f "$REPO/${entry%%:*}" ]; then
            put 0644 "$REPO/${entry%%:*}" "$D${entry#*:}"
        else
            warn "missing $REPO/${entry%%:*}: not installed"
        fi
    done
    say "installed $D$SHARE/ (example config, prometheus.yml, alerts, Grafana dashboard) and $D$DOC"

    # 6. Does the config load with this binary? (An upgrade can retire a key you set.)
    local config_ok=1 status=0
    config_loads "$D$BIN" "$D$CONF" || status=$?
    case "$status" in
        0) say "config check passed: $D$CONF" ;;
        1) config_ok=0; warn "$D$CONF does not load with the new binary (errors above); fix it before (re)starting sluice" ;;
        *) warn "cannot run $D$BIN on this machine; config check skipped" ;;
    esac

    [ "$LIVE" -eq 1 ] || { say "staged into $D (DESTDIR set: user, sysctl and systemctl steps skipped)"; return 0; }

    # 7. Apply the sysctls now (they also apply at every boot).
    if command -v sysctl >/dev/null 2>&1; then
        if sysctl --system >/dev/null; then
            say "applied kernel settings (sysctl --system)"
        else
            warn "sysctl --system reported errors (read-only /proc/sys in a container?); see $SYSCTL"
        fi
    fi

    # 8. The service.
    if [ "$HAVE_SYSTEMD" -eq 0 ]; then
        say "systemd is not running here: start it yourself: $BIN serve --config $CONF"
        return 0
    fi
    systemctl daemon-reload
    [ "$ENABLE" -eq 1 ] || { say "not enabling the service (--no-enable)"; return 0; }
    systemctl enable --quiet sluice.service
    say "enabled sluice.service"
    if systemctl is-active --quiet sluice.service; then
        say "sluice is running the previous binary: 'systemctl restart sluice' drains (up to limits.drain_timeout_ms) and starts the new one"
    elif [ "$START" -eq 0 ]; then
        say "not starting it (--no-start): systemctl start sluice"
    elif [ "$config_ok" -eq 0 ]; then
        warn "not starting sluice: the config does not load"
        return 1
    else
        systemctl start sluice.service
        say "started sluice.service (journalctl -u sluice -f)"
    fi
}

if [ "$MODE" = uninstall ]; then
    uninstall
else
    install_all
fi
