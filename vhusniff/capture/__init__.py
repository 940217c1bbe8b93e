"""Captures: the pcapng writer and reader (format 2, reading format 1 too) and the one migration of
format-1 event notes to event kinds (compat)."""
