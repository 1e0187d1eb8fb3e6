"""Files: the lowbit directory format, atomic writes, text sources, interop with other formats."""
