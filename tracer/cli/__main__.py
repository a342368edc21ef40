"""`python -m tracer.cli`: the same command as the installed `luotrace`."""
from tracer.cli.commands import main

main()
