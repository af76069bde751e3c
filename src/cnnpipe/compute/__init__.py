"""Where and how runs compute: the device, torch threads, the executors, the machine's compute turn."""
