"""The stand-in cloud's MQTT connections, each described by one URL::

    mqtt://[user:password@]host[:port]                     plain (loopback benches only)
    mqtts://[user:password@]host[:port][?ca=FILE&cert=FILE&key=FILE]

``mqtts``: TLS, the broker's certificate checked against ``ca`` (the system's CAs without
it) and its name against the host; ``cert``/``key``: a client certificate for a broker that
asks for one. The user name is the connection's identity: on the shipped Mosquitto
configuration it is also its client id, so each cloud service needs its own (the collector
``vota-collector``, the operator's tools ``vota-cloud``).
"""

from __future__ import annotations

import ssl
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlparse

import paho.mqtt.client as mqtt

from agent.adapters.cloud_link import make_client
from agent.errors import UsageError

__all__ = ["BrokerUrl", "parse_broker", "shown", "cloud_client", "broker_address", "broker_login"]


class BrokerUrl(NamedTuple):
    host: str
    port: int
    user: str | None
    password: str | None
    tls: bool
    ca: str | None
    cert: str | None
    key: str | None


def shown(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)).geturl()


def parse_broker(url: str) -> BrokerUrl:
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise UsageError(f"broker must be mqtt[s]://[user:password@]host:port[?ca=FILE], got {shown(url)!r}")
    tls = parsed.scheme == "mqtts"
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = set(query) - {"ca", "cert", "key"}
    if unknown or (query and not tls):
        raise UsageError(f"broker {shown(url)!r}: only mqtts:// takes ?ca=, ?cert= and ?key=")
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise UsageError(f"broker {shown(url)!r}: the port is not a number from 1 to 65535") from None
    return BrokerUrl(parsed.hostname, port, unquote(parsed.username) if parsed.username else None,
                     unquote(parsed.password) if parsed.password is not None else None, tls,
                     query.get("ca"), query.get("cert"), query.get("key"))


def broker_address(url: str) -> tuple[str, int]:
    b = parse_broker(url)
    return b.host, b.port


def broker_login(url: str) -> tuple[str | None, str | None]:
    """The connection's identity on a broker with ACLs, from ``mqtt[s]://user:password@host:port``."""
    b = parse_broker(url)
    return b.user, b.password


def cloud_client(url: str, client_id: str, mqtt_version: str, clean: bool) -> tuple[mqtt.Client, str, int]:
    """A paho client set up as ``url`` says (login, TLS), not connected: (client, host, port)."""
    b = parse_broker(url)
    client = make_client(client_id, mqtt_version, clean)
    if b.tls:
        try:
            client.tls_set(ca_certs=b.ca, certfile=b.cert, keyfile=b.key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"broker {shown(url)!r}: the TLS files cannot be used ({exc})") from None
    if b.user:
        client.username_pw_set(b.user, b.password)
    return client, b.host, b.port
