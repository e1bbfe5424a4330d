"""Every Redis URL form: parsing, and real servers started here (TLS with certificates
made by the test, a unix socket, Sentinel with a failover under live CLI workers).

Servers run on free loopback ports (never 6379) and are stopped at the end of each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis as sync_redis
from arq.connections import ArqRedis
from redis.asyncio import Redis

from cachesaver_dist import OnlineAPI, Request, SimModel, defaults, prompt_key
from cachesaver_dist.connection import (
    DEFAULT_CONNECT_TIMEOUT_S,
    KEEPALIVE,
    HiredisPackConnection,
    HiredisSSLConnection,
    HiredisUnixConnection,
    SentinelConnection,
    SentinelPool,
    SentinelSSLConnection,
    check_reachable,
    connect,
    connection_pool,
)
from cachesaver_dist.errors import RedisRefusedError, RedisUnavailableError
from cachesaver_dist.protocol import Keys
from cachesaver_dist.server import find_server_binary
from cachesaver_dist.urls import parse_url, safe_url
from tests.conftest import ROOT, Processes

processes = pytest.mark.processes
SERVICE, PASSWORD, SENTINEL_PASSWORD = "mymaster", "s3cret-pw", "sentinel-pw"


# --- parsing --------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "kind", "tls", "addresses", "options"), [
    ("redis://localhost", "tcp", False, [("localhost", 6379)], {}),
    ("redis://:pw@cache-host:6380/2", "tcp", False, [("cache-host", 6380)],
     {"password": "pw", "db": 2}),
    ("redis://user:p%40ss@[::1]:7000/0?socket_timeout=3&client_name=me", "tcp", False,
     [("::1", 7000)], {"username": "user", "password": "p@ss", "db": 0, "socket_timeout": 3.0,
                       "client_name": "me"}),
    ("rediss://h:6390?ssl_ca_certs=/ca.crt&ssl_certfile=/c.crt&ssl_keyfile=/c.key"
     "&ssl_cert_reqs=optional&ssl_check_hostname=yes&socket_connect_timeout=1.5",
     "tcp", True, [("h", 6390)],
     {"ssl_ca_certs": "/ca.crt", "ssl_certfile": "/c.crt", "ssl_keyfile": "/c.key",
      "ssl_cert_reqs": "optional", "ssl_check_hostname": True, "socket_connect_timeout": 1.5}),
    ("unix:///run/redis.sock?db=3", "unix", False, [], {"db": 3}),
    ("unix://:pw@/run/redis.sock", "unix", False, [], {"password": "pw"}),
    ("redis+sentinel://:pw@s1:26379,s2,[::1]:26380/mymaster/1?sentinel_password=spw",
     "sentinel", False, [("s1", 26379), ("s2", 26379), ("::1", 26380)],
     {"password": "pw", "db": 1}),
    ("rediss+sentinel://s1:5000/svc?ssl_ca_certs=/ca.crt", "sentinel", True, [("s1", 5000)],
     {"ssl_ca_certs": "/ca.crt"}),
])
def test_each_form_parses(url, kind, tls, addresses, options):
    u = parse_url(url)
    assert (u.kind, u.tls, list(u.addresses), u.options) == (kind, tls, addresses, options)
    if kind == "unix":
        assert u.path == "/run/redis.sock"
    if kind == "sentinel":
        assert u.service == ("mymaster" if not tls else "svc")
        assert u.sentinel_options == ({"password": "spw"} if not tls else {})


@pytest.mark.parametrize(("url", "problem"), [
    ("localhost:6379", "no scheme"),
    ("http://:pw@host/0", "'http://' is not supported"),
    ("redis://:pw@host:port/0", "the port after 'host' is not a number"),
    ("redis://:pw@host:99999", "the port after 'host' is not a number"),
    ("redis://:pw@h1,h2/0", "only accepted by redis+sentinel://"),
    ("redis://:pw@/0", "one host is needed"),
    ("redis://:pw@host/zero", "not a database number"),
    ("redis://:pw@host/1?db=2", "two different databases"),
    ("redis://:pw@host?ssl_ca_certs=/ca.crt", "ssl_* options need rediss://"),
    ("redis://:pw@host?colour=blue", "unknown option 'colour'"),
    ("rediss://:pw@host?ssl_cert_reqs=maybe", "expected none, optional or required"),
    ("redis://:pw@host?socket_connect_timeout=-1", "positive number of seconds"),
    ("redis://pw@host", "a user without ':password'"),
    ("unix://:pw@var/run/redis.sock", "absolute socket path"),
    ("unix:///tmp/r.sock?socket_keepalive=yes&password=pw", "unknown option 'socket_keepalive'"),
    ("redis+sentinel://:pw@s1:26379", "/<service_name>[/<db>]"),
    ("redis+sentinel://:pw@s1:26379/svc/x", "'x' after the service name"),
    ("redis+sentinel://:pw@s1:26379/svc/0/extra", "/<service_name>[/<db>]"),
    ("redis://:pw@ho#st/0", "percent-encode"),
    ("redis://:p/w@host/0", "percent-encode"),  # unencoded in a password: still hidden
    ("redis://:p?w@host/0", "percent-encode"),
    ("redis+sentinel://:p/w@s1/svc", "percent-encode"),
    ("redis+sentinel://:pw@s1,,s2/svc", "a host is missing"),
    ("rediss://:pw@host?ssl_certfile=/c.crt", "needs both ssl_certfile= and ssl_keyfile="),
])
def test_bad_forms_raise_a_clear_value_error_without_the_password(url, problem):
    with pytest.raises(ValueError) as err:
        parse_url(url)
    message = str(err.value)
    assert problem in message
    assert safe_url(url) in message
    if re.search(r"p\W?w", url):  # the password: pw, or p/w and p?w unencoded
        assert "***" in message
        assert not re.search(r"p\W?w", message.replace("password", ""))
    assert "Accepted forms: redis://" in message and "redis+sentinel://" in message
    with pytest.raises(ValueError):
        connection_pool(url)  # the public functions check the same way


def test_a_missing_tls_file_is_named_before_connecting():
    with pytest.raises(ValueError, match=r"ssl_ca_certs='/nowhere/ca\.crt': no such file"):
        connection_pool("rediss://:pw@h/0?ssl_ca_certs=/nowhere/ca.crt")


def test_safe_url_hides_every_password():
    assert safe_url("redis://u:p@h:1/0") == "redis://u:***@h:1/0"
    assert safe_url("redis://:p@h") == "redis://:***@h"
    assert safe_url("redis://p@h") == "redis://***@h"  # a misplaced password, maybe
    assert safe_url("unix:///s.sock?db=0&password=p") == "unix:///s.sock?db=0&password=***"
    assert safe_url("redis+sentinel://:p@a:1,b:2/m/0?sentinel_password=q&x=1") == \
        "redis+sentinel://:***@a:1,b:2/m/0?sentinel_password=***&x=1"
    assert safe_url("redis://h:1/0") == "redis://h:1/0"
    for unencoded in ("pa/ss", "pa?ss", "pa#ss", "pa@ss"):  # hidden even when malformed
        assert safe_url(f"redis://u:{unencoded}@h:1/0") == "redis://u:***@h:1/0"


def test_each_form_gets_its_connection_class_and_only_options_it_accepts():
    pools = {url: connection_pool(url) for url in (
        "redis://h/0", "rediss://h/0", "unix:///tmp/r.sock?db=1",
        "redis+sentinel://s:1/m", "rediss+sentinel://s:1/m")}
    classes = [p.connection_class for p in pools.values()]
    assert classes == [HiredisPackConnection, HiredisSSLConnection, HiredisUnixConnection,
                       SentinelConnection, SentinelSSLConnection]
    unix = pools["unix:///tmp/r.sock?db=1"].connection_kwargs
    assert "socket_keepalive" not in unix and unix["path"] == "/tmp/r.sock" and unix["db"] == 1
    for pool in pools.values():  # bounded connect (and TLS handshake), retries kept
        assert pool.connection_kwargs["socket_connect_timeout"] == DEFAULT_CONNECT_TIMEOUT_S
        assert pool.connection_kwargs["retry"]._retries == 12
    assert connection_pool("redis://h?socket_connect_timeout=0.5").connection_kwargs[
        "socket_connect_timeout"] == 0.5
    for url in ("redis://h/0", "rediss://h/0", "redis+sentinel://s:1/m"):  # TCP: dead peers
        assert pools[url].connection_kwargs["socket_keepalive_options"] == KEEPALIVE
        assert "socket_timeout" not in pools[url].connection_kwargs  # clients bound their own
    assert connection_pool("redis://h", read_timeout=30).connection_kwargs[
        "socket_timeout"] == 30  # workers
    assert connection_pool("redis://h?socket_timeout=2", read_timeout=30).connection_kwargs[
        "socket_timeout"] == 2  # the URL wins
    sentinel = pools["redis+sentinel://s:1/m"]
    assert isinstance(sentinel, SentinelPool) and sentinel.service_name == "m"
    twin = sentinel.__class__(connection_class=sentinel.connection_class,
                              **sentinel.connection_kwargs)  # as OnlineAPI's in-process workers
    assert (twin.service_name, twin.sentinel_manager) == ("m", sentinel.sentinel_manager)


# --- servers ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accepts(address: int | str) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(0.5)
        try:
            s.connect(address if isinstance(address, str) else ("127.0.0.1", address))
            return True
        except OSError:
            return False


class Servers:
    """redis-server processes of one test, stopped (and killed if need be) at its end."""

    def __init__(self, directory: Path) -> None:
        self.dir, self.procs = directory, []
        self.named: dict[str, subprocess.Popen] = {}

    def start(self, *args: str, name: str, address: int | str) -> subprocess.Popen:
        with open(self.dir / f"{name}.log", "wb") as log:  # the child keeps its own copy
            proc = subprocess.Popen([find_server_binary(), *args], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=self.dir)
        self.procs.append(proc)
        self.named[name] = proc
        deadline = time.monotonic() + 10
        while not accepts(address):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start: "
                                     f"{(self.dir / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.02)
        return proc

    def redis(self, *args: str, name: str, port: int | None = None,
              address: int | str | None = None) -> int:
        """A throw-away redis-server (no persistence) on ``port`` (default: a free one)."""
        port = free_port() if port is None else port
        self.start("--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(self.dir), *args, name=name,
                   address=address or port)
        return port

    def kill(self, name: str) -> None:
        """SIGKILL the server started as ``name``."""
        self.named[name].kill()
        self.named[name].wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    group = Servers(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A CA, a server and a client certificate it signed, and an unrelated CA."""
    d = tmp_path_factory.mktemp("certs")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    for ca in ("ca", "otherca"):
        openssl("req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN=test {ca}")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", "/CN=localhost")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", "san.ext")
    return SimpleNamespace(**{f"{n}_{ext}": str(d / f"{n}.{ext}") for n in
                              ("ca", "otherca", "server", "client") for ext in ("crt", "key")})


def tls_args(certs: SimpleNamespace, port: int, auth_clients: bool) -> list[str]:
    return ["--tls-port", str(port), "--tls-cert-file", certs.server_crt,
            "--tls-key-file", certs.server_key, "--tls-ca-cert-file", certs.ca_crt,
            "--tls-auth-clients", "yes" if auth_clients else "no"]


def tls_server(servers: Servers, certs: SimpleNamespace, *, auth_clients: bool = False) -> int:
    port = free_port()
    servers.redis(*tls_args(certs, port, auth_clients), name="tls", port=0, address=port)
    return port


async def round_trip(url: str, prompt: str) -> SimModel:
    """A request through ``OnlineAPI`` (in-process workers) and a cached repeat."""
    model = SimModel(f"m{uuid.uuid4().hex[:6]}")
    async with OnlineAPI(model, cache=url, prefix=f"t{uuid.uuid4().hex[:6]}:") as api:
        first = await api.request(Request(prompt, 2, "a", "ns1"))
        again = await api.request(Request(prompt, 2, "b", "ns2"))
    assert first.cached == [False, False]
    assert again.data == first.data and again.cached == [True, True]
    assert model.calls == [(prompt, 2)]
    return model


async def assert_stale_reply_is_replaced(url: str, connection_class: type) -> None:
    """The hiredis fast path of every form: a pooled connection with unread data is
    replaced, not read from."""
    client = connect(url)
    try:
        pool = client.connection_pool
        assert pool.connection_class is connection_class
        conn = await pool.get_connection()
        assert await conn.can_read_destructive() is False
        await conn.send_command("PING")  # its reply is never read
        await asyncio.sleep(0.1)
        assert await conn.can_read_destructive() is True
        await pool.release(conn)
        assert await client.echo("x") == b"x"
    finally:
        await client.aclose()


# --- TLS ---------------------------------------------------------------------------------

@processes
async def test_tls_round_trip_and_repeat_is_cached(servers, certs):
    port = tls_server(servers, certs)
    url = f"rediss://localhost:{port}/0?ssl_ca_certs={certs.ca_crt}&ssl_check_hostname=yes"
    await check_reachable(url)
    await round_trip(url, "hello over TLS")
    await assert_stale_reply_is_replaced(url, HiredisSSLConnection)


@processes
async def test_tls_client_certificate_required(servers, certs):
    port = tls_server(servers, certs, auth_clients=True)
    base = f"rediss://127.0.0.1:{port}?ssl_ca_certs={certs.ca_crt}"
    await round_trip(f"{base}&ssl_certfile={certs.client_crt}&ssl_keyfile={certs.client_key}",
                     "hello with a client certificate")
    for url in (base, f"{base}&ssl_certfile={certs.otherca_crt}"
                      f"&ssl_keyfile={certs.otherca_key}"):  # none, or one it does not trust
        with pytest.raises(RedisUnavailableError) as err:
            await check_reachable(url)
        message = str(err.value)
        assert f"cannot reach Redis at {url}: TLS handshake failed" in message
        assert "ssl_certfile" in message and "ssl_keyfile" in message


@processes
async def test_tls_wrong_ca_is_refused_with_a_clear_error(servers, certs):
    port = tls_server(servers, certs)
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={certs.otherca_crt}"
    with pytest.raises(RedisUnavailableError) as err:
        async with OnlineAPI(SimModel(), cache=url):
            pass
    message = str(err.value)
    assert message.startswith(f"cannot reach Redis at {safe_url(url)}: TLS handshake failed: "
                              f"the certificate of 127.0.0.1:{port} is not trusted")
    assert "certificate verify failed" in message and "ssl_ca_certs=" in message
    assert PASSWORD not in message


@processes
async def test_tls_against_a_plain_server_fails_within_the_connect_timeout(servers, certs):
    port = servers.redis(name="plain")
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs.ca_crt}"
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError) as err:  # default timeout, through OnlineAPI
        async with OnlineAPI("sim:x", cache=url):
            pass
    elapsed = time.monotonic() - started
    assert elapsed < DEFAULT_CONNECT_TIMEOUT_S + 2
    message = str(err.value)
    assert f"cannot reach Redis at {url}: " in message
    # Either the handshake times out (the server waits for a line) or the server's error
    # reply arrives first: both say it is no TLS server and to use redis://.
    assert ("timed out after 5 s connecting to" in message and "non-TLS" in message) or \
        "does not speak TLS" in message
    assert "use redis://" in message

    started = time.monotonic()  # the URL's own timeout wins
    with pytest.raises(RedisUnavailableError, match="TLS"):
        await check_reachable(f"{url}&socket_connect_timeout=0.5")
    assert time.monotonic() - started < 1.5


async def test_a_database_that_does_not_exist_is_named_and_a_port_like_one_gets_a_hint(
        redis_url):
    """``redis://host/6380`` reads 6380 as the database: the error says where a port goes."""
    base = parse_url(redis_url)
    host, port = base.addresses[0]
    with pytest.raises(RedisUnavailableError) as err:
        await check_reachable(f"redis://{host}:{port}/6380")
    assert "database 6380 does not exist" in str(err.value)
    assert "a port goes after a colon: redis://host:PORT/0" in str(err.value)
    with pytest.raises(RedisUnavailableError) as err:
        await check_reachable(f"redis://{host}:{port}/99")
    assert str(err.value).endswith("database 99 does not exist at "
                                   f"{host}:{port}; fix the /db of the URL")


# --- unix socket -------------------------------------------------------------------------

@processes
async def test_a_refused_login_is_a_redis_refused_error(servers):
    """As the README says: a wrong password or user is refused at once with
    ``RedisRefusedError`` (asking again cannot help), from OnlineAPI as from the check."""
    port = servers.redis("--requirepass", PASSWORD, name="password")
    for url in (f"redis://:wrong@127.0.0.1:{port}/0", f"redis://nobody:x@127.0.0.1:{port}/0",
                f"redis://127.0.0.1:{port}/0"):
        with pytest.raises(RedisRefusedError, match="authentication failed") as err:
            async with OnlineAPI(SimModel(), cache=url, prefix="refused:") as api:
                await api.request(Request("p", 1, "a", "ns"))
        assert "wrong" not in str(err.value), err.value  # no password in the message
    await check_reachable(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")


async def test_unix_socket_round_trip_and_cli_stats(servers, tmp_path):
    sock = str(tmp_path / "redis.sock")
    servers.redis("--unixsocket", sock, "--unixsocketperm", "700", name="unix", port=0,
                  address=sock)
    url = f"unix://{sock}?db=0"
    await check_reachable(url)
    prefix, model = f"u{uuid.uuid4().hex[:6]}:", SimModel("unixsim")
    async with OnlineAPI(model, cache=url, prefix=prefix, run="unix-run") as api:
        first = await api.request(Request("over a socket", 2, "a", "ns1"))
        again = await api.request(Request("over a socket", 2, "b", "ns2"))
    assert again.data == first.data and again.cached == [True, True]
    await assert_stale_reply_is_replaced(url, HiredisUnixConnection)

    done = subprocess.run(
        [sys.executable, "-m", "cachesaver_dist.cli", "stats", "--redis-url", url,
         "--prefix", prefix, "--run", "unix-run", "--json"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (row,) = [r for r in json.loads(done.stdout) if r["model"] == "sim:unixsim"]
    assert (row["samples_generated"], row["samples_cached"]) == (2, 2)

    with pytest.raises(RedisUnavailableError, match=r"no socket at .*/missing\.sock"):
        await check_reachable(f"unix://{tmp_path}/missing.sock")


# --- Sentinel ------------------------------------------------------------------------------

class SentinelGroup:
    """A primary, a replica and one sentinel, all with passwords."""

    def __init__(self, servers: Servers, tmp_path: Path) -> None:
        auth = ("--requirepass", PASSWORD, "--masterauth", PASSWORD,
                "--repl-diskless-sync-delay", "0")  # replicas sync at once, not after 5 s
        self.primary = servers.redis(*auth, name="primary")
        self.replica = servers.redis("--replicaof", "127.0.0.1", str(self.primary), *auth,
                                     name="replica")
        self.sentinel_port = free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"requirepass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 1\n"
            f"sentinel auth-pass {SERVICE} {PASSWORD}\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n")
        servers.start(str(conf), "--sentinel", name="sentinel", address=self.sentinel_port)
        self.sentinel = sync_redis.Redis(port=self.sentinel_port, password=SENTINEL_PASSWORD,
                                         decode_responses=True, socket_timeout=5)
        # Shorter periods than the defaults (10 s INFO, 2 s hello): the sentinel finds the
        # replica, and reconfigures the old primary after a failover, within about a second.
        self.sentinel.execute_command("SENTINEL", "DEBUG", "info-period", "200",
                                      "publish-period", "200", "ping-period", "200")
        self.url = (f"redis+sentinel://:{PASSWORD}@127.0.0.1:{self.sentinel_port}/{SERVICE}/0"
                    f"?sentinel_password={SENTINEL_PASSWORD}")

    def server(self, port: int) -> sync_redis.Redis:
        return sync_redis.Redis(port=port, password=PASSWORD, socket_timeout=5)

    def primary_port(self) -> int:
        return int(self.sentinel.sentinel_get_master_addr_by_name(SERVICE)[1])

    def failover(self, timeout: float = 20) -> int:
        """Ask the sentinel for a failover (once it knows a good replica); return the new
        primary's port once the sentinel names it."""
        old, deadline = self.primary_port(), time.monotonic() + timeout
        assert self.server(old).execute_command("WAIT", 1, 5000) == 1  # replica caught up
        while True:
            try:
                self.sentinel.execute_command("SENTINEL", "FAILOVER", SERVICE)
                break
            except sync_redis.ResponseError as exc:  # NOGOODSLAVE: replica not seen yet
                assert time.monotonic() < deadline, f"no failover: {exc}"
                time.sleep(0.1)
        while (new := self.primary_port()) == old:
            assert time.monotonic() < deadline, "the sentinel still names the old primary"
            time.sleep(0.05)
        return new

    def wait_role(self, port: int, role: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(sync_redis.ConnectionError):  # cut off by the sentinel
                if self.server(port).role()[0].decode() == role:
                    return
            assert time.monotonic() < deadline, f"{port} is not a {role}"
            time.sleep(0.05)


def wait_alive(client: sync_redis.Redis, keys: Keys, procs: Processes, *routes: str) -> None:
    deadline = time.monotonic() + 30
    for route in routes:
        while not client.zcount(keys.workers(route), int(time.time() * 1000), "+inf"):
            dead = [p for p in procs.procs if p.poll() is not None]
            assert not dead, f"worker exited: {procs.logs(dead[0])}"
            assert time.monotonic() < deadline, f"no worker for {route}"
            time.sleep(0.05)


@processes
@pytest.mark.timeout(90)
async def test_sentinel_failover_under_cli_workers(servers, tmp_path):
    started = time.monotonic()
    group = SentinelGroup(servers, tmp_path)
    keys, model = Keys(f"fo{uuid.uuid4().hex[:6]}:"), "sim:failover"
    procs = Processes(group.url, keys, tmp_path)
    try:
        procs.cli("worker", "cache", "--redis-url", group.url, "--poll-delay", "0.2",
                  name="cache")
        procs.cli("worker", "batch", "--model", model, "--sim-latency", "0.01",
                  "--redis-url", group.url, name="batch")
        wait_alive(group.server(group.primary), keys, procs, "cache", model)
        async with OnlineAPI(model, cache=group.url, prefix=keys.prefix, run="fo",
                             reply_timeout=1.0, request_timeout=45) as api:
            async def serve(tag: str, prompts: list[str]) -> list:
                return await asyncio.gather(*(api.request(Request(p, 2, f"{tag}{i}", tag))
                                              for i, p in enumerate(prompts)))

            before = await serve("ns1", ["p1", "p2", "p3"])
            assert all(r.cached == [False, False] for r in before)

            done = asyncio.Event()

            async def live_traffic() -> int:  # new prompts, one after the other, throughout
                served = 0
                while not done.is_set():
                    await serve(f"live{served}", [f"live{served}"])
                    served += 1
                    await asyncio.sleep(0.02)
                return served

            live = asyncio.create_task(live_traffic())
            try:
                await asyncio.sleep(0.2)
                new_primary = await asyncio.to_thread(group.failover)
                assert new_primary == group.replica
                after = await serve("ns2", ["p1", "p2", "p3", "p4"])  # repeats and a new one
                assert [r.data for r in after[:3]] == [r.data for r in before]
                assert all(r.cached == [True, True] for r in after[:3])
                # The old primary is reconfigured as a replica: its clients are cut off.
                await asyncio.to_thread(group.wait_role, group.primary, "slave")
                await asyncio.sleep(0.5)
            finally:
                done.set()
            assert await asyncio.wait_for(live, 45) > 5
            later = await serve("ns3", ["p1", "p5"])
            assert later[0].data == before[0].data and later[0].cached == [True, True]
            assert later[1].cached == [False, False]
            # The new samples are on the new primary, written by the same worker processes.
            p5 = keys.samples(prompt_key(model, {"prompt": "p5"}))
            assert group.server(new_primary).hlen(p5) == 2

            # A crash: the sentinel promotes the first server again, and everyone follows.
            assert group.server(new_primary).execute_command("WAIT", 1, 5000) == 1
            servers.kill("replica")
            crashed = await serve("ns4", ["p5", "p6"])  # sent while there is no primary
            assert group.primary_port() == group.primary
            assert crashed[0].data == later[1].data and crashed[0].cached == [True, True]
            assert crashed[1].cached == [False, False]
        assert all(p.poll() is None for p in procs.procs), [procs.logs(p) for p in procs.procs]
        assert "lost Redis" not in procs.logs(procs.procs[0])  # cache worker never restarted
    finally:
        procs.stop_all()
    assert time.monotonic() - started < 60


@processes
@pytest.mark.timeout(120)
async def test_workers_leave_a_frozen_primary_for_the_one_sentinel_promotes(servers,
                                                                              tmp_path):
    """A primary whose process froze keeps its connections open and answers nothing; the
    sentinel promotes the replica. Workers blocked on the frozen one drop it once a reply
    is 10 s late (their read timeout) and carry on with the new primary, which then
    serves new clients, while the old one stays frozen; their heartbeats reach it before
    the old ones expire, so no request is told that no worker is alive. A client that was
    connected before does the same: its send is retried there, and its reply
    subscription, whose PING goes unanswered, is made again there."""
    group = SentinelGroup(servers, tmp_path)
    keys, model = Keys(f"fz{uuid.uuid4().hex[:6]}:"), "sim:frozen"
    procs = Processes(group.url, keys, tmp_path)
    frozen = servers.named["primary"]
    old_client = OnlineAPI(model, cache=group.url, prefix=keys.prefix, request_timeout=90)
    try:
        procs.cli("worker", "cache", "--redis-url", group.url, name="cache")
        procs.cli("worker", "batch", "--model", model, "--sim-latency", "0.01",
                  "--redis-url", group.url, name="batch")
        wait_alive(group.server(group.primary), keys, procs, "cache", model)
        first = await old_client.request(Request("before", 1, "r", "ns"))
        assert group.server(group.primary).execute_command("WAIT", 1, 5000) == 1
        frozen.send_signal(signal.SIGSTOP)
        frozen_at, frozen_ms = time.monotonic(), int(time.time() * 1000)
        asked_during = asyncio.create_task(old_client.request(Request("during", 1, "r", "ns")))
        while group.primary_port() != group.replica:  # the sentinel's failover
            await asyncio.sleep(0.1)
        new = group.server(group.replica)
        # Heartbeats written before the freeze were replicated and live 15 s: wait for
        # ones written after it, i.e. by workers that moved.
        since = frozen_ms + int(defaults.HEARTBEAT_S * 3000) + 1
        while not all(new.zcount(keys.workers(r), since, "+inf") for r in ("cache", model)):
            assert time.monotonic() - frozen_at < 60, procs.logs(procs.procs[0])
            await asyncio.sleep(0.2)
        moved_after = time.monotonic() - frozen_at
        async with OnlineAPI(model, cache=group.url, prefix=keys.prefix,
                             request_timeout=20) as api:
            answers = await asyncio.gather(*(api.request(Request(f"p{i}", 2, f"r{i}", "ns"))
                                             for i in range(4)))
        assert all(r.cached == [False, False] for r in answers)
        during = await asyncio.wait_for(asked_during, 40)
        again = await old_client.request(Request("before", 1, "r2", "ns2"))
        assert during.cached == [False] and again.data == first.data  # replicated before
        assert frozen.poll() is None and group.primary_port() == group.replica
        assert moved_after < 20, moved_after
    finally:
        frozen.send_signal(signal.SIGCONT)
        await old_client.close()
        procs.stop_all()


@processes
@pytest.mark.timeout(120)
async def test_in_process_workers_leave_a_frozen_primary_too(servers, tmp_path):
    """``OnlineAPI(model_object)``: its own cache and batch workers were blocked on the
    frozen primary like worker processes; they move to the promoted one as those do,
    and a request sent during the freeze is answered there."""
    group = SentinelGroup(servers, tmp_path)
    keys = Keys(f"fi{uuid.uuid4().hex[:6]}:")
    frozen = servers.named["primary"]
    api = OnlineAPI(SimModel(latency=0.01), cache=group.url, prefix=keys.prefix,
                    request_timeout=60)
    try:
        first = await api.request(Request("before", 1, "r", "ns"))
        assert group.server(group.primary).execute_command("WAIT", 1, 5000) == 1
        await asyncio.sleep(1.5)  # both workers back in their blocking reads
        frozen.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        during = await asyncio.wait_for(api.request(Request("during", 2, "r", "ns")), 50)
        assert during.cached == [False, False] and len(set(during.data)) == 2
        assert group.primary_port() == group.replica and frozen.poll() is None
        again = await api.request(Request("before", 1, "r2", "ns2"))
        assert again.data == first.data  # replicated before the freeze
        assert time.monotonic() - frozen_at < 40
    finally:
        frozen.send_signal(signal.SIGCONT)
        await api.close()


@processes
async def test_sentinel_in_process_pubsub_arq_and_clear_errors(servers, tmp_path):
    group = SentinelGroup(servers, tmp_path)
    await check_reachable(group.url)
    await round_trip(group.url, "hello through the sentinel")  # in-process workers: a twin pool
    await assert_stale_reply_is_replaced(group.url, SentinelConnection)

    arq = ArqRedis(connection_pool=connection_pool(group.url))
    pubsub = arq.pubsub()
    try:
        await pubsub.subscribe("chan")
        assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"
        assert await arq.publish("chan", b"hi") == 1
        assert (await pubsub.get_message(timeout=2))["data"] == b"hi"
        assert arq.connection_pool.master_address == ("127.0.0.1", group.primary)
    finally:
        await pubsub.aclose()
        await arq.aclose(close_connection_pool=True)

    s = f"127.0.0.1:{group.sentinel_port}"
    dead = f"127.0.0.1:{free_port()}"
    cases: list[tuple[str, Callable[[str], bool]]] = [
        (f"redis+sentinel://:{PASSWORD}@{s}/other?sentinel_password={SENTINEL_PASSWORD}",
         lambda m: f"sentinel {s} monitors no service 'other'" in m),
        (f"redis+sentinel://:{PASSWORD}@{s}/{SERVICE}?sentinel_password=wrong",
         lambda m: f"sentinel {s}: authentication failed" in m),
        (f"redis+sentinel://:{PASSWORD}@{dead}/{SERVICE}",
         lambda m: f"sentinel {dead}: connection refused" in m),
        (f"redis+sentinel://:wrong@{s}/{SERVICE}?sentinel_password={SENTINEL_PASSWORD}",
         lambda m: f"authentication failed at the primary 127.0.0.1:{group.primary}" in m),
    ]
    for url, expected in cases:
        refused = url.startswith("redis+sentinel://:wrong@")  # the primary refused the login
        with pytest.raises(RedisRefusedError if refused else RedisUnavailableError) as err:
            await check_reachable(url)
        message = str(err.value)
        assert expected(message), message
        assert message.startswith(f"cannot reach Redis at {safe_url(url)}: ")
        assert "wrong" not in message and SENTINEL_PASSWORD not in message


@processes
async def test_rediss_sentinel_uses_tls_to_sentinels_and_servers(servers, certs, tmp_path):
    primary = tls_server(servers, certs)
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port 0\ntls-port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"tls-cert-file {certs.server_crt}\ntls-key-file {certs.server_key}\n"
        f"tls-ca-cert-file {certs.ca_crt}\ntls-auth-clients no\ntls-replication yes\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 1\n")
    servers.start(str(conf), "--sentinel", name="sentinel", address=sentinel_port)
    url = f"rediss+sentinel://127.0.0.1:{sentinel_port}/{SERVICE}?ssl_ca_certs={certs.ca_crt}"
    deadline = time.monotonic() + 10
    while True:  # until the sentinel has pinged the primary
        try:
            await check_reachable(url)
            break
        except RedisUnavailableError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    await round_trip(url, "hello through a TLS sentinel")
    with pytest.raises(RedisUnavailableError, match="TLS handshake failed: the certificate of "
                                                   f"sentinel 127.0.0.1:{sentinel_port} is not"):
        await check_reachable(f"rediss+sentinel://127.0.0.1:{sentinel_port}/{SERVICE}"
                              f"?ssl_ca_certs={certs.otherca_crt}&socket_connect_timeout=1")


@processes
async def test_sentinel_connections_ask_the_sentinels_on_every_attempt(servers, certs):
    """A primary that stopped answering (here: accepts TCP, never completes the TLS
    handshake) is left as soon as the sentinels name another one: each connection attempt,
    bounded by the connect timeout, asks them again."""
    port = tls_server(servers, certs)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        answers = [silent.getsockname(), ("127.0.0.1", port)]

        class Sentinels:  # stands in for redis-py's Sentinel: the primary moves once
            sentinels: list = []

            async def discover_master(self, service: str) -> tuple[str, int]:
                assert service == SERVICE
                return answers.pop(0) if len(answers) > 1 else answers[0]

        pool = connection_pool(f"rediss+sentinel://127.0.0.1:1/{SERVICE}?ssl_ca_certs="
                               f"{certs.ca_crt}&socket_connect_timeout=0.3")
        pool.sentinel_manager = Sentinels()
        client = Redis.from_pool(pool)
        started = time.monotonic()
        try:
            assert await client.ping() is True
        finally:
            await client.aclose()
        assert time.monotonic() - started < 2
        assert pool.master_address == ("127.0.0.1", port)
