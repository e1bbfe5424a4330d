"""Redis URLs: the forms cachesaver-dist accepts, parsed and checked before connecting,
and what a failure to connect to one means, in terms of the URL.

See docs/redis-urls.md. Every problem is a ``ValueError`` naming the URL (password
hidden) and the accepted forms.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import AuthenticationError, InvalidResponse, NoPermissionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["ACCEPTED_FORMS", "RedisURL", "explain_failure", "parse_url", "refused_login",
           "safe_url"]

ACCEPTED_FORMS = (
    "redis://[[user]:password@]host[:port][/db], "
    "rediss://[[user]:password@]host[:port][/db][?ssl_ca_certs=FILE&ssl_certfile=FILE"
    "&ssl_keyfile=FILE&ssl_cert_reqs=none|optional|required&ssl_check_hostname=yes|no], "
    "unix://[[user]:password@]/path/to/redis.sock[?db=N], "
    "redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]"
    "[?sentinel_password=...] (rediss+sentinel:// for TLS); see docs/redis-urls.md"
)
DEFAULT_PORT, DEFAULT_SENTINEL_PORT = 6379, 26379
_TRUE, _FALSE = ("1", "yes", "true", "on", "y", "t"), ("0", "no", "false", "off", "n", "f")


def _bool(value: str) -> bool:
    if value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError("expected yes or no")


def _cert_reqs(value: str) -> str:
    if value.lower() in ("none", "optional", "required"):
        return value.lower()
    raise ValueError("expected none, optional or required")


def _seconds(value: str) -> float:
    if float(value) <= 0:
        raise ValueError("expected a positive number of seconds")
    return float(value)


def _db(value: str) -> int:
    if not value.isdigit():
        raise ValueError("expected a database number (0, 1, ...)")
    return int(value)


_COMMON: dict[str, Callable[[str], Any]] = {
    "db": _db, "username": str, "password": str, "client_name": str,
    "socket_timeout": _seconds, "socket_connect_timeout": _seconds,
    "health_check_interval": float, "max_connections": int,
}
_TCP: dict[str, Callable[[str], Any]] = {"socket_keepalive": _bool}
_TLS: dict[str, Callable[[str], Any]] = {
    "ssl_ca_certs": str, "ssl_certfile": str, "ssl_keyfile": str,
    "ssl_cert_reqs": _cert_reqs, "ssl_check_hostname": _bool,
}
_SENTINEL: dict[str, Callable[[str], Any]] = {"sentinel_username": str, "sentinel_password": str}
_SCHEMES = {  # scheme -> (kind, TLS)
    "redis": ("tcp", False), "rediss": ("tcp", True), "unix": ("unix", False),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
}


@dataclass(frozen=True)
class RedisURL:
    """A parsed Redis URL. ``options`` are connection keyword arguments (db, username,
    password, ssl_*, socket_*, ...); ``addresses`` is the server (``tcp``) or the
    sentinels (``sentinel``)."""

    url: str
    kind: str  # "tcp", "unix" or "sentinel"
    tls: bool
    addresses: tuple[tuple[str, int], ...] = ()
    path: str = ""  # unix: the socket
    service: str = ""  # sentinel: the monitored service (master name)
    options: dict[str, Any] = field(default_factory=dict)
    sentinel_options: dict[str, Any] = field(default_factory=dict)

    @property
    def safe(self) -> str:
        """The URL without its password."""
        return safe_url(self.url)

    @property
    def where(self) -> str:
        """What the URL points at, for messages: host:port, the socket, or the sentinels."""
        if self.kind == "unix":
            return self.path
        hosts = ",".join(f"{h}:{p}" for h, p in self.addresses)
        return f"sentinels {hosts} (service {self.service!r})" if self.service else hosts


def safe_url(url: str) -> str:
    """``url`` without its password (in the user part or as a ``password=`` option).

    The user part ends at the last ``@`` before any ``password=`` option, so a password
    with an unencoded ``/``, ``?`` or ``#`` is hidden too (better too much than a leak).
    """
    url = str(url)
    scheme, sep, rest = url.partition("://")
    option = re.search(r"[?&](?:sentinel_)?password=", rest)
    at = rest.rfind("@", 0, option.start() if option else len(rest))
    if sep and at >= 0:  # a user part without ':' may be a misplaced password: hide it
        userinfo = rest[:at]
        user = userinfo.split(":", 1)[0] + ":***" if ":" in userinfo else "***"
        url = f"{scheme}{sep}{user}{rest[at:]}"
    return re.sub(r"([?&](?:sentinel_)?password=)[^&#]*", r"\1***", url)


def _bad(url: str, problem: str) -> ValueError:
    return ValueError(f"invalid Redis URL {safe_url(url)!r}: {problem}. "
                      f"Accepted forms: {ACCEPTED_FORMS}")


def _address(url: str, text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[ipv6]:port``."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port[1:] if port.startswith(":") else port
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    host = unquote(host)
    if not host:
        raise _bad(url, "a host is missing")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:  # not echoed: may be a password
        raise _bad(url, f"the port after {host!r} is not a number from 1 to 65535")
    return host, int(port)


def _parse_options(url: str, query: str, allowed: dict[str, Callable[[str], Any]]
                   ) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            hint = " (ssl_* options need rediss://)" if name in _TLS else ""
            raise _bad(url, f"unknown option {name!r}{hint}; this form takes "
                            f"{', '.join(sorted(allowed))}")
        try:
            options[name] = allowed[name](value)
        except ValueError as exc:
            raise _bad(url, f"option {name}={value!r}: {exc}") from None
    return options


def _userinfo(url: str, userinfo: str, options: dict[str, Any]) -> None:
    user, colon, password = userinfo.partition(":")
    if not colon:
        raise _bad(url, "a user without ':password' (a password alone is written "
                        "redis://:password@host)")
    if user:
        options["username"] = unquote(user)
    if password:
        options["password"] = unquote(password)


def parse_url(url: str) -> RedisURL:
    """Parse and check ``url``; raise ``ValueError`` naming what is wrong."""
    if not isinstance(url, str):
        raise ValueError(f"a Redis URL must be a string, got {type(url).__name__}. "
                         f"Accepted forms: {ACCEPTED_FORMS}")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in _SCHEMES:
        found = f"scheme {scheme + '://'!r} is not supported" if scheme else "no scheme"
        raise _bad(url, found)
    kind, tls = _SCHEMES[scheme]
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _bad(url, str(exc)) from None
    names = "".join(name for name, _ in parse_qsl(parts.query, keep_blank_values=True))
    if parts.fragment or "@" in names + (parts.path if kind != "unix" else ""):
        raise _bad(url, "a '#', or an '@' after the host: percent-encode '/', '?', '#' and "
                        "'@' in a user or password (%2F, %3F, %23, %40)")
    allowed = {**_COMMON, **(_TLS if tls else {}), **(_TCP if kind != "unix" else {}),
               **(_SENTINEL if kind == "sentinel" else {})}
    options = _parse_options(url, parts.query, allowed)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at:
        _userinfo(url, userinfo, options)
    if ("ssl_certfile" in options) != ("ssl_keyfile" in options):
        raise _bad(url, "a client certificate needs both ssl_certfile= and ssl_keyfile=")
    sentinel_options = {k[len("sentinel_"):]: options.pop(k) for k in list(_SENTINEL)
                        if k in options}
    path = unquote(parts.path)
    if kind == "unix":
        if hosts or not path.startswith("/") or path == "/":
            raise _bad(url, "unix:// takes an absolute socket path: unix:///path/to/redis.sock")
        return RedisURL(url, kind, tls, path=path, options=options)
    if kind == "tcp":
        if not hosts or "," in hosts:
            raise _bad(url, "one host is needed" if not hosts else
                       "several hosts are only accepted by redis+sentinel://")
        address = _address(url, hosts, DEFAULT_PORT)
        segments = [s for s in path.split("/") if s]
        if len(segments) > 1 or (segments and not segments[0].isdigit()):
            raise _bad(url, f"the path {path!r} is not a database number (/0, /1, ...)")
        _set_db(url, options, segments[0] if segments else None)
        return RedisURL(url, kind, tls, (address,), options=options)
    sentinels = tuple(_address(url, h, DEFAULT_SENTINEL_PORT) for h in hosts.split(","))
    segments = path.split("/")[1:] if path.startswith("/") else []
    if not segments or not segments[0] or len(segments) > 2:
        raise _bad(url, "the path must be /<service_name>[/<db>], e.g. "
                        "redis+sentinel://sentinel-host:26379/mymaster/0")
    if len(segments) == 2 and not segments[1].isdigit():
        raise _bad(url, f"the database {segments[1]!r} after the service name is not a number")
    _set_db(url, options, segments[1] if len(segments) == 2 else None)
    return RedisURL(url, kind, tls, sentinels, service=segments[0], options=options,
                    sentinel_options=sentinel_options)


def _set_db(url: str, options: dict[str, Any], db: str | None) -> None:
    if db is not None and "db" in options and options["db"] != int(db):
        raise _bad(url, "two different databases in the path and in ?db=")
    if db is not None:
        options["db"] = int(db)


def _causes(exc: BaseException | None) -> list[BaseException]:
    """The exception and its causes."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def refused_login(exc: BaseException) -> bool:
    """The server answered, and refused the URL's credentials or user (not worth retrying)."""
    chain = _causes(exc)
    return any(isinstance(e, (AuthenticationError, NoPermissionError)) for e in chain) or \
        any(w in str(e) for e in chain for w in ("WRONGPASS", "NOAUTH", "NOPERM"))


def explain_failure(exc: BaseException, u: RedisURL, where: str,
                    timeout: float) -> tuple[str, str]:
    """What a failed connection attempt to ``where`` (part of ``u``) means, and what to
    change: ``(cause, fix)``, in words."""
    chain = _causes(exc)
    text = " | ".join(str(e) for e in chain)
    low = text.lower()

    def has(*types: type) -> bool:
        return any(isinstance(e, types) for e in chain)

    if has(MasterNotFoundError):
        return (f"no sentinel names a healthy primary of {u.service!r}",
                "check the sentinels and the service name")
    if has(NoPermissionError):
        return (f"the URL's user is refused a command at {where} ({chain[-1]})",
                "grant it to that user (ops/acl.conf lists each role's rules, +ping "
                "included) or use another user")
    if has(AuthenticationError) or any(w in text for w in ("WRONGPASS", "NOAUTH", "NOPERM")):
        return (f"authentication failed at {where} ({chain[-1]})",
                "check the user and password of the URL" if "password" in u.options else
                "the server needs a password: put it in the URL, e.g. redis://:password@host/0")
    if has(ssl.SSLCertVerificationError):
        return (f"TLS handshake failed: the certificate of {where} is not trusted "
                f"({chain[-1]})", "pass the CA that signed it: ?ssl_ca_certs=/path/to/ca.crt")
    if any(w in low for w in ("wrong version number", "packet length too long")):
        return (f"TLS handshake failed: {where} does not speak TLS",
                "use redis:// for a plain server, or the server's TLS port")
    closed = has(ConnectionResetError) or "reset by peer" in low or "closed by server" in low
    if has(ssl.SSLError) or (u.tls and ("ssl" in low or closed)):
        return (f"TLS handshake failed with {where} ({chain[-1]})",
                "if the server checks client certificates (tls-auth-clients), pass "
                "?ssl_certfile=...&ssl_keyfile=... signed by a CA it trusts")
    if has(RedisTimeoutError, asyncio.TimeoutError, socket.timeout):
        return (f"timed out after {timeout:g} s connecting to {where}" + (
                " or in the TLS handshake (is it a plain, non-TLS server? then use redis://)"
                if u.tls else ""), "check the host, port and firewall, or raise "
                "?socket_connect_timeout=")
    if has(ConnectionRefusedError) or "connection refused" in low:
        return f"connection refused: nothing listens at {where}", "start Redis or fix the URL"
    if has(socket.gaierror) or any(w in low for w in (
            "name or service not known", "nodename nor servname", "name resolution")):
        return f"unknown host: {where} does not resolve", "fix the host name"
    if u.kind == "unix" and (has(FileNotFoundError) or "no such file" in low):
        return f"no socket at {u.path}", f"start Redis with --unixsocket {u.path} or fix the path"
    if has(PermissionError) or "permission denied" in low:
        return f"permission denied opening {where}", "check the socket's permissions"
    if closed:
        return f"{where} closed the connection at once", "a TLS port? then use rediss://"
    if has(InvalidResponse):
        return f"{where} does not speak the Redis protocol ({chain[0]})", "check the port"
    if "db index" in low or "invalid database" in low:
        db = u.options.get("db")
        port_like = isinstance(db, int) and db >= 1024  # redis://host/6380 meant a port
        hint = " (a port goes after a colon: redis://host:PORT/0)" if port_like else ""
        return f"database {db} does not exist at {where}", f"fix the /db of the URL{hint}"
    return (f"{chain[0]}",
            "start it, fix REDIS_URL/cache, or leave both unset to use the embedded server")
