"""The command-line options of the data plane, shared by `vhusniff proxy` and `vhusniff lab`."""
from __future__ import annotations

import argparse

from .rings import SAMPLE_INTERVAL_DEFAULT


def add_data_plane_arguments(parser: argparse.ArgumentParser) -> None:
    """--rings, --rings-interval, --notifications: for proxy and lab alike."""
    parser.add_argument("--rings", action="store_true",
                        help="map guest memory read-only and sample every running ring (avail/used indexes, in "
                             "flight) when it starts and stops and periodically; recorded as ring events "
                             "(`vhusniff rings CAPTURE`)")
    parser.add_argument("--rings-interval", type=float, default=SAMPLE_INTERVAL_DEFAULT, metavar="SECONDS",
                        help=f"seconds between ring samples (default {SAMPLE_INTERVAL_DEFAULT})")
    parser.add_argument("--notifications", action="store_true",
                        help="relay each ring's kick and call eventfds through the proxy's and count them "
                             "(in the ring samples)")


def data_plane_options(parser: argparse.ArgumentParser, args) -> dict:
    if args.rings_interval <= 0:
        parser.error("--rings-interval must be above 0")
    return {"rings": args.rings, "rings_interval": args.rings_interval, "notifications": args.notifications}
