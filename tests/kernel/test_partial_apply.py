"""A pass whose nft transaction committed but whose policy routing failed says so.

The failure is a real one: the plan names ext2, which is deleted between discovery and apply,
so the route through it cannot be added (ENODEV) after nft has taken the new rules.
"""

from __future__ import annotations

import pytest
from pyroute2 import AsyncIPRoute

from smartnatd.errors import DataplaneError
from smartnatd.host import discover
from smartnatd.model import Snapshot
from smartnatd.planner import plan
from smartnatd.settings import Settings
from tests.builders import endpoint_slice, mapping, service
from tests.kernel.conftest import new_dataplane
from tests.kernel.harness import Topology, sh

SETTINGS = Settings(interfaces_pattern=r"^ext[0-9]+$", default_gw_interface="eth0", instance_name="test")


async def test_routing_failing_after_nft_committed_is_reported_as_a_partial_pass(topology: Topology, tmp_path):
    async with AsyncIPRoute(netns=topology.appliance, flags=0) as ipr:
        host = await discover(ipr, pattern=SETTINGS.interfaces_regex, default_gw_interface="eth0")
    m = mapping(name="ext2", addresses=("198.51.100.10",), mode="direct", ports=((80, "tcp", 80),))
    svc = service(ports=(("http", "tcp", 80, 8080),))
    eps = endpoint_slice(ready=("10.244.1.2",), ports=(("http", "tcp", 8080),))
    p = plan(Snapshot(mappings=(m,), services=(svc,), endpoint_slices=(eps,), host=host), SETTINGS)
    assert p.desired.return_paths, "the plan needs a return path through ext2"
    sh(topology.appliance, "ip", "link", "del", "ext2")

    async with new_dataplane(topology, tmp_path) as dp:
        with pytest.raises(DataplaneError) as caught:
            await dp.apply(p.desired, full=True)
    assert caught.value.nft_committed is True, caught.value
    assert "ext2" in str(caught.value) or "No such device" in str(caught.value), caught.value
    assert "198.51.100.10" in sh(topology.appliance, "nft", "list", "table", "ip", "smartnat").stdout
