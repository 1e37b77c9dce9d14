"""Closing a cluster (the end of a drain) closes its endpoints' pools together."""

from __future__ import annotations

import asyncio

from quicmesh import DevCA, H2Transport, MeshStream

from .test_cluster_refusals import _h2_cluster


def test_a_cluster_closes_its_busy_endpoints_at_once_not_one_after_the_other() -> None:
    """Each pool waits up to ``grace`` for its busy flows: one pool after the other, a
    drain took ``grace`` more for each busy endpoint (2 s each at the end of a drain)."""

    async def hold(stream: MeshStream) -> None:
        await stream.read()  # until the flow is reset

    async def main() -> None:
        ca = DevCA()
        server = H2Transport(
            identity=ca.issue("spiffe://mesh.local/ns/default/sa/b"), trust=ca.trust_bundle
        )
        listeners = [await server.listen(("127.0.0.1", 0), hold) for _ in range(3)]
        cluster = _h2_cluster(ca, [listener.address for listener in listeners])
        flows = []
        pools = [endpoint.pool for endpoint in cluster.endpoints.values()]
        for _ in range(30):
            if all(pool.active_streams for pool in pools):
                break
            flows.append(await cluster.open_flow())
        assert all(pool.active_streams for pool in pools)
        seen: list[tuple[str, int]] = []
        for index, pool in enumerate(pools):
            original = pool.close

            async def close(grace: float = 0.0, index: int = index, original=original) -> None:
                seen.append(("start", index))
                await original(grace)
                seen.append(("end", index))

            pool.close = close  # type: ignore[method-assign]
        await cluster.close(0.5)
        assert [step for step, _ in seen[:3]] == ["start"] * 3, seen
        for listener in listeners:
            listener.close()
            await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))
