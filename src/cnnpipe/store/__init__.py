"""Everything cnnpipe stores under .cnnpipe-cache/: finished runs, run states, stage outputs; keys and code identity."""
