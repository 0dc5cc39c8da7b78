"""The operator dashboard: a small web UI on the admin listener (``/dashboard/``).

No build step and no separate server: plain HTML, vanilla JavaScript modules and one
vendored chart library (Chart.js, MIT, ``static/chart.umd.min.js``) served by the admin
listener's aiohttp application (:mod:`.app`), reading and writing through the admin API's own
handlers. Sign-in with an admin token gives the operator pages (overview with live charts,
accounts and keys, attestation, recent refusals); sign-in with an API key gives that key's
own account, read-only (:mod:`.views`). Sessions and CSRF tokens: :mod:`.sessions`.
"""
