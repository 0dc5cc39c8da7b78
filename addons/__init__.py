"""The request path: mitmproxy addons, one concern each, in hook order.

``chain()`` lists them in the order mitmproxy must call them; see
``teegate.runner`` for how they are mounted.
"""
