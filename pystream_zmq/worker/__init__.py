"""A worker process: the loop that runs a unit's stages between its sockets, started by the
orchestrator or standalone by ``pystream-worker``."""
