"""Routing tables the actor kinds and the eBPF steering share: allowed IPs by
longest prefix, and which crypto worker owns a peer."""
