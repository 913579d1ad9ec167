#!/bin/sh
# install.sh: install (or uninstall) multi-eni-routing: the tool, its man
# page, its systemd unit and SysV init script (both run the watcher), its
# options file and the systemd-networkd drop-in, and register it for boot.
# POSIX sh.
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
DEPS=no
CHANGED=no  # set when a file is installed or removed: --now then restarts

usage() {
    cat <<EOF
Usage: sh install.sh [--prefix DIR] [--destdir DIR] [--deps] [--now] [-q]
       sh install.sh --uninstall [--prefix DIR] [--destdir DIR] [--force] [-q]

Installs multi-eni-routing: the tool as a module in PREFIX/lib/$NAME,
compiled to bytecode, and PREFIX/bin/multi-eni-routing.py that runs it, its
man page as PREFIX/share/man/man8/multi-eni-routing.8.gz, the systemd unit and
the SysV init script (/etc/init.d), which both run the watcher, the options
file (/etc/default or, on the RHEL family, /etc/sysconfig; an options file
you changed is never overwritten: the new default goes next to it as .dist)
and the systemd-networkd drop-in.  Then it registers the service for boot
with systemctl, update-rc.d or chkconfig.  It does not start it unless --now.
Running it again is harmless: unchanged files are left alone.

Options:
  --prefix DIR   where the programs go (default: \$PREFIX or /usr)
  --destdir DIR  stage every file under DIR (same as DESTDIR=DIR): nothing is
                 registered or started, and host programs are not checked
  --deps         first install the packages of the programs the tool runs
                 (iproute2, iptables) with the package manager
  --now          also start it now (restart it if it runs)
  --uninstall    stop it (which removes the routing), unregister, and remove
                 the files and directories the install created (same
                 --prefix) and the tool's files under /run; an options file
                 you changed is kept
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
        --deps) DEPS=yes ;;
        --uninstall) ACTION=uninstall ;;
        --force) FORCE=yes ;;
        -q|--quiet) QUIET=yes ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
    shift
done

# The paths end up in sed expressions and unit files: keep them to plain
# characters.
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
TOOL=$PREFIX/bin/$NAME.py
# The tool's module, beside its bytecode: the launcher $TOOL imports it from
# there, so Python starts from the cached bytecode (a script's is never cached).
LIBDIR=$PREFIX/lib/$NAME
MODULE=$LIBDIR/multi_eni_routing.py
MANDIR=$PREFIX/share/man/man8
# The directories this install created, removed again by --uninstall.
CREATED=/var/lib/$NAME/created-directories
# What the tool and the init script keep under /run (the tool's default
# state directory, the SysV watcher's pid file, an earlier version's hotplug
# trigger directory).
RUN_FILES="/run/$NAME /run/$NAME.pid /run/$NAME-hotplug"

# unit directory: /usr/lib everywhere today (merged /usr); an old split-/usr
# system without it gets /lib.
UNITDIR=/usr/lib/systemd/system
if [ -z "$DESTDIR" ] && [ ! -d /usr/lib/systemd/system ] && [ -d /lib/systemd/system ]; then
    UNITDIR=/lib/systemd/system
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/$NAME-install.XXXXXX") || die "cannot create a temporary directory"
trap 'rm -rf "$TMP"' EXIT
trap 'exit 1' HUP INT TERM

# manifest: "source destination mode how" for every installed file except
# the options file; how: as-is, paths (substitute the paths), module (its
# #! line becomes a comment: it is imported, not run) or man (paths, then
# gzip -n, as the distributions' packages compress manual pages).
manifest() {
    cat <<EOF
multi_eni_routing.py $MODULE 0644 module
bin/$NAME.py $TOOL 0755 paths
docs/$NAME.8 $MANDIR/$NAME.8.gz 0644 man
init.d/$NAME /etc/init.d/$NAME 0755 paths
systemd/$NAME.service $UNITDIR/$NAME.service 0644 paths
systemd/networkd.conf.d/$NAME.conf /usr/lib/systemd/networkd.conf.d/$NAME.conf 0644 as-is
EOF
}

# obsolete: files of earlier versions whose work the watcher does now (the
# udev rule, the network-manager hooks, the hotplug trigger, the refresh
# timer); install and uninstall remove them.
obsolete() {
    cat <<EOF
$PREFIX/libexec/$NAME-hotplug
$MANDIR/$NAME.8
$UNITDIR/$NAME-refresh.service
$UNITDIR/$NAME-refresh.timer
/usr/lib/udev/rules.d/90-$NAME.rules
/lib/udev/rules.d/90-$NAME.rules
/etc/NetworkManager/dispatcher.d/90-$NAME
/etc/network/if-up.d/$NAME
/etc/network/if-post-down.d/$NAME
/etc/networkd-dispatcher/routable.d/50-$NAME
EOF
}

# substitute SRC OUT: the shipped files name the default paths; point them at
# the chosen prefix and options file.
substitute() {
    sed -e "s|/usr/bin/$NAME\\.py|$TOOL|g" \
        -e "s|/usr/lib/$NAME\\([/\"]\\)|$LIBDIR\\1|g" \
        -e "s|/usr/share/man/man8/|$MANDIR/|g" \
        -e "s|/etc/default/$NAME|$OPTIONS|g" "$1" >"$2"
}

# prepare HOW SRC OUT: the file to install for manifest's HOW.
prepare() {
    case $1 in
        paths) substitute "$2" "$3" ;;
        module) sed "1s|^#!.*|# $NAME: imported by $TOOL, not run by itself|" "$2" >"$3" ;;
        man) substitute "$2" "$3.page" && gzip -9 -n -c "$3.page" >"$3" ;;
    esac
}

mode_of() { stat -c %a "$1" 2>/dev/null; }

# make_directory DIR: create $DESTDIR$DIR and its missing parents; on a real
# system note the ones created in $CREATED, for --uninstall.
make_directory() {
    [ -d "$DESTDIR$1" ] && return 0
    make_directory "$(dirname "$1")" || return 1
    [ -d "$DESTDIR$1" ] || mkdir "$DESTDIR$1" || return 1
    [ -z "$DESTDIR" ] || return 0
    if [ "$1" != "$(dirname "$CREATED")" ]; then
        make_directory "$(dirname "$CREATED")" || return 1
    fi
    grep -qxF "$1" "$CREATED" 2>/dev/null || echo "$1" >>"$CREATED"
}

# remove_created_directories: the directories the install created, deepest
# first, where they are empty (something else may have put files there).
remove_created_directories() {
    [ -f "$CREATED" ] || return 0
    sort -r "$CREATED" >"$TMP/created"
    rm -f "$CREATED"
    while read -r d; do
        case $d in /?*) rmdir "$d" 2>/dev/null && say "removed $d/" ;; esac
    done <"$TMP/created"
}

# install_file FILE DEST MODE: install FILE as $DESTDIR$DEST unless it is
# already there with the same content and mode.
install_file() {
    target=$DESTDIR$2
    if [ -f "$target" ] && cmp -s "$1" "$target" && [ "$(mode_of "$target")" = "${3#0}" ]; then
        say "unchanged $2"
        return 0
    fi
    make_directory "$(dirname "$2")" || die "cannot create the directory of $target"
    if [ "$(id -u)" = 0 ]; then
        install -o 0 -g 0 -m "$3" "$1" "$target" || die "cannot install $target"
    else
        install -m "$3" "$1" "$target" || die "cannot install $target"
    fi
    CHANGED=yes
    say "installed $2"
}

# remove_file DEST: remove $DESTDIR$DEST; under DESTDIR also the directories
# that this leaves empty (on a real system $CREATED says which to remove).
remove_file() {
    target=$DESTDIR$1
    [ -e "$target" ] || [ -L "$target" ] || return 0
    rm -f "$target" || die "cannot remove $target"
    CHANGED=yes
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
OPTIONS=$(options_path)

install_options() {
    shipped=$SRC/etc/$NAME.options
    if [ -e "$DESTDIR$OPTIONS" ] && ! cmp -s "$shipped" "$DESTDIR$OPTIONS"; then
        say "kept $OPTIONS (changed by you); the shipped default is $OPTIONS.dist"
        install_file "$shipped" "$OPTIONS.dist" 0644
    else
        install_file "$shipped" "$OPTIONS" 0644
        remove_file "$OPTIONS.dist"
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

# install_deps: install the packages of the programs the tool runs.
install_deps() {
    if command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q iproute2 iptables >/dev/null 2>&1 ||
            { apt-get update -q && apt-get install -y -q iproute2 iptables; }
    elif command -v dnf >/dev/null 2>&1; then
        dnf install -y iproute iptables-nft
    elif command -v yum >/dev/null 2>&1; then
        yum install -y iproute iptables
    elif command -v zypper >/dev/null 2>&1; then
        zypper --non-interactive install iproute2 iptables
    else
        die "--deps: found none of apt-get, dnf, yum, zypper: install iproute2 and iptables by hand"
    fi || die "--deps: installing iproute2 and iptables failed"
    say "installed the packages iproute2 and iptables"
}

# package_hint PROGRAM: the package that provides PROGRAM here.
package_hint() {
    if command -v apt-get >/dev/null 2>&1; then
        case $1 in
            ip) echo iproute2 ;;
            python3) echo python3 ;;
            *) echo iptables ;;
        esac
    else
        case $1 in
            ip) echo iproute ;;
            python3) echo python3 ;;
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
        die "missing programs:$missing; install them first: $(installer_name) install$pkgs (or run: sh install.sh --deps)"
    fi
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 8))' 2>/dev/null ||
        die "python3 is older than 3.8; the tool needs Python >= 3.8"
}

# compile_module: the module's bytecode in $LIBDIR/__pycache__, as Debian's
# py3compile and Fedora's byte-compilation make it (compileall leaves bytecode
# that is up to date alone).
compile_module() {
    python3 -m compileall -q "$MODULE" >/dev/null ||
        warn "compiling $MODULE failed: the tool works, but starts slower"
}

# remove_bytecode: what compile_module (or Python itself) left of the module.
remove_bytecode() {
    for pyc in "$DESTDIR$LIBDIR"/__pycache__/multi_eni_routing.*.pyc; do
        [ -e "$pyc" ] || continue
        rm -f "$pyc" && say "removed ${pyc#"$DESTDIR"}"
    done
    rmdir "$DESTDIR$LIBDIR/__pycache__" 2>/dev/null || true
}

systemd_running() {
    [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1
}

# remove_obsolete: an earlier version's hotplug trigger, hooks, udev rule and
# refresh timer (the timer is stopped and disabled first).
remove_obsolete() {
    if [ -z "$DESTDIR" ] && systemd_running && [ -e "$UNITDIR/$NAME-refresh.timer" ]; then
        systemctl disable --now "$NAME-refresh.timer" >/dev/null 2>&1 || true
    fi
    obsolete >"$TMP/obsolete"
    while read -r path; do
        remove_file "$path"
    done <"$TMP/obsolete"
}

register() {
    if systemd_running; then
        systemctl daemon-reload || warn "systemctl daemon-reload failed"
        if systemctl enable "$NAME.service" >/dev/null 2>&1; then
            say "enabled $NAME.service (systemd)"
        else
            warn "systemctl enable $NAME.service failed: enable it by hand"
        fi
        if systemctl is-active --quiet systemd-networkd.service 2>/dev/null; then
            say "note: systemd-networkd reads its new drop-in when it restarts (or at the next boot); until then the watcher repairs what networkd removes"
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
}

start_now() {
    if [ "$CHANGED" = no ] && running_already; then
        say "running, and nothing changed: not restarted"
        return 0
    fi
    if systemd_running; then
        # restart: the watcher reads the options (and runs the new tool) when
        # it starts
        systemctl restart "$NAME.service" ||
            die "starting $NAME.service failed (see: systemctl status $NAME)"
        systemctl status --no-pager --lines=0 "$NAME.service" 2>/dev/null | sed -n 's/^ *Status: //p' |
            while read -r status; do say "$status"; done
    else
        "/etc/init.d/$NAME" restart || die "/etc/init.d/$NAME start failed"
    fi
    say "started"
}

running_already() {
    if systemd_running; then
        systemctl is-active --quiet "$NAME.service"
    else
        "/etc/init.d/$NAME" status >/dev/null 2>&1
    fi
}

do_install() {
    [ -f "$SRC/multi_eni_routing.py" ] || die "$SRC/multi_eni_routing.py is missing: run install.sh from the source tree"
    if [ -z "$DESTDIR" ]; then
        [ "$(id -u)" = 0 ] || die "must run as root (or set DESTDIR to stage the files)"
        [ "$DEPS" = no ] || install_deps
        check_programs
    elif [ "$DEPS" = yes ]; then
        warn "--deps is ignored with DESTDIR"
    fi
    remove_obsolete
    manifest >"$TMP/manifest"
    n=0
    while read -r src dest mode how <&3; do
        [ -f "$SRC/$src" ] || die "$SRC/$src is missing"
        file=$SRC/$src
        if [ "$how" != as-is ]; then
            n=$((n + 1))
            file=$TMP/file.$n
            prepare "$how" "$SRC/$src" "$file" || die "cannot prepare $src"
        fi
        install_file "$file" "$dest" "$mode"
    done 3<"$TMP/manifest"
    install_options
    if [ -n "$DESTDIR" ]; then
        # staged files are packaged: the package compiles at install time
        say "staged under $DESTDIR: nothing registered or started"
        [ "$NOW" = no ] || warn "--now is ignored with DESTDIR"
        return 0
    fi
    compile_module
    register
    if [ "$NOW" = yes ]; then
        start_now
    else
        say "installed; start it with: $(if systemd_running; then echo "systemctl start $NAME"; else echo "/etc/init.d/$NAME start"; fi)"
    fi
}

# stop_and_flush: stop the watcher, then remove the routing before the tool
# goes away (a flush ignores a bad options file; its exit code is the verdict).
stop_and_flush() {
    if systemd_running; then
        systemctl stop "$NAME.service" "$NAME-refresh.timer" 2>/dev/null || true
    elif [ -x "/etc/init.d/$NAME" ]; then
        "/etc/init.d/$NAME" stop >/dev/null 2>&1 || true
    fi
    if [ ! -x "$TOOL" ]; then
        say "tool not installed: nothing to flush"
        return 0
    fi
    if [ -e "$OPTIONS" ]; then
        "$TOOL" --flush -q --options-file "$OPTIONS"
    else
        "$TOOL" --flush -q
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
        stop_and_flush
        if systemd_running && [ -e "$UNITDIR/$NAME.service" ]; then
            systemctl disable "$NAME.service" >/dev/null 2>&1 ||
                warn "systemctl disable $NAME.service failed"
        fi
        if command -v chkconfig >/dev/null 2>&1 && [ -e "/etc/init.d/$NAME" ]; then
            chkconfig --del "$NAME" >/dev/null 2>&1 || true
        fi
    fi
    remove_obsolete
    remove_bytecode
    manifest >"$TMP/manifest"
    while read -r _src dest _mode _how <&3; do
        remove_file "$dest"
    done 3<"$TMP/manifest"
    uninstall_options
    if [ -z "$DESTDIR" ]; then
        if command -v update-rc.d >/dev/null 2>&1; then
            update-rc.d "$NAME" remove >/dev/null 2>&1 || true
        fi
        if systemd_running; then
            systemctl daemon-reload || true
            systemctl reset-failed "$NAME.service" >/dev/null 2>&1 || true
        fi
        for path in $RUN_FILES; do
            [ -e "$path" ] || continue
            rm -rf "$path" && say "removed $path"
        done
        remove_created_directories
    fi
    say "uninstalled"
}

if [ "$ACTION" = uninstall ]; then
    [ "$NOW" = no ] || usage_error "--now makes no sense with --uninstall"
    [ "$DEPS" = no ] || usage_error "--deps makes no sense with --uninstall"
    do_uninstall
else
    [ "$FORCE" = no ] || usage_error "--force goes with --uninstall"
    do_install
fi
