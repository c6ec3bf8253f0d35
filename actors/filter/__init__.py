"""The stateful packet filter: rules (first match wins), a connection table, reject replies.

Sans-IO, shared by the crypto workers (each keeps the state of its own
peers' flows, whose packets all pass through it both ways): `Filter` takes
batches of IP packets and `now`, and gives back those that pass and the
replies that rejects send (actors.filter.packetfilter).
"""
