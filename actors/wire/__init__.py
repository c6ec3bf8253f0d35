"""Wire formats the actor kinds share, sans-IO: IP headers with named offsets,
WireGuard message classification, STUN, DERP, disco, TSMP, and the demux that
tells the protocols sharing the node's UDP port apart."""
