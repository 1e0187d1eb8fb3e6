"""The deployment planner and the device catalog."""
