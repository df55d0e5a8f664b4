"""What travels between processes: the codec, the envelope and control vocabulary, sockets
and their inputs/outputs, and CURVE security."""
