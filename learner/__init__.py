"""The learner service: learns TTFT online from telemetry and publishes model snapshots."""
