"""Small helpers shared by several subsystems."""
