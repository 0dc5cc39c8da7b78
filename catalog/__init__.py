"""What is confidential, and at what price.

``catalog`` polls the upstream's model list, keeps only rows that carry
``confidential_compute: true``, marks prices up into integer micro-USD, and
answers the gate's one question — *may this model id be served?* — from a
cache that refuses to answer once it is older than its staleness bound.
"""
