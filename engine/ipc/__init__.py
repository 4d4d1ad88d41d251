"""The HTTP front and the engine core process: their messages and their sockets."""
