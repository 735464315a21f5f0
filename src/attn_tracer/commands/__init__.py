"""Each command from its request to its outputs: validate, compute, write."""
