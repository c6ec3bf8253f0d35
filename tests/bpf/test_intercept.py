"""The interception program: the kernel's verifier takes every variant of it
(what it does to packets is tests/actors/dns/test_intercept.py's, in namespaces:
bpf_sk_assign works only at a real ingress)."""

from __future__ import annotations

import ipaddress
import os

import pytest

from meshsup.bpf.intercept import Target, program
from meshsup.bpf.syscall import BPF_PROG_TYPE_SCHED_CLS, load_program
from tests.nodes import is_root

V4 = Target(ipaddress.ip_address("127.0.0.153"), 53, 54)
V6 = Target(ipaddress.ip_address("100::53"), 53, 54)


@pytest.mark.skipif(not is_root(), reason="loading a traffic-control program needs CAP_BPF and CAP_NET_ADMIN")
@pytest.mark.parametrize(("v4", "v6"), [(V4, V6), (V4, None), (None, V6)])
def test_the_kernel_takes_the_program(v4, v6):
    fd = load_program(program(v4, v6, 0x4453), "meshsup_dns", BPF_PROG_TYPE_SCHED_CLS)
    os.close(fd)


def test_targets_and_mark_are_in_the_program():
    base = program(V4, V6, 0x4453)
    assert program(V4, V6, 0x4454) != base
    assert program(Target(V4.address, 53, 55), V6, 0x4453) != base
    assert program(V4, None, 0x4453) != base
    with pytest.raises(ValueError, match="no target"):
        program(None, None, 0x4453)
