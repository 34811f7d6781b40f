"""The vmig guest: a small bare-metal program that dirties and checks its memory.

Its source lives in `src/` (GNU assembler for the real-mode and Multiboot starts,
freestanding C for the rest); `build.py` turns it into a flat binary that is also a
Multiboot kernel; `layout.py` is the one place where the guest-physical memory map
and the config/status page layouts are defined (the C header is generated from it);
`cmdline.py` writes the command line that carries the guest's parameters; `status.py`
reads the status page and runs the self-check over any way of reading guest memory.
"""
