"""The data plane, seen read-only from the proxy: guest memory mapped read-only (`memory`), the rings followed
from the messages and sampled (`rings`), the sample records (`sample`), what is in flight (`inflight`), and the
kick/call eventfds relayed and counted (`notify`). Never writes guest memory."""
