"""The node's settings: each config section parsed and checked once, into frozen typed objects."""
