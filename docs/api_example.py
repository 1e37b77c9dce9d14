"""The example of docs/api.md, runnable: python3 docs/api_example.py."""

import asyncio

import quicmesh


async def main() -> None:
    ca = quicmesh.DevCA()                                    # embedded development CA (in memory)
    ca.save("/tmp/quicmesh-ca")                              # ca.pem, ca-key.pem
    ca = quicmesh.DevCA.load("/tmp/quicmesh-ca")
    server_id = ca.issue("spiffe://mesh.local/ns/default/sa/reviews")        # -> Identity
    client_id = ca.issue("spiffe://mesh.local/ns/default/sa/productpage")
    server_id.save("/tmp/reviews-cert.pem", "/tmp/reviews-key.pem")
    server_id = quicmesh.Identity.from_files("/tmp/reviews-cert.pem", "/tmp/reviews-key.pem")
    trust = ca.trust_bundle                                  # or quicmesh.TrustBundle.from_file("roots.pem")

    async def handler(stream: quicmesh.MeshStream) -> None:
        # stream.target, stream.headers, stream.peer_identity describe the flow
        request = await stream.read()                        # to EOF (the client half-closed)
        stream.write(b"you asked for " + stream.target.encode() + b": " + request)
        await stream.drain()
        stream.write_eof()

    def authorize(peer_spiffe_id: str, target: str) -> bool:
        return peer_spiffe_id == client_id.spiffe_id and target.endswith(":9080")

    server = quicmesh.QuicTransport(identity=server_id, trust=trust)  # or H2Transport, TcpTransport
    listener = await server.listen(("127.0.0.1", 0), handler, authorize=authorize)

    client = quicmesh.QuicTransport(identity=client_id, trust=trust)
    conn = await client.connect(listener.address)            # -> PeerConnection
    assert conn.peer_identity == server_id.spiffe_id

    stream = await conn.open_stream("reviews.default.svc:9080", headers={"x-request-id": "1"})
    stream.write(b"ratings")
    await stream.drain()
    stream.write_eof()
    print(await stream.read())                               # b'you asked for reviews.default.svc:9080: ratings'
    await stream.wait_closed()

    try:
        await conn.open_stream("payments.default.svc:443")
    except quicmesh.StreamRefused as exc:
        print(exc.status, exc.reason)                        # 403 spiffe://.../productpage may not reach ...

    print(conn.stats())                                      # rtt, cwnd, bytes, packets, streams ...
    conn.close()
    await conn.wait_closed()
    listener.close()
    await listener.wait_closed()


asyncio.run(main())
