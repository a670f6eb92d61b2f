"""Behind a reverse proxy, a caller without a key is the client the proxy names (X-Forwarded-For), when the
proxy is one SDB_FORWARDED_ALLOW_IPS trusts; from anywhere else the header is ignored (a client could name
anyone). The per-address rate limit shows whom the server took each request for: a bucket of one request.
gRPC calls name the client alike, in ``x-forwarded-for`` metadata (nginx's ``grpc_set_header``), read by the same
rule; and SDB_FORWARDED_ALLOW_IPS is written as uvicorn reads it, so that what it accepts trusts what it says."""
from __future__ import annotations

import grpc
import httpx
import pytest
from uvicorn.middleware.proxy_headers import _TrustedHosts

from service.grpc import grpc_predict_v2_pb2 as pb
from service.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from service.settings import Settings, SettingsError
from tests.service.conftest import Server, free_port

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


class _Call:
    """What :func:`service.grpc.server.client_address` reads of a gRPC call: its peer and its metadata."""

    def __init__(self, peer: str, *forwarded_for: str):
        self._peer, self._metadata = peer, tuple(("x-forwarded-for", v) for v in forwarded_for)

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple:
        return self._metadata


def test_a_grpc_caller_is_known_as_an_http_caller_is():
    from service.grpc.server import client_address

    nobody, loopback = _TrustedHosts(""), _TrustedHosts("127.0.0.1")
    address = lambda *call, proxies=nobody: client_address(_Call(*call), proxies)
    assert address("ipv6:%5B2001:db8:1:2::1%5D:5000") == address("ipv6:%5B2001:db8:1:2:ff::9%5D:6000")
    assert address("ipv6:%5B2001:db8:1:2::1%5D:5000") == "2001:db8:1:2::/64"
    assert address("ipv4:10.0.0.1:5000") == "10.0.0.1" == address("ipv6:%5B::ffff:10.0.0.1%5D:1")
    # a forwarded client is grouped as a peer is; its metadata lines are one list, walked as HTTP's header
    assert address("ipv4:127.0.0.1:5000", "2001:db8:1:2::1", proxies=loopback) == "2001:db8:1:2::/64"
    assert address("ipv4:127.0.0.1:5000", "198.51.100.6", "203.0.113.1", proxies=loopback) == "203.0.113.1"
    assert address("ipv4:10.0.0.1:5000", "203.0.113.1", proxies=loopback) == "10.0.0.1"  # not a trusted peer


def _grpc_status(port: int, client: str) -> grpc.StatusCode:
    """ServerMetadata (no key: it spends the address's rate) as a proxy forwards it for ``client``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
                pb.ServerMetadataRequest(), metadata=(("x-forwarded-for", client),), timeout=30)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def _grpc_server(servers, tmp_path, bundles, trusted: str) -> int:
    port = free_port()
    servers.append(Server(tmp_path / "data", bundles, {**ONE_EACH, "SDB_FORWARDED_ALLOW_IPS": trusted,
                                                      "SDB_GRPC_PORT": str(port)}))
    return port


OK, SPENT = grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(("trusted", "second_client"), [("127.0.0.1", OK), ("10.0.0.0/8", SPENT), ("", SPENT)],
                         ids=["proxy trusted", "another proxy trusted", "none trusted"])
def test_a_grpc_forwarded_client_is_the_caller_only_from_a_trusted_proxy(servers, tmp_path, bundles, trusted,
                                                                         second_client):
    # every gRPC caller behind a trusted proxy was the proxy's address: one bucket, spent by the first client
    port = _grpc_server(servers, tmp_path, bundles, trusted)
    assert _grpc_status(port, "203.0.113.1") == OK
    assert _grpc_status(port, "203.0.113.2") == second_client
    assert _grpc_status(port, "203.0.113.1") == SPENT


def test_a_grpc_call_through_every_trusted_peer_takes_the_address_the_nearest_proxy_appended(servers, tmp_path,
                                                                                          bundles):
    port = _grpc_server(servers, tmp_path, bundles, "*")
    assert _grpc_status(port, "198.51.100.6, 203.0.113.1") == OK
    assert _grpc_status(port, "198.51.100.7, 203.0.113.1") == SPENT  # the same client, naming another address
    assert _grpc_status(port, "203.0.113.2") == OK


# SDB_FORWARDED_ALLOW_IPS as written, and addresses each entry describes: uvicorn parses the setting strictly, and
# took a host's address with its prefix, a "*" with a blank beside it (an env file's), for a name it never sees
@pytest.mark.parametrize(("value", "peers"), [
    ("192.168.1.10/24", ["192.168.1.10", "192.168.1.200"]),
    ("10.0.0.1/8", ["10.0.0.5", "10.200.0.1"]),
    ("10.0.0.0/255.0.0.0", ["10.1.2.3"]),
    ("fd00::1/64, 127.0.0.1", ["fd00::abcd", "127.0.0.1"]),
    (" 127.0.0.1 ,, ::1 ", ["127.0.0.1", "::1"]),
    ("* ", ["203.0.113.1", "::1"]),
    (" *", ["203.0.113.1"]),
    ("*,", ["203.0.113.1"]),
])
def test_every_trusted_proxy_the_setting_accepts_is_trusted_by_uvicorn(tmp_path, value, peers):
    proxies = _TrustedHosts(Settings(data_dir=tmp_path, forwarded_allow_ips=value).forwarded_allow_ips)
    assert all(peer in proxies for peer in peers), (value, proxies.trusted_literals)
    assert ("198.51.100.1" in proxies) == ("*" in value)  # an address no entry describes


def test_a_star_among_other_proxies_is_refused_saying_to_give_it_alone(tmp_path, monkeypatch):
    # uvicorn drops such a "*": only the others were trusted
    monkeypatch.setenv("SDB_FORWARDED_ALLOW_IPS", "*, 10.0.0.0/8")
    with pytest.raises(SettingsError) as e:
        Settings.load(data_dir=tmp_path)
    assert "SDB_FORWARDED_ALLOW_IPS" in str(e.value) and 'give "*" alone' in str(e.value), str(e.value)
