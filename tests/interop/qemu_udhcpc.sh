#!/bin/sh
# udhcpc hook of the netferry QEMU test guest: applies the lease and reports it.
case "$1" in
deconfig)
    ip addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound | renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    gw=
    for r in $router; do gw=$r; break; done
    [ -n "$gw" ] && ip route add default via "$gw" dev "$interface"
    dns1=
    for d in $dns; do dns1=$d; break; done
    printf 'LEASE_ROUTER=%s\nLEASE_DNS=%s\n' "$gw" "$dns1" >/tmp/lease
    routers=$(echo $router | tr ' ' ',')
    servers=$(echo $dns | tr ' ' ',')
    echo "NETFERRY-LEASE ip=$ip/${mask:-24} router=$routers dns=$servers mtu=$mtu"
    ;;
esac
exit 0
