"""The admin listener: Prometheus metrics, health checks and the operator's JSON API.

An aiohttp server on its own address (``[admin] listen``, default ``127.0.0.1:8082``), run on
the gateway's event loop beside mitmproxy but outside its addon chain: nothing it serves can
reach the upstream, and no admin request is ever judged by the request path.

- :mod:`.server` starts and stops it and mounts the routes;
- :mod:`.metrics` the scrape (request-path counters from :class:`teegate.addons.metrics.Meter`
  plus gauges read at scrape time);
- :mod:`.health` ``/healthz`` and ``/readyz``;
- :mod:`.api` the admin API (``/admin/v1/...``), every write through the ledger's own
  operations (:class:`teegate.ledger.Ledger`, the same :class:`~teegate.ledger.Store` methods
  the command line calls);
- :mod:`.envelope` errors in the API's OpenAI envelope, and the bearer-token check.

The web dashboard (:mod:`teegate.dashboard`) is mounted on the same application at
``/dashboard/`` (:func:`.server.build_app`).
"""
