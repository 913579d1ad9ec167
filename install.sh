#!/bin/sh
# install.sh: install (or uninstall) multi-eni-routing: the tool, its SysV
# init script and systemd unit, its options file, the udev hotplug rule and
# the network-manager hooks, and register it for boot.  POSIX sh.
#
# Exit codes: 0 ok, 1 failure, 2 usage.

set -u
umask 022

NAME=multi-eni-routing
ME=install.sh
PREFIX=${PREFIX:-/usr}
DESTDIR=${DESTDIR:-}
ACTION=install
NOW=no
FORCE=no
QUIET=no

usage() {
    cat <<EOF
Usage: ./install.sh [--prefix DIR] [--destdir DIR] [--now] [-q]
       ./install.sh --uninstall [--prefix DIR] [--destdir DIR] [--force] [-q]

Installs multi-eni-routing: the tool as PREFIX/bin/multi-eni-routing.py, the
hotplug trigger as PREFIX/libexec/multi-eni-routing-hotplug, the SysV init
script (/etc/init.d), the systemd unit, the options file (/etc/default or, on
the RHEL family, /etc/sysconfig; an options file you changed is never
overwritten: the new default goes next to it as .dist), the udev rule, the
systemd-networkd drop-in and the NetworkManager, ifupdown and
networkd-dispatcher hooks.  Then it registers the service for boot with
systemctl, update-rc.d or chkconfig.  It does not start it unless --now.
Running it again is harmless: unchanged files are left alone.

Options:
  --prefix DIR   where the programs go (default: \$PREFIX or /usr)
  --destdir DIR  stage every file under DIR (same as DESTDIR=DIR): nothing is
                 registered or started, and host programs are not checked
  --now          also apply the routing now (start, or re-apply if running)
  --uninstall    remove the routing (flush), unregister, and remove the files
                 installed with the same --prefix; a changed options file is
                 kept
  --force        with --uninstall: remove the files even if the flush fails
  -q, --quiet    print only warnings and errors
  -h, --help     show this help
EOF
}

say() { [ "$QUIET" = yes ] || printf '%s: %s\n' "$ME" "$*"; }
warn() { printf '%s: warning: %s\n' "$ME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$ME" "$*" >&2; exit 1; }
usage_error() { printf '%s: %s (see --help)\n' "$ME" "$*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || usage_error "--prefix needs a directory"
                  PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#--prefix=} ;;
        --destdir) [ $# -ge 2 ] || usage_error "--destdir needs a directory"
                   DESTDIR=$2; shift ;;
        --destdir=*) DESTDIR=${1#--destdir=} ;;
        --now) NOW=yes ;;
        --uninstall) ACTION=uninstall ;;
        --force) FORCE=yes ;;
        -q|--quiet) QUIET=yes ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
    shift
done

# The paths end up in sed expressions, udev RUN keys and unit files: keep
# them to plain characters.
case $PREFIX in
    /*) ;;
    *) usage_error "--prefix must be an absolute path: $PREFIX" ;;
esac
case $PREFIX$DESTDIR in
    *[!A-Za-z0-9._/+-]*) usage_error "unsupported character in prefix or destdir: $PREFIX $DESTDIR" ;;
esac
while [ "${PREFIX%/}" != "$PREFIX" ] && [ "$PREFIX" != / ]; do PREFIX=${PREFIX%/}; done
[ "$PREFIX" = / ] && PREFIX=
if [ -n "$DESTDIR" ]; then
    mkdir -p "$DESTDIR" || die "cannot create $DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd -P) || die "cannot use $DESTDIR"
    [ "$DESTDIR" = / ] && DESTDIR=
fi

SRC=$(cd "$(dirname "$0")" && pwd -P) || die "cannot find the source directory"
BINDIR=$PREFIX/bin
LIBEXECDIR=$PREFIX/libexec
TOOL=$BINDIR/$NAME.py
HOTPLUG=$LIBEXECDIR/$NAME-hotplug

# unit and udev directories: /usr/lib everywhere today (merged /usr); an old
# split-/usr system without them gets /lib.
UNITDIR=/usr/lib/systemd/system
UDEVRULESDIR=/usr/lib/udev/rules.d
if [ -z "$DESTDIR" ]; then
    [ ! -d /usr/lib/systemd/system ] && [ -d /lib/systemd/system ] && UNITDIR=/lib/systemd/system
    [ ! -d /usr/lib/udev ] && [ -d /lib/udev ] && UDEVRULESDIR=/lib/udev/rules.d
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/$NAME-install.XXXXXX") || die "cannot create a temporary directory"
trap 'rm -rf "$TMP"' EXIT
trap 'exit 1' HUP INT TERM

# manifest: "source destination mode substitute" for every installed file
# except the options file.
manifest() {
    cat <<EOF
multi_eni_routing.py $TOOL 0755 no
libexec/$NAME-hotplug $HOTPLUG 0755 yes
init.d/$NAME /etc/init.d/$NAME 0755 yes
systemd/$NAME.service $UNITDIR/$NAME.service 0644 yes
systemd/$NAME-refresh.service $UNITDIR/$NAME-refresh.service 0644 yes
systemd/$NAME-refresh.timer $UNITDIR/$NAME-refresh.timer 0644 no
systemd/networkd.conf.d/$NAME.conf /usr/lib/systemd/networkd.conf.d/$NAME.conf 0644 no
udev/90-$NAME.rules $UDEVRULESDIR/90-$NAME.rules 0644 yes
hooks/networkmanager-dispatcher /etc/NetworkManager/dispatcher.d/90-$NAME 0755 yes
hooks/ifupdown /etc/network/if-up.d/$NAME 0755 yes
hooks/ifupdown /etc/network/if-post-down.d/$NAME 0755 yes
hooks/networkd-dispatcher /etc/networkd-dispatcher/routable.d/50-$NAME 0755 yes
EOF
}

# substitute SRC OUT: the shipped files name the default paths; point them at
# the chosen prefix.
substitute() {
    sed -e "s|/usr/bin/$NAME\\.py|$TOOL|g" \
        -e "s|/usr/libexec/$NAME-hotplug|$HOTPLUG|g" "$1" >"$2"
}

mode_of() { stat -c %a "$1" 2>/dev/null; }

# install_file FILE DEST MODE: install FILE as $DESTDIR$DEST unless it is
# already there with the same content and mode.
install_file() {
    target=$DESTDIR$2
    if [ -f "$target" ] && cmp -s "$1" "$target" && [ "$(mode_of "$target")" = "${3#0}" ]; then
        say "unchanged $2"
        return 0
    fi
    mkdir -p "$(dirname "$target")" || die "cannot create the directory of $target"
    if [ "$(id -u)" = 0 ]; then
        install -o 0 -g 0 -m "$3" "$1" "$target" || die "cannot install $target"
    else
        install -m "$3" "$1" "$target" || die "cannot install $target"
    fi
    say "installed $2"
}

# remove_file DEST: remove $DESTDIR$DEST; under DESTDIR also the directories
# that this leaves empty (on a real system directories stay: others own them).
remove_file() {
    target=$DESTDIR$1
    [ -e "$target" ] || [ -L "$target" ] || return 0
    rm -f "$target" || die "cannot remove $target"
    say "removed $1"
    if [ -n "$DESTDIR" ]; then
        d=$(dirname "$target")
        while [ "$d" != "$DESTDIR" ] && [ "$d" != / ] && rmdir "$d" 2>/dev/null; do
            d=$(dirname "$d")
        done
    fi
}

# options_path: where the options file is or goes: an existing one stays
# where it is; else /etc/sysconfig on the RHEL family, /etc/default elsewhere.
options_path() {
    if [ -e "$DESTDIR/etc/default/$NAME" ]; then
        echo "/etc/default/$NAME"
    elif [ -e "$DESTDIR/etc/sysconfig/$NAME" ] || [ -d "$DESTDIR/etc/sysconfig" ]; then
        echo "/etc/sysconfig/$NAME"
    else
        echo "/etc/default/$NAME"
    fi
}

install_options() {
    shipped=$SRC/etc/$NAME.options
    opts=$(options_path)
    if [ -e "$DESTDIR$opts" ] && ! cmp -s "$shipped" "$DESTDIR$opts"; then
        say "kept $opts (changed by you); the shipped default is $opts.dist"
        install_file "$shipped" "$opts.dist" 0644
    else
        install_file "$shipped" "$opts" 0644
        remove_file "$opts.dist"
    fi
}

uninstall_options() {
    shipped=$SRC/etc/$NAME.options
    for opts in /etc/default/$NAME /etc/sysconfig/$NAME; do
        remove_file "$opts.dist"
        [ -e "$DESTDIR$opts" ] || continue
        if cmp -s "$shipped" "$DESTDIR$opts"; then
            remove_file "$opts"
        else
            say "kept $opts: it has your changes (delete it by hand if unwanted)"
        fi
    done
}

# package_hint PROGRAM: the package that provides PROGRAM here.
package_hint() {
    if command -v apt-get >/dev/null 2>&1; then
        case $1 in
            ip) echo iproute2 ;;
            python3) echo python3 ;;
            flock) echo util-linux ;;
            *) echo iptables ;;
        esac
    else
        case $1 in
            ip) echo iproute ;;
            python3) echo python3 ;;
            flock) echo util-linux ;;
            *) if command -v dnf >/dev/null 2>&1; then echo iptables-nft; else echo iptables; fi ;;
        esac
    fi
}

installer_name() {
    for p in apt-get dnf yum zypper; do
        command -v "$p" >/dev/null 2>&1 && { echo "$p"; return; }
    done
    echo "your package manager"
}

# check_programs: the programs the tool runs must exist on this host.
check_programs() {
    missing='' pkgs=''
    for p in ip iptables-save iptables-restore ip6tables-save ip6tables-restore python3; do
        if ! command -v "$p" >/dev/null 2>&1; then
            missing="$missing $p"
            pkg=$(package_hint "$p")
            case " $pkgs " in *" $pkg "*) ;; *) pkgs="$pkgs $pkg" ;; esac
        fi
    done
    if [ -n "$missing" ]; then
        die "missing programs:$missing; install them first: $(installer_name) install$pkgs"
    fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 8))' 2>/dev/null ||
        die "python3 is older than 3.8; the tool needs Python >= 3.8"
    command -v flock >/dev/null 2>&1 ||
        warn "flock is missing (package $(package_hint flock)): hotplug events are not debounced"
}

systemd_running() {
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

register() {
    if systemd_running; then
        systemctl daemon-reload || warn "systemctl daemon-reload failed"
        if systemctl enable "$NAME.service" "$NAME-refresh.timer" >/dev/null 2>&1; then
            say "enabled $NAME.service and $NAME-refresh.timer (systemd)"
        else
            warn "systemctl enable $NAME.service $NAME-refresh.timer failed: enable them by hand"
        fi
    elif command -v update-rc.d >/dev/null 2>&1; then
        if update-rc.d "$NAME" defaults >/dev/null; then
            say "registered /etc/init.d/$NAME (update-rc.d)"
        else
            warn "update-rc.d $NAME defaults failed: register it by hand"
        fi
    elif command -v chkconfig >/dev/null 2>&1; then
        if chkconfig --add "$NAME" && chkconfig "$NAME" on; then
            say "registered /etc/init.d/$NAME (chkconfig)"
        else
            warn "chkconfig --add $NAME failed: register it by hand"
        fi
    else
        warn "found none of systemctl, update-rc.d, chkconfig: start /etc/init.d/$NAME at boot (runlevels 2-5) by hand"
    fi
    if command -v udevadm >/dev/null 2>&1; then
        udevadm control --reload >/dev/null 2>&1 || true
    fi
    if systemd_running && systemctl is-active --quiet systemd-networkd.service 2>/dev/null; then
        say "note: systemd-networkd reads the new drop-in when it restarts (or at the next boot)"
    fi
}

start_now() {
    if systemd_running; then
        systemctl reload-or-restart "$NAME.service" || die "starting $NAME.service failed (see: journalctl -u $NAME.service)"
        systemctl start "$NAME-refresh.timer" || warn "starting $NAME-refresh.timer failed"
    else
        "/etc/init.d/$NAME" start || die "/etc/init.d/$NAME start failed"
    fi
    say "routing applied"
}

do_install() {
    [ -f "$SRC/multi_eni_routing.py" ] || die "$SRC/multi_eni_routing.py is missing: run install.sh from the source tree"
    if [ -z "$DESTDIR" ]; then
        [ "$(id -u)" = 0 ] || die "must run as root (or set DESTDIR to stage the files)"
        check_programs
    fi
    manifest >"$TMP/manifest"
    n=0
    while read -r src dest mode subst <&3; do
        [ -f "$SRC/$src" ] || die "$SRC/$src is missing"
        file=$SRC/$src
        if [ "$subst" = yes ]; then
            n=$((n + 1))
            file=$TMP/file.$n
            substitute "$SRC/$src" "$file" || die "cannot prepare $src"
        fi
        install_file "$file" "$dest" "$mode"
    done 3<"$TMP/manifest"
    install_options
    if [ -n "$DESTDIR" ]; then
        say "staged under $DESTDIR: nothing registered or started"
        [ "$NOW" = no ] || warn "--now is ignored with DESTDIR"
        return 0
    fi
    register
    if [ "$NOW" = yes ]; then
        start_now
    else
        say "installed; apply it now with: $(if systemd_running; then echo "systemctl start $NAME"; else echo "/etc/init.d/$NAME start"; fi)"
    fi
}

# flush: remove the routing before the tool goes away.
flush() {
    if systemd_running; then
        systemctl stop "$NAME-refresh.timer" "$NAME.service" 2>/dev/null || true
    fi
    if [ -x "/etc/init.d/$NAME" ]; then
        "/etc/init.d/$NAME" stop >/dev/null
    elif [ -x "$TOOL" ]; then
        "$TOOL" --flush
    else
        say "tool not installed: nothing to flush"
        return 0
    fi
    rc=$?
    [ "$rc" -eq 0 ] && { say "routing removed"; return 0; }
    if [ "$FORCE" = yes ]; then
        warn "flushing the routing failed (exit code $rc); going on (--force)"
    else
        die "flushing the routing failed (exit code $rc): nothing removed; fix it or use --force"
    fi
}

do_uninstall() {
    if [ -z "$DESTDIR" ]; then
        [ "$(id -u)" = 0 ] || die "must run as root (or set DESTDIR)"
        flush
        if systemd_running && [ -e "$UNITDIR/$NAME.service" ]; then
            systemctl disable "$NAME.service" "$NAME-refresh.timer" >/dev/null 2>&1 ||
                warn "systemctl disable $NAME.service $NAME-refresh.timer failed"
        fi
        if command -v chkconfig >/dev/null 2>&1 && [ -e "/etc/init.d/$NAME" ]; then
            chkconfig --del "$NAME" >/dev/null 2>&1 || true
        fi
    fi
    manifest >"$TMP/manifest"
    while read -r _src dest _mode _subst <&3; do
        remove_file "$dest"
    done 3<"$TMP/manifest"
    uninstall_options
    if [ -z "$DESTDIR" ]; then
        if command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d "$NAME" remove >/dev/null 2>&1 || true
        fi
        if systemd_running; then
            systemctl daemon-reload || true
        fi
        if command -v udevadm >/dev/null 2>&1; then
            udevadm control --reload >/dev/null 2>&1 || true
        fi
    fi
    say "uninstalled"
}

if [ "$ACTION" = uninstall ]; then
    [ "$NOW" = no ] || usage_error "--now makes no sense with --uninstall"
    do_uninstall
else
    [ "$FORCE" = no ] || usage_error "--force goes with --uninstall"
    do_install
fi
