"""The command-line tools: ``pystream`` (profiles, procfile, keys) and ``pystream-worker``."""
