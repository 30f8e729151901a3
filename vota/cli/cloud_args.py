"""The arguments of ``vota cloud``: the stand-in cloud's serving, campaigns, broker and messages."""

from __future__ import annotations

import argparse
from typing import Any

from vota.cli.inputs import IMAGE_KEY_HELP

__all__ = ["add_cloud"]


def add_cloud(sub: Any) -> None:
    """``vota cloud``."""
    p = sub.add_parser(
        "cloud",
        help="the stand-in cloud: serve packages and collect reports, make campaigns, publish to a vehicle",
        description="A stand-in for the OEM cloud, for benches and tests.",
    )
    csub = p.add_subparsers(dest="cloud_command", metavar="ACTION")
    csub.required = True
    k = csub.add_parser("serve", help="serve packages over HTTP and store every report (until SIGINT/SIGTERM)")
    k.add_argument("--broker", default="mqtt://127.0.0.1:1883",
                   help="MQTT broker URL: mqtt[s]://[user:password@]host:port[?ca=CA.pem] (default: mqtt://127.0.0.1:1883)")
    k.add_argument("--store", default="var/cloud/store", metavar="DIR", help="where reports are stored")
    k.add_argument("--packages", default="var/cloud/packages", metavar="DIR", help="package files to serve")
    k.add_argument("--http-port", type=int, default=8080, help="HTTP port for packages (default 8080)")
    k.add_argument("--mqtt-version", choices=("5", "3.1.1"), default="5")
    k.add_argument("--report-keys", metavar="DIR",
                   help="vehicles' report public keys, one <VIN>.pub each: only reports a vehicle signed are stored "
                   "(and none from a VIN without a key)")
    k.add_argument("--collector-broker", metavar="URL",
                   help="the collector's own connection (its identity, e.g. mqtts://vota-collector:PW@host:8883?ca=CA.pem); "
                        "default: --broker")
    k.add_argument("--share", metavar="GROUP", help="one of several collectors on an MQTT shared subscription "
                   "($share/GROUP/...) storing into the same --store: each report is stored once")
    k.add_argument("--collector-id", default="vota-cloud-collector", metavar="ID",
                   help="the collector's MQTT client id (its durable session); one per collector of a --share group")
    k.add_argument("--tls-cert", metavar="PEM", help="serve packages over HTTPS with this certificate (and --tls-key)")
    k.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    k = csub.add_parser("certs", help="make a CA, the broker's and package server's certificate and a client "
                        "certificate per name (a VIN, vota-collector) for a bench; a CA already in DIR is used again")
    k.add_argument("names", nargs="*", metavar="NAME", help="clients to certify: VINs, cloud identities")
    k.add_argument("--out", required=True, metavar="DIR", help="where ca.pem, server.pem and <NAME>.pem (with keys) go")
    k.add_argument("--server-name", action="append", default=[], metavar="HOST",
                   help="a name or address the vehicles connect to (repeatable; default: localhost and 127.0.0.1)")
    _campaign(csub)
    _messages(csub)


def _campaign(csub: Any) -> None:
    k = csub.add_parser("campaign", help="make and sign a campaign for package files")
    k.add_argument("packages", nargs="+", metavar="ECU=FILE@VERSION")
    k.add_argument("--vin", required=True)
    k.add_argument("--key", required=True, metavar="PEM", help="the cloud's Ed25519 signing key")
    k.add_argument("--base-url", required=True, help="URL under which the package files are served")
    k.add_argument("--id", dest="campaign_id", required=True, help="campaign id")
    k.add_argument("--install", choices=("immediate", "confirm"), default="immediate")
    k.add_argument("--valid-days", type=float, default=30.0, help="days until the campaign expires (default 30)")
    k.add_argument("--delta-from", action="append", default=[], metavar="ECU=OLD_IMAGE@VERSION",
                   help="also carry a delta from the image the ECU runs (made beside its package, served with it); "
                        "the vehicle sends it when the ECU runs OLD_IMAGE, the full image otherwise (repeatable)")
    k.add_argument("--precondition", action="append", default=[], metavar="KEY=VALUE",
                   help="override the vehicle's install preconditions for this campaign: min_soc, soc_per_minute, "
                        "min_battery_mv, parked, ignition_off, speed_zero, charging (allowed|forbidden), window_s "
                        "(repeatable; e.g. min_soc=50)")
    k.add_argument("--image-key", action="append", default=[], metavar="ECU=KEY[@N]", help=IMAGE_KEY_HELP)
    k.add_argument("--rxswin", nargs=3, action="append", default=[], metavar=("REGULATION", "BEFORE", "AFTER"),
                   help="the campaign changes the vehicle's RXSWIN under REGULATION from BEFORE to AFTER with its "
                        "commit; a vehicle whose RXSWIN is not BEFORE refuses it (repeatable)")
    k.add_argument("--information", metavar="FILE", help="what the driver is told, per language (YAML or JSON: "
                   "{en: {purpose, changes, unavailable, instructions, after_success, after_failure}, ...})")
    k.add_argument("--out", metavar="FILE", help="signed campaign (default: standard output)")


def _messages(csub: Any) -> None:
    k = csub.add_parser("broker", help="run the demo's embedded MQTT broker (amqtt, MQTT 3.1.1)")
    k.add_argument("--port", type=int, default=1883)
    for name, what in (("publish", "a signed campaign file"), ("command", "a command"),
                       ("keys", "a signed key list (vota campaign keys), retained: vehicles offline get it when back"),
                       ("offer-content", "a signed content bundle (its items go to --packages)"),
                       ("request-content", "the owner's request to download and run offered content")):
        k = csub.add_parser(name, help=f"send {what} to a vehicle over MQTT")
        k.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt[s]://[user:password@]host:port[?ca=CA.pem]")
        k.add_argument("--vin", required=True)
        k.add_argument("--mqtt-version", choices=("5", "3.1.1"), default="5")
        if name == "publish":
            k.add_argument("campaign", metavar="SIGNED.json")
        elif name == "keys":
            k.add_argument("keys", metavar="KEYS.json")
        elif name == "command":
            k.add_argument("command", choices=("confirm_install",))
            k.add_argument("campaign_id")
        elif name == "offer-content":
            k.add_argument("bundle", metavar="SIGNED.tar")
            k.add_argument("--packages", default="var/cloud/packages", metavar="DIR", help="the directory vota cloud serve serves")
            k.add_argument("--base-url", default="http://127.0.0.1:8080/packages", help="URL of that directory")
            k.add_argument("--request", action="store_true", help="the owner already asked: download at once")
        else:
            k.add_argument("bundle_id")
    for k in csub.choices.values():
        k.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
