"""Tests for quicmesh.congestion."""
