#!/bin/sh
# Prepare the peer servers for bench/compare.py: Postfix 3.7 and OpenSMTPD 6.8 from Debian,
# unpacked (never installed) under bench/.peers, the users they need, and the listen-backlog
# shim.  Idempotent; run as root:
#
#     sh bench/setup_peers.sh
#
# Nothing here installs or starts a mail service: the packages are fetched with
# `apt-get download` and unpacked with `dpkg -x`, so no maintainer script runs, /etc/mail,
# /etc/aliases and /usr/sbin/sendmail are untouched and no MTA alternative changes.  Only the
# shared libraries the binaries link against are installed with apt (plain libraries, no
# services), plus gcc for the shim.
#
# What OpenSMTPD needs outside bench/.peers, because Debian compiled these paths in:
#   /var/spool/smtpd            its queue (created by smtpd itself; compare.py empties it)
#   /var/lib/opensmtpd/empty    the chroot of its unprivileged processes (an empty directory)
#   /var/run/smtpd.sock         its control socket (created and removed by smtpd)
#   /usr/libexec/opensmtpd      its delivery helpers (the `maildir` action runs
#                               /usr/libexec/opensmtpd/mail.maildir): a root-owned copy of the
#                               unpacked ones, marked .homemail-bench, so that the helpers run
#                               as hmbench wherever the checkout is (a 0700 /root included) and
#                               whichever checkout set it up
# These are made only while no system OpenSMTPD is installed, and are shared by every checkout
# on the machine (run one benchmark with OpenSMTPD at a time: compare.py takes a lock);
# `sh bench/setup_peers.sh --remove` takes them away again, with the users and bench/.peers.
set -eu

BENCH=$(cd "$(dirname "$0")" && pwd)
PEERS=$BENCH/.peers

if [ "$(id -u)" != 0 ]; then
    echo "setup_peers.sh: run as root" >&2
    exit 1
fi

if [ "${1:-}" = "--remove" ]; then
    if [ -L /usr/libexec/opensmtpd ]; then rm -f /usr/libexec/opensmtpd; fi
    if ! dpkg-query -W -f '${Status}' opensmtpd 2>/dev/null | grep -q 'install ok installed'; then
        # ours only while no package owns the path (one installed since may have filled it)
        if [ -f /usr/libexec/opensmtpd/.homemail-bench ]; then rm -rf /usr/libexec/opensmtpd; fi
        rm -rf /var/spool/smtpd /var/lib/opensmtpd
        rm -f /var/run/smtpd.sock
        for u in opensmtpd opensmtpq; do
            getent passwd "$u" >/dev/null && userdel "$u"
            getent group "$u" >/dev/null && groupdel "$u"
        done
    fi
    if ! dpkg-query -W -f '${Status}' postfix 2>/dev/null | grep -q 'install ok installed'; then
        getent passwd postfix >/dev/null && userdel postfix
        for g in postfix postdrop; do getent group "$g" >/dev/null && groupdel "$g"; done
    fi
    getent passwd hmbench >/dev/null && userdel hmbench
    getent group hmbench >/dev/null && groupdel hmbench
    rm -rf /var/lib/hmbench "$PEERS"
    echo "peers removed"
    exit 0
fi

if dpkg-query -W -f '${Status}' opensmtpd 2>/dev/null | grep -q 'install ok installed'; then
    echo "setup_peers.sh: a system OpenSMTPD is installed; its queue and helper paths are the" >&2
    echo "ones the unpacked copy would use, so the benchmark will not run beside it" >&2
    exit 1
fi

need_pkgs=""
for p in gcc libc6-dev libevent-2.1-7 libdb5.3 libssl3 libpam0g libcrypt1 zlib1g \
         libicu72 libnsl2 libsasl2-2 iproute2; do
    if ! dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        need_pkgs="$need_pkgs $p"
    fi
done
if [ -n "$need_pkgs" ] || [ ! -d /var/lib/apt/lists ] || \
   [ -z "$(ls /var/lib/apt/lists 2>/dev/null | grep -i packages | head -1)" ]; then
    apt-get update -qq
fi
if [ -n "$need_pkgs" ]; then
    echo "installing libraries and tools:$need_pkgs"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need_pkgs
fi

mkdir -p "$PEERS/debs"
# _apt downloads into a directory it can write; fetch into a scratch dir, then move.
scratch=$(mktemp -d)
chmod 0777 "$scratch"
for pkg in postfix opensmtpd; do
    version=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        echo "setup_peers.sh: apt knows no candidate for $pkg" >&2
        exit 1
    fi
    stamp="$PEERS/$pkg/.version"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version" ]; then
        echo "$pkg $version: already unpacked"
        continue
    fi
    (cd "$scratch" && apt-get download -q "$pkg=$version" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    deb=$(ls "$scratch"/"${pkg}"_*.deb | head -1)
    mv "$deb" "$PEERS/debs/"
    deb="$PEERS/debs/$(basename "$deb")"
    rm -rf "$PEERS/$pkg"
    mkdir -p "$PEERS/$pkg"
    dpkg -x "$deb" "$PEERS/$pkg"
    echo "$version" > "$stamp"
    echo "$pkg $version: unpacked into $PEERS/$pkg"
done
rm -rf "$scratch"

# Users and groups, as the Debian maintainer scripts would create them.
getent group postdrop >/dev/null || groupadd --system postdrop
getent group postfix >/dev/null || groupadd --system postfix
getent passwd postfix >/dev/null || useradd --system --gid postfix --no-create-home \
    --home-dir /var/spool/postfix --shell /usr/sbin/nologin --comment "Postfix (bench)" postfix
# Debian's OpenSMTPD runs as opensmtpd and opensmtpq (upstream's _smtpd and _smtpq).
for name in opensmtpd opensmtpq; do
    getent group "$name" >/dev/null || groupadd --system "$name"
done
getent passwd opensmtpd >/dev/null || useradd --system --gid opensmtpd --no-create-home \
    --home-dir /var/lib/opensmtpd/empty --shell /usr/sbin/nologin --comment "OpenSMTPD (bench)" opensmtpd
getent passwd opensmtpq >/dev/null || useradd --system --gid opensmtpq --no-create-home \
    --home-dir /var/lib/opensmtpd/empty --shell /usr/sbin/nologin --comment "OpenSMTPD queue (bench)" opensmtpq
# The mailbox owner for the peers' deliveries (they deliver as the recipient, never as root).
# OpenSMTPD looks for ~/.forward, and logs a warning per message if the home does not exist.
getent group hmbench >/dev/null || groupadd --system hmbench
getent passwd hmbench >/dev/null || useradd --system --gid hmbench --no-create-home \
    --home-dir /var/lib/hmbench --shell /usr/sbin/nologin --comment "mail benchmark recipient" hmbench
mkdir -p /var/lib/hmbench
chown hmbench:hmbench /var/lib/hmbench

# OpenSMTPD's compiled-in chroot (it refuses to start without it) and helper directory.
mkdir -p /var/lib/opensmtpd/empty
chmod 0755 /var/lib/opensmtpd /var/lib/opensmtpd/empty
# A copy, not a link into the checkout: the helpers run as hmbench, which may not be able to
# reach a checkout under a private directory, and the checkout may go away.
if [ -L /usr/libexec/opensmtpd ] || [ ! -e /usr/libexec/opensmtpd ] || \
   [ -f /usr/libexec/opensmtpd/.homemail-bench ]; then
    # copied whole and marked beside it, then put in place: never a half copy without its mark
    rm -rf /usr/libexec/.opensmtpd.bench-new
    cp -a "$PEERS/opensmtpd/usr/libexec/opensmtpd" /usr/libexec/.opensmtpd.bench-new  # as dpkg -x
    touch /usr/libexec/.opensmtpd.bench-new/.homemail-bench
    rm -rf /usr/libexec/opensmtpd
    mv /usr/libexec/.opensmtpd.bench-new /usr/libexec/opensmtpd
else
    echo "setup_peers.sh: /usr/libexec/opensmtpd exists and is not ours; leaving it" >&2
fi

# The backlog shim.
gcc -shared -fPIC -O2 -Wall -o "$PEERS/listen_backlog.so" "$BENCH/listen_backlog.c" -ldl
echo "built $PEERS/listen_backlog.so"

# The benchmark's temp dirs must be traversable by the peers' unprivileged processes.
chmod 0755 "$PEERS" "$BENCH"

# Checks: the binaries run, and no mail service was started.
LD_LIBRARY_PATH=$PEERS/postfix/usr/lib/postfix "$PEERS/postfix/usr/sbin/postconf" -d mail_version 2>/dev/null
"$PEERS/opensmtpd/usr/sbin/smtpd" -h 2>&1 | head -1 || true
if command -v ss >/dev/null && ss -ltnH 'sport = :25' | grep -q .; then
    echo "setup_peers.sh: WARNING: something listens on port 25:" >&2
    ss -ltnpH 'sport = :25' >&2
    exit 1
fi
echo "nothing listens on port 25; peers ready under $PEERS"
