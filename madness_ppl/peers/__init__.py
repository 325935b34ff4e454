"""Peer deblenders run the way their documentation recommends, for side-by-side comparisons.

Each peer is imported lazily and is an optional dependency (``pip install madness_ppl[bench]``):
:func:`madness_ppl.peers.scarlet2.run_scarlet2`.
"""
