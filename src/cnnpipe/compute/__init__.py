"""Where and how runs compute: the device, torch threads, the run/thread plan, the Ray connection, the compute turn."""
