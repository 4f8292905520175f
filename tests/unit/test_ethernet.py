"""hostd/stack/ethernet.py alone: the CAM table and MAC parsing."""

from __future__ import annotations

import pytest

from netferry.hostd.stack import ethernet

MAC1 = "5a:94:ef:e4:0c:ee"
MAC2 = "5a:94:ef:e4:0c:ef"
MAC3 = "5a:94:ef:e4:0c:f0"


def m(mac: str) -> bytes:
    return ethernet.parse_mac(mac)


def test_cam_table_bounded_moves_and_forgets():
    cam = ethernet.CamTable(max_entries=2)  # learn(): may the frame pass
    assert cam.learn(m(MAC1), 1) is True
    assert cam.learn(m(MAC1), 1) is True and cam.stats["mac_learned"] == 1
    assert cam.learn(m(MAC2), 1) is True
    assert cam.learn(m(MAC3), 2) is False and cam.lookup(m(MAC3)) is None
    assert cam.stats["cam_full_dropped"] == 1
    assert cam.learn(m(MAC2), 2) is True and cam.lookup(m(MAC2)) == 2  # not secure: moves
    assert sorted(cam.macs(1)) == [m(MAC1)]
    assert cam.forget_port(2) == [m(MAC2)] and len(cam) == 1


def test_parse_mac():
    assert ethernet.parse_mac("5A-94-EF-E4-0C-EE") == bytes.fromhex("5a94efe40cee")
    assert ethernet.mac_to_str(bytes.fromhex("5a94efe40cee")) == MAC1
    for bad in ["5a:94:ef:e4:0c", "5a:94:ef:e4:0c:zz", "5a94efe40cee", ""]:
        with pytest.raises(ValueError, match="bad MAC"):
            ethernet.parse_mac(bad)
