"""Kernel interfaces the actor kinds share: the TUN device (with its virtio-net
header), UDP sockets with GSO/GRO, recvmmsg/sendmmsg batching, and the one
Buffer and Endpoint type they all speak."""
