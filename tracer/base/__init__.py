"""Plain helpers every layer uses: errors, safe output files, sizes and the page size, private state.
Imports nothing of luotrace."""
