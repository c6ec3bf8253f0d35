"""Imported last by the fork server (registry.PRELOAD), once it has loaded every kind.

What it loaded is moved to the collector's permanent generation: an actor forked
from it then never walks those objects in a collection, which would write to each
(its collector header) and so copy every page the actors share with the server
into each of them. Decoding thousands of peers runs many collections in each actor.
"""

import gc

gc.freeze()
