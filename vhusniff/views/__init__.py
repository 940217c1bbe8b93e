"""How records look to people and tools: summary lines and field trees, display filters, the fast `read`
path, the SVG timeline and the generated Wireshark dissector."""
