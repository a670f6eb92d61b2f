"""The I/O-free half of the SDK: configuration, the retry decision, error mapping, batching."""
from __future__ import annotations

import email.utils
import time

import httpx
import numpy as np
import pytest
import sdb_client
from sdb_client import _base as b
from sdb_client import _exceptions as e

KEY = "sdb_0123456789ab_" + "f" * 64


def test_key_from_argument_or_env(monkeypatch):
    monkeypatch.setenv("SDB_API_KEY", KEY)
    monkeypatch.setenv("SDB_URL", "http://example.test:9000/")
    c = sdb_client.Client()
    assert c.has_key and c.base_url == "http://example.test:9000"
    monkeypatch.delenv("SDB_API_KEY")
    monkeypatch.delenv("SDB_URL")
    c = sdb_client.Client()
    assert not c.has_key and c.base_url == b.DEFAULT_URL


@pytest.mark.parametrize("bad", ["sk-123", KEY[:-1], KEY.upper(), KEY + "0", "sdb__" + "f" * 64])
def test_malformed_key_is_refused_at_construction_without_echo(bad, monkeypatch):
    with pytest.raises(e.ConfigurationError) as info:
        sdb_client.Client("http://127.0.0.1:1", api_key=bad)
    assert info.value.code == "invalid_key_format" and "sdb_<12 hex digits>_<64 hex digits>" in str(info.value)
    assert bad not in str(info.value) and bad not in repr(info.value)
    assert isinstance(info.value, ValueError)
    monkeypatch.setenv("SDB_API_KEY", bad)
    with pytest.raises(e.ConfigurationError, match="SDB_API_KEY"):
        sdb_client.AsyncClient("http://127.0.0.1:1")


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://x", "http://", ""])
def test_malformed_url_is_refused(url):
    with pytest.raises(e.ConfigurationError, match="http"):
        sdb_client.Client(url)


def test_repr_never_shows_the_key():
    for c in (sdb_client.Client("http://h:1", api_key=KEY), sdb_client.AsyncClient("http://h:1", api_key=KEY)):
        assert KEY not in repr(c) and "f" * 16 not in repr(c) and "api_key='set'" in repr(c)
        assert KEY not in repr(c.with_options(max_retries=0))


def test_with_options_overrides_per_call_and_keeps_the_rest():
    c = sdb_client.Client("http://h:1", api_key=KEY, max_retries=5, batch_size=10, timeout=3)
    d = c.with_options(max_retries=0)
    assert (d.options.max_retries, d.options.batch_size, d.options.timeout.read) == (0, 10, 3.0)
    assert c.options.max_retries == 5 and d._http is c._http and d.has_key
    with pytest.raises(e.ConfigurationError):
        c.with_options(batch_size=0)
    # no request finishes in 0 s or less: said at once (-1 was the socket's ValueError; 0 four retries, then
    # "cannot reach the server")
    for bad in (0, -1, "soon", float("nan")):
        with pytest.raises(e.ConfigurationError, match="timeout must be a number of seconds > 0"):
            sdb_client.Client("http://h:1", api_key=KEY, timeout=bad)
        with pytest.raises(e.ConfigurationError):
            c.with_options(timeout=bad)


def test_retry_decision():
    r = b.retry_delay
    assert r(0, 3, status=503) is not None  # backoff
    assert r(0, 3, status=503, headers={"retry-after": "2"}) == 2.0
    assert r(0, 3, status=429, headers={"retry-after": "1"}) == 1.0
    assert r(0, 3, status=429) is None  # lifetime quota: waiting will not refill it
    assert r(0, 3, status=429, headers={"retry-after": str(b.RETRY_AFTER_MAX_S + 1)}) is None
    for status in (400, 401, 403, 404, 409, 413, 415, 422, 500, 502, 504):
        assert r(0, 3, status=status, headers={"retry-after": "0"}) is None, status
    assert r(3, 3, status=503) is None  # bounded
    req = httpx.Request("POST", "http://h/x")
    assert r(0, 3, error=httpx.ConnectError("refused", request=req), idempotent=False) is not None
    assert r(0, 3, error=httpx.ReadError("reset", request=req), idempotent=True) is not None
    assert r(0, 3, error=httpx.ReadError("reset", request=req), idempotent=False) is None
    delays = [b.backoff(i) for i in range(10)]
    assert all(0 < d <= b.BACKOFF_MAX_S for d in delays) and b.backoff(0) <= b.BACKOFF_INITIAL_S


def test_retry_after_http_date():
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= b.parse_retry_after(when) <= 31
    assert b.parse_retry_after("soon") is None and b.parse_retry_after(None) is None


@pytest.mark.parametrize("status,cls", [(400, e.BadRequest), (401, e.AuthError), (403, e.PermissionDenied),
                                        (404, e.NotFound), (413, e.PayloadTooLarge), (415, e.BadRequest),
                                        (422, e.BadRequest), (429, e.QuotaError), (500, e.ServerError),
                                        (503, e.ServerError), (409, e.SDBError)])
def test_error_mapping(status, cls):
    body = b'{"error": {"code": "some_code", "message": "what went wrong"}}'
    err = b.error_from_response(status, body, {"retry-after": "7"})
    assert type(err) is cls and isinstance(err, e.SDBError)
    assert (err.status, err.code, err.message, err.retry_after) == (status, "some_code", "what went wrong", 7.0)
    bare = b.error_from_response(status, b"<html>proxy says no</html>")
    assert type(bare) is cls and bare.code and "proxy says no" in bare.message


def test_error_messages_are_scrubbed_of_keys():
    body = ('{"error": {"code": "x", "message": "bad Bearer ' + KEY + '"}}').encode()
    err = b.error_from_response(401, body)
    assert KEY not in str(err) and "f" * 8 not in repr(err) and "sdb_0123456789ab_***" in err.message


def test_batching_helpers():
    assert b.batch_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    with pytest.raises(e.BadRequest, match="non-empty"):
        b.as_array([])
    with pytest.raises(e.BadRequest, match="NaN"):
        b.distill_body(np.array([[np.nan]], np.float32), None)


def test_masked_and_complex_inputs_are_refused_not_sent_wrongly():
    """A masked array went out with the values under its mask (np.asarray drops the mask), a complex one with its
    imaginary part dropped; both answered as if they were the inputs. Refused, saying what to do."""
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    masked = np.ma.masked_array(x, mask=np.zeros_like(x, bool))
    np.testing.assert_array_equal(b.as_array(masked), x)  # nothing masked: its values
    masked[0, 1] = np.ma.masked
    with pytest.raises(e.BadRequest, match=r"filled") as info:
        b.as_array(masked)
    assert info.value.code == "invalid_input"
    for complex_inputs in (x + 1j, [x[0].astype(np.complex64)], [np.complex128(1.0)]):
        with pytest.raises(e.BadRequest, match=r"x\.real") as info:
            b.as_array(complex_inputs)
        assert info.value.code == "invalid_dtype"
    with pytest.raises(e.BadRequest, match=r"predict\(name, image_path=") as info:  # distill has no image_path
        b.as_array(x.astype(np.uint8))


def test_a_key_given_as_the_url_is_not_echoed():
    """``Client(key)`` (the key where the URL goes) used to repeat the whole key in the ConfigurationError."""
    for cls in (sdb_client.Client, sdb_client.AsyncClient):
        with pytest.raises(e.ConfigurationError) as info:
            cls(KEY)
        assert "f" * 16 not in str(info.value) and "f" * 16 not in repr(info.value)
        assert "give it as api_key" in info.value.message
    with pytest.raises(e.ConfigurationError) as info:  # a key in the URL's query: refused (no query), not echoed
        sdb_client.Client("http://h:1/?api_key=" + KEY)
    assert "f" * 16 not in str(info.value) and "no query or fragment" in info.value.message


@pytest.mark.parametrize(("url", "why"), [
    ("http://[::1", ""), ("http://127.0.0.1:abc", ""), ("http://127.0.0.1:99999", ""), ("http://h:0", "a port"),
    ("http://h:8000/?q=1", "no query"), ("http://h:8000#top", "fragment"), ("http://:80", "")])
def test_a_url_no_request_could_use_is_a_configuration_error(url, why):
    """A malformed IPv6 host was urlsplit's ValueError, a port past 65535 an OverflowError inside an
    ExceptionGroup (async), a query or fragment had every route's path glued after it."""
    for cls in (sdb_client.Client, sdb_client.AsyncClient):
        with pytest.raises(e.ConfigurationError, match="must be an http\\(s\\) URL") as info:
            cls(url)
        assert info.value.code == "invalid_url" and why in info.value.message
    assert sdb_client.Client("http://[::1]:8000/").base_url == "http://[::1]:8000"


def test_a_url_with_a_password_is_refused_and_never_shown(monkeypatch):
    """SDB_URL=http://admin:hunter2@host printed the password in every error, and httpx sent it as Basic auth in
    place of the key (401); a ?token=... was refused, the refusal repeating it."""
    with pytest.raises(e.ConfigurationError, match="no user:password in the URL") as info:
        b.resolve_url("http://u:p@h:1")
    assert "p@" not in str(info.value) and "SDB_API_KEY" in info.value.message
    monkeypatch.setenv("SDB_URL", "http://admin:hunter2@127.0.0.1:1")
    for cls in (sdb_client.Client, sdb_client.AsyncClient):
        with pytest.raises(e.ConfigurationError) as info:
            cls()
        assert "hunter2" not in str(info.value) and "admin" not in str(info.value)
    with pytest.raises(e.ConfigurationError, match="no query") as info:
        b.resolve_url("http://h:1/?token=s3cret")
    assert "s3cret" not in str(info.value)
    with pytest.raises(e.ConfigurationError) as info:  # one urlsplit refuses: masked all the same
        b.resolve_url("http://u:s3cret@[::1?token=s3cret")
    assert "s3cret" not in str(info.value)


def test_no_answer_names_the_server_and_what_to_check():
    """A connection error used to read `ConnectError: [Errno 111] Connection refused`, naming no server."""
    req = httpx.Request("GET", "http://h:1/v1/models")
    err = b.connection_error(httpx.ConnectError("[Errno 111] Connection refused", request=req), "http://h:1", 4)
    assert type(err) is e.APIConnectionError and err.code == "connection_error"
    assert "cannot reach http://h:1 after 4 attempts" in err.message and "SDB_URL" in err.message
    late = b.connection_error(httpx.ReadTimeout("timed out", request=req), "http://h:1")
    assert type(late) is e.APITimeoutError and "no answer from http://h:1" in late.message and "timeout" in late.message


def test_a_path_given_as_inputs_says_what_to_do():
    """A .npy file's path as ``inputs`` used to be refused as `not a rectangular array of numbers`."""
    for path in ("x.npy", b"x.npy"):
        with pytest.raises(e.BadRequest, match=r"numpy.load\(path\).*image_path"):
            b.as_array(path)


def test_download_target_folders(tmp_path, monkeypatch):
    """`download(..., "out/")` to a folder not made yet used to write a file named `out`; a file in a missing
    folder failed with a FileNotFoundError naming a `.part` file."""
    assert b.download_target("report.json", str(tmp_path / "new" / "sub") + "/") == tmp_path / "new/sub/report.json"
    assert (tmp_path / "new" / "sub").is_dir()
    assert b.download_target("r.json", tmp_path) == tmp_path / "r.json"
    assert b.download_target("r.json", tmp_path / "mine.json") == tmp_path / "mine.json"
    with pytest.raises(e.BadRequest, match="no folder"):
        b.download_target("r.json", tmp_path / "missing" / "mine.json")
    monkeypatch.chdir(tmp_path)
    assert b.download_target("a/../r.json", None) == tmp_path / "r.json"


def test_a_missing_image_file_is_a_bad_request(tmp_path):
    """Used to be a bare FileNotFoundError, where a missing upload is a BadRequest naming the file."""
    with pytest.raises(e.BadRequest, match="no image file at .*seven.png"):
        b.image_upload(tmp_path / "seven.png")
