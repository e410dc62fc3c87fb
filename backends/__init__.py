"""hal.backends: the built-in backends (cpu, cuda, rocm; gpu is their shared launch glue, sim the host
emulator), each registered through the `hal.plugins` entry point exactly like a vendor's plugin.

To list backends, call `hal.list_backends()`.
"""
