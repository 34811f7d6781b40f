"""The vmig guest: a small bare-metal program that dirties and checks its memory.

Its source lives in `src/` (GNU assembler for the real-mode start, freestanding C
for the rest); `build.py` turns it into a flat binary; `layout.py` is the one
place where the guest-physical memory map and the config/status page layouts
are defined (the C header is generated from it).
"""
