"""`vhusniff fuzz`: structure-aware fuzzing of a real vhost-user peer from a seed capture, on replay's scripted
peers and the session core (no receive/frame/dispatch loop of its own).

`mutate` makes cases (the seed's messages and grammar-driven mutations), `target` runs the fuzzed process and
plays one case against it, `campaign` draws, plays and records cases, `triage` tells crashes apart, minimises
them and writes reproducers that `vhusniff replay` plays, `reverse` fuzzes a front-end as a back-end.
"""
