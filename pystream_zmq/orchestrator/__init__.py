"""The orchestrator of a parallel pipeline: it launches the workers a plan describes, feeds
the first stage, collects the outputs, supervises, drains and shuts down."""
