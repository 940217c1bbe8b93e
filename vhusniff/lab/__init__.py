"""Real peers for the lab and the tests: QEMU, qemu-storage-daemon, dpdk-testpmd, the guest kit (peers), and
`vhusniff lab`, the proxy between a throwaway real QEMU and a real back-end (command)."""
