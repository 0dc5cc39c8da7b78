"""Egress host policy and CA: which destinations are LLM APIs, and the certificate authority
that lets the egress listener read their TLS. Plain data and crypto, no mitmproxy: the egress
addons in ``teegate.addons`` apply them to flows; configuration and the CLI use them directly.
"""
