"""eBPF programs for the data path, generated as bytecode in Python.

DESIGN places the eBPF programs here. Rather than compiling C with clang and
loading it with libbpf, each program (``steering``, ``intercept``) is
assembled from a few instruction helpers (``asm``), and it and the maps it
reads are handed to the kernel with the bare ``bpf()`` system call
(``syscall``): no clang, libbpf or BTF is needed at build time or at runtime.
"""
