"""The run-directory wing: creating and logging a run directory (runlog), its lock (lock), checkpoints (checkpoint), resuming (resume), and write fault injection for tests (failpoints)."""
