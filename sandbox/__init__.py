"""The sandbox upstream: a simulated confidential OpenAI-compatible API, run as its own process.

It stands in for the real upstream in tests and benchmarks (``python -m teegate.sandbox``). It
shares no code with the gateway on purpose: if both sides used one parser, a bug in it would be
invisible.
"""
