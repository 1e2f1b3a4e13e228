"""Kernel selection, autograd / custom-op registration, compile capture and runtime glue."""
