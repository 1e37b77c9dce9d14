"""QUIC interop matrix: quicmesh against independent QUIC stacks (see docs/interop.md)."""
