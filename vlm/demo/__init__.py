"""The embedded demo: teach the self-trained tiny base a task it does not know, on a 4-bit base."""
