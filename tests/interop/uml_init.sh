#!/bin/sh
# init of the netferry User Mode Linux test guest (see tests/interop/uml_guest.py).
# The root is the host's filesystem over hostfs, read-only; writable state lives in two
# tmpfs mounts that only the guest sees. Test steps come from kernel command-line words
# "nf.<step>=<value>"; results are printed on the console (con0 = UML's stdout) as lines
# starting with "NETFERRY-" for the test to parse. Programs are the host's busybox.

# UML runs under uml_exec.py, which keeps only x87/SSE state across its context switches:
# keep glibc's string functions off AVX (without this busybox prints "%s" raw).
export GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX_Fast_Unaligned_Load
bb=/bin/busybox
here=$($bb dirname "$0")
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
# /run for our tools, /tmp for udhcpc's lease file (the QEMU guest's hook writes /tmp/lease).
$bb mount -t tmpfs -o size=4m tmpfs /run
$bb mkdir -p /run/nf/bin
$bb cp "$here/qemu_udhcpc.sh" /run/nf/udhcpc.sh
$bb chmod 755 /run/nf/udhcpc.sh
for applet in awk cat cut dd grep insmod ip nc ping ping6 poweroff sha256sum sleep sync timeout tr udhcpc wget; do
    $bb ln -s $bb "/run/nf/bin/$applet"
done
$bb mount -t tmpfs -o size=4m tmpfs /tmp
export PATH=/run/nf/bin
echo "NETFERRY-INIT start"

finish() {
    echo "NETFERRY-DONE"
    sync
    poweroff -f
    sleep 60
}

# The value of kernel command-line word "nf.$1=VALUE", empty if there is none.
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in
        "nf.$1="*)
            echo "${w#*=}"
            return
            ;;
        esac
    done
}

# Uptime in centiseconds (UML's clock is the host's), for the benchmark's timings.
now_cs() {
    read -r up _ </proc/uptime
    echo $((${up%.*} * 100 + 1${up#*.} - 100))
}

ip link set lo up
# Debian's UML has IPv6 as a module (it needs crc-ccitt), on the host's filesystem: load
# both before the NIC comes up when a step needs them
if [ -n "$(arg slaac6)" ]; then
    read -r _ _ release _ </proc/version
    mods=/usr/lib/uml/modules/$release/kernel
    for m in lib/crc-ccitt net/ipv6/ipv6; do
        insmod "$mods/$m.ko" || echo "NETFERRY-MODULE fail $m"
    done
fi
if ! ip link set vec0 up; then
    echo "NETFERRY-NIC fail"
    finish
fi
static_addr=$(arg addr)
if [ -n "$static_addr" ]; then
    # A fixed address (slirp4netns's plan: 10.0.2.100/24 via 10.0.2.2), no DHCP.
    if ! ip addr add "$static_addr" dev vec0 || ! ip route add default via "$(arg gw)"; then
        echo "NETFERRY-STATIC fail"
        finish
    fi
elif ! udhcpc -i vec0 -n -q -t 10 -T 2 -O mtu -s /run/nf/udhcpc.sh; then
    echo "NETFERRY-DHCP fail"
    finish
fi

for word in $(cat /proc/cmdline); do
    case "$word" in
    nf.*=*) ;;
    *) continue ;;
    esac
    key=${word%%=*}
    key=${key#nf.}
    val=${word#*=}
    case "$key" in
    ping)
        if ping -c 2 -W 3 "$val" >/tmp/ping.out 2>&1; then
            echo "NETFERRY-PING ok"
        else
            cat /tmp/ping.out
            echo "NETFERRY-PING fail"
        fi
        ;;
    addr | gw) ;; # applied above
    fetch)
        # Streamed into sha256sum, so the size is not bounded by the guest's memory.
        # Debian's busybox 1.35 "wget -T" segfaults, hence the outer timeout.
        start=$(now_cs)
        sum=$({
            timeout 600 wget -q -O - "$val"
            echo $? >/tmp/wget.rc
        } | sha256sum | cut -d' ' -f1)
        rc=$(cat /tmp/wget.rc)
        if [ "$rc" = 0 ]; then
            echo "NETFERRY-FETCHTIME cs=$(($(now_cs) - start))"
            echo "NETFERRY-FETCH sha256=$sum"
        else
            echo "NETFERRY-FETCH fail wget-exit=$rc"
        fi
        ;;
    sink)
        # The same transfer into /dev/null: the network alone, without the guest's hashing.
        start=$(now_cs)
        if timeout 600 wget -q -O /dev/null "$val"; then
            echo "NETFERRY-SINK cs=$(($(now_cs) - start))"
        else
            echo "NETFERRY-SINK fail"
        fi
        ;;
    upload)
        # HOST:PORT:MIB: MIB MiB of zeros to a host sink that answers "ok BYTES" at EOF.
        host=${val%%:*}
        rest=${val#*:}
        start=$(now_cs)
        reply=$(dd if=/dev/zero bs=1M count="${rest#*:}" 2>/dev/null | timeout 600 nc "$host" "${rest%%:*}")
        echo "NETFERRY-UPLOAD cs=$(($(now_cs) - start)) $reply"
        ;;
    connrate)
        # HOST:PORT:N: N connections, one after another, each sending a byte and reading the
        # sink's answer (the guest's fork and exec of nc are in the time, for both switches).
        host=${val%%:*}
        rest=${val#*:}
        n=${rest#*:}
        fails=0
        i=0
        start=$(now_cs)
        while [ $i -lt "$n" ]; do
            echo | timeout 10 nc "$host" "${rest%%:*}" >/dev/null || fails=$((fails + 1))
            i=$((i + 1))
        done
        echo "NETFERRY-CONNRATE cs=$(($(now_cs) - start)) n=$n fails=$fails"
        ;;
    slaac6)
        # SLAAC from hostd's RA: a global address in prefix $val past DAD and a default route
        n=0
        addr=
        while [ $n -lt 200 ]; do
            addr=$(ip -6 addr show dev vec0 scope global | grep -v tentative |
                awk -v p="$val" '$1 == "inet6" && index($2, p) == 1 { print $2; exit }')
            route=$(ip -6 route show default | awk '/via/ { print $3; exit }')
            [ -n "$addr" ] && [ -n "$route" ] && break
            sleep 0.1
            n=$((n + 1))
        done
        if [ -n "$addr" ] && [ -n "$route" ]; then
            echo "NETFERRY-SLAAC6 addr=$addr router=$route"
        else
            ip -6 addr show dev vec0
            echo "NETFERRY-SLAAC6 fail"
        fi
        ;;
    ping6)
        if ping6 -c 2 -W 3 "$val" >/tmp/ping6.out 2>&1; then
            echo "NETFERRY-PING6 ok"
        else
            cat /tmp/ping6.out
            echo "NETFERRY-PING6 fail"
        fi
        ;;
    *)
        echo "NETFERRY-UNKNOWN $key"
        ;;
    esac
done
finish
