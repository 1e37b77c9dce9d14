"""quicmesh: service-mesh traffic between sidecars over QUIC."""
