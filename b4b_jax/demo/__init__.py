"""The end-to-end offline demo: a small SimSiam victim served through B4B, legit users, thieves.

Stages (each resumable; see b4b_jax/jobs/demo.py): victim -> calibration -> legit users -> attacks
(undefended, B4B single account, B4B sybils) -> probes of the stolen copies -> remapping -> report.
"""
