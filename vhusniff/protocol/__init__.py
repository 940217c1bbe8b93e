"""The protocol, declared once: the catalogue (requests, feature bits, reply and fd rules), the construct
grammar of every payload, incremental framing, and the per-connection decoding context.

Everything else in vhusniff derives its protocol knowledge from here; nothing here does I/O.
"""
