"""Kernel interfaces the actor kinds share: the TUN device (with its virtio-net
header), UDP sockets with GSO/GRO, the one Buffer and Endpoint type they all
speak, and files and directories no other local user can plant or change (files)."""
