"""The ``vota`` command line's arguments: one parser, every command and its help, one function a command."""

from __future__ import annotations

import argparse
from typing import Any

from vota.cli.arguments import DEFAULT_CONFIG, _add_common, _capture, _seconds, _size
from vota.cli.cloud_args import add_cloud as _cloud
from vota.cli.inputs import IMAGE_KEY_HELP

__all__ = ["build_parser", "DEFAULT_CONFIG"]

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vota")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vota",
        description="Vehicle-side OTA agent: ECU simulator, gateway flashing with header-only traces, bench.",
    )
    parser.add_argument("--version", action="version", version=f"vota {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _ecu_sim(sub)
    _flash(sub)
    _versions(sub)
    _gateway(sub)
    _tbox(sub)
    _deploy(sub)
    _campaign(sub)
    _cloud(sub)
    _content(sub)
    _diagnose(sub)
    _fleet(sub)
    _init(sub)
    _log(sub)
    _evidence(sub)
    _bench(sub)
    return parser


def _log(sub: Any) -> None:
    """``vota log``."""
    p = sub.add_parser("log", help="check the vehicle's update log", description="The vehicle's update log "
                       "(<tbox.state_dir>/update-log.jsonl): every campaign report, hash-chained and signed.")
    lsub = p.add_subparsers(dest="log_command", metavar="ACTION")
    lsub.required = True
    k = lsub.add_parser("verify", help="check the chain and the signatures offline",
                        description="Check every entry links to the one before and (with --key) carries the vehicle's "
                        "signature; name the first line that does not. Exit 0 intact, 1 broken, 2 bad input.")
    k.add_argument("file", metavar="FILE")
    k.add_argument("--key", metavar="PUB", help="the vehicle's report public key (PEM): signatures checked too")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    k.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)


def _evidence(sub: Any) -> None:
    p = sub.add_parser("evidence", help="a campaign's type-approval evidence pack (UN R156): make one, or check one",
                       description="Gather a campaign's evidence on the vehicle (the update log, RXSWIN and versions "
                       "before and after, preconditions, what the driver was shown, results, traces, diagnosis) into "
                       "one archive signed with the vehicle's report key; or check a pack offline. Exit 0 written or "
                       "intact, 1 not intact, 2 bad input.")
    p.add_argument("campaign", nargs="?", metavar="CAMPAIGN", help="the campaign id")
    p.add_argument("--verify", metavar="PACK", help="check this pack instead: signature, digests, the update log")
    p.add_argument("-c", "--config", dest="vehicle_config", metavar="YAML",
                   help="vehicle configuration (its tbox section; default: configs/bench.yaml, else the installed example)")
    p.add_argument("--state-dir", metavar="DIR", help="the TBOX's state directory (default: tbox.state_dir)")
    p.add_argument("--store", metavar="DIR", help="gather from the cloud's store instead (with --vin and --key)")
    p.add_argument("--vin", help="--store: the vehicle")
    p.add_argument("--key", metavar="PEM", help="making: the signing key (default: tbox.cloud.report_key); "
                   "--verify: the signer's public key")
    p.add_argument("--vehicle-key", metavar="PUB", help="--verify a pack from the cloud's store: the vehicle's report "
                   "public key, every report's signature checked")
    p.add_argument("--out", metavar="FILE", help="the pack (default: evidence-CAMPAIGN.tar.gz)")
    p.add_argument("--json", action="store_true", help="--verify: print the result as JSON")
    p.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)


def _init(sub: Any) -> None:
    """``vota init``."""
    p = sub.add_parser("init", help="write a starter vehicle configuration, its keys and the examples",
                       description="Write DIR/vehicle.yaml (the bench vehicle, or --kind vcan: on SocketCAN), the keys it "
                       "names (DIR/keys), and DIR/examples (Mosquitto, systemd units, content). Run the commands from DIR. "
                       "Exit 0 when written, 2 when DIR/vehicle.yaml exists (without --force) or DIR cannot be written.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--kind", choices=("bench", "vcan"), default="bench",
                   help="bench: udp_multicast, runs anywhere; vcan: SocketCAN vcan0, vcan1, vcan2 (default: bench)")
    p.add_argument("--force", action="store_true", help="write over DIR/vehicle.yaml and its keys")
    p.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)


def _fleet(sub: Any) -> None:
    """``vota fleet``."""
    p = sub.add_parser("fleet", help="fleet failure analytics over a cloud store",
                       description="What failed across a fleet: every failed campaign in a collector's store diagnosed.")
    fsub = p.add_subparsers(dest="fleet_command", metavar="ACTION")
    fsub.required = True
    k = fsub.add_parser("diagnose", help="diagnose every failed campaign of every vehicle, on every core",
                        description="Diagnose what is new in STORE (a collector's store of <VIN>/messages and <VIN>/traces, "
                        "or any tree holding such directories) in a process pool or on a Dask cluster; append one row per "
                        "failed campaign to OUT/findings.jsonl and one per finished campaign to OUT/campaigns.jsonl, write "
                        "OUT/waiting.jsonl (campaigns waiting for their preconditions), the same tables as Parquet (with "
                        "pyarrow), OUT/summary.md and OUT/summary.html (counts and rates per campaign, unit, cause, step, "
                        "NRC, ECU, clusters, per day, deferrals; charts). Exit 0 when it ran, 1 when the Dask scheduler "
                        "cannot be reached, 2 on bad input.")
    k.add_argument("store", metavar="STORE")
    k.add_argument("--out", required=True, metavar="DIR", help="where the tables, the summaries and done.json go")
    k.add_argument("--workers", type=int, default=0, metavar="N",
                   help="worker processes (default: every core; with --dask local: the LocalCluster's workers)")
    k.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="run on a dask.distributed scheduler (tcp://host:8786), or 'local' for a LocalCluster of worker "
                   "processes here (needs the fleet extra: pip install 'vota[fleet]')")
    k.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)


def _ecu_sim(sub: Any) -> None:
    """``vota ecu-sim``."""
    p = sub.add_parser(
        "ecu-sim",
        help="run simulated ECUs (UDS servers) until stopped",
        description="Run one or more simulated ECUs, each a UDS server over ISO-TP on its own addresses. "
        "Stops on SIGINT/SIGTERM.",
    )
    _add_common(p)
    p.add_argument("--ecu", action="append", metavar="NAME", help="ECU to simulate (repeatable; default: every configured ECU)")
    p.add_argument("--state-dir", metavar="DIR", help="where the flash banks live (default: each ECU's sim.state_dir)")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault, e.g. bms:36#5:nrc=0x72 (docs/fault-injection.md)")


def _flash(sub: Any) -> None:
    """``vota flash``."""
    p = sub.add_parser(
        "flash",
        help="flash ECUs with new images (gateway side)",
        description="Run the UDS programming sequence against each named ECU; write per-ECU results and "
        "header-only flash traces.",
    )
    _add_common(p)
    p.add_argument("images", nargs="+", metavar="ECU=IMAGE[@VERSION]",
                   help="image file for an ECU; VERSION defaults to the file name without suffix")
    p.add_argument("--out", metavar="DIR", help="directory for results and traces (default: gateway.results_dir/<time>)")
    p.add_argument("--no-progress", action="store_true", help="do not show progress")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a client-side fault into the gateway's flashing, e.g. vcu:36#3:skip_counter (docs/fault-injection.md)")
    p.add_argument("--delta-from", action="append", default=[], metavar="ECU=OLD_IMAGE",
                   help="send ECU a delta from OLD_IMAGE (the image it runs) to its new image, the full image "
                        "when the ECU does not run OLD_IMAGE or takes no deltas (repeatable)")
    p.add_argument("--image-key", action="append", default=[], metavar="ECU=KEY[@N]", help=IMAGE_KEY_HELP)
    _capture(p)


def _versions(sub: Any) -> None:
    """``vota versions``."""
    p = sub.add_parser(
        "versions",
        help="read the identification of every ECU (version collection)",
        description="Read part number, software version, serial, supplier software and bootloader version of each ECU.",
    )
    _add_common(p)
    p.add_argument("--ecu", action="append", metavar="NAME", help="ECU to read (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _gateway(sub: Any) -> None:
    """``vota gateway``."""
    p = sub.add_parser(
        "gateway",
        help="run the gateway daemon (deploy server on the TBOX link)",
        description="Run the gateway as a daemon: it receives upgrade packages from the TBOX over ISO-TP/UDS "
        "(RequestFileTransfer, TransferData, RequestTransferExit). Stops on SIGINT/SIGTERM.",
    )
    _add_common(p)
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault: deploy-stage server faults into the deploy server (deploy:GW:36#5:nrc=0x72), "
                   "flash-stage client faults into the flashing (vcu:36#3:skip_counter); see docs/fault-injection.md")
    _capture(p)


def _tbox(sub: Any) -> None:
    """``vota tbox``."""
    p = sub.add_parser(
        "tbox",
        help="run the TBOX daemon (campaigns from the cloud, download, deploy, install, reports)",
        description="Run the TBOX as a daemon: take signed campaigns over MQTT, download and verify the packages, "
        "deploy them to the gateway, trigger the install, and report results and traces through the "
        "store-and-forward outbox. SIGTERM checkpoints the current step and exits.",
    )
    _add_common(p)
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a client-side fault into the TBOX's deploys, e.g. deploy:vcu-2.0.bin:36#3:not_sent")
    p.add_argument("--clock", metavar="TIME",
                   help="run the content schedule on a simulated clock that starts at TIME "
                   "(ISO 8601 with offset, e.g. 2026-05-20T18:30:00+08:00); benches and tests only")
    p.add_argument("--clock-rate", type=float, default=1.0, metavar="N",
                   help="simulated seconds per real second for --clock (default: 1)")
    _capture(p)


def _deploy(sub: Any) -> None:
    """``vota deploy``."""
    p = sub.add_parser(
        "deploy",
        help="deploy upgrade packages to the gateway (TBOX side)",
        description="Send package files to the gateway's deploy server as deploy data packets; write per-package "
        "deploy results and header-only deploy traces.",
    )
    _add_common(p)
    p.add_argument("packages", nargs="+", metavar="FILE[=NAME]", help="package file, stored on the gateway as NAME (default: file name)")
    p.add_argument("--sha256", action="append", default=[], metavar="HEX",
                   help="the package's SHA-256 as the campaign declares it (default: computed from the file); repeat per package")
    p.add_argument("--resume", action="store_true", help="continue interrupted deploys (RequestFileTransfer ResumeFile)")
    p.add_argument("--out", default="var/tbox/deploy", metavar="DIR",
                   help="directory for deploy results and traces (default: var/tbox/deploy)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="do not show progress")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a client-side fault into the deploy, e.g. deploy:vcu.bin:36#3:bad_length (docs/fault-injection.md)")
    p.add_argument("--keep-going", action="store_true", help="deploy the other packages after one failed (benches)")
    _capture(p)


def _campaign(sub: Any) -> None:
    """``vota campaign``."""
    p = sub.add_parser(
        "campaign",
        help="make keys, sign, verify, export and import upgrade campaigns",
        description="Campaign tools: keygen writes an Ed25519 key pair, sign wraps a campaign JSON in a signed "
        "envelope, verify checks an envelope as a vehicle would, keys makes a signed key list (rotation, revocation, "
        "thresholds), export writes a campaign and its packages to removable media, import hands such media to the "
        "vehicle's TBOX.",
    )
    csub = p.add_subparsers(dest="campaign_command", metavar="ACTION")
    csub.required = True
    k = csub.add_parser("keygen", help="write an Ed25519 signing key and its public key")
    k.add_argument("--out", default="keys", metavar="DIR", help="directory for NAME.key and NAME.pub (default: keys)")
    k.add_argument("--name", default="signing", help="file name: signing (default), root, report (a vehicle's report key)...")
    k = csub.add_parser("sign", help="sign a campaign JSON file")
    k.add_argument("campaign", metavar="CAMPAIGN.json")
    k.add_argument("--key", action="append", required=True, metavar="PEM",
                   help="Ed25519 private key (PEM); repeat for a campaign that needs several signatures")
    k.add_argument("--out", metavar="FILE", help="signed envelope (default: standard output)")
    k = csub.add_parser("verify", help="verify a signed campaign as a vehicle would")
    k.add_argument("envelope", metavar="SIGNED.json")
    k.add_argument("--trusted", action="append", required=True, metavar="PEM", help="trusted public key (repeatable)")
    k.add_argument("--threshold", type=int, default=1, metavar="N", help="distinct trusted keys that must sign (default 1)")
    k.add_argument("--vin", required=True, help="this vehicle's VIN")
    k.add_argument("--installed", action="append", default=[], metavar="ECU=VERSION", help="installed version (anti-rollback)")
    k = csub.add_parser("keys", help="make and sign a key list: the keys and threshold of each role (vehicles take "
                        "it when the current root keys signed it and its version is higher)")
    k.add_argument("--version", type=int, required=True, metavar="N", help="the list's version (higher than the vehicle's)")
    for role, what in (("root", "signs key lists"), ("campaign", "signs campaigns"), ("content", "signs content bundles")):
        k.add_argument(f"--{role}", action="append", required=True, metavar="PUB", help=f"public key that {what} (repeatable)")
        k.add_argument(f"--{role}-threshold", type=int, default=1, metavar="N", help=f"{role} signatures needed (default 1)")
    k.add_argument("--key", action="append", required=True, metavar="PEM",
                   help="root private key to sign with (repeat: a threshold of the current and of the new root keys)")
    k.add_argument("--valid-days", type=float, default=90.0, metavar="DAYS",
                   help="days until the list expires: vehicles then refuse campaigns (keys_expired) until a newer "
                        "list comes; 0: never (default 90)")
    k.add_argument("--out", metavar="FILE", help="signed key list (default: standard output)")
    k = csub.add_parser("export", help="write a signed campaign and its packages to a directory (a USB stick) for "
                        "vota campaign import")
    k.add_argument("envelope", metavar="SIGNED.json")
    k.add_argument("--packages", required=True, metavar="DIR", help="directory with the campaign's package files")
    k.add_argument("--out", required=True, metavar="DIR", help="the directory to write (the stick's mount point)")
    k = csub.add_parser("import", help="hand the campaign on a directory (a mounted stick) to this vehicle's TBOX: "
                        "verified as an online campaign, its results reported when the vehicle is next online")
    k.add_argument("media", metavar="DIR", help="directory written by vota campaign export")
    k.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"vehicle configuration YAML (default: {DEFAULT_CONFIG})")
    k.add_argument("--wait", type=float, default=0.0, metavar="S",
                   help="wait up to S seconds for the campaign to end and exit with its outcome (0 success, 1 not)")
    for k in csub.choices.values():
        k.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)


def _content(sub: Any) -> None:
    """``vota content``."""
    p = sub.add_parser(
        "content",
        help="custom service content: the trust platform's tools, and the vehicle's list/show/accept/decline",
        description="Owner-customised content bundles. The trust platform's tools: keygen writes a vehicle's X25519 "
        "key pair, build packs a bundle from a spec (encrypting the items marked encrypt for a vehicle), sign signs "
        "its manifest, verify checks a bundle as the vehicle would. On the vehicle: list and show what the TBOX was "
        "offered and runs, accept and decline items (the running TBOX applies the choice and reports it).",
    )
    csub = p.add_subparsers(dest="content_command", metavar="ACTION")
    csub.required = True
    k = csub.add_parser("keygen", help="write a vehicle's X25519 key pair (vehicle.key, vehicle.pub)")
    k.add_argument("--out", default="keys", metavar="DIR")
    k = csub.add_parser("build", help="build an unsigned bundle from a spec (YAML or JSON)")
    k.add_argument("spec", metavar="SPEC.yaml", help="manifest fields; each item names its file with 'source'")
    k.add_argument("--vehicle-key", metavar="PEM", help="the vehicle's X25519 public key, for items marked encrypt")
    k.add_argument("--vin", help="the vehicle the encrypted items are for")
    k.add_argument("--out", required=True, metavar="BUNDLE.tar")
    k = csub.add_parser("review", help="the trust platform's review of a content spec (exit 1 with the problems)")
    k.add_argument("spec", metavar="SPEC.yaml")
    k.add_argument("--at", metavar="TIME", help="review as of this time (ISO 8601 with offset; default: now)")
    k = csub.add_parser("sign", help="sign a bundle's manifest (adds to the signatures already there)")
    k.add_argument("bundle", metavar="BUNDLE.tar")
    k.add_argument("--key", action="append", required=True, metavar="PEM",
                   help="the trust platform's Ed25519 private key (repeatable)")
    k.add_argument("--out", required=True, metavar="SIGNED.tar")
    k = csub.add_parser("verify", help="verify a bundle as the vehicle would")
    k.add_argument("bundle", metavar="SIGNED.tar")
    k.add_argument("--trusted", action="append", required=True, metavar="PEM")
    k.add_argument("--threshold", type=int, default=1, metavar="N", help="distinct trusted keys that must sign (default 1)")
    k.add_argument("--vin", required=True)
    k.add_argument("--installed", type=int, metavar="VERSION", help="the installed version of this bundle id")
    k = csub.add_parser("list", help="on the vehicle: the offered and installed content and each item's state")
    _add_common(k)
    k.add_argument("--json", action="store_true", help="print JSON instead of a table")
    k = csub.add_parser("show", help="on the vehicle: one bundle's items, classes, targets, policies and schedule")
    _add_common(k)
    k.add_argument("bundle_id")
    k = csub.add_parser("import", help="on the vehicle: hand a signed bundle archive to the TBOX (a workshop, a bench "
                        "without a cloud); it is verified as a whole and run as if the owner had requested it")
    _add_common(k)
    k.add_argument("bundle", metavar="SIGNED.tar")
    k = csub.add_parser("bind", help="on the vehicle: bind an app for automatic or manual updates (C5)")
    _add_common(k)
    k.add_argument("app", metavar="APP_ID")
    mode = k.add_mutually_exclusive_group(required=True)
    mode.add_argument("--auto", dest="auto_update", action="store_true", help="update without asking")
    mode.add_argument("--manual", dest="auto_update", action="store_false", help="wait for the owner's confirmation")
    for name, what in (("accept", "confirm a manual item, or ask for one set never to download"),
                       ("decline", "decline an item (an active one is reverted)")):
        k = csub.add_parser(name, help=f"on the vehicle: {what}; the running TBOX applies it")
        _add_common(k)
        k.add_argument("bundle_id")
        k.add_argument("item", nargs="?", help=f"the item (default: every {'manual' if name == 'accept' else 'optional'} item)")
    for name, k in csub.choices.items():
        if name not in ("list", "show", "accept", "decline", "import", "bind"):
            k.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)


def _diagnose(sub: Any) -> None:
    """``vota diagnose``."""
    p = sub.add_parser(
        "diagnose",
        help="find the root cause of a failed upgrade from its results and header-only traces",
        description="Analyse the results and traces of one campaign (a bench --out directory, a TBOX campaign "
        "directory, or any directory of results and traces): which package failed, in which stage, which side "
        "and unit, which cause, where. Prints a Markdown report. Exit 0 when the analysis ran (whatever it "
        "found), 2 when the input or the rules cannot be read.",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--mode", choices=("first", "all"), default="first",
                   help="first: stop at the first failed check (default); all: report every failure")
    p.add_argument("--json", metavar="FILE", help="also write the verdict as JSON (schema vota-diagnosis/1); - for stdout")
    p.add_argument("--rules", metavar="YAML", help="validation data and cause mapping (default: the rules shipped with vota, "
                   "agent/core/diagnosis/rules.yaml)")
    p.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)


def _bench(sub: Any) -> None:
    """``vota bench``."""
    p = sub.add_parser(
        "bench",
        help="run a whole simulated vehicle and a stand-in cloud through one campaign",
        description="Start an MQTT broker (Mosquitto with the shipped per-vehicle ACLs where it is installed, else the "
        "embedded one; or use --broker), one ECU simulator per ECU, the gateway and the "
        "TBOX as separate processes; play the cloud: publish a signed campaign, follow it, collect results and "
        "traces, write DIR/report.json. Exit 0 when the campaign succeeded, 1 when it failed, 2 on bad usage.",
    )
    _add_common(p)
    p.add_argument("--out", default="out/bench", metavar="DIR", help="report directory (default: out/bench)")
    p.add_argument("--broker", metavar="URL", help="use this MQTT broker (mqtt://[user:password@]host:port; the cloud's "
                   "login) instead of starting one; 'embedded': the embedded amqtt broker even where Mosquitto is installed")
    p.add_argument("--mqtt-version", choices=("5", "3.1.1"), default="5", help="MQTT version with --broker (default 5)")
    p.add_argument("--image-size", type=_size, default=256 * 1024, metavar="BYTES",
                   help="size of each generated package, e.g. 1M or 262144 (default: 256K)")
    p.add_argument("--ecu", action="append", metavar="NAME", help="ECU to update (repeatable; default: all)")
    p.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault where it belongs: flash/server -> ECU simulators, flash/client and "
                   "deploy/server -> gateway, deploy/client -> TBOX (docs/fault-injection.md)")
    p.add_argument("--version", dest="image_version", default="2.0.0", help="version of the new software (default: 2.0.0)")
    p.add_argument("--image-kind", choices=("random", "firmware"), default="random",
                   help="random images (incompressible), or firmware-like ones: a real compiled binary (PyYAML's C "
                        "extension), which ECUs configured with `compression` receive compressed (default: random)")
    p.add_argument("--timeout", type=_seconds, default=600.0, help="seconds to wait for the campaign (default 600)")
    p.add_argument("--doip", action="store_true",
                   help="the DoIP variant: the gateway a DoIP entity on loopback and the deploy link over it "
                   "(deploy.transport doip); the ECUs stay on CAN (docs/doip.md)")
    p.add_argument("--content", metavar="SPEC.yaml",
                   help="run an owner-content scenario instead of the campaign: the cloud reviews, signs and offers the "
                   "content spec (as vota content build reads it), the owner requests it, the TBOX runs it on a "
                   "simulated clock that covers its schedule in about --content-seconds")
    p.add_argument("--content-seconds", type=float, default=20.0, metavar="S",
                   help="real seconds the content's schedule is compressed into (default 20)")
    _capture(p, bench=True)
