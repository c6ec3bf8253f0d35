"""The relay: `meshsup relay` workers speaking DERP to nodes and answering STUN."""
