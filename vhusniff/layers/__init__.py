"""scapy layers generated from the grammar (packets), and scapy's reading of vhusniff captures (pcap).

Imported only on demand: `import vhusniff` never imports scapy.
"""
