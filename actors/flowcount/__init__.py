"""Traffic counting where the packets are (tun-io, crypto, magicsock) and the
feed that delivers the counts to netlog over the bus."""
