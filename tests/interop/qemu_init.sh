#!/bin/sh
# /init of the netferry QEMU test guest (see tests/interop/qemu_guest.py).
# Test steps come from kernel command-line words "nf.<step>=<value>"; results are
# printed on the serial console as lines starting with "NETFERRY-" for the test to parse.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The initramfs has a /dev/console node, but re-open it in case the kernel had none.
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /tmp
echo "NETFERRY-INIT start"

finish() {
    echo "NETFERRY-DONE"
    sync
    poweroff -f
    sleep 60
}

for m in $(cat /etc/nf-modules); do
    insmod "/lib/modules/$m.ko" || echo "NETFERRY-MODULE fail $m"
done

ip link set lo up
# The NIC appears asynchronously after virtio_net loads.
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
if ! ip link set eth0 up; then
    echo "NETFERRY-NIC fail"
    finish
fi

if ! udhcpc -i eth0 -n -q -t 10 -T 2 -O mtu -s /udhcpc.sh; then
    echo "NETFERRY-DHCP fail"
    finish
fi
LEASE_ROUTER=
LEASE_DNS=
[ -f /tmp/lease ] && . /tmp/lease

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
    fetch)
        rm -f /tmp/f
        # Debian's busybox 1.35 "wget -T" segfaults, hence the outer timeout.
        if timeout 30 wget -q -O /tmp/f "$val"; then
            sum=$(sha256sum /tmp/f | cut -d' ' -f1)
            echo "NETFERRY-FETCH sha256=$sum"
        else
            echo "NETFERRY-FETCH fail"
        fi
        ;;
    dns)
        server=${LEASE_DNS:-$LEASE_ROUTER}
        addrs=$(timeout 20 nslookup "$val" "$server" 2>&1 |
            awk '/^Name:/ { n = 1 } n && /^Address/ { print $NF }' | tr '\n' ',')
        if [ -n "$addrs" ]; then
            echo "NETFERRY-DNS addrs=${addrs%,}"
        else
            echo "NETFERRY-DNS fail"
        fi
        ;;
    slaac6)
        # SLAAC from hostd's router advertisement: a global address in prefix $val that has
        # passed DAD, and the default route the RA gave (via the gateway's link-local)
        n=0
        addr=
        while [ $n -lt 200 ]; do
            addr=$(ip -6 addr show dev eth0 scope global | grep -v tentative |
                awk -v p="$val" '$1 == "inet6" && index($2, p) == 1 { print $2; exit }')
            route=$(ip -6 route show default | awk '/via/ { print $3; exit }')
            [ -n "$addr" ] && [ -n "$route" ] && break
            sleep 0.1
            n=$((n + 1))
        done
        if [ -n "$addr" ] && [ -n "$route" ]; then
            echo "NETFERRY-SLAAC6 addr=$addr router=$route"
        else
            ip -6 addr show dev eth0
            ip -6 route
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
