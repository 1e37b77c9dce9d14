"""The two-sidecar demo: migration and 0-RTT between two real sidecar processes.

Run it with ``python -m interop.two_sidecars [--quick]``; see :mod:`.run`.
"""
