"""The served B4B API: the defended encoder behind HTTP with accounts, micro-batching and crash-safe
state (see docs/serving.md). Start it with `python -m b4b_jax.main --config=configs/serve.py
--workdir=DIR`; manage keys with `python -m b4b_jax.serve.admin`; talk to it with
`b4b_jax.serve.client` (Client, AdminClient, RemoteDefendedEncoder)."""
