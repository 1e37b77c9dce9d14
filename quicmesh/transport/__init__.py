"""Transports: the socket interface and its QUIC, HTTP/2 and TLS-over-TCP implementations."""
