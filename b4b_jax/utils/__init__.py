"""Small helpers shared by every job: metrics, progress, checkpoints, workdirs, multi-device set-up."""
