"""Stealing attacks: query protocol, losses, stolen-model training, sybil mappers."""
