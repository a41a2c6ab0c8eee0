"""Scale-out on Ray Serve: one endpoint, N replicas, requests routed to the replica that already
holds their adapter (Ray Serve model multiplexing keyed by the adapter).

`build_app(...)` is the application for `serve.run`/`serve run`/`serve deploy`;
`loraserve serve-ray` runs it from the command line. Needs the `ray` extra
(`pip install loraserve[ray]`); nothing outside this package imports Ray.
"""

from loraserve.distributed.app import build_app

__all__ = ["build_app"]
