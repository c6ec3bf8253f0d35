"""The pcap writer: libpcap's own bytes, and packets Wireshark reads back with good checksums."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from meshsup.actors.wire import pcap
from meshsup.supervisor.lab import have

UDP4 = pcap.udp_packet(("198.51.100.1", 51820), ("203.0.113.9", 4000), b"\x04\0\0\0" + bytes(28))
UDP6 = pcap.udp_packet(("2001:db8::1", 51820), ("2001:db8::2", 4000), b"\x01" * 33)  # odd length: checksum pads


def test_file_header_is_libpcaps() -> None:
    # magic (microseconds), version 2.4, thiszone, sigfigs, snaplen 262144, LINKTYPE_RAW; little-endian.
    assert pcap.file_header() == bytes.fromhex("d4c3b2a1 0200 0400 00000000 00000000 00000400 65000000")


def test_record_header_stamps_microseconds_and_cuts_to_the_snaplen() -> None:
    packet = bytes(range(100))
    rec = pcap.record(1_700_000_000_123_456_789, packet)
    assert rec[:16] == bytes.fromhex("00f15365 40e20100 64000000 64000000") and rec[16:] == packet
    cut = pcap.record(2_000_000_999, packet, snaplen=10)  # 2 s and 999 ns: the microseconds round down
    assert cut == bytes.fromhex("02000000 00000000 0a000000 64000000") + packet[:10]
    assert pcap.records(5, [b"a", b"bc"]) == pcap.record(5, b"a") + pcap.record(5, b"bc")


def test_udp_packet_headers() -> None:
    assert len(UDP4) == 20 + 8 + 32 and UDP4[0] == 0x45 and UDP4[9] == 17
    assert UDP4[12:20] == bytes([198, 51, 100, 1, 203, 0, 113, 9])
    assert UDP4[20:26] == (51820).to_bytes(2, "big") + (4000).to_bytes(2, "big") + (40).to_bytes(2, "big")
    assert UDP6[0] >> 4 == 6 and UDP6[4:6] == (41).to_bytes(2, "big") and UDP6[6] == 17 and UDP6[48:] == b"\x01" * 33
    with pytest.raises(ValueError, match="different IP versions"):
        pcap.udp_packet(("198.51.100.1", 1), ("2001:db8::1", 2), b"")


@pytest.mark.skipif(bool(have("tcpdump")), reason=str(have("tcpdump")))
def test_libpcap_writes_the_same_file(tmp_path: Path) -> None:
    """tcpdump reads the file and writes it again with libpcap's pcap_dump: not one byte differs."""
    ours, theirs = tmp_path / "ours.pcap", tmp_path / "theirs.pcap"
    ours.write_bytes(pcap.file_header() + pcap.record(1_700_000_000_000_001_000, UDP4) + pcap.record(2, UDP6))
    subprocess.run(["tcpdump", "-r", str(ours), "-w", str(theirs)], check=True, capture_output=True)
    assert theirs.read_bytes() == ours.read_bytes()


@pytest.mark.skipif(bool(have("tshark")), reason=str(have("tshark")))
def test_wireshark_reads_times_and_checksums(tmp_path: Path) -> None:
    path = tmp_path / "udp.pcap"
    path.write_bytes(pcap.file_header() + pcap.record(1_700_000_000_123_456_789, UDP4) + pcap.record(10**9, UDP6))
    checks = ("-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE")
    fields = ("-e", "frame.time_epoch", "-e", "ip.checksum.status", "-e", "udp.checksum.status", "-e", "udp.dstport")
    r = subprocess.run(["tshark", "-r", str(path), *checks, "-T", "fields", *fields], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # Status 1 is Wireshark's "Good" (IPv6 has no header checksum).
    assert [line.split("\t") for line in r.stdout.splitlines()] == [
        ["1700000000.123456000", "1", "1", "4000"],
        ["1.000000000", "", "1", "4000"],
    ]
