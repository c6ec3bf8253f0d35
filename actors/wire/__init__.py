"""Wire formats the actor kinds share, sans-IO: IP headers with named offsets
and WireGuard message classification."""
