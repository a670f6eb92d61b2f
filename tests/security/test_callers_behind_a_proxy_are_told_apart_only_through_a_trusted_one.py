"""Behind a reverse proxy, a caller without a key is the client the proxy names (X-Forwarded-For), when the
proxy is one SDB_FORWARDED_ALLOW_IPS trusts; from anywhere else the header is ignored (a client could name
anyone). The per-address rate limit shows whom the server took each request for: a bucket of one request."""
from __future__ import annotations

import httpx
import pytest

from tests.service.conftest import Server

ONE_EACH = {"SDB_RATE_LIMIT_ADDRESS_PER_S": "0.001", "SDB_RATE_LIMIT_ADDRESS_BURST": "1"}


def _status(srv: Server, client: str) -> int:
    return httpx.get(srv.url + "/v1/models", headers={"X-Forwarded-For": client}, timeout=30).status_code


@pytest.mark.parametrize(("trusted", "second_client"), [("127.0.0.1", 200), ("10.0.0.0/8", 429), ("", 429)],
                         ids=["proxy trusted", "another proxy trusted", "none trusted"])
def test_the_forwarded_client_is_the_caller_only_from_a_trusted_proxy(servers, tmp_path, bundles, trusted,
                                                                      second_client):
    srv = Server(tmp_path / "data", bundles, {**ONE_EACH, "SDB_FORWARDED_ALLOW_IPS": trusted})
    servers.append(srv)
    assert _status(srv, "203.0.113.1") == 200
    # a second client behind the proxy: its own bucket when the proxy (this test, on 127.0.0.1) is trusted;
    # otherwise both are the proxy's address, whose one request is spent
    assert _status(srv, "203.0.113.2") == second_client
    assert _status(srv, "203.0.113.1") == 429


def test_trusting_every_peer_takes_the_address_the_nearest_proxy_appended(servers, tmp_path, bundles):
    # "*" took X-Forwarded-For's first entry, the one a client writes itself behind a proxy that appends: each
    # request naming a new address had a bucket of its own. The last entry, the nearest proxy's, is the client.
    srv = Server(tmp_path / "data", bundles, {**ONE_EACH, "SDB_FORWARDED_ALLOW_IPS": "*"})
    servers.append(srv)
    assert _status(srv, "198.51.100.6, 203.0.113.1") == 200
    assert _status(srv, "198.51.100.7, 203.0.113.1") == 429  # the same client, naming another address
    assert _status(srv, "203.0.113.2") == 200  # another client


def test_the_addresses_of_one_ipv6_64_are_one_client(servers, tmp_path, bundles):
    # a host is given a whole /64 and may send from any address in it: each was a client with its own bucket
    srv = Server(tmp_path / "data", bundles, ONE_EACH)
    servers.append(srv)
    assert _status(srv, "2001:db8:1:2::1") == 200
    assert _status(srv, "2001:db8:1:2:ffff::9") == 429
    assert _status(srv, "2001:db8:1:3::1") == 200  # another /64
    assert _status(srv, "::ffff:203.0.113.9") == 200
    assert _status(srv, "203.0.113.9") == 429  # the same IPv4 client, written as IPv6


def test_a_grpc_caller_is_known_as_an_http_caller_is():
    from service.grpc.server import peer_address

    assert peer_address("ipv6:%5B2001:db8:1:2::1%5D:5000") == peer_address("ipv6:%5B2001:db8:1:2:ff::9%5D:6000")
    assert peer_address("ipv6:%5B2001:db8:1:2::1%5D:5000") == "2001:db8:1:2::/64"
    assert peer_address("ipv4:10.0.0.1:5000") == "10.0.0.1" == peer_address("ipv6:%5B::ffff:10.0.0.1%5D:1")
