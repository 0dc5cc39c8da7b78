"""teegate: wiring (configuration, command line, process start-up).

The request path lives in ``addons/``, what counts as confidential in
``catalog/``, money in ``ledger/``. This package only puts them together.
"""
